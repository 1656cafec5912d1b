"""Expert-parallel token movement, low-latency (decode) mode: DeepEP's `low_latency_dispatch` /
`low_latency_combine` semantics on one `all_to_all_single` with equal splits each way.

Why fixed shapes: decode steps are replayed as CUDA graphs, and a graph cannot contain a host
wait. So nothing here reads a device value on the host (no .item(), .tolist(), nonzero(),
boolean-mask indexing, data-dependent shapes): every (token, k) pair gets a slot in a
`[R, E_loc, Tmax, H]` send buffer, the whole buffer goes over the wire, and the receiver
compacts it into DeepEP's "masked layout" `[E_loc, R*Tmax, H]` whose first `recv_count[e]` rows of
expert e are valid (rows of source 0 first, then source 1, ...; source order inside).

Cost versus DeepEP: DeepEP's kernels put only the occupied slots over NVLink/RDMA; an
all_to_all_single moves the whole buffer, i.e. `E * Tmax * H * elt` bytes per rank per dispatch
(and again per combine) whatever the routing, e.g. 470 MB at E=256, Tmax=128, H=7168, bf16. A
denser wire format (`Tmax * min(K, E_loc)` slots per destination rank, re-laid out by the
receiver) would cut that by E_loc/K; not done here.

FP8 (DeepEP's default `use_fp8=True`): rows are quantised to e4m3 with one float32 scale per 128
channels before sending (values and scales as one byte row), halving the dispatch bytes.

This module also holds `exchange`, the one collective both modes use (ep_buffer.py imports it).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

# float8 travels as its bytes: gloo has no float8 type, and a byte view costs nothing.
_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
        if hasattr(torch, n)}


def wire_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in _FP8 else t


def exchange(out: torch.Tensor, inp: torch.Tensor, group, world: int,
             out_splits: Optional[list[int]] = None, in_splits: Optional[list[int]] = None) -> torch.Tensor:
    """all_to_all_single along dim 0 (splits are host ints, so no device read). One rank: a copy,
    no collective, so a lone process needs no torch.distributed at all."""
    if world == 1:
        out.copy_(inp)
        return out
    dist.all_to_all_single(wire_view(out), wire_view(inp), out_splits, in_splits, group=group)
    return out


class LowLatencyHandle(NamedTuple):
    """The first five fields are DeepEP's LL handle; the rest is what our combine needs."""
    src_info: torch.Tensor       # [E_loc, R*Tmax] int32: source token index per received row, -1 = empty
    layout_range: torch.Tensor   # [E_loc, R] int64: begin << 32 | count of rows from source rank j
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    pair_pos: torch.Tensor       # [T, K] int64: wire slot of each (token, k) pair, E*Tmax = none
    wire_to_row: torch.Tensor    # [R*E_loc*Tmax] int64: received wire slot -> masked-layout row (0 if empty)


def pair_slots(topk_idx: torch.Tensor, num_experts: int, tmax: int) -> torch.Tensor:
    """Wire slot `e * Tmax + j` of each (token, k) pair, where j is the pair's rank among this rank's
    pairs for expert e in (token, k) order; `E * Tmax` for -1. Global expert e = r * E_loc + local
    id, so `e * Tmax` is exactly the [R, E_loc, Tmax] flat offset. A stable sort ranks the pairs in
    O(T*K) without a host read (a one-hot cumsum would cost T*K*E)."""
    t, k = topk_idx.shape
    valid = topk_idx >= 0
    e = torch.where(valid, topk_idx, num_experts).flatten()
    n = e.numel()
    order = torch.argsort(e, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=e.device)
    counts.scatter_add_(0, e, torch.ones_like(e))
    starts = counts.cumsum(0) - counts
    ranked = torch.arange(n, device=e.device) - starts[e[order]]
    slot = torch.empty_like(e).scatter_(0, order, ranked)
    pos = torch.where(valid.flatten(), e * tmax + slot, num_experts * tmax)
    return pos.view(t, k)


