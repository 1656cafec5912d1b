"""Single-row matrix-vector product y = x W^T for batch-1 decode on CUDA (issue 6's TP=2 shapes).

Why our own: at one row, every projection is a read of the weight at memory bandwidth and
nothing else. cuBLAS reaches 90% of copy bandwidth on the 8B model's big projections but only
59-65% on the half-size ones of TP=2 (o_proj 2048 -> 4096: 6.8 us for 16.8 MB on an H200,
benchmarks/results/profile-llama-3.1-8b-20261122-111011.json), and adds a split-K reduction
kernel to two of them. This kernel gives each program BLOCK_N output features over the full K,
streams the weight once with fp32 accumulation in registers, and needs no second kernel.

`linear(x, weight, bias)` is F.linear, except that one contiguous bf16/fp16 row on a Hopper GPU
(where it was measured) goes through `gemv`, unless the caller's `KernelConfig.gemv` is off (engine
argument `gemv`, env RAYLIGHT_GEMV=0/1 overrides; the fallback's SiLU-and-mul follows its
`fused_kernels`). The launch
configuration per (N, K) comes from this GPU model's table in `CONFIGS_BY_GPU`, else `DEFAULT`.

Measured on an H200 (benchmarks/results/gemv-20261122-130623.json, inside CUDA graphs, weights
cycled through more than L2 holds), microseconds per call, cuBLAS -> this kernel (its best config):
  8B TP=1: qkv 16.1 -> 14.6, o 13.5 -> 11.3, gate_up 63.4 -> 57.3, down 33.1 -> 31.3
  8B TP=2: qkv 11.9 -> 8.5, o 7.4 -> 6.4, gate_up 34.0 -> 30.4, down 20.2 -> 16.7, LM head 133.9 -> 125.1
DEFAULT (16, 512, 8, 4) beat cuBLAS at every one of those shapes.

`gemv_rows` is the same idea for a few rows (decode at batch 2..64): still one pass over the weight,
each tile multiplied with every row at once on the tensor cores. Why: at batch 8 and 32 the 8B
model's decode graph took 6.12 / 6.62 ms against 5.36 ms at batch 1 on an H100, although the weight
bytes (the floor) are the same (benchmarks/results/throughput-gpu-b{1,8,32}-auto-20261205-17*-h100.json).
It runs where this GPU model's table (`ROWS_CONFIGS_BY_GPU`, from `bench_gemv.py --rows`) measured it
faster than cuBLAS, up to `KernelConfig.gemv_max_rows` rows (RAYLIGHT_GEMV_MAX_ROWS=<n>).
A config's optional fifth entry splits K over that many programs per output tile, the last of them
summing the fp32 partials (one kernel, no memset: the arrival counts go back to zero), for shapes whose
N alone gives too few programs (8B o_proj: 128 tiles of 32 for 132 SMs, on cuBLAS at 68% of bandwidth at
batch 8). Tested on an H100 (graphs of back-to-back calls, with and without PDL) and in the sweep,
where it won no shape at 8 or 32 rows on an H100 (2026-12-06: qkv, o_proj, down): no table entry uses it.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from raylight.kernels import activation
from raylight.kernels.fused import _next_pow2
from raylight.kernels.config import DEFAULT_KERNELS, FEW_ROWS_MAX, KernelConfig
from raylight.kernels.pdl import gdc_functions, launch_options

triton = None
tl = None
gdc_wait = gdc_launch_dependents = None

def parse_config(text: str) -> dict:
    """RAYLIGHT_GEMV_CONFIG's and RAYLIGHT_GEMV_ROWS_CONFIG's format (what bench_gemv prints and writes as
    gemv.env / gemv-rows.env): "N,K[,BLOCK_M]:BLOCK_N,BLOCK_K,WARPS,STAGES[;...]", or "...:cublas" where
    cuBLAS was the faster one. Returns {(N, K[, BLOCK_M]): config tuple, or None for cuBLAS}."""
    table: dict = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        key, _, cfg = entry.partition(":")
        table[tuple(int(v) for v in key.split(","))] = (None if cfg.strip() == "cublas"
                                                        else tuple(int(v) for v in cfg.split(",")))
    return table


def format_config(table: dict) -> str:
    return ";".join(",".join(map(str, key)) + ":" + ("cublas" if cfg is None else ",".join(map(str, cfg)))
                    for key, cfg in sorted(table.items()))


# (BLOCK_N, BLOCK_K, num_warps, num_stages) by weight (N, K), per GPU model: the best of bench_gemv's sweep
# there. A GPU not listed takes the H200's table; a shape not listed, DEFAULT.
CONFIGS_BY_GPU: dict = {
    "H200": {
        (6144, 4096): (8, 512, 4, 3), (4096, 4096): (4, 1024, 8, 4), (28672, 4096): (16, 256, 4, 4),
        (4096, 14336): (8, 512, 8, 3), (3072, 4096): (8, 1024, 8, 4), (4096, 2048): (8, 512, 8, 3),
        (14336, 4096): (16, 256, 4, 4), (4096, 7168): (8, 512, 8, 4), (64128, 4096): (32, 256, 4, 4),
    },
}
DEFAULT = (16, 512, 8, 4)
# The environment variable, read once here, goes before the tables (a tuning run passes its sweep's
# winners on to the benchmarks after it without a commit).
CONFIGS: dict = {k: v for k, v in parse_config(os.environ.get("RAYLIGHT_GEMV_CONFIG", "")).items() if v is not None}


def _table_of_gpu(tables: dict, index: int, default: dict) -> dict:
    """The table of `tables` whose GPU model is in device `index`'s name, else `default`."""
    name = torch.cuda.get_device_name(index)
    return next((t for model, t in tables.items() if model in name), default)


