"""Triton kernels for paged attention over our KV layout `[num_blocks, 2, block_size, KVH, D]`.

- `write_kv`: one fused kernel storing a step's new K and V at their flat slots.
- `decode_attention`: one query token per sequence. A program owns one (sequence, KV head, split):
  the KV head's whole GQA group of query heads rides along as the rows of one tile, so every K/V
  tile is loaded once per group. Long contexts are split over several programs (flash-decoding)
  and merged by a small combine kernel.
- `prefill_attention`: query chunks that may sit on a cached prefix. A program owns one
  (work item, KV head), where a work item is a block of query tokens of one sequence; its rows
  are (query token, head of the group) pairs, so K/V are again loaded once per group.

Everything reads K/V from the cache (a chunk's own K/V are written before attention runs), and
launch grids depend only on sizes the caller passes, never on device data, so the decode path
can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from raylight.kernels.pdl import gdc_functions, launch_options

# Grid dependency control, used under `if PDL:` only (kernels/pdl.py): a kernel launched early waits
# for the previous one before its first memory access.
gdc_wait, gdc_launch_dependents = gdc_functions()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# KV write
# ---------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, num_kv_heads,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ckv, stride_cp, stride_ch,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # Negative slots are padding tokens: masked out rather than branched on. (The slot test is
    # broadcast to a block first: Triton's interpreter mistypes `block & scalar` masks.)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM) & (d[None, :] * 0 + slot >= 0)
    slot = tl.maximum(slot, 0)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cp \
        + h[:, None] * stride_ch + d[None, :]
    key = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(dst, key, mask=mask)
    value = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(dst + stride_ckv, value, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             pdl: bool = False) -> None:
    """k, v: [T, KVH, D]; kv_cache: [num_blocks, 2, block_size, KVH, D]; slot_mapping: [T] (< 0: skip).
    `pdl`: launched early where supported (kernels/pdl.py)."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(k, v, kv_cache)
    block_d = next_pow2(head_dim)
    # At most ~2K elements per program, so very wide (MHA) layers stay in registers.
    block_h = min(next_pow2(kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, triton.cdiv(kv_heads, block_h))
    _write_kv_kernel[grid](
        k, v, kv_cache, slot_mapping, kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_SIZE=kv_cache.shape[2], HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        **launch_options(pdl, k),
    )


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the head dimension must be contiguous, got strides {t.stride()}")


# ---------------------------------------------------------------------------------------------
# Shared inner loop: online softmax over a range of key positions read through the block table
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attend_range(q, q_pos, acc, m_i, l_i, cache_ptr, table_ptr, kv_head, seq_len, lo, hi, qk_scale,
                  stride_cb, stride_ckv, stride_cp, stride_ch,
                  BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  TILE: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q: [M, BLOCK_D] with query positions q_pos [M]; keys [lo, hi) in TILE steps (lo % TILE == 0).

    Scores are kept in log2 units (qk_scale folds in log2(e)), so exp2 does the softmax. acc and
    l_i stay unnormalised; m_i is the running row max (-inf while a row has seen no key).
    """
    d = tl.arange(0, BLOCK_D)
    d_live = d < HEAD_DIM
    head_off = kv_head.to(tl.int64) * stride_ch
    for start in range(lo, hi, TILE):
        kpos = start + tl.arange(0, TILE)
        k_live = kpos < seq_len
        # One block-table entry per key: TILE need not match the cache's block size.
        phys = tl.load(table_ptr + kpos // BLOCK_SIZE, mask=k_live, other=0).to(tl.int64)
        tok_off = phys * stride_cb + (kpos % BLOCK_SIZE) * stride_cp + head_off  # [TILE], int64
        # Masked loads (other=0) matter: slots past seq_len may hold anything, NaN included.
        k_t = tl.load(cache_ptr + tok_off[None, :] + d[:, None], mask=d_live[:, None] & k_live[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [M, TILE]
        visible = k_live[None, :] & (kpos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            visible = visible & (kpos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row can see nothing in a tile (window, padding rows): keep its max finite so that
        # exp2(-inf - -inf) never produces NaN; its p and alpha are then exactly 0 / unchanged.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(cache_ptr + stride_ckv + tok_off[:, None] + d[None, :], mask=k_live[:, None] & d_live[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------
# Decode: one query token per sequence, split-KV
# ---------------------------------------------------------------------------------------------


# Block-table widths change from step to step; specialising on them (==1, divisible by 16) would
# compile new variants mid-serving. Every other integer argument is fixed per model.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(out_ptr, part_o_ptr, part_m_ptr, part_l_ptr, q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
                   num_heads, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   qk_scale, stride_cb, stride_ckv, stride_cp, stride_ch,
                   GROUP: tl.constexpr, GROUP_P: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   TILE: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   PDL: tl.constexpr = False):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, GROUP_P)  # the GQA group, padded to a tl.dot-friendly height
    head = kv_head * GROUP + rows
    row_live = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    d_live = d < HEAD_DIM
    io_mask = row_live[:, None] & d_live[None, :]
    tok = seq.to(tl.int64)  # decode rows come first, one token each: token index == sequence index
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)
    q_pos = tl.zeros([GROUP_P], dtype=tl.int32) + (seq_len - 1)

    # This split's share of the key tiles; tiles wholly outside the window are skipped.
    first_tile = 0
    if WINDOW > 0:
        first_tile = tl.maximum(seq_len - WINDOW, 0) // TILE
    num_tiles = (seq_len + TILE - 1) // TILE - first_tile
    per_split = (num_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    lo = (first_tile + split * per_split) * TILE
    hi = tl.minimum(lo + per_split * TILE, seq_len)

    acc = tl.zeros([GROUP_P, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(q, q_pos, acc, m_i, l_i, cache_ptr, block_tables_ptr + seq * stride_bt, kv_head,
                                  seq_len, lo, hi, qk_scale, stride_cb, stride_ckv, stride_cp, stride_ch,
                                  BLOCK_SIZE, HEAD_DIM, BLOCK_D, TILE, WINDOW, DOT_PRECISION)
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Unnormalised partials; empty splits store m = -inf, l = 0 and drop out of the combine.
        part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + split  # [GROUP_P]
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=io_mask)
        tl.store(part_m_ptr + part, m_i, mask=row_live)
        tl.store(part_l_ptr + part, l_i, mask=row_live)


@triton.jit
def _combine_splits_kernel(out_ptr, part_o_ptr, part_m_ptr, part_l_ptr, num_heads, stride_ot, stride_oh,
                           NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           PDL: tl.constexpr = False):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_live = d < HEAD_DIM
    part = (seq * num_heads + head) * NUM_SPLITS + s
    m = tl.load(part_m_ptr + part)
    l = tl.load(part_l_ptr + part)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=d_live[None, :], other=0.0)
    num = tl.sum(o * w[:, None], axis=0)
    den = tl.sum(l * w, axis=0)
    o = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_live)


# ---------------------------------------------------------------------------------------------
# Prefill: query chunks on a (possibly) cached prefix
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(out_ptr, q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                    work_seq_ptr, work_qblock_ptr, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    qk_scale, stride_cb, stride_ckv, stride_cp, stride_ch,
                    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    TILE: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    work = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(work_seq_ptr + work)
    qblock = tl.load(work_qblock_ptr + work)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens cached before this chunk

    rows = tl.arange(0, BLOCK_Q * GROUP_P)  # row = (query token, head of the group)
    qi = qblock * BLOCK_Q + rows // GROUP_P
    head = kv_head * GROUP + rows % GROUP_P
    row_live = (qi < q_len) & (rows % GROUP_P < GROUP)
    d = tl.arange(0, BLOCK_D)
    d_live = d < HEAD_DIM
    io_mask = row_live[:, None] & d_live[None, :]
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)
    q_pos = context + qi  # causal mask aligned to the end of the sequence

    # Keys up to the block's last query position; with a window, none before the first one's window.
    hi = context + tl.minimum(q_len, (qblock + 1) * BLOCK_Q)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(context + qblock * BLOCK_Q - WINDOW + 1, 0) // TILE * TILE

    acc = tl.zeros([BLOCK_Q * GROUP_P, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * GROUP_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(q, q_pos, acc, m_i, l_i, cache_ptr, block_tables_ptr + seq * stride_bt, kv_head,
                                  seq_len, lo, hi, qk_scale, stride_cb, stride_ckv, stride_cp, stride_ch,
                                  BLOCK_SIZE, HEAD_DIM, BLOCK_D, TILE, WINDOW, DOT_PRECISION)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


def group_rows(num_heads: int, num_kv_heads: int, min_rows: int = 1) -> tuple[int, int]:
    """(GQA group size, its padded height: a power of two, at least min_rows)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    return group, max(min_rows, next_pow2(group))


# A decode tile is one GQA group; tl.dot needs M >= 16 on a GPU, so small groups are padded
# (decode is bound by K/V bandwidth, the idle rows cost little). Prefill tiles stack query tokens
# instead and pad the group only to a power of two: compute-bound, they must not waste rows.
DECODE_MIN_ROWS = 16


def prefill_block_q(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Query tokens per prefill program: 64 rows (tokens x group heads) per tile, 32 for fp32 and
    the widest heads to stay within registers and shared memory; always at least 16 rows."""
    _, group_p = group_rows(num_heads, num_kv_heads)
    target_rows = 32 if dtype == torch.float32 or head_dim > 128 else 64
    return max(1, target_rows // group_p)


def _tile(head_dim: int, fp32: bool) -> int:
    """Keys per inner-loop step: K and V tiles of TILE x head_dim, kept to ~16-32 KiB each."""
    if not fp32:
        return 64 if head_dim <= 128 else 32
    return 32 if head_dim <= 128 else 16


def _shared_args(q, kv_cache, scale) -> tuple[tuple, dict]:
    """Both attention kernels' trailing runtime arguments (qk_scale, cache strides), and their
    shared compile-time constants and launch options."""
    _check_last_dim_contiguous(q, kv_cache)
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"query dtype {q.dtype} differs from the KV cache's {kv_cache.dtype}")
    head_dim = q.shape[2]
    fp32 = q.dtype == torch.float32
    # fp32 dots default to TF32 on tensor cores; fp32 is our accuracy mode, so ask for real fp32.
    return (scale * LOG2E, *kv_cache.stride()[:4]), dict(
        BLOCK_SIZE=kv_cache.shape[2], HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
        TILE=_tile(head_dim, fp32), DOT_PRECISION="ieee" if fp32 else None,
        # Fewer pipeline stages where K/V tiles are widest, to stay inside shared memory.
        num_warps=4, num_stages=2 if fp32 or head_dim > 128 else 3,
    )


def parse_decode_config(text: str) -> dict[int, dict]:
    """RAYLIGHT_DECODE_ATTN_CONFIG's format, "HEAD_DIM:TILE,WARPS,STAGES[;...]", as launch options per head dim."""
    table = {}
    for entry in filter(None, text.split(";")):
        dim, _, cfg = entry.partition(":")
        tile, warps, stages = (int(x) for x in cfg.split(","))
        table[int(dim)] = dict(TILE=tile, num_warps=warps, num_stages=stages)
    return table


# Decode launch options per head dim for half precision, chosen on an H200 by
# scripts/tune_decode_attention.py (benchmarks/results/tune-decode-attention-20261204-205529.json):
# head dim 64, W1's batch 256 at 512 / 768 tokens: 71.6 / 102.5 us against 83.5 / 117.3 us with the
# shared 4 warps and 3 stages; head dim 128, the 8B shape's batch 1 / 8 / 32: 56.3 / 55.4 / 52.7 us
# against 57.9 / 58.0 / 56.2 us. A head dim not listed keeps the shared defaults. The environment
# variable, read once here, overrides it per head dim (a tuning sweep passes `launch` instead).
DECODE_TUNED: dict[int, dict] = {
    64: dict(TILE=64, num_warps=2, num_stages=2),
    128: dict(TILE=64, num_warps=8, num_stages=2),
    **parse_decode_config(os.environ.get("RAYLIGHT_DECODE_ATTN_CONFIG", "")),
}


def _decode_launch(head_dim: int, fp32: bool) -> dict:
    """The decode kernel's tile and launch options for this head dim: the tuned table's, else the
    shared ones (float32, our accuracy mode, always keeps the shared ones)."""
    return {} if fp32 else DECODE_TUNED.get(head_dim, {})


def decode_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, num_seqs: int, scale: float, window: Optional[int] = None,
                     num_splits: int = 1, partials: Optional[tuple] = None, launch: Optional[dict] = None,
                     pdl: bool = False) -> None:
    """Rows 0..num_seqs-1 of q/out are one decode token each, of sequence i.

    num_splits > 1 (a power of two) needs `partials` = (o [>=num_seqs, H, S, D] fp32,
    m [>=num_seqs, H, S] fp32, l [same]) from `alloc_partials`. `launch`: tile and launch options
    instead of the tuned table's (scripts/tune_decode_attention.py sweeps them). `pdl`: both kernels
    launched early where supported (kernels/pdl.py).
    """
    if num_seqs == 0:
        return
    num_heads, kv_heads = q.shape[1], kv_cache.shape[3]
    group, group_p = group_rows(num_heads, kv_heads, DECODE_MIN_ROWS)
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    shared, consts = _shared_args(q, kv_cache, scale)
    consts.update(launch if launch is not None else _decode_launch(q.shape[2], q.dtype == torch.float32))
    part_o, part_m, part_l = partials if num_splits > 1 else (out, out, out)  # unused when not splitting
    _decode_kernel[(num_seqs, kv_heads, num_splits)](
        out, part_o, part_m, part_l, q, kv_cache, block_tables, seq_lens,
        num_heads, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), *shared,
        GROUP=group, GROUP_P=group_p, NUM_SPLITS=num_splits, WINDOW=window or 0, **consts,
        **launch_options(pdl, q))
    if num_splits > 1:
        head_dim = q.shape[2]
        _combine_splits_kernel[(num_seqs, num_heads)](
            out, part_o, part_m, part_l, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim), num_warps=4,
            **launch_options(pdl, q))


def alloc_partials(num_seqs: int, num_heads: int, head_dim: int, num_splits: int, device) -> tuple:
    o = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device)
    return o, m, torch.empty_like(m)


def prefill_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, work_seq: torch.Tensor,
                      work_qblock: torch.Tensor, block_q: int, scale: float, window: Optional[int] = None) -> None:
    """Work item i covers query tokens [work_qblock[i] * block_q, +block_q) of sequence work_seq[i]
    (indices into seq_lens / query_start_loc / block_tables; token rows as in query_start_loc)."""
    num_work = work_seq.shape[0]
    if num_work == 0:
        return
    num_heads, kv_heads = q.shape[1], kv_cache.shape[3]
    group, group_p = group_rows(num_heads, kv_heads)
    if block_q * group_p < 16:
        raise ValueError(f"prefill tiles need at least 16 rows; block_q={block_q} x group {group_p}")
    shared, consts = _shared_args(q, kv_cache, scale)
    _prefill_kernel[(num_work, kv_heads)](
        out, q, kv_cache, block_tables, seq_lens, query_start_loc, work_seq, work_qblock,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), *shared,
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, WINDOW=window or 0, **consts)
