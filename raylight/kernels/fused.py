"""Fused elementwise kernels for the llama layers (issue 5), off by default.

- `fused_add_rms_norm(x, residual, weight, eps)`: `residual = x + residual` and RMSNorm of it in
  one pass over the row (the torch path reads/writes the hidden state several times).
- `silu_and_mul(x)`: `silu(x[:, :I]) * x[:, I:]` in one pass.
- `rotary_qk(q, k, cos, sin)`: the neox (rotate-half) rotation of `kernels.rotary.apply_rotary`
  on q and k in one launch.
- `rope_write_kv(q, k, v, cos, sin, kv_cache, slot_mapping)`: that rotation with k and v written into
  the paged KV cache instead of returned (the Triton attention backend's `forward_rope`).

Each op rounds its intermediates to the input dtype exactly where the torch path does
(`kernels/norm.py`, `kernels/activation.py`, `kernels/rotary.py`), so the only differences are
the order of the fp32 reduction in the norm and fp32 rounding inside an op. Launch grids depend
only on shapes, never on device data, so every op can be captured in a CUDA graph. Rows may be
strided (views of a wider projection output); the last dimension must be contiguous.

The model layers use these kernels when their `KernelConfig.fused_kernels` (engine argument
`fused_kernels`, env `RAYLIGHT_FUSED_KERNELS=0/1` overrides) is on and `fused_ops_enabled(device)`:
a CUDA device and an importable triton. On CPU the layers run the torch code.
Measured on an H200 (benchmarks/results/kernels-20261122-104043.json, profile-llama-3.2-1b-*):
each op 2-10x faster than its torch chain; a W1 decode step's GPU time 4.54 -> 3.37 ms, an
8192-token prefill step's 40.6 -> 25.5 ms, batch-1 8B decode 6.55 -> 4.88 ms per token.
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from raylight.kernels.pdl import gdc_functions, launch_options

# triton is imported, and the kernels decorated, on first use (`_kernels()`), not when the model
# layers import this module: importing raylight stays as cheap as before, and Triton picks
# interpreter or compiler from TRITON_INTERPRET as it stands at that first use.
triton = None
tl = None
gdc_wait = gdc_launch_dependents = None

@functools.lru_cache(maxsize=None)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_ops_enabled(device: torch.device) -> bool:
    """True when the fused kernels can serve the model layers on `device`: it is CUDA and triton is
    importable. (Whether they should is the layer's `KernelConfig.fused_kernels`.)"""
    # Called by every layer on every eager step: the cheap test first, no torch.device() construction.
    if getattr(device, "type", device) != "cuda":
        return False
    return _have_triton()


def _use_triton(t: torch.Tensor) -> bool:
    """Whether the kernels can run on `t`: compiled on CUDA, or by Triton's CPU interpreter."""
    if not _have_triton():
        return False
    return kernels_interpreted() if not t.is_cuda else not kernels_interpreted()


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


# ---------------------------------------------------------------------------------------------
# The unfused ops: what the layers run with the switch off, and the kernels' references
# ---------------------------------------------------------------------------------------------


def torch_add_rms_norm(x, residual, weight, eps):
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def torch_silu_and_mul(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

# Kernel bodies, decorated with triton.jit by _kernels().

def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
                         n_inner, sx_o, sx_i, sr_o, sr_i, eps,
                         N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         PDL: tl.constexpr = False):
    # One program per row. Rows are (outer, inner) pairs so 3-D views such as the per-head
    # slices of a qkv split need no copy; outputs are contiguous.
    if PDL:  # launched early (kernels/pdl.py): wait for the previous kernel before any memory access
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    o = row // n_inner
    i = row % n_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + o * sx_o + i * sx_i + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + o * sr_o + i * sr_i + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # x + residual, rounded
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / N
    h = h * (1.0 / tl.sqrt(var + eps))
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # h.to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)

def _silu_and_mul_kernel(x_ptr, out_ptr, sx_t, I, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + t * sx_t + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * sx_t + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu(gate)
    tl.store(out_ptr + t * I + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)

def _rotated(src, mask, c1, c2, s1, s2, HALF: tl.constexpr):
    # The two halves at `src` rotated: x * cos + cat(-x2, x1) * sin, each product rounded to the dtype as
    # torch does; returned in the dtype.
    ty = src.dtype.element_ty
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c1[None, :]).to(ty).to(tl.float32) + (-x2 * s1[None, :]).to(ty).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(ty).to(tl.float32) + (x1 * s2[None, :]).to(ty).to(tl.float32)
    return o1.to(ty), o2.to(ty)


def _cos_sin(cos_ptr, sin_ptr, t, sc_t, ss_t, d, d_mask, HALF: tl.constexpr):
    c1 = tl.load(cos_ptr + t * sc_t + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * sc_t + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * ss_t + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * ss_t + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


def _rotate_tile(src_ptr, dst_ptr, s_t, s_h, t, heads, n_heads, d, d_mask, c1, c2, s1, s2,
                 HALF: tl.constexpr):
    mask = (heads[:, None] < n_heads) & d_mask[None, :]
    o1, o2 = _rotated(src_ptr + t * s_t + heads[:, None] * s_h + d[None, :], mask, c1, c2, s1, s2, HALF)
    dst = dst_ptr + (t * n_heads + heads[:, None]) * (2 * HALF) + d[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)

def _rotary_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, cache_ptr, slot_ptr,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, ss_t, n_q, n_k,
                   stride_cb, stride_ckv, stride_cp, stride_ch,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HAS_K: tl.constexpr,
                   TO_CACHE: tl.constexpr, BLOCK_SIZE: tl.constexpr = 1, PDL: tl.constexpr = False):
    # q (and k) rotated into q_out (and k_out); with TO_CACHE, k rotated and v stored straight into the paged
    # cache at the token's slot instead (kernels/attention/triton_kernels.py's write_kv), one launch for both.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, t, sc_t, ss_t, d, d_mask, HALF)
    _rotate_tile(q_ptr, q_out_ptr, sq_t, sq_h, t, heads, n_q, d, d_mask, c1, c2, s1, s2, HALF)
    if TO_CACHE:
        # Negative slots are padding tokens: masked out (the slot test broadcast to a block first, as there).
        slot = tl.load(slot_ptr + t).to(tl.int64)
        mask = (heads[:, None] < n_k) & d_mask[None, :] & (d[None, :] * 0 + slot >= 0)
        slot = tl.maximum(slot, 0)
        at = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cp \
            + heads[:, None] * stride_ch + d[None, :]
        o1, o2 = _rotated(k_ptr + t * sk_t + heads[:, None] * sk_h + d[None, :], mask, c1, c2, s1, s2, HALF)
        tl.store(at, o1, mask=mask)
        tl.store(at + HALF, o2, mask=mask)
        v = v_ptr + t * sv_t + heads[:, None] * sv_h + d[None, :]
        tl.store(at + stride_ckv, tl.load(v, mask=mask), mask=mask)
        tl.store(at + stride_ckv + HALF, tl.load(v + HALF, mask=mask), mask=mask)
    elif HAS_K:
        _rotate_tile(k_ptr, k_out_ptr, sk_t, sk_h, t, heads, n_k, d, d_mask, c1, c2, s1, s2, HALF)



@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    global triton, tl
    import triton
    import triton.language as tl

    # The kernels call these helpers by their global names, so those names must be the jitted ones.
    for helper in (_rotated, _cos_sin, _rotate_tile):
        globals()[helper.__name__] = triton.jit(helper)
    globals()["gdc_wait"], globals()["gdc_launch_dependents"] = gdc_functions()  # used under `if PDL:` only
    return SimpleNamespace(add_rms_norm=triton.jit(_add_rms_norm_kernel),
                           silu_and_mul=triton.jit(_silu_and_mul_kernel),
                           rotary=triton.jit(_rotary_kernel))


def kernels_interpreted() -> bool:
    """Whether the kernels run on Triton's CPU interpreter (decorating them on first call)."""
    if not _have_triton():
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels().add_rms_norm, InterpretedFunction)


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor):
    """(n_outer, n_inner, stride_outer, stride_inner) addressing the rows of a 1-3 dim t[..., N]
    without a copy; None for more dims (the caller falls back to torch)."""
    if t.dim() == 1:
        return 1, 1, 0, 0
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.stride(0), t.stride(1)
    return None