@functools.lru_cache(maxsize=None)
def _gpu_table(index: int) -> dict:
    return _table_of_gpu(CONFIGS_BY_GPU, index, CONFIGS_BY_GPU["H200"])


def single_row_config(n: int, k: int, index: int) -> tuple:
    """`gemv`'s launch config for a weight [n, k] on CUDA device `index`."""
    return CONFIGS.get((n, k)) or _gpu_table(index).get((n, k), DEFAULT)


# The few-row kernel (`gemv_rows`): up to MAX_ROWS rows, padded to a row tile of 16, 32 or 64.
MAX_ROWS = FEW_ROWS_MAX
ROWS_DEFAULT = (32, 256, 4, 4)


# (N, K, BLOCK_M) -> launch config, or None where cuBLAS was faster, per GPU model: `bench_gemv.py --rows 8
# 32 64` on an H100 (2026-12-06, benchmarks/results/gemv-rows-20261206-000707-h100.json), the Llama-3.1-8B
# TP=1 shapes and its LM head. o_proj at row tile 16 is cuBLAS: the sweep had the kernel 1.9 us ahead, a
# probe in the same lease 7.8 us behind (24.4 against 16.6 us), so the nearer call goes to the library.
# A GPU or shape not listed stays on cuBLAS: on an H200 the H100's table made batch 8 and 32 slower
# (1,486 / 5,114 out tok/s against 1,623 / 5,844 on cuBLAS, 8B shape, same machine), and a config not
# measured on a GPU may even need more shared memory than it has.
ROWS_CONFIGS_BY_GPU: dict = {
    "H100": {
        (6144, 4096, 16): (32, 128, 4, 4), (6144, 4096, 32): (16, 128, 4, 4), (6144, 4096, 64): None,
        (4096, 4096, 16): None, (4096, 4096, 32): None, (4096, 4096, 64): None,
        (28672, 4096, 16): (32, 128, 4, 3), (28672, 4096, 32): (64, 128, 4, 3), (28672, 4096, 64): (64, 128, 4, 3),
        (4096, 14336, 16): (16, 256, 4, 4), (4096, 14336, 32): (16, 256, 4, 4), (4096, 14336, 64): (32, 256, 4, 4),
        (128256, 4096, 16): (64, 256, 4, 4), (128256, 4096, 32): (64, 256, 8, 4), (128256, 4096, 64): (64, 128, 4, 3),
    },
}
# The environment variable, read once here, goes before the tables on any GPU (a tuning run passes its
# sweep's winners on to the benchmarks after it without a commit).
ROWS_CONFIGS: dict = parse_config(os.environ.get("RAYLIGHT_GEMV_ROWS_CONFIG", ""))


