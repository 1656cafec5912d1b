"""Moves one MoE layer's expert weights from an old slot map to a new one, across EP ranks.

Every rank derives the same transfer plan from the two global maps, so the point-to-point sends and
receives pair up without any negotiation. Per destination slot, cheapest source first:
  1. unchanged slot: nothing to do;
  2. this rank already held the expert (any local slot, old map): local copy;
  3. otherwise receive it once from one rank that held it, then copy it into every slot that
     needs it here.
Senders read the live (old) weights and receivers write a staging buffer of one layer; the buffer
is copied into place only after all transfers finish, so no rank overwrites an expert a peer is
still reading and reads never see half-moved layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class LayerPlan:
    """What this rank does for one layer (slot indices are local, 0..S-1)."""
    local_copies: list[tuple[int, int]] = field(default_factory=list)  # (dst, src): src held the expert before
    recvs: list[tuple[int, int, int]] = field(default_factory=list)     # (expert, peer, dst) in expert order
    sends: list[tuple[int, int, int]] = field(default_factory=list)     # (expert, peer, src) in expert order
    fan_out: list[tuple[int, int]] = field(default_factory=list)        # (dst, first dst that received it)

    @property
    def changed(self) -> list[int]:
        return [d for d, _ in self.local_copies] + [d for _, _, d in self.recvs] + [d for d, _ in self.fan_out]


def plan_layer(old: list[int], new: list[int], ep_rank: int, ep_size: int) -> LayerPlan:
    """The transfer plan for `ep_rank`, from global slot maps (lists of logical ids, rank-major)."""
    num_physical = len(old)
    if len(new) != num_physical or num_physical % ep_size:
        raise ValueError(f"maps of {len(old)} and {len(new)} slots over {ep_size} ranks")
    per = num_physical // ep_size
    held = [set(old[r * per : (r + 1) * per]) for r in range(ep_size)]
    # Ranks that need expert e and did not hold it: they must receive it.
    needers: dict[int, list[int]] = {}
    for r in range(ep_size):
        for e in sorted(set(new[r * per : (r + 1) * per]) - held[r]):
            needers.setdefault(e, []).append(r)

    plan = LayerPlan()
    mine_old = old[ep_rank * per : (ep_rank + 1) * per]
    mine_new = new[ep_rank * per : (ep_rank + 1) * per]
    first_src = {}
    for j, e in enumerate(mine_old):
        first_src.setdefault(e, j)
    first_dst: dict[int, int] = {}
    for j, e in enumerate(mine_new):
        if mine_old[j] == e:
            continue
        if e in first_src:
            plan.local_copies.append((j, first_src[e]))
        elif e in first_dst:
            plan.fan_out.append((j, first_dst[e]))
        else:
            first_dst[e] = j

    # Sorted expert order on every rank, so each (sender, receiver) pair issues its ops in the same order.
    for e in sorted(needers):
        holders = [r for r in range(ep_size) if e in held[r]]
        # Receivers dealt round-robin over holders: each holder serves ~len(needers)/len(holders).
        for i, r in enumerate(needers[e]):
            src = holders[i % len(holders)]
            if r == ep_rank:
                plan.recvs.append((e, src, first_dst[e]))
            elif src == ep_rank:
                plan.sends.append((e, r, first_src[e]))
    return plan


def rearrange_layer(old_row: Tensor, new_row: Tensor, weights: list[Tensor], ep_rank: int, ep_size: int,
                    group: Optional[dist.ProcessGroup], staging: Optional[list[Tensor]] = None) -> int:
    """Rewrites this rank's slots of one layer, in place, from `old_row` to `new_row` ([P] logical
    ids). `weights`: this rank's [S, ...] slot-major tensors of the layer (w13, w2, ...).
    `staging`: optional reusable buffers shaped like `weights` (allocated here otherwise).
    Returns the bytes this rank received. Every rank of `group` must call it with the same maps."""
    old, new = old_row.tolist(), new_row.tolist()
    if old == new:
        return 0
    plan = plan_layer(old, new, ep_rank, ep_size)
    if (plan.recvs or plan.sends) and (group is None or ep_size == 1):
        raise ValueError("remote transfers needed but no EP group given")
    if staging is None or [s.shape for s in staging] != [w.shape for w in weights]:
        staging = [torch.empty_like(w) for w in weights]

    for dst, src in plan.local_copies:
        for w, buf in zip(weights, staging):
            buf[dst].copy_(w[src])
    ops = []
    received = 0
    # Ops in sorted expert order, then tensor order: sends and receives interleaved by expert.
    events = sorted([(e, 0, peer, j) for e, peer, j in plan.sends] + [(e, 1, peer, j) for e, peer, j in plan.recvs])
    for e, is_recv, peer, j in events:
        for w, buf in zip(weights, staging):
            if is_recv:
                ops.append(dist.P2POp(dist.irecv, buf[j], group=group, group_peer=peer))
                received += buf[j].numel() * buf[j].element_size()
            else:
                ops.append(dist.P2POp(dist.isend, w[j], group=group, group_peer=peer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    for dst, src in plan.fan_out:
        for buf in staging:
            buf[dst].copy_(buf[src])
    for dst in plan.changed:
        for w, buf in zip(weights, staging):
            w[dst].copy_(buf[dst])
    return received
