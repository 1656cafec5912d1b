"""What the MoE layer tests run inside each rank (gloo): one `FusedMoE` sharded over the ranks (expert
parallel through the dispatch buffer, or every expert split by features) against the same layer in one
process, over step sizes that take each token mover and over placements EPLB could have made."""

from __future__ import annotations

import torch
import torch.distributed as dist

from raylight.parallel.moe_layer import ExpertParallelContext, FusedMoE
from raylight.parallel.state import ParallelConfig, ParallelGroups

E, H, I, K = 8, 16, 12, 3


def _layer(groups: ParallelGroups, eplb: bool, seed: int) -> FusedMoE:
    ctx = ExpertParallelContext(groups, 1, E, H)
    if eplb:
        ctx.enable_eplb(window_size=4, device=torch.device("cpu"))
    layer = FusedMoE(ctx, 0, I, K, renormalize=True)
    layer.fill_dummy(seed, layer=0)
    return layer


def _inputs(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    return x, logits


def compare(rank: int, world: int, expert_parallel: bool, redundant: int) -> dict[str, float]:
    """Max |sharded - single| per case; the sharded output is the all-reduced sum of the partials."""
    cfg = ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=expert_parallel,
                         num_redundant_experts=redundant)
    groups = ParallelGroups.from_world(cfg)
    single = _layer(ParallelGroups.single(), eplb=False, seed=7)
    errors = {}
    for placement in ("initial", "shuffled"):
        layer = _layer(groups, eplb=expert_parallel, seed=7)
        if placement == "shuffled":
            if not expert_parallel:
                continue
            # A placement EPLB could choose: a random permutation of the slots (same seed on every rank),
            # the redundant slots holding random experts; the weights follow it.
            g = torch.Generator().manual_seed(11)
            P = E + redundant
            row = torch.cat([torch.arange(E), torch.randint(0, E, (redundant,), generator=g)])[torch.randperm(P, generator=g)]
            layer.ctx.placement.set_layer(0, row)
            layer.fill_dummy(7, layer=0)
        for T, ll_max in ((1, 128), (5, 128), (40, 128), (40, 2), (97, 4)):  # LL path, then normal
            layer.ctx.ll_max_tokens = ll_max
            x, logits = _inputs(T, seed=T)
            if expert_parallel and world > 1:
                lo, n = layer.token_share(T)
                partial = layer(x, logits[lo:lo + n])
            else:
                partial = layer(x, logits)
            dist.all_reduce(partial)
            want = single(x, logits)
            errors[f"{placement}/T{T}/ll{ll_max}"] = float((partial - want).abs().max()) if T else 0.0
    return errors