@functools.lru_cache(maxsize=None)
def _rows_table(index: int) -> dict:
    return _table_of_gpu(ROWS_CONFIGS_BY_GPU, index, {})


def row_tile(rows: int) -> int:
    """The padded row count (tl.dot's tile side is at least 16) a call of `rows` rows runs at."""
    return max(16, 1 << (rows - 1).bit_length())


def warmup_row_counts(max_rows: int) -> list[int]:
    """Row counts that together build every variant of the few-row kernel a launch of 1..max_rows rows
    can ask for: per row tile, one count Triton specializes as a multiple of 16 and one it does not
    (the row count is a plain argument), and the single-row GEMV. The decode graphs build them for
    the body at capture; the LM head runs eagerly after the graph, so start-up runs it at these."""
    counts = [1]
    for tile in (16, 32, 64):
        lo, hi = (2 if tile == 16 else tile // 2 + 1), min(tile, max_rows, MAX_ROWS)
        if lo <= hi:
            counts.append(lo)
            if hi // 16 * 16 >= lo:
                counts.append(hi // 16 * 16)
    return counts


def rows_config(n: int, k: int, rows: int, index: Optional[int] = None):
    """`gemv_rows`' launch config for a weight [n, k] at `rows` rows on CUDA device `index` (None: the
    current one); None where cuBLAS is faster or the shape was never measured on that GPU."""
    key = (n, k, row_tile(rows))
    if key in ROWS_CONFIGS:
        return ROWS_CONFIGS[key]
    if not torch.cuda.is_available():
        return None
    return _rows_table(torch.cuda.current_device() if index is None else index).get(key)


def _prefetch_weight(w_ptr, rn, N, K, stride_w, PREFETCH: tl.constexpr):
    # Pulls the first PREFETCH columns of this program's weight rows toward L2 (one PTX prefetch per
    # 128-byte line, addresses clamped in bounds): weights are never written by a previous kernel, so
    # this may run before the PDL wait, streaming HBM while the previous kernel finishes.
    cols = tl.minimum(tl.arange(0, PREFETCH // 64) * 64, K - 1)
    rows = tl.cast(tl.minimum(rn, N - 1), tl.int64)
    lines = w_ptr + rows[:, None] * stride_w + cols[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [lines], dtype=tl.int32, is_pure=False, pack=1)


def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SILU_AND_MUL: tl.constexpr,
                 PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    # SILU_AND_MUL: x is [gate | up] of width 2K and the input row is silu(gate) * up, computed
    # here per chunk (rounded as kernels/fused.silu_and_mul does): no separate kernel for it.
    pid = tl.program_id(0)
    if PREFETCH > 0:  # only with PDL (the wrapper's rule): before the wait is the point of it
        _prefetch_weight(w_ptr, pid * BLOCK_N + tl.arange(0, BLOCK_N), N, K, stride_w, PREFETCH)
    if PDL:  # launched early (kernels/pdl.py): wait for the previous kernel before any memory access
        gdc_wait()
        gdc_launch_dependents()
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + tl.cast(rn, tl.int64)[:, None] * stride_w + rk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k + rk)
            if SILU_AND_MUL:
                u = tl.load(x_ptr + K + k + rk)
        else:
            k_mask = (k + rk) < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k + rk, mask=k_mask, other=0.0)
            if SILU_AND_MUL:
                u = tl.load(x_ptr + K + k + rk, mask=k_mask, other=0.0)
        if SILU_AND_MUL:
            g = x.to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
            x = (s * u.to(tl.float32)).to(x.dtype)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_mask)


def _rows_kernel(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, K_PER_SPLIT, stride_x, stride_w, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 SPLIT_K: tl.constexpr = 1, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    # The few-row case (decode at batch 2..MAX_ROWS): like _gemv_kernel, each program owns BLOCK_N
    # output features and streams their weight rows once, but multiplies each weight tile with all M
    # input rows at once on the tensor cores (rows padded to BLOCK_M >= 16). It takes no SiLU-and-mul
    # input (see `applies`).
    # SPLIT_K > 1: program (n, s) covers K_PER_SPLIT columns of K (a multiple of BLOCK_K), so a small N
    # still gives every SM work (o_proj's 4,096 features at BLOCK_N 32 are 128 programs for 132 SMs).
    # Each writes its fp32 partial to part_ptr [SPLIT_K, M, N], then counts itself in count_ptr[n]; the
    # last of a tile's SPLIT_K programs sums the partials, writes y and sets the count back to 0 for the
    # next call: no second kernel, no memset.
    pid = tl.program_id(0)
    if SPLIT_K == 1:  # resolved at compile time: the unsplit kernel is the same code as before the split
        split = 0
        k_start = 0
        k_end = K
    else:
        split = tl.program_id(1)
        k_start = split * K_PER_SPLIT
        k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    if PREFETCH > 0:
        _prefetch_weight(w_ptr + k_start, pid * BLOCK_N + tl.arange(0, BLOCK_N), N, K - k_start, stride_w, PREFETCH)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    rk = k_start + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + tl.cast(rn, tl.int64)[:, None] * stride_w + rk[None, :]
    x_ptrs = x_ptr + tl.cast(rm, tl.int64)[:, None] * stride_x + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = (k - k_start + rk) < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y_ptrs = y_ptr + tl.cast(rm, tl.int64)[:, None] * stride_y + rn[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = tl.cast(rm, tl.int64)[:, None] * N + rn[None, :]
        tl.store(part_ptr + split * M * N + tile, acc, mask=out_mask)
        # Every thread's share of the partial is stored before the count (the barrier), and acq_rel makes
        # it visible before the count at GPU scope; the last program's loads then see every partial.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid, 0)


@functools.lru_cache(maxsize=None)
def gemv_kernel():
    global triton, tl, gdc_wait, gdc_launch_dependents
    import triton
    import triton.language as tl

    gdc_wait, gdc_launch_dependents = gdc_functions()  # used under `if PDL:` only
    # the kernels call it by its global name, so that name must be the jitted one
    globals()["_prefetch_weight"] = triton.jit(_prefetch_weight)
    return triton.jit(_gemv_kernel)


@functools.lru_cache(maxsize=None)
def rows_kernel():
    gemv_kernel()  # binds triton and tl
    return triton.jit(_rows_kernel)


@functools.lru_cache(maxsize=None)
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def applies(x: torch.Tensor, weight: torch.Tensor, silu_and_mul: bool = False, max_rows: int = 1) -> bool:
    rows = x.shape[0] if x.dim() == 2 else 0
    return (x.is_cuda and x.dim() == 2 and 1 <= rows <= min(max_rows, MAX_ROWS) and x.is_contiguous()
            and weight.dim() == 2 and weight.is_contiguous() and weight.dtype == x.dtype
            and weight.shape[1] * (2 if silu_and_mul else 1) == x.shape[1]
            and x.dtype in (torch.bfloat16, torch.float16) and _hopper(x.device.index or 0)
            # where the sweep found cuBLAS faster at this row tile, cuBLAS it is; the few-row kernel takes
            # no SiLU-and-mul input (fused there it ran 4.5-8x slower than the activation then cuBLAS,
            # H100, 8B down_proj, 8 rows: 225 us against 50), so with several rows the activation runs first
            and (rows == 1 or (not silu_and_mul and rows_config(*weight.shape, rows, x.device.index) is not None)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           silu_and_mul: bool = False, kernels: KernelConfig = DEFAULT_KERNELS) -> torch.Tensor:
    """F.linear(x, weight, bias), through `gemv` for a single row (and `gemv_rows` for up to
    `kernels.gemv_max_rows` rows) where it applies and `kernels.gemv` is on. With `silu_and_mul`,
    x is [gate | up] and the product is taken with silu(gate) * up."""
    def ours(x: torch.Tensor, silu_and_mul: bool) -> bool:
        return kernels.gemv and applies(x, weight, silu_and_mul, kernels.gemv_max_rows)

    if silu_and_mul and not ours(x, True):  # several rows: the activation, then the projection alone
        x, silu_and_mul = activation.silu_and_mul(x, kernels.fused_kernels, kernels.pdl), False
    if ours(x, silu_and_mul):
        if x.shape[0] == 1:
            y = gemv(x, weight, silu_and_mul=silu_and_mul, pdl=kernels.pdl, prefetch=kernels.gemv_prefetch)
        else:  # never with silu_and_mul (applies refuses it)
            y = gemv_rows(x, weight, pdl=kernels.pdl, prefetch=kernels.gemv_prefetch)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _launch(pdl: bool, prefetch: int, x: torch.Tensor) -> dict:
    """PDL's launch options (kernels/pdl.py) and the weight prefetch ahead of its wait: `prefetch`
    columns (a multiple of 64, at least 64) when PDL is on; before a wait that is not there it is no use."""
    opts = launch_options(pdl, x)
    if opts["PDL"] and prefetch > 0:
        opts["PREFETCH"] = max(64, _next_pow2(prefetch))
    return opts


def gemv(x: torch.Tensor, weight: torch.Tensor, config=None, silu_and_mul: bool = False,
         pdl: bool = False, prefetch: int = 0) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T -> [1, N] (x [1, 2K] = [gate | up] with `silu_and_mul`);
    `config` overrides the table (benchmarks); `pdl`: launched early where supported (kernels/pdl.py),
    with `prefetch` weight columns pulled toward L2 before its wait (KernelConfig.gemv_prefetch)."""
    N, K = weight.shape
    block_n, block_k, warps, stages = config or single_row_config(N, K, x.device.index or 0)
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    gemv_kernel()[(triton.cdiv(N, block_n),)](x, weight, y, N, K, weight.stride(0), BLOCK_N=block_n,
                                              BLOCK_K=block_k, EVEN_K=K % block_k == 0,
                                              SILU_AND_MUL=silu_and_mul, num_warps=warps, num_stages=stages,
                                              **_launch(pdl, prefetch, x))
    return y


# Arrival counts of the split-K variant's tiles, per (device, stream): zero between calls (the last program
# of each tile sets its count back), so one buffer serves every call on a stream, CUDA graphs included.
# Kept for the process's life: a graph captured with a buffer keeps its address.
_SPLIT_COUNTS: dict = {}
SPLIT_COUNTS_LEN = 1 << 16  # tiles of one call at most (N / BLOCK_N)


def _split_counts(device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    if key not in _SPLIT_COUNTS:
        _SPLIT_COUNTS[key] = torch.zeros(SPLIT_COUNTS_LEN, dtype=torch.int32, device=device)
    return _SPLIT_COUNTS[key]


def gemv_rows(x: torch.Tensor, weight: torch.Tensor, config=None, pdl: bool = False,
              prefetch: int = 0) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T -> [M, N] for 1 <= M <= MAX_ROWS; `config` (BLOCK_N, BLOCK_K,
    num_warps, num_stages[, SPLIT_K]) overrides the tables. With SPLIT_K > 1 the K dimension is split
    over that many programs per tile (see _rows_kernel); calls on one stream must not overlap (kernels
    on one stream never do)."""
    M = x.shape[0]
    N, K = weight.shape
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv_rows takes 1 to {MAX_ROWS} rows, not {M}")
    kernel = rows_kernel()  # binds triton
    block_m = row_tile(M)
    block_n, block_k, warps, stages, *rest = config or rows_config(N, K, M, x.device.index) or ROWS_DEFAULT
    tiles = triton.cdiv(N, block_n)
    # no more splits than K has BLOCK_K chunks, each split a whole number of chunks
    split_k = max(1, min(rest[0] if rest else 1, triton.cdiv(K, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    if split_k > 1 and tiles > SPLIT_COUNTS_LEN:
        raise ValueError(f"{tiles} tiles of {block_n} features: more than the split-K counts hold")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if split_k > 1:
        partials, counts = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device), _split_counts(x.device)
    else:
        partials = counts = y  # not read
    kernel[(tiles, split_k)](x, weight, y, partials, counts, M, N, K, k_per_split, x.stride(0),
                             weight.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             EVEN_K=K % block_k == 0, SPLIT_K=split_k, num_warps=warps, num_stages=stages,
                             **_launch(pdl, prefetch, x))
    return y
