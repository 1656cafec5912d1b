"""Expert-sorted, block-padded layout of the (token, k) routing pairs for the fused MoE GEMMs.

`moe_align_block_size(topk_ids, block_size, num_experts)` returns
- `sorted_ids` (int32, length `n_blocks * block_size`): the flat (token, k) indices `t * K + k`
  grouped by expert, each expert's group starting on a multiple of `block_size` and padded with the
  sentinel `T * K`; entries whose id is -1 (or outside [0, E)) are dropped;
- `expert_ids` (int32, `n_blocks`): the expert of each block, -1 for blocks past the last one used;
- `num_tokens_post_padded` (int32, 1 element, on the device): Σ_e ceil(count_e / block_size) * block_size.

`n_blocks = cdiv(T*K + min(E, T*K) * (block_size - 1), block_size)` is the worst case, known from
shapes alone: nothing is read back to the host, so the whole thing can be captured in a CUDA graph
and the GEMMs' grids are sized from it (their programs past `num_tokens_post_padded` exit at once).

On CUDA (or under TRITON_INTERPRET=1), up to SMALL_PAIRS pairs (decode), one Triton program does
it all (counts and ranks from compare matrices). Above, three kernels: per-pair rank within its
expert by atomic counters, one program for the padded prefix sums + block->expert map + sentinel
fill, and a scatter. The order of the pairs inside an expert's group is then unspecified (atomics);
the GEMMs do not depend on it (every output row is its own dot products; the reduction over k is in
fixed order). The single-program kernel and the torch fallback (`torch_moe_align_block_size`)
order them by flat index.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

triton = None
tl = None

SMALL_PAIRS = 128  # up to this many (token, k) pairs one program lays them all out


def max_blocks(num_pairs: int, block_size: int, num_experts: int) -> int:
    """The worst-case block count: every hit expert wastes at most block_size - 1 slots."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_size - 1)
    return max(1, -(-worst // block_size))


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rank_kernel(ids_ptr, counts_ptr, rank_ptr, TK, E, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TK
    e = tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32)
    valid = mask & (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    r = tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.store(rank_ptr + offs, r, mask=valid)


def _layout_kernel(counts_ptr, starts_ptr, expert_ids_ptr, sorted_ptr, ntp_ptr, E, TK, n_blocks,
                   BLOCK_SIZE: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                   FILL: tl.constexpr):
    es = tl.arange(0, E_POW2)
    emask = es < E
    c = tl.load(counts_ptr + es, mask=emask, other=0)
    padded = (c + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, 0)
    tl.store(starts_ptr + es, ends - padded, mask=emask)
    tl.store(ntp_ptr, tl.sum(padded, 0))
    # block b belongs to the expert whose [start, end) holds b * BLOCK_SIZE: the number of experts
    # that end at or before it (empty experts end where the previous one does, so they never own one)
    for b0 in range(0, n_blocks, CHUNK):
        bs = b0 + tl.arange(0, CHUNK)
        pos = bs * BLOCK_SIZE
        before = (ends[None, :] <= pos[:, None]) & emask[None, :]
        eid = tl.sum(before.to(tl.int32), 1)
        eid = tl.where(eid >= E, -1, eid)
        tl.store(expert_ids_ptr + bs, eid, mask=bs < n_blocks)
    n_sorted = n_blocks * BLOCK_SIZE
    for s0 in range(0, n_sorted, FILL):
        ss = s0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + ss, tl.full([FILL], 0, tl.int32) + TK, mask=ss < n_sorted)


def _scatter_kernel(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, TK, E, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TK
    e = tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32)
    valid = mask & (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    dest = tl.load(starts_ptr + e, mask=valid, other=0) + tl.load(rank_ptr + offs, mask=valid, other=0)
    tl.store(sorted_ptr + dest, offs.to(tl.int32), mask=valid)


def _align_small_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, ntp_ptr, TK, E, n_blocks,
                        BLOCK_SIZE: tl.constexpr, TK_POW2: tl.constexpr, E_POW2: tl.constexpr,
                        CHUNK: tl.constexpr, FILL: tl.constexpr):
    # The whole layout in one program for a few pairs (decode): counts and ranks from compare
    # matrices, pairs in flat-index order inside each expert (as the torch fallback orders them).
    i = tl.arange(0, TK_POW2)
    e = tl.load(ids_ptr + i, mask=i < TK, other=-1).to(tl.int32)
    valid = (i < TK) & (e >= 0) & (e < E)
    e = tl.where(valid, e, -1)
    es = tl.arange(0, E_POW2)
    emask = es < E
    onehot = (e[:, None] == es[None, :]) & valid[:, None]  # [TK_POW2, E_POW2]
    c = tl.sum(onehot.to(tl.int32), 0)
    padded = (c + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    tl.store(ntp_ptr, tl.sum(padded, 0))
    j = tl.arange(0, TK_POW2)
    same = (e[:, None] == e[None, :]) & (j[None, :] < i[:, None])
    rank = tl.sum(same.to(tl.int32), 1)
    dest = tl.sum(tl.where(onehot, starts[None, :], 0), 1) + rank
    for b0 in range(0, n_blocks, CHUNK):
        bs = b0 + tl.arange(0, CHUNK)
        before = (ends[None, :] <= (bs * BLOCK_SIZE)[:, None]) & emask[None, :]
        eid = tl.sum(before.to(tl.int32), 1)
        tl.store(expert_ids_ptr + bs, tl.where(eid >= E, -1, eid), mask=bs < n_blocks)
    n_sorted = n_blocks * BLOCK_SIZE
    for s0 in range(0, n_sorted, FILL):
        ss = s0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + ss, tl.full([FILL], 0, tl.int32) + TK, mask=ss < n_sorted)
    tl.debug_barrier()  # the sentinels land before the pairs overwrite some of them
    tl.store(sorted_ptr + dest, i, mask=valid)


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    global triton, tl
    import triton
    import triton.language as tl

    # TK and n_blocks change with every step's size: no variant per value's divisibility (see fused_moe.py).
    jit = lambda fn, vary: triton.jit(fn, do_not_specialize=vary)  # noqa: E731
    return SimpleNamespace(rank=jit(_rank_kernel, ["TK"]), layout=jit(_layout_kernel, ["TK", "n_blocks"]),
                           scatter=jit(_scatter_kernel, ["TK"]), small=jit(_align_small_kernel, ["TK", "n_blocks"]))


def torch_moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int):
    """The same layout from torch ops (pairs ordered by flat index inside each expert's group)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    TK = flat.numel()
    n_blocks = max_blocks(TK, block_size, num_experts)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)  # dropped pairs sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts  # each expert's first position in `order`
    skey = key[order]
    rank = torch.arange(TK, device=dev) - first.index_select(0, skey.clamp(max=num_experts - 1))
    dest = starts.index_select(0, skey.clamp(max=num_experts - 1)) + rank
    n_sorted = n_blocks * block_size
    dest = torch.where(skey < num_experts, dest, n_sorted)  # one trash slot past the end
    sorted_ids = torch.full((n_sorted + 1,), TK, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    pos = torch.arange(n_blocks, device=dev) * block_size
    eid = torch.searchsorted(ends, pos, right=True)
    expert_ids = torch.where(eid >= num_experts, -1, eid).to(torch.int32)
    ntp = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids[:n_sorted], expert_ids, ntp


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int, use_triton: bool = True):
    """(sorted_ids, expert_ids, num_tokens_post_padded) for topk_ids [T, K] (see the module doc).
    No host synchronisation on either path; `use_triton=False` takes the torch ops."""
    if not use_triton:
        return torch_moe_align_block_size(topk_ids, block_size, num_experts)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    TK = ids.numel()
    n_blocks = max_blocks(TK, block_size, num_experts)
    sorted_ids = torch.empty(n_blocks * block_size, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    ntp = torch.empty(1, dtype=torch.int32, device=dev)
    k = _kernels()
    e_pow2 = max(16, _next_pow2(num_experts))
    chunk = max(16, min(256, 8192 // e_pow2))
    if TK <= SMALL_PAIRS and e_pow2 <= 1024:  # one launch instead of four
        k.small[(1,)](ids, sorted_ids, expert_ids, ntp, TK, num_experts, n_blocks, BLOCK_SIZE=block_size,
                      TK_POW2=max(16, _next_pow2(TK)), E_POW2=e_pow2, CHUNK=chunk, FILL=2048, num_warps=8)
        return sorted_ids, expert_ids, ntp
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    rank = torch.empty(max(TK, 1), dtype=torch.int32, device=dev)
    starts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    block = 1024
    grid = (max(1, -(-TK // block)),)
    if TK:
        k.rank[grid](ids, counts, rank, TK, num_experts, BLOCK=block, num_warps=4)
    k.layout[(1,)](counts, starts, expert_ids, sorted_ids, ntp, num_experts, TK, n_blocks,
                   BLOCK_SIZE=block_size, E_POW2=e_pow2, CHUNK=chunk, FILL=2048, num_warps=8)
    if TK:
        k.scatter[grid](ids, rank, starts, sorted_ids, TK, num_experts, BLOCK=block, num_warps=4)
    return sorted_ids, expert_ids, ntp
