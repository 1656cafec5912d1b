"""The MoE expert computation: routing (`select_experts`) and the experts' SwiGLU MLPs over the
routed (token, k) pairs (`fused_experts`), as a torch path (CPU, and the reference on GPU) and a
fused Triton path (CUDA).

    out[t] = Σ_k w[t, k] · W2[e] (silu(G[e] x_t) * U[e] x_t),   e = ids[t, k],  W13[e] = [G[e]; U[e]]

with w13 [E, 2I, H] (gate rows then up rows, HF's `gate_up_proj`), w2 [E, H, I] (`down_proj`).
An id of -1 (an expert not on this rank under EP) contributes nothing.

Torch path: the (token, k) pairs are sorted by expert once (one `.tolist()` of the counts), and
only the hit experts run: gather, linear, silu*mul, linear, times the routing weight, `index_add_`.
In float32 it is HF's expert loop (`Qwen3MoeExperts.forward`) operation for operation (same rows
in the same order per expert, same accumulation order), so the engine's greedy outputs can be
compared token for token with HF's; bf16/fp16 accumulate over the experts in float32.

Triton path (no host synchronisation, CUDA-graph capturable; grids from shapes only):
  1. `moe_align.moe_align_block_size`: pairs grouped by expert, padded to BLOCK_M per expert;
  2. GEMM 1: each program computes a BLOCK_M x BLOCK_N tile of gate and the matching tile of up
     over H and writes silu(g) * u (rounded as the torch path rounds) -> cache1 [padded rows, I];
  3. GEMM 2: cache1 x W2[e]^T times the routing weight -> cache2 [T*K, H] (float32 for small
     batches, x.dtype above FP32_CACHE_PAIRS pairs);
  4. a sum over k (in k order, float32, skipping -1 entries) -> out [T, H].
Tile configurations per (E, H, I) and token bucket come from `CONFIGS` (tuned on an H200 by
scripts/bench_fused_moe.py --sweep), else from `default_config`; `fit_config` shrinks stages /
BLOCK_K where shared memory is short (fp32, smaller GPUs).

Measured on an H200 (benchmarks/results/fused-moe-20261204-172359.json; bf16, E=128, top-8,
H=2048, I=768; CUDA-graph replay up to T=512, eager above), ms ours / sorted torch._grouped_mm:
T=1 0.035/0.103, 8 0.134/0.254, 64 0.293/0.488, 512 0.336/0.596, 2048 0.604/1.256,
8192 1.450/3.262 (427 TFLOP/s): 0.34-0.61x grouped_mm's time at every T from 1 to 8192.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from raylight.kernels import moe_align
from raylight.kernels.fused import _have_triton

triton = None
tl = None

# (BLOCK_M, gemm1 (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), gemm2 (same)) by
# (E, H, I) -> [(max tokens T, config), ...] ascending; the first bucket with T <= max applies.
CONFIGS: dict = {
    # Qwen3-30B-A3B (TP=1 / EP): bench_fused_moe.py --sweep on an H200, torch 2.11, triton 3.6
    # (T <= 256 timed in CUDA graphs, above eagerly; benchmarks/results/fused-moe-20261204-*.json)
    (128, 2048, 768): [
        (1, (16, (64, 128, 1, 4, 4), (64, 64, 1, 4, 4))),
        (2, (16, (32, 128, 1, 4, 4), (64, 64, 1, 4, 4))),
        (4, (16, (32, 256, 1, 4, 3), (64, 64, 1, 4, 4))),
        (8, (16, (32, 256, 1, 4, 3), (32, 128, 1, 4, 4))),
        (32, (16, (32, 256, 1, 4, 3), (64, 128, 1, 4, 4))),
        (64, (16, (32, 128, 1, 4, 4), (64, 128, 1, 4, 4))),
        (128, (16, (32, 256, 1, 4, 3), (64, 128, 1, 4, 4))),
        (256, (32, (64, 64, 1, 4, 4), (128, 64, 1, 4, 3))),
        (512, (64, (64, 64, 8, 4, 4), (128, 64, 8, 4, 3))),
        (1024, (64, (64, 64, 8, 4, 4), (128, 64, 8, 4, 3))),
        (2048, (128, (128, 64, 8, 8, 4), (128, 64, 8, 4, 3))),
        (4096, (128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 3))),
        (1 << 62, (128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 3))),
    ],
}
FP32_CACHE_PAIRS = 4096  # cache2 is float32 up to this many (token, k) pairs


def default_config(E: int, H: int, I: int, T: int, top_k: int):
    """Shapes not in CONFIGS: the H200 table's picks by pairs per expert."""
    per_expert = T * top_k / max(1, E)
    if per_expert <= 2:
        return (16, (32, 256, 1, 4, 3), (64, 128, 1, 4, 4))
    if per_expert <= 8:
        return (16, (32, 128, 1, 4, 4), (64, 128, 1, 4, 4))
    if per_expert <= 16:
        return (32, (64, 64, 1, 4, 4), (128, 64, 1, 4, 3))
    if per_expert <= 64:
        return (64, (64, 64, 8, 4, 4), (128, 64, 8, 4, 3))
    return (128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 3))


