"""Turns a `SchedulerOutput` into flat tensors, runs the model once, and samples."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from raylight.kernels.attention import CommonAttentionMetadata
from raylight.workers.kv_cache_manager import KVCacheManager
from raylight.workers.request import Request
from raylight.workers.sampler import Sampler
from raylight.workers.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attn_backend, kv_caches: list[torch.Tensor],
                 kv: KVCacheManager, device: torch.device, seed: int = 0):
        self.model = model
        self.attn_backend = attn_backend
        self.kv_caches = kv_caches
        self.kv = kv
        self.block_size = kv.block_size
        self.device = device
        self.sampler = Sampler(device, seed)
        self.generators: dict[str, torch.Generator] = {}

    def generator_for(self, req: Request) -> Optional[torch.Generator]:
        seed = req.sampling_params.seed
        if seed is None or req.sampling_params.greedy:
            return None
        g = self.generators.get(req.request_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seed % 2**64)
            self.generators[req.request_id] = g
        return g

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, int]:
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

        # Only requests that reach the end of their known tokens sample this step.
        samples = [i for i, r in enumerate(reqs) if seq_lens[i] == r.num_tokens]
        logits_indices = query_start_loc[1:][samples] - 1

        dev = self.device
        common = CommonAttentionMetadata(
            num_decodes=num_decodes, query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_tables=block_tables, slot_mapping=torch.from_numpy(slot_mapping).to(dev),
        )
        attn_meta = self.attn_backend.build(common)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, torch.from_numpy(positions).to(dev), self.kv_caches, attn_meta)
        if not samples:
            return {}
        logits = self.model.compute_logits(hidden[torch.from_numpy(logits_indices).to(dev)])
        sample_reqs = [reqs[i] for i in samples]
        token_ids_out = self.sampler(
            logits, [r.sampling_params for r in sample_reqs], [self.generator_for(r) for r in sample_reqs]
        ).tolist()  # the one host sync of the step
        return {r.request_id: t for r, t in zip(sample_reqs, token_ids_out)}
