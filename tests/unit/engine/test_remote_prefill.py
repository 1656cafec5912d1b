"""Disaggregated prefill/decode in one process: a prefill engine pushes KV into a decode engine over
the gloo pair path; every output equals the plain engine's, and no block leaks on either side."""

from __future__ import annotations

import asyncio
import time

import pytest

from raylight.config import EngineArgs
from raylight.engine.llm_engine import LLMEngine
from raylight.sampling_params import SamplingParams
from raylight.testing.disagg import disagg_generate, drain, plain_generate
from raylight.testing.helpers import assert_no_leaks, make_random_hf_model, random_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama"))
    make_random_hf_model("llama", d)
    return d


def _args(model_dir, **kw):
    # small blocks and a small token budget: prompts span many blocks and prefill in several chunks
    return EngineArgs(**{**dict(model=model_dir, device="cpu", dtype="float32", num_kv_blocks=96, block_size=4,
                                max_num_batched_tokens=16, kv_lease_s=3.0), **kw})


@pytest.fixture(scope="module")
def engines(model_dir):
    plain = LLMEngine(_args(model_dir))
    prefill = LLMEngine(_args(model_dir, kv_role="prefill"))
    decode = LLMEngine(_args(model_dir, kv_role="decode"))
    yield plain, prefill, decode
    for e in (plain, prefill, decode):
        e.shutdown()


def _ids(out):
    return out.outputs[0].token_ids


def test_outputs_equal_the_plain_engine(engines):
    plain, prefill, decode = engines
    for i, ids in enumerate(random_prompts(4, 512, 9, 45, seed=3)):
        res, out = disagg_generate(prefill, decode, ids, GREEDY, f"eq{i}")
        assert not res.local and res.reason == "remote"
        assert _ids(out) == _ids(plain_generate(plain, ids, GREEDY, f"eq{i}"))
    m = decode.get_metrics()
    assert m["kv_remote_prefills"] >= 4 and m["kv_blocks_received"] > 0 and m["kv_bytes_received"] > 0
    assert prefill.get_metrics()["kv_blocks_sent"] >= m["kv_blocks_received"]
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_sampling_state_stays_on_the_decode_side(engines):
    """Seeded sampling, n > 1 and logprobs: the decode replica samples every token, so they match too."""
    plain, prefill, decode = engines
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, n=2, logprobs=2)
    ids = random_prompts(1, 512, 30, 30, seed=4)[0]
    _, out = disagg_generate(prefill, decode, ids, params, "seeded")
    ref = plain_generate(plain, ids, params, "seeded")
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
    for a, b in zip(out.outputs, ref.outputs):
        assert [sorted(p) for p in a.logprobs] == [sorted(p) for p in b.logprobs]