def fused_add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                       pdl: bool = False):
    """With residual: (norm(x + residual) * weight, x + residual). Without: norm(x) * weight.
    Exactly kernels/norm.RMSNorm.forward's contract and rounding; x may be a strided 2-D/3-D view.
    `pdl`: launched early where supported (kernels/pdl.py)."""
    N = x.shape[-1]
    rows = _rows(x)
    rrows = _rows(residual) if residual is not None else rows
    if (not _use_triton(x) or rows is None or rrows is None or x.stride(-1) != 1
            or (residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1
                                          or residual.dtype != x.dtype))
            or not weight.is_contiguous() or x.numel() == 0):
        return torch_add_rms_norm(x, residual, weight, eps)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    n_outer, n_inner, sx_o, sx_i = rows
    _, _, sr_o, sr_i = rrows
    block = _next_pow2(N)
    _kernels().add_rms_norm[(n_outer * n_inner,)](
        x, residual if residual is not None else x, weight, out, res_out,
        n_inner, sx_o, sx_i, sr_o, sr_i, float(eps),
        N=N, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=_warps(block), **launch_options(pdl, x))
    return out if residual is None else (out, res_out)


def silu_and_mul(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """x: [T, 2I] (rows may be strided) -> silu(x[:, :I]) * x[:, I:], [T, I]."""
    if not _use_triton(x) or x.dim() != 2 or x.stride(-1) != 1 or x.shape[-1] % 2 or x.numel() == 0:
        return torch_silu_and_mul(x)
    T, two_i = x.shape
    inter = two_i // 2
    out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    block = min(1024, _next_pow2(inter))
    _kernels().silu_and_mul[(T, -(-inter // block))](x, out, x.stride(0), inter, BLOCK=block,
                                                         num_warps=_warps(block), **launch_options(pdl, x))
    return out


def _cos_ok(c: torch.Tensor, T: int, D: int) -> bool:
    # [T, D] or [T, 1, D] (the model's broadcast shape), last dim contiguous
    return (c.shape[-1] == D and c.stride(-1) == 1 and c.dim() in (2, 3) and c.shape[0] == T
            and (c.dim() == 2 or c.shape[1] == 1))


def rotary_qk(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
              pdl: bool = False):
    """The rotation of kernels.rotary.apply_rotary on q [T, H, D] and k [T, KVH, D] (strided views
    allowed) in one launch; cos/sin [T, 1, D] or [T, D]. Returns new contiguous (q, k); k may be
    None (then only q is rotated and (q, None) is returned)."""
    T, H, D = q.shape if q.dim() == 3 else (0, 0, 0)
    ok = (_use_triton(q) and q.dim() == 3 and D % 2 == 0 and q.stride(-1) == 1 and q.numel() > 0
          and _cos_ok(cos, T, D) and _cos_ok(sin, T, D) and cos.dtype == q.dtype and sin.dtype == q.dtype)
    if ok and k is not None:
        ok = (k.dim() == 3 and k.shape[0] == T and k.shape[2] == D and k.stride(-1) == 1
              and k.dtype == q.dtype and k.shape[1] > 0)
    if not ok:
        return torch_rotary(q, cos, sin), (torch_rotary(k, cos, sin) if k is not None else None)
    KVH = k.shape[1] if k is not None else 0
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else q_out
    grid, sizes = _rotary_launch(T, H, KVH, D)
    kk = k if k is not None else q
    _kernels().rotary[grid](
        q, kk, q, cos, sin, q_out, k_out, q, q,  # (no v, cache or slots: TO_CACHE is off)
        q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), 0, 0, cos.stride(0), sin.stride(0), H, KVH, 0, 0, 0, 0,
        HAS_K=k is not None, TO_CACHE=False, **sizes, **launch_options(pdl, q))
    return q_out, (k_out if k is not None else None)


def _rotary_launch(T: int, H: int, KVH: int, D: int) -> tuple[tuple[int, int], dict]:
    """_rotary_kernel's grid and its tile sizes and warps for T tokens of H query and KVH KV heads of dim D:
    at most ~2K elements per program, so wide (MHA) layers stay in registers."""
    half = D // 2
    block_d = _next_pow2(half)
    block_h = min(_next_pow2(max(H, KVH)), max(1, 2048 // block_d))
    return (T, -(-max(H, KVH) // block_h)), dict(HALF=half, BLOCK_H=block_h, BLOCK_D=block_d,
                                                 num_warps=_warps(block_h * block_d))


def rope_write_kv_applies(q, k, v, cos, sin, kv_cache) -> bool:
    """Whether `rope_write_kv` takes these on this device (else: rotary_qk, then the KV write)."""
    if not _use_triton(q) or q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0]:
        return False
    T, _, D = q.shape
    return (D % 2 == 0 and k.shape[2] == D and kv_cache.dim() == 5 and kv_cache.shape[-1] == D
            and kv_cache.shape[3] == k.shape[1] and all(t.stride(-1) == 1 for t in (q, k, v, kv_cache))
            and q.dtype == k.dtype == v.dtype == kv_cache.dtype == cos.dtype == sin.dtype
            and _cos_ok(cos, T, D) and _cos_ok(sin, T, D))


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_cache: torch.Tensor, slot_mapping: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """`rotary_qk` on q [T, H, D] and k [T, KVH, D], with the rotated k and v [T, KVH, D] written into the
    paged kv_cache [blocks, 2, block_size, KVH, D] at slot_mapping (< 0: skipped) instead of returned, in
    one launch (where `rope_write_kv_applies`); returns the rotated q (contiguous). The same values as
    rotary_qk followed by the attention backend's write_kv."""
    T, H, D = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    grid, sizes = _rotary_launch(T, H, kv_heads, D)
    _kernels().rotary[grid](
        q, k, v, cos, sin, q_out, q_out, kv_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        H, kv_heads, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        HAS_K=True, TO_CACHE=True, BLOCK_SIZE=kv_cache.shape[2], **sizes, **launch_options(pdl, q))
    return q_out
