"""DeepSeek's expert-parallel load balancer (EPLB), re-implemented from its published description.

Given a per-layer load statistic of the logical experts, choose how many replicas each expert gets
and on which GPU each replica lives, so that the token load per GPU is as even as possible.

Vocabulary: a *logical* expert is an expert of the checkpoint; a *physical* expert (slot) is one
copy of it on one GPU. Slots are rank-major: GPU g owns slots [g*S, (g+1)*S), S = replicas // gpus.

Determinism: every EP rank runs this on the same all-reduced load and must get bit-identical maps,
or the weight moves that follow would not pair up. All sorts are therefore STABLE (ties broken by
the lower index) and argmax picks the first maximum; the float math is done on CPU in float64.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def balanced_packing(weight: Tensor, num_packs: int) -> tuple[Tensor, Tensor]:
    """Packs the n items of each row into `num_packs` packs of exactly n / num_packs items each,
    keeping pack weights even: greedy longest-processing-time with a cardinality cap (heaviest item
    first into the lightest pack that still has room; ties go to the lower pack index).

    weight: [X, n]. Returns (pack_index [X, n], rank_in_pack [X, n]), int64.
    """
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:  # one item per pack: nothing to balance
        idx = torch.arange(n, dtype=torch.int64).expand(rows, n).clone()
        return idx, torch.zeros_like(idx)
    # Stable: equal weights keep their index order, so every rank gets the same packing.
    order = torch.sort(weight.double().cpu(), dim=-1, descending=True, stable=True).indices.tolist()
    w = weight.double().cpu().tolist()
    pack_index = [[0] * n for _ in range(rows)]
    rank_in_pack = [[0] * n for _ in range(rows)]
    for r in range(rows):
        load = [0.0] * num_packs
        count = [0] * num_packs
        for item in order[r]:
            # The lightest pack with room; min() keeps the first (lowest index) among equals.
            pack = min((p for p in range(num_packs) if count[p] < per_pack), key=load.__getitem__)
            pack_index[r][item] = pack
            rank_in_pack[r][item] = count[pack]
            load[pack] += w[r][item]
            count[pack] += 1
    return torch.tensor(pack_index, dtype=torch.int64), torch.tensor(rank_in_pack, dtype=torch.int64)


def replicate_experts(weight: Tensor, num_physical: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gives each of the n logical experts of a row one replica, then hands every extra slot to the
    expert with the highest load per replica (load is assumed to split evenly over replicas, which
    is what round-robin dispatch implements). Minimizes the largest per-replica load greedily.

    weight: [X, n]. Returns (phy2log [X, num_physical], replica_rank [X, num_physical], logcnt [X, n]).
    """
    rows, n = weight.shape
    if num_physical < n:
        raise ValueError(f"{num_physical} physical slots cannot hold {n} logical experts")
    w = weight.double().cpu()
    phy2log = torch.arange(num_physical, dtype=torch.int64).repeat(rows, 1)
    replica_rank = torch.zeros(rows, num_physical, dtype=torch.int64)
    logcnt = torch.ones(rows, n, dtype=torch.int64)
    row_ids = torch.arange(rows)
    for slot in range(n, num_physical):
        best = (w / logcnt).argmax(dim=-1)  # first maximum on ties: deterministic
        phy2log[:, slot] = best
        replica_rank[:, slot] = logcnt[row_ids, best]
        logcnt[row_ids, best] += 1
    return phy2log, replica_rank, logcnt


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def _rebalance_hierarchical(weight: Tensor, num_physical: int, num_groups: int, num_nodes: int,
                            num_gpus: int) -> tuple[Tensor, Tensor, Tensor]:
    """Groups -> nodes, then replicas inside each node, then replicas -> GPUs of that node.
    With num_groups = num_nodes = 1 this is the global policy."""
    layers, num_logical = weight.shape
    if num_logical % num_groups:
        raise ValueError(f"{num_logical} experts do not split into {num_groups} groups")
    if num_groups % num_nodes:
        raise ValueError(f"{num_groups} groups do not split over {num_nodes} nodes")
    if num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not split over {num_nodes} nodes")
    if num_physical % num_gpus:
        raise ValueError(f"{num_physical} replicas do not split evenly over {num_gpus} GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    log_per_node = num_logical // num_nodes

    # 1. Whole expert groups onto nodes (keeps a group's experts, hence a token's, on one node).
    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    # "Meta-logical" ids: node n's experts become the block [n*E/N, (n+1)*E/N).
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate inside each node: every node gets exactly R/N slots.
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)

    # 3. Replicas onto the node's GPUs by their per-replica load.
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * slots_per_gpu + rank_in_pack)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    node_offset = torch.arange(0, num_logical, log_per_node, dtype=torch.int64).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1) + node_offset).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphy_rank = phy_rank.gather(-1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return pphy2log, pphy_rank, logcnt


def build_log2phy(phy2log: Tensor, replica_rank: Tensor, num_logical: int, width: int) -> Tensor:
    """[L, E, width] slot ids of each logical expert's replicas, -1 padded."""
    layers, num_physical = phy2log.shape
    log2phy = torch.full((layers, num_logical * width), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log * width + replica_rank,
                     torch.arange(num_physical, dtype=torch.int64).expand(layers, -1))
    return log2phy.view(layers, num_logical, width)


def rebalance_experts(weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      log2phy_width: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The EPLB entry point.

    weight: [L, E] load of each logical expert (any numeric dtype, any device; computed on CPU).
    Uses the hierarchical policy when num_groups % num_nodes == 0 (prefill-style: groups stay on a
    node), else the global one (groups = nodes = 1). `log2phy_width` fixes the last dimension of
    log2phy (e.g. num_redundant + 1, for static shapes); default max(logcnt).

    Returns (phy2log [L, R], log2phy [L, E, X] (-1 padded), logcnt [L, E]), int64 on CPU.
    """
    weight = weight.double().cpu()
    num_logical = weight.size(-1)
    if num_replicas % num_gpus:
        raise ValueError(f"{num_replicas} replicas do not split evenly over {num_gpus} GPUs")
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = _rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    needed = int(logcnt.max()) if logcnt.numel() else 1
    width = needed if log2phy_width is None else log2phy_width
    if width < needed:
        raise ValueError(f"log2phy width {width} < {needed} replicas of one expert")
    return phy2log, build_log2phy(phy2log, rank, num_logical, width), logcnt


def preserve_slots(old_phy2log: Tensor, new_phy2log: Tensor, num_gpus: int) -> Tensor:
    """Reorders each GPU's new slots so that experts the GPU keeps stay in their old slot (a slot
    whose expert does not change costs no copy); the multiset of experts per GPU is unchanged.
    Experts that are new to the GPU fill the freed slots in their original order."""
    layers, num_physical = new_phy2log.shape
    if old_phy2log.shape != new_phy2log.shape or num_physical % num_gpus:
        raise ValueError(f"bad shapes {tuple(old_phy2log.shape)}, {tuple(new_phy2log.shape)} for {num_gpus} GPUs")
    per_gpu = num_physical // num_gpus
    old, new = old_phy2log.cpu().tolist(), new_phy2log.cpu().tolist()
    out = []
    for layer in range(layers):
        row = []
        for g in range(num_gpus):
            lo, hi = g * per_gpu, (g + 1) * per_gpu
            want: dict[int, int] = {}
            for e in new[layer][lo:hi]:
                want[e] = want.get(e, 0) + 1
            slots: list[Optional[int]] = [None] * per_gpu
            for j, e in enumerate(old[layer][lo:hi]):  # stayers keep their slot
                if want.get(e, 0) > 0:
                    slots[j] = e
                    want[e] -= 1
            rest = iter(e for e in new[layer][lo:hi] if _take(want, e))
            row += [e if e is not None else next(rest) for e in slots]
        out.append(row)
    return torch.tensor(out, dtype=torch.int64)


def _take(want: dict[int, int], e: int) -> bool:
    """True (and consumes one) while expert e still has unplaced copies."""
    if want.get(e, 0) > 0:
        want[e] -= 1
        return True
    return False
