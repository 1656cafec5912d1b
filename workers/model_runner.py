"""Turns a `SchedulerOutput` into flat tensors, runs the model once, and samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from raylight.kernels.attention import CommonAttentionMetadata
from raylight.workers.kv_cache_manager import KVCacheManager
from raylight.workers.request import Request
from raylight.workers.sampler import Sampler
from raylight.workers.sampling_state import SampleRow, SamplingState
from raylight.workers.scheduler import SchedulerOutput


@dataclass
class SampledToken:
    token_id: int
    logprob: Optional[float] = None  # raw logprob of the token (when the request asked for logprobs)
    rank: Optional[int] = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class PromptLogprob:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class ModelRunnerOutput:
    # request id -> its sampled token; n tokens (the request's own, then its forks') on a fork step
    sampled: dict[str, list[SampledToken]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PromptLogprob]] = field(default_factory=dict)

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attn_backend, kv_caches: list[torch.Tensor],
                 kv: KVCacheManager, device: torch.device, seed: int = 0, graphs=None):
        self.model = model
        self.graphs = graphs  # a CudaGraphRunner for decode-only steps, or None (eager)
        self.attn_backend = attn_backend
        self.kv_caches = kv_caches
        self.kv = kv
        self.block_size = kv.block_size
        self.device = device
        self.sampler = Sampler(device, seed)
        self.sampling = SamplingState(model.config.vocab_size, device)

    def release(self, seq_id: str) -> None:
        self.sampling.release(seq_id)

    PROMPT_LOGPROBS_CHUNK = 256  # rows of [rows, vocab] logits materialised at once

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        copies = self.kv.take_pending_copies()
        if copies:  # forked sequences' private copies of a shared, partly filled block
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            for cache in self.kv_caches:
                cache[dst] = cache[src]
        # Decodes (one query token) first: attention batches them in one call.
        order = sorted(range(len(sched.requests)), key=lambda i: sched.num_scheduled_tokens[i] != 1)
        reqs = [sched.requests[i] for i in order]
        num_new = np.array([sched.num_scheduled_tokens[i] for i in order], dtype=np.int64)
        num_computed = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
        num_decodes = int((num_new == 1).sum())

        token_ids: list[int] = []
        for r, c, n in zip(reqs, num_computed.tolist(), num_new.tolist()):
            token_ids.extend(r.all_token_ids[c : c + n])
        query_start_loc = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])
        seq_lens = num_computed + num_new
        total = int(query_start_loc[-1])
        req_idx = np.repeat(np.arange(len(reqs)), num_new)
        positions = num_computed[req_idx] + (np.arange(total) - query_start_loc[req_idx])

        tables = [self.kv.req_block_ids[r.request_id] for r in reqs]
        block_tables = np.zeros((len(reqs), max(len(t) for t in tables)), dtype=np.int64)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        bs = self.block_size
        slot_mapping = block_tables[req_idx, positions // bs] * bs + positions % bs

        dev = self.device
        if (self.graphs is not None and num_decodes == len(reqs)
                and self.graphs.can_run(len(reqs), block_tables.shape[1])):
            hidden = self.graphs.run(np.array(token_ids, dtype=np.int64), positions, seq_lens, block_tables,
                                     slot_mapping)
        else:
            common = CommonAttentionMetadata(
                num_decodes=num_decodes, query_start_loc=query_start_loc, seq_lens=seq_lens,
                block_tables=block_tables, slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            )
            attn_meta = self.attn_backend.build(common)
            input_ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
            hidden = self.model(input_ids, torch.from_numpy(positions).to(dev), self.kv_caches, attn_meta)

        out = ModelRunnerOutput()
        for i, r in enumerate(reqs):
            if r.needs_prompt_logprobs:
                out.prompt_logprobs[r.request_id] = self._prompt_logprobs(
                    r, hidden, int(query_start_loc[i]), int(num_computed[i]), int(num_new[i]))

        # Requests that reach the end of their known tokens sample; a request about to fork
        # samples its n first tokens from the same logits row.
        rows: list[SampleRow] = []
        hidden_rows: list[int] = []
        for i, r in enumerate(reqs):
            if seq_lens[i] != r.num_tokens:
                continue  # a chunk of a prompt: nothing to sample yet
            n_out = len(r.output_token_ids)
            rows.append(SampleRow(r, r.request_id, r.sampling_params, n_out))
            rows.extend(SampleRow(r, fid, fp, n_out) for fid, fp in zip(r.fork_ids, r.fork_params))
            hidden_rows.extend([int(query_start_loc[i + 1]) - 1] * r.num_seqs)
        if not rows:
            return out
        logits = self.model.compute_logits(hidden[torch.tensor(hidden_rows, device=dev)])
        sampled = self.sampler(logits, self.sampling.metadata(rows))
        token_ids = sampled.token_ids.tolist()  # the step's host sync
        self.sampling.record(rows, token_ids)
        lps = ranks = top_ids = top_lps = None
        if sampled.logprobs is not None:
            lps, ranks = sampled.logprobs.tolist(), sampled.ranks.tolist()
            if sampled.top_ids is not None:
                top_ids, top_lps = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
        for j, (row, tok) in enumerate(zip(rows, token_ids)):
            s = SampledToken(tok)
            k = row.params.logprobs
            if k is not None and lps is not None:
                s.logprob, s.rank = lps[j], ranks[j]
                s.top = list(zip(top_ids[j][:k], top_lps[j][:k])) if top_ids is not None else []
            out.sampled.setdefault(row.request.request_id, []).append(s)
        return out

    def _prompt_logprobs(self, r: Request, hidden: torch.Tensor, q_start: int, computed: int, n: int):
        """Logprob of each prompt token given the ones before it, for this chunk's positions."""
        k = r.sampling_params.prompt_logprobs
        first = max(computed, r.num_prompt_logprobs - 1)  # position p predicts token p + 1
        last = min(computed + n, r.num_prompt_tokens - 1)
        results: list[PromptLogprob] = []
        for lo in range(first, last, self.PROMPT_LOGPROBS_CHUNK):
            hi = min(lo + self.PROMPT_LOGPROBS_CHUNK, last)
            rows = torch.arange(q_start + lo - computed, q_start + hi - computed, device=self.device)
            logprobs = self.model.compute_logits(hidden[rows]).log_softmax(dim=-1)
            targets = torch.tensor(r.prompt_token_ids[lo + 1 : hi + 1], device=self.device)
            chosen = logprobs.gather(1, targets[:, None])
            ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
            top = logprobs.topk(k, dim=-1) if k > 0 else None
            top_ids = top.indices.tolist() if top is not None else [[]] * (hi - lo)
            top_lps = top.values.tolist() if top is not None else [[]] * (hi - lo)
            for t, lp, rk, ti, tl in zip(targets.tolist(), chosen[:, 0].tolist(), ranks, top_ids, top_lps):
                results.append(PromptLogprob(t, lp, rk, list(zip(ti, tl))))
        r.num_prompt_logprobs = max(r.num_prompt_logprobs, last + 1)
        return results
