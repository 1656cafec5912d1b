"""The fused kernels of kernels/fused.py against the torch paths, run on CPU by Triton's
interpreter (fp32). The GPU twin (tests/gpu/test_fused_gpu.py) runs them compiled, in bf16 and
fp32, and under CUDA-graph capture; it reuses the case builders here."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of kernels.fused (triton picks interpreter or compiler when a
    # kernel is decorated); on a GPU machine the GPU tests cover the compiled kernels instead.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from raylight.kernels import fused  # noqa: E402
from raylight.kernels.activation import silu_and_mul as layer_silu_and_mul  # noqa: E402
from raylight.kernels.config import ENV_VARS, KernelConfig  # noqa: E402
from raylight.kernels.norm import RMSNorm  # noqa: E402
from raylight.kernels.rotary import RotaryEmbedding, apply_rotary, apply_rotary_qk  # noqa: E402

INTERPRETED = not torch.cuda.is_available() and fused.kernels_interpreted()  # False in CI without triton

interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs triton, run by its CPU interpreter")

TOKENS = [1, 37]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def norm_case(T, hidden, dtype, device="cpu", seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    width = hidden + 24 if strided else hidden
    x = torch.randn(T, width, generator=g)[:, :hidden].to(device=device, dtype=dtype)
    r = torch.randn(T, hidden, generator=g).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device=device, dtype=dtype)
    return x, r, w


def silu_case(T, inter, dtype, device="cpu", seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    width = 2 * inter + 8 if strided else 2 * inter
    return torch.randn(T, width, generator=g)[:, : 2 * inter].to(device=device, dtype=dtype)


def rotary_case(T, heads, kv_heads, dim, dtype, device="cpu", seed=0):
    """q, k as the model makes them: views of a split of one qkv projection output, so rows are
    strided; cos/sin gathered at random positions, [T, 1, D] in the model dtype."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * dim, generator=g).to(device=device, dtype=dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(T, heads, dim), k.view(T, kv_heads, dim)
    rope = RotaryEmbedding(dim, 4096, 500000.0, None)
    positions = torch.randint(0, 4096, (T,), generator=g)
    cos = rope.cos[positions].to(device=device, dtype=dtype)[:, None, :]
    sin = rope.sin[positions].to(device=device, dtype=dtype)[:, None, :]
    return q, k, cos, sin


@interpreted
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("hidden", [576, 64])
@pytest.mark.parametrize("strided", [False, True])
def test_add_rms_norm(T, hidden, strided):
    x, r, w = norm_case(T, hidden, torch.float32, strided=strided)
    out, res = fused.fused_add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = fused.torch_add_rms_norm(x, r, w, 1e-5)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert rel_err(out, ref_out) < 1e-5
    assert torch.equal(res, ref_res)  # the add is one rounding either way
    assert rel_err(fused.fused_add_rms_norm(x, None, w, 1e-5), fused.torch_add_rms_norm(x, None, w, 1e-5)) < 1e-5


@interpreted
def test_rms_norm_per_head_view():
    """qk-norm: RMSNorm over head_dim of a strided [T, H, D] view."""
    q, k, _, _ = rotary_case(37, 9, 3, 80, torch.float32)
    w = 1 + 0.1 * torch.randn(80)
    for t in (q, k):
        assert rel_err(fused.fused_add_rms_norm(t, None, w, 1e-6), fused.torch_add_rms_norm(t, None, w, 1e-6)) < 1e-5


@interpreted
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("inter", [1536, 100])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul(T, inter, strided):
    x = silu_case(T, inter, torch.float32, strided=strided)
    out = fused.silu_and_mul(x)
    ref = fused.torch_silu_and_mul(x)
    assert out.shape == ref.shape == (T, inter)
    assert rel_err(out, ref) < 1e-5


@interpreted
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 80), (4, 4, 128)])
def test_rotary_qk(T, heads, kv_heads, dim):
    q, k, cos, sin = rotary_case(T, heads, kv_heads, dim, torch.float32)
    if T > 1:  # (view() picks its own stride for a size-1 dim)
        assert q.stride(0) == k.stride(0) == (heads + 2 * kv_heads) * dim  # strided rows
    fq, fk = fused.rotary_qk(q, k, cos, sin)
    assert rel_err(fq, apply_rotary(q, cos, sin)) < 1e-5
    assert rel_err(fk, apply_rotary(k, cos, sin)) < 1e-5
    only_q, none = fused.rotary_qk(q, None, cos, sin)
    assert none is None and rel_err(only_q, apply_rotary(q, cos, sin)) < 1e-5


def test_fused_ops_on_cuda_only():
    assert not fused.fused_ops_enabled(torch.device("cpu"))  # CPU runs the torch ops
    assert fused.fused_ops_enabled(torch.device("cuda")) == fused._have_triton()