def test_decode_side_prefix_is_not_shipped(engines):
    plain, prefill, decode = engines
    head = random_prompts(1, 512, 24, 24, seed=5)[0]
    decode.add_request(head + [1, 2, 3], GREEDY, "warm")  # prefilled locally: the decode cache holds head
    drain(decode)
    ids = head + random_prompts(1, 512, 10, 10, seed=6)[0]
    before = decode.get_metrics()["kv_blocks_received"]
    res, out = disagg_generate(prefill, decode, ids, GREEDY, "prefixed")
    assert res.num_cached_tokens == 24 and not res.local
    shipped = decode.get_metrics()["kv_blocks_received"] - before
    assert shipped == -(-(len(ids) - 1) // 4) - 24 // 4  # only blocks past the cached prefix travel
    assert _ids(out) == _ids(plain_generate(plain, ids, GREEDY, "prefixed"))


def test_prefill_side_cached_prefix_is_shipped_too(engines):
    """Blocks the prefill replica had cached (never computed in a step) still reach the decode side."""
    plain, prefill, decode = engines
    head = random_prompts(1, 512, 28, 28, seed=8)[0]
    prefill.add_request(head + [7], GREEDY, "prefill-warm")
    drain(prefill)
    ids = head + random_prompts(1, 512, 9, 9, seed=9)[0]
    res, out = disagg_generate(prefill, decode, ids, GREEDY, "prefill-cached")
    assert res.num_cached_tokens == 0 and not res.local
    assert _ids(out) == _ids(plain_generate(plain, ids, GREEDY, "prefill-cached"))


def test_short_prompts_and_prompt_logprobs_prefill_locally(engines):
    plain, prefill, decode = engines
    ids = random_prompts(1, 512, 20, 20, seed=10)[0]
    res, out = disagg_generate(prefill, decode, ids, GREEDY, "short", threshold=64)
    assert res.local and res.reason == "short"
    assert _ids(out) == _ids(plain_generate(plain, ids, GREEDY, "short"))
    plp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    res, out = disagg_generate(prefill, decode, ids, plp, "plp")
    assert res.local and res.reason == "prompt_logprobs" and out.prompt_logprobs is not None
    local = decode.get_metrics()["kv_local_prefills"]
    assert local["short"] >= 1 and local["prompt_logprobs"] >= 1


def test_failed_prefill_falls_back_to_local_and_quarantines_its_blocks(engines):
    plain, prefill, decode = engines
    ids = random_prompts(1, 512, 33, 33, seed=11)[0]
    res = decode.reserve_remote(ids, GREEDY, "failed", None, 1)
    held = decode.get_metrics()
    assert held["kv_reservations_held"] == 1 and held["kv_blocks_free"] < held["kv_blocks_total"]
    decode.remote_prefill_failed(res.transfer_id, "prefill_replica_died")
    t0 = time.monotonic()
    out = drain(decode)["failed"]  # runs the request locally, then holds on until the quarantine ends
    assert _ids(out) == _ids(plain_generate(plain, ids, GREEDY, "failed"))
    assert time.monotonic() - t0 >= 2.9  # the reserved blocks were held for a lease after the failure
    m = decode.get_metrics()
    assert m["kv_handoff_failures"]["prefill_replica_died"] == 1 and m["kv_reservations_held"] == 0
    assert_no_leaks(decode)


def test_lease_expiry_falls_back(engines):
    plain, prefill, decode = engines
    ids = random_prompts(1, 512, 21, 21, seed=12)[0]
    _, out = disagg_generate(prefill, decode, ids, GREEDY, "expired", push=False)  # nobody pushes
    assert _ids(out) == _ids(plain_generate(plain, ids, GREEDY, "expired"))
    assert decode.get_metrics()["kv_handoff_failures"]["lease_expired"] >= 1
    assert_no_leaks(decode)


def test_abort_while_reserved_frees_everything(engines):
    _, prefill, decode = engines
    ids = random_prompts(1, 512, 25, 25, seed=13)[0]
    decode.reserve_remote(ids, GREEDY, "gone", None, 1)
    decode.abort_request(["gone"])
    assert decode.get_metrics()["kv_blocks_quarantined"] > 0  # a write may still land: held for a lease
    drain(decode)
    assert_no_leaks(decode)
    assert decode.get_metrics()["kv_reservations_held"] == 0


def test_unreachable_decode_endpoint_fails_the_push_not_the_prefill(engines):
    _, prefill, decode = engines
    from raylight.messages import KVPushTarget
    from raylight.testing.helpers import free_port

    ids = random_prompts(1, 512, 17, 17, seed=14)[0]
    failed = prefill.get_metrics()["kv_pushes_failed"]
    prefill.add_request(ids, GREEDY, "nowhere", kv_push=KVPushTarget(99, "127.0.0.1", free_port(), 0, list(range(5))))
    assert drain(prefill)["nowhere"].finished  # the prefill itself completes
    deadline = time.monotonic() + 30
    while prefill.get_metrics()["kv_pushes_failed"] == failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prefill.get_metrics()["kv_pushes_failed"] > failed
    assert_no_leaks(prefill)


def test_bad_push_target_is_refused(engines):
    _, prefill, _ = engines
    from raylight.messages import KVPushTarget

    with pytest.raises(ValueError, match="kv_push"):
        prefill.add_request(list(range(20)), GREEDY, "bad", kv_push=KVPushTarget(1, "127.0.0.1", 1, 0, [1, 2]))


def test_smollm2_disaggregated_equals_plain(smollm2_dir):
    base = dict(model=smollm2_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=16,
                max_num_batched_tokens=64)
    plain = LLMEngine(EngineArgs(**base))
    prefill = LLMEngine(EngineArgs(**base, kv_role="prefill"))
    decode = LLMEngine(EngineArgs(**base, kv_role="decode"))
    tok = plain.tokenizer
    try:
        for i, text in enumerate(["The capital of France is a city that", "Write a haiku about the sea and the "
                                  "wind, and about the ships that sail between the two of them at night"]):
            ids = tok(text).input_ids
            res, out = disagg_generate(prefill, decode, ids, GREEDY, f"s{i}")
            assert not res.local
            assert _ids(out) == _ids(plain_generate(plain, ids, GREEDY, f"s{i}"))
    finally:
        for e in (plain, prefill, decode):
            e.shutdown()


# ---------------------------------------------------------------- through AsyncLLMEngine, as the Serve replicas use it

def _async_pair(engines):
    from raylight.engine.async_engine import AsyncLLMEngine

    _, prefill, decode = engines
    return AsyncLLMEngine(prefill), AsyncLLMEngine(decode)


async def _disagg_stream(aprefill, adecode, ids, rid, cancel_after=None):
    """The router's flow: decode first, the prefill call beside it; returns (reservation, tokens)."""
    from raylight.messages import KVReservation

    tokens, res, prefill_task = [], None, None

    async def prefill_call(r):
        agen = aprefill.generate({"prompt_token_ids": ids[: r.num_prompt_tokens - 1]},
                                 SamplingParams(max_tokens=1, temperature=0.0), f"{rid}-p", kv_push=r.push_target())
        async for _ in agen:
            pass

    agen = adecode.generate(ids, GREEDY, rid, remote_prefill_threshold=1)
    try:
        async for item in agen:
            if isinstance(item, KVReservation):
                res = item
                if not res.local:
                    prefill_task = asyncio.ensure_future(prefill_call(res))
                if cancel_after == "reserve":
                    break
                continue
            tokens = item.outputs[0].token_ids
            if cancel_after == "token":
                break
    finally:
        await agen.aclose()  # a client that goes away: the decode request aborts
        if prefill_task is not None:
            await prefill_task
    return res, tokens


def test_async_engines_stream_and_free_everything_on_disconnect(engines):
    plain = engines[0]
    aprefill, adecode = _async_pair(engines)
    ids = random_prompts(1, 512, 37, 37, seed=15)[0]
    async def main():
        res, tokens = await _disagg_stream(aprefill, adecode, ids, "async-ok")
        assert not res.local and tokens == _ids(plain_generate(plain, ids, GREEDY, "async-ok"))
        for stage in ("reserve", "token"):  # a client gone while the KV travels, and while decoding
            await _disagg_stream(aprefill, adecode, ids[:-3], f"async-{stage}", cancel_after=stage)
        deadline = time.monotonic() + 15
        while (adecode.engine.get_metrics()["kv_reservations_held"] or adecode.engine.has_unfinished_requests()) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    try:
        asyncio.run(main())
        for eng in (adecode.engine, aprefill.engine):
            assert_no_leaks(eng)
        assert adecode.engine.get_metrics()["kv_reservations_held"] == 0
        assert adecode.dead is None and aprefill.dead is None
    finally:
        aprefill.shutdown()
        adecode.shutdown()