def get_config(E: int, H: int, I: int, T: int, top_k: int):
    for max_t, cfg in CONFIGS.get((E, H, I), ()):
        if T <= max_t:
            return cfg
    return default_config(E, H, I, T, top_k)


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   round_to: Optional[torch.dtype] = None):
    """softmax over experts in float32, top-k, optionally renormalised to sum 1 -> (float32 weights
    [T, K], int64 ids [T, K]). HF's routers in this order: Mixtral (always renormalises, keeps the
    float32 weights: round_to=None), Qwen2-MoE / Qwen3-MoE (`norm_topk_prob`, then cast to the
    logits' dtype: pass round_to=router_logits.dtype to get those values, still as float32)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if round_to is not None and round_to != torch.float32:
        weights = weights.to(round_to).to(torch.float32)
    return weights, ids.to(torch.int64)


# ---------------------------------------------------------------------------------------------
# Torch paths
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def torch_fused_experts(x, w13, w2, topk_weights, topk_ids):
    """Sort the pairs by expert, run the hit experts only (one host sync for the counts)."""
    T, H = x.shape
    E = w13.shape[0]
    out = torch.zeros((T, H), dtype=_acc_dtype(x.dtype), device=x.device)
    if T == 0 or topk_ids.numel() == 0:
        return out.to(x.dtype)
    # k-major flat order (k * T + t), stably sorted by expert: inside an expert the rows come as
    # HF's torch.where(expert_mask[e]) yields them (by k, then token)
    ids = topk_ids.t().reshape(-1).to(torch.int64)
    valid = (ids >= 0) & (ids < E)
    key = torch.where(valid, ids, E)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()
    tok = order % T
    weights = topk_weights.t().reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        t_idx = tok[start:start + c]
        gate, up = F.linear(x[t_idx], w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, t_idx, (h * weights[start:start + c, None]).to(out.dtype))
        start += c
    return out.to(x.dtype)


def moe_reference(x, w13, w2, topk_weights, topk_ids):
    """The naive loop over every expert with masks, computed in float32 (tests only)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    out = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(E):
        t_idx, k_idx = torch.where(topk_ids == e)
        if t_idx.numel() == 0:
            continue
        gu = xf[t_idx] @ w13[e].float().t()
        h = (F.silu(gu[:, : two_i // 2]) * gu[:, two_i // 2:]) @ w2[e].float().t()
        out.index_add_(0, t_idx, h * topk_weights[t_idx, k_idx].float()[:, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


def _gemm1_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, ntp_ptr,
                  N, K, TK, top_k, n_blocks, stride_xm, stride_we, stride_wn, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    # out[r] = silu(x[tok_r // top_k] G[e]^T) * (x[tok_r // top_k] U[e]^T) for the padded row r
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    if pid_m * BLOCK_M >= tl.load(ntp_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(sorted_ptr + offs_m)
    tmask = tok < TK
    row = (tok // top_k).to(tl.int64)
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + row[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_off = N * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=tmask[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(g_ptrs + u_off)
        else:
            kmask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=tmask[:, None] & kmask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=kmask[:, None], other=0.0)
            u = tl.load(g_ptrs + u_off, mask=kmask[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    ty = out_ptr.dtype.element_ty
    gv = acc_g.to(ty).to(tl.float32)  # the linear's output in the dtype, then F.silu(gate) * up
    uv = acc_u.to(ty).to(tl.float32)
    s = (gv / (1.0 + tl.exp(-gv))).to(ty).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, (s * uv).to(ty), mask=tmask[:, None] & (cols < N)[None, :])


def _gemm2_kernel(a_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, ntp_ptr, tw_ptr,
                  N, K, TK, n_blocks, stride_am, stride_we, stride_wn, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    # out[tok_r] = w[tok_r] * (a[r] W2[e]^T): a's rows are the padded rows GEMM 1 wrote
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    if pid_m * BLOCK_M >= tl.load(ntp_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(sorted_ptr + offs_m)
    tmask = tok < TK
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=tmask[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            kmask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=tmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tw = tl.load(tw_ptr + tok, mask=tmask, other=0.0).to(tl.float32)
    y = acc.to(a_ptr.dtype.element_ty).to(tl.float32) * tw[:, None]  # linear in the dtype, times w
    out_ptrs = out_ptr + tok[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & (cols < N)[None, :])


def _sum_k_kernel(c_ptr, ids_ptr, out_ptr, H, E, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    # out[t] = Σ_k c[t * TOP_K + k] over the entries with a local expert id, in k order, float32
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + k + tl.zeros([BLOCK], dtype=tl.int64))  # broadcast id
        ok = (e >= 0) & (e < E)
        v = tl.load(c_ptr + (t * TOP_K + k) * H + cols, mask=mask & ok, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _kernels():
    global triton, tl
    import triton
    import triton.language as tl

    # The counts that change with every step's size are not specialised on (Triton would compile a
    # variant per divisibility-by-16 of each): one compile per tile config, done at engine start.
    vary = ["TK", "n_blocks"]
    return (triton.jit(_gemm1_kernel, do_not_specialize=vary), triton.jit(_gemm2_kernel, do_not_specialize=vary),
            triton.jit(_sum_k_kernel))


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 160 * 1024))


def fit_config(cfg, block_m: int, n_b: int, elt: int, limit: int):
    """cfg with fewer stages, then a smaller BLOCK_K, until the pipelined tiles (A: block_m x BK,
    n_b weight tiles BK x BN per stage) fit in `limit` bytes of shared memory (fp32 inputs; GPUs
    with less shared memory than the H200 the table was tuned on)."""
    bn, bk, group, warps, stages = cfg
    size = lambda: stages * (block_m * bk + n_b * bk * bn) * elt  # noqa: E731
    while size() > limit and stages > 2:
        stages -= 1
    while size() > limit and bk > 16:
        bk //= 2
    return (bn, bk, group, warps, stages)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm1(x, w13, sorted_ids, expert_ids, ntp, top_k: int, block_m: int, cfg) -> torch.Tensor:
    """cache1 [n_blocks * block_m, I] = silu(gate) * up on the padded rows (benchmarks time it alone)."""
    bn, bk, group, warps, stages = cfg
    E, two_i, H = w13.shape
    inter = two_i // 2
    n_blocks = expert_ids.numel()
    cache1 = torch.empty((n_blocks * block_m, inter), dtype=x.dtype, device=x.device)
    grid = (n_blocks * -(-inter // bn),)
    _kernels()[0][grid](x, w13, cache1, sorted_ids, expert_ids, ntp, inter, H, x.shape[0] * top_k,
                        top_k, n_blocks, x.stride(0), w13.stride(0), w13.stride(1), cache1.stride(0),
                        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EVEN_K=H % bk == 0,
                        PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages)
    return cache1


def gemm2(cache1, w2, sorted_ids, expert_ids, ntp, topk_weights, top_k: int, block_m: int, cfg,
          out_dtype: torch.dtype) -> torch.Tensor:
    """cache2 [T*K, H] = routing weight * (cache1 W2[e]^T) per pair (rows of -1 pairs unwritten)."""
    bn, bk, group, warps, stages = cfg
    E, H, inter = w2.shape
    TK = topk_weights.numel()
    n_blocks = expert_ids.numel()
    cache2 = torch.empty((TK, H), dtype=out_dtype, device=cache1.device)
    grid = (n_blocks * -(-H // bn),)
    _kernels()[1][grid](cache1, w2, cache2, sorted_ids, expert_ids, ntp, topk_weights, H, inter, TK,
                        n_blocks, cache1.stride(0), w2.stride(0), w2.stride(1), cache2.stride(0),
                        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EVEN_K=inter % bk == 0,
                        PRECISION=_precision(cache1.dtype), num_warps=warps, num_stages=stages)
    return cache2


def sum_k(cache2, topk_ids, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    T, K = topk_ids.shape
    H = cache2.shape[1]
    out = torch.empty((T, H), dtype=dtype, device=cache2.device)
    block = min(1024, 1 << max(0, H - 1).bit_length())
    _kernels()[2][(T, -(-H // block))](cache2, topk_ids, out, H, num_experts, TOP_K=K, BLOCK=block,
                                       num_warps=max(1, min(8, block // 128)))
    return out


def triton_fused_experts(x, w13, w2, topk_weights, topk_ids, config=None):
    """The fused path (see the module doc); `config` overrides the table (benchmarks)."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    if T == 0:
        return torch.zeros((0, H), dtype=x.dtype, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    w13 = w13 if w13.stride(2) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(2) == 1 else w2.contiguous()
    topk_ids = topk_ids.contiguous()
    tw = topk_weights.to(torch.float32).contiguous()
    block_m, cfg1, cfg2 = config or get_config(E, H, two_i // 2, T, K)
    if x.is_cuda:
        elt, limit = x.element_size(), _smem_limit(x.device.index or 0)
        if elt > 2:  # fp32 (tests, references): smaller tiles, the table is for 16-bit weights
            block_m, limit = min(block_m, 64), limit * 3 // 4
            cfg1, cfg2 = ((min(c[0], 64),) + tuple(c[1:]) for c in (cfg1, cfg2))
        cfg1, cfg2 = fit_config(cfg1, block_m, 2, elt, limit), fit_config(cfg2, block_m, 1, elt, limit)
    sorted_ids, expert_ids, ntp = moe_align.moe_align_block_size(topk_ids, block_m, E)
    cache1 = gemm1(x, w13, sorted_ids, expert_ids, ntp, K, block_m, cfg1)
    c2_dtype = torch.float32 if T * K <= FP32_CACHE_PAIRS else x.dtype
    cache2 = gemm2(cache1, w2, sorted_ids, expert_ids, ntp, tw, K, block_m, cfg2, c2_dtype)
    return sum_k(cache2, topk_ids, E, x.dtype)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, use_triton: Optional[bool] = None) -> torch.Tensor:
    """out [T, H] in x.dtype = Σ_k w[t, k] · W2[e] (silu(G[e] x) * U[e] x), e = topk_ids[t, k]
    (local expert index, -1: skip). use_triton None: the Triton path on CUDA when triton imports
    and the weights share x's dtype, the torch path otherwise."""
    if use_triton is None:
        use_triton = (x.is_cuda and _have_triton() and w13.dtype == x.dtype and w2.dtype == x.dtype
                      and x.dtype in (torch.bfloat16, torch.float16, torch.float32))
    if use_triton:
        return triton_fused_experts(x, w13, w2, topk_weights, topk_ids)
    return torch_fused_experts(x, w13, w2, topk_weights, topk_ids)


@torch.no_grad()
def warmup_fused_experts(w13: torch.Tensor, w2: torch.Tensor, top_k: int, max_tokens: int) -> int:
    """Compiles (JIT) every Triton variant `fused_experts` can pick for these weights, for token counts up
    to `max_tokens`: each power of two (the tile table's buckets and the kernels' power-of-two block sizes
    switch there) and `max_tokens` itself. Without it the first traffic pays the compiles: ~20 s of stalls
    on an H200 for Qwen3-30B-A3B's shapes (measured; a warm Triton cache hides it). Returns calls made."""
    if not (w13.is_cuda and _have_triton()):
        return 0
    E, _, H = w13.shape
    sizes = sorted({1 << i for i in range(max(1, max_tokens).bit_length())} | {max_tokens})
    for T in sizes:
        x = torch.zeros(T, H, dtype=w13.dtype, device=w13.device)
        ids = (torch.arange(T * top_k, device=w13.device) % E).view(T, top_k)
        fused_experts(x, w13, w2, torch.ones(T, top_k, device=w13.device), ids)
    return len(sizes)