def check_low_latency_args(x: torch.Tensor, topk_idx: torch.Tensor, tmax: int, num_experts: int,
                           owned_experts: int, world: int, hidden: int) -> None:
    """Everything that can be checked from shapes alone, before any collective: a rank that raises
    after its peers entered the exchange would hang them."""
    if num_experts != owned_experts:
        raise ValueError(f"num_experts={num_experts}, but this buffer was built for {owned_experts}")
    if num_experts % world:
        raise ValueError(f"num_experts={num_experts} is not divisible by {world} ranks")
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [T, {hidden}], got {tuple(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [T={x.shape[0]}, K], got {tuple(topk_idx.shape)}")
    if tmax < 1 or x.shape[0] > tmax:
        raise ValueError(f"{x.shape[0]} tokens exceed num_max_dispatch_tokens_per_rank={tmax}")


def ll_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, tmax: int, num_experts: int, group, world: int,
                stats: Optional[torch.Tensor] = None):
    """-> (recv_x [E_loc, R*Tmax, H], recv_count [E_loc] int32, LowLatencyHandle). Host-sync free."""
    dev, (t, h) = x.device, x.shape
    e_loc = num_experts // world
    slots = num_experts * tmax  # = R * E_loc * Tmax, this rank's whole send buffer
    pos = pair_slots(topk_idx.long(), num_experts, tmax)

    # Which token fills each send slot (t = the zero padding row); duplicates only hit the dropped
    # last element, so the result does not depend on scatter order.
    tok_ids = torch.arange(t, device=dev).repeat_interleave(topk_idx.shape[1])
    send_tok = torch.full((slots + 1,), t, dtype=torch.long, device=dev)
    send_tok.scatter_(0, pos.flatten(), tok_ids)
    send_tok = send_tok[:slots]
    x_pad = torch.cat([x, x.new_zeros(1, h)])
    send_x = x_pad.index_select(0, send_tok)  # padding slots zero: outputs are bit-reproducible
    send_src = torch.where(send_tok < t, send_tok, -1).int()

    # Receive into a buffer with one extra zero row, the target of every empty masked-layout row.
    recv_buf = torch.empty(slots + 1, h, dtype=x.dtype, device=dev)
    recv_buf[slots].zero_()
    exchange(recv_buf[:slots], send_x, group, world)
    recv_src = torch.empty(slots + 1, dtype=torch.int32, device=dev)
    recv_src[slots] = -1
    exchange(recv_src[:slots], send_src, group, world)

    # Wire slot (j, e, i) holds the i-th pair source j sent to local expert e; compact per expert,
    # sources ascending: row begin[e, j] + i of expert e.
    wire = recv_src[:slots].view(world, e_loc, tmax)
    counts = (wire >= 0).sum(-1)  # [R, E_loc]
    begin = (counts.cumsum(0) - counts).t()  # [E_loc, R]
    i = torch.arange(tmax, device=dev)
    row = (torch.arange(e_loc, device=dev).view(1, e_loc, 1) * (world * tmax)
           + begin.t().unsqueeze(-1) + i)  # [R, E_loc, Tmax]
    filled = i < counts.unsqueeze(-1)
    rows = e_loc * world * tmax
    row = torch.where(filled, row, rows).flatten()
    row_to_wire = torch.full((rows + 1,), slots, dtype=torch.long, device=dev)
    row_to_wire.scatter_(0, row, torch.arange(slots, device=dev))
    row_to_wire = row_to_wire[:rows]

    recv_x = recv_buf.index_select(0, row_to_wire).view(e_loc, world * tmax, h)
    src_info = recv_src.index_select(0, row_to_wire).view(e_loc, world * tmax)
    recv_count = counts.sum(0).int()
    layout_range = (begin.long() << 32) | counts.t().long()
    if stats is not None:
        stats.add_(recv_count.to(stats.dtype))  # in place: EPLB's per-expert load counter
    handle = LowLatencyHandle(src_info, layout_range, tmax, h, num_experts, pos,
                              torch.where(filled.flatten(), row, 0))
    return recv_x, recv_count, handle


def ll_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: LowLatencyHandle,
               group, world: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * x[row of (t, k)], -1 pairs skipped, fp32 accumulation in k order
    (deterministic), one cast at the end. Host-sync free."""
    tmax, h, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
    e_loc = num_experts // world
    if x.shape != (e_loc, world * tmax, h):
        raise ValueError(f"x must be [{e_loc}, {world * tmax}, {h}], got {tuple(x.shape)}")
    if topk_idx.shape != handle.pair_pos.shape:
        raise ValueError(f"topk_idx {tuple(topk_idx.shape)} is not the dispatch's {tuple(handle.pair_pos.shape)}")
    slots = num_experts * tmax
    send = x.reshape(-1, h).index_select(0, handle.wire_to_row)  # back into [R, E_loc, Tmax] wire order
    back = torch.empty(slots + 1, h, dtype=x.dtype, device=x.device)
    back[slots].zero_()  # where -1 pairs point
    exchange(back[:slots], send, group, world)

    pos = handle.pair_pos
    w = torch.where(topk_idx >= 0, topk_weights.float(), 0.0)
    acc = torch.zeros(pos.shape[0], h, dtype=torch.float32, device=x.device)
    for k in range(pos.shape[1]):
        acc += back.index_select(0, pos[:, k]).float() * w[:, k : k + 1]
    if out is None:
        return acc.to(x.dtype)
    return out.copy_(acc)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8_per_128(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's FP8 dispatch format: e4m3 values and one float32 scale per 128 channels,
    x ~= x_fp8 * scale. round_scale: scales rounded up to a power of two (exact to apply)."""
    t, h = x.shape
    if h % 128:
        raise ValueError(f"FP8 dispatch needs hidden % 128 == 0, got {h}")
    groups = x.float().view(t, h // 128, 128)
    scale = groups.abs().amax(-1).clamp(min=1e-4) / FP8_MAX
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(t, h), scale


def ll_dispatch_fp8(x: torch.Tensor, topk_idx: torch.Tensor, tmax: int, num_experts: int, group, world: int,
                    stats: Optional[torch.Tensor] = None, round_scale: bool = False):
    """ll_dispatch of the quantised rows: -> ((recv_fp8 [E_loc, R*Tmax, H], scales [E_loc, R*Tmax, H/128]),
    recv_count, handle). Values and scales travel as one byte row (one exchange); the scales come
    back column-major in the last two dims, as DeepEP returns them for TMA loads."""
    h = x.shape[1]
    q, scale = quantize_fp8_per_128(x, round_scale)
    packed = torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], 1)
    recv, recv_count, handle = ll_dispatch(packed, topk_idx, tmax, num_experts, group, world, stats)
    recv_q = recv[..., :h].contiguous().view(torch.float8_e4m3fn)
    recv_scale = recv[..., h:].contiguous().view(torch.float32)
    recv_scale = recv_scale.transpose(1, 2).contiguous().transpose(1, 2)
    return (recv_q, recv_scale), recv_count, handle._replace(hidden=h)


def low_latency_buffer_bytes(num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int,
                             elem_size: int = 2) -> int:
    """Bytes one dispatch allocates for its send and receive buffers (combine the same again)."""
    return 2 * (num_experts * num_max_dispatch_tokens_per_rank + 1) * (hidden * elem_size + 4)