def test_kernel_config_from_args_and_env():
    """Engine arguments set the switches; each env var overrides its argument when "0" or "1" (read
    once, by from_args), and any other value leaves the argument in charge."""
    assert KernelConfig.from_args(None, environ={}) == KernelConfig()
    assert KernelConfig() == KernelConfig(True, True, True, None)
    args = KernelConfig(fused_kernels=False, gemv=False, custom_allreduce=True, flashinfer_decode_tensor_cores=True)
    assert KernelConfig.from_args(args, environ={}) == args
    env = {ENV_VARS["fused_kernels"]: "1", ENV_VARS["gemv"]: "yes", ENV_VARS["custom_allreduce"]: "0",
           ENV_VARS["flashinfer_decode_tensor_cores"]: "0"}
    assert KernelConfig.from_args(args, environ=env) == KernelConfig(True, False, False, False)


def test_env_override_reaches_engine_args(monkeypatch):
    from raylight.config import EngineArgs

    monkeypatch.setenv("RAYLIGHT_FUSED_KERNELS", "0")
    assert KernelConfig.from_args(EngineArgs(fused_kernels=True)).fused_kernels is False
    monkeypatch.delenv("RAYLIGHT_FUSED_KERNELS")
    assert KernelConfig.from_args(EngineArgs(fused_kernels=False)).fused_kernels is False
    assert KernelConfig.from_args(EngineArgs(gemv=False)) == KernelConfig(gemv=False)


def test_layers_unchanged_when_off(monkeypatch):
    """With the switch off (always, on CPU) the layers run the torch code bit for bit."""
    x, r, w = norm_case(5, 64, torch.float32)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        out, res = norm(x, r)
        ref_out, ref_res = fused.torch_add_rms_norm(x, r, norm.weight, 1e-5)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)
    y = silu_case(5, 48, torch.float32)
    assert torch.equal(layer_silu_and_mul(y), fused.torch_silu_and_mul(y))
    q, k, cos, sin = rotary_case(5, 4, 2, 64, torch.float32)
    rq, rk = apply_rotary_qk(q, k, cos, sin)
    assert torch.equal(rq, fused.torch_rotary(q, cos, sin)) and torch.equal(rk, fused.torch_rotary(k, cos, sin))


@interpreted
def test_layers_route_to_fused_when_on(monkeypatch):
    """With the switch forced on (it needs CUDA; here the interpreter stands in), the unchanged
    model call sites reach the fused kernels and agree with the torch path."""
    monkeypatch.setattr(fused, "fused_ops_enabled", lambda device: True)
    calls = []
    for name in ("fused_add_rms_norm", "silu_and_mul", "rotary_qk"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    x, r, w = norm_case(37, 576, torch.float32, strided=True)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        out, res = norm(x, r)
    ref_out, ref_res = fused.torch_add_rms_norm(x, r, w, 1e-5)
    assert rel_err(out, ref_out) < 1e-5 and torch.equal(res, ref_res)
    y = silu_case(37, 100, torch.float32)
    assert rel_err(layer_silu_and_mul(y), fused.torch_silu_and_mul(y)) < 1e-5
    q, k, cos, sin = rotary_case(37, 32, 8, 80, torch.float32)
    assert rel_err(apply_rotary(q, cos, sin), fused.torch_rotary(q, cos, sin)) < 1e-5
    rq, rk = apply_rotary_qk(q, k, cos, sin)
    assert rel_err(rq, fused.torch_rotary(q, cos, sin)) < 1e-5 and rel_err(rk, fused.torch_rotary(k, cos, sin)) < 1e-5
    assert calls == ["fused_add_rms_norm", "silu_and_mul", "rotary_qk", "rotary_qk"]


def test_layers_switched_off_run_torch(monkeypatch):
    """fused_kernels=False keeps the torch ops even where the fused ones could run."""
    monkeypatch.setattr(fused, "fused_ops_enabled", lambda device: True)
    for name in ("fused_add_rms_norm", "silu_and_mul", "rotary_qk"):
        monkeypatch.setattr(fused, name, lambda *a, _n=name: pytest.fail(f"{_n} called with the switch off"))
    x, r, w = norm_case(5, 64, torch.float32)
    norm = RMSNorm(64, 1e-5, fused_kernels=False)
    with torch.no_grad():
        norm.weight.copy_(w)
        out, res = norm(x, r)
    assert torch.equal(out, fused.torch_add_rms_norm(x, r, w, 1e-5)[0])
    y = silu_case(5, 48, torch.float32)
    assert torch.equal(layer_silu_and_mul(y, fused_kernels=False), fused.torch_silu_and_mul(y))
    q, k, cos, sin = rotary_case(5, 4, 2, 64, torch.float32)
    rq, rk = apply_rotary_qk(q, k, cos, sin, fused_kernels=False)
    assert torch.equal(rq, fused.torch_rotary(q, cos, sin)) and torch.equal(rk, fused.torch_rotary(k, cos, sin))
    assert torch.equal(apply_rotary(q, cos, sin, fused_kernels=False), fused.torch_rotary(q, cos, sin))
