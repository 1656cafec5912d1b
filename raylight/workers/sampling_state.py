"""Per-request sampling state that lives across steps (generators, penalty counts), and the
assembly of one step's `SamplingMetadata` from the rows that sample."""

from __future__ import annotations

from typing import Optional

import torch

from raylight.messages import SampleRow
from raylight.workers.sampler import SamplingMetadata


class SamplingState:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.output_counts: dict[str, torch.Tensor] = {}  # seq_id -> [V] float
        self.prompt_masks: dict[str, torch.Tensor] = {}  # seq_id -> [V] bool
        self.allowed_masks: dict[str, torch.Tensor] = {}  # seq_id -> [V] bool: its allowed_token_ids

    def release(self, seq_id: str) -> None:
        self.generators.pop(seq_id, None)
        self.output_counts.pop(seq_id, None)
        self.prompt_masks.pop(seq_id, None)
        self.allowed_masks.pop(seq_id, None)

    def _generator(self, row: SampleRow) -> Optional[torch.Generator]:
        seed = row.params.seed
        if seed is None or row.params.greedy:
            return None
        g = self.generators.get(row.seq_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seed % 2**64)
            self.generators[row.seq_id] = g
        return g

    def _penalty_tensors(self, row: SampleRow) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.output_counts.get(row.seq_id)
        if counts is None:
            counts = torch.zeros(self.vocab_size, device=self.device)
            out_ids = row.output_token_ids  # non-empty after a preemption or a fork
            if out_ids:
                counts.index_add_(0, torch.tensor(out_ids, device=self.device),
                                  torch.ones(len(out_ids), device=self.device))
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            mask[torch.tensor(row.prompt_token_ids, device=self.device)] = True
            self.output_counts[row.seq_id], self.prompt_masks[row.seq_id] = counts, mask
        return counts, self.prompt_masks[row.seq_id]

    def _allowed(self, rows: list[SampleRow]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, [rows, V] bool) for the rows with allowed_token_ids; each mask is built once per sequence."""
        which = [i for i, r in enumerate(rows) if r.params.allowed_token_ids is not None]
        if not which:
            return None
        masks = []
        for i in which:
            mask = self.allowed_masks.get(rows[i].seq_id)
            if mask is None:
                mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                mask[torch.tensor(rows[i].params.allowed_token_ids, device=self.device)] = True
                self.allowed_masks[rows[i].seq_id] = mask
            masks.append(mask)
        return torch.tensor(which, device=self.device), torch.stack(masks)

    def metadata(self, rows: list[SampleRow]) -> SamplingMetadata:
        dev = self.device
        params = [r.params for r in rows]
        if all(p.plain_greedy for p in params):  # the common batch: no tensors to build or copy
            return SamplingMetadata(temperature=None, greedy=None, all_greedy=True, generators=[])
        greedy = [p.greedy for p in params]
        meta = SamplingMetadata(
            temperature=torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=dev),
            greedy=torch.tensor(greedy, device=dev),
            all_greedy=all(greedy),
            generators=[self._generator(r) for r in rows],
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )
        if any(0 < p.top_k < self.vocab_size for p in params):
            meta.top_k = torch.tensor([p.top_k if 0 < p.top_k else self.vocab_size for p in params], device=dev)
        if any(p.top_p < 1.0 for p in params):
            meta.top_p = torch.tensor([p.top_p for p in params], device=dev)
        if any(p.min_p > 0.0 for p in params):
            meta.min_p = torch.tensor([p.min_p for p in params], device=dev)
        if any(p.uses_penalties for p in params):
            meta.presence_penalty = torch.tensor([p.presence_penalty for p in params], device=dev)
            meta.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], device=dev)
            meta.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)
            zeros_c = zeros_m = None
            counts, masks = [], []
            for r in rows:
                if r.params.uses_penalties:
                    c, m = self._penalty_tensors(r)
                else:  # rows without penalties see neutral state
                    if zeros_c is None:
                        zeros_c = torch.zeros(self.vocab_size, device=dev)
                        zeros_m = torch.zeros(self.vocab_size, dtype=torch.bool, device=dev)
                    c, m = zeros_c, zeros_m
                counts.append(c)
                masks.append(m)
            meta.output_counts, meta.prompt_mask = torch.stack(counts), torch.stack(masks)
        bias_rows, bias_toks, bias_vals, ban_rows, ban_toks = [], [], [], [], []
        for i, r in enumerate(rows):
            p = r.params
            for tok, val in (p.logit_bias or {}).items():
                bias_rows.append(i)
                bias_toks.append(tok)
                bias_vals.append(val)
            if r.num_output_tokens < p.min_tokens:
                stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
                ban_rows.extend([i] * len(stops))
                ban_toks.extend(stops)
        if bias_rows:
            meta.bias = (torch.tensor(bias_rows, device=dev), torch.tensor(bias_toks, device=dev),
                         torch.tensor(bias_vals, device=dev))
        if ban_rows:
            meta.banned = (torch.tensor(ban_rows, device=dev), torch.tensor(ban_toks, device=dev))
        meta.allowed = self._allowed(rows)
        return meta

    def record(self, rows: list[SampleRow], token_ids: torch.Tensor) -> None:
        """Right after sampling, on the device: count each row's sampled token for the rows that use
        penalties. No host wait, so a step scheduled before these tokens are read back (async
        scheduling) already samples with them counted. (A row whose request a stop string ends
        meanwhile counts one token too many in state that is about to be released.)"""
        one = None
        for j, r in enumerate(rows):
            if r.params.uses_penalties:
                # A forked sequence's state was made from the request's (pre-token) state in metadata().
                counts, _ = self._penalty_tensors(r)
                if one is None:
                    one = torch.ones(1, device=self.device)
                counts.index_add_(0, token_ids[j : j + 1], one)
