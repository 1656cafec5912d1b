"""Drives a prefill engine and a decode engine by hand, the way the Serve router does, for tests
and the CPU smoke of the disaggregation benchmark: decode first, then the prefill push."""

from __future__ import annotations

import dataclasses
from typing import Optional

from raylight.engine.remote_prefill import prefill_params
from raylight.messages import KVReservation
from raylight.sampling_params import SamplingParams


def drain(engine, outputs: Optional[dict] = None) -> dict:
    """Steps `engine` until it has nothing left; returns request id -> its final RequestOutput."""
    outputs = {} if outputs is None else outputs
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    return outputs


def disagg_generate(prefill, decode, prompt_ids: list[int], params: SamplingParams, request_id: str,
                    threshold: int = 1, cache_salt: Optional[str] = None, push: bool = True):
    """Reserves on `decode`, runs the prefill on `prefill` (pushing the KV) unless the reservation is
    local or `push` is False; returns (reservation, the decode engine's final output)."""
    res: KVReservation = decode.reserve_remote(prompt_ids, params, request_id, cache_salt, threshold)
    if not res.local and push:
        prefill.add_request({"prompt_token_ids": prompt_ids[: res.num_prompt_tokens - 1]},
                            prefill_params(params), f"{request_id}-prefill", cache_salt, kv_push=res.push_target())
        drain(prefill)
    return res, drain(decode).get(request_id)


def plain_generate(engine, prompt_ids: list[int], params: SamplingParams, request_id: str):
    engine.add_request(prompt_ids, dataclasses.replace(params), request_id)
    return drain(engine)[request_id]
