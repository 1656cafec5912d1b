"""Batched sampling on the device: greedy rows by argmax, the rest by the exponential race.

For probabilities p and i.i.d. E_i ~ Exp(1), argmax(p_i / E_i) is distributed as p, so
sampling is one argmax for the whole batch; seeded requests draw their noise from their
own generator so their tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from raylight.sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[Optional[torch.Generator]]) -> torch.Tensor:
        """logits: [S, V] float32. Returns [S] token ids on the device."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        dev = logits.device
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
        logits = logits / temps[:, None]
        top_ks = [p.top_k for p in params]
        if any(k > 0 for k in top_ks):
            logits = _apply_top_k(logits, top_ks)
        top_ps = [p.top_p for p in params]
        probs = logits.softmax(dim=-1)
        if any(p < 1.0 for p in top_ps):
            probs = _apply_top_p(probs, torch.tensor(top_ps, device=dev))
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=dev)
        return torch.where(is_greedy, greedy, sampled)


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_ps[:, None], 0.0)
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)
