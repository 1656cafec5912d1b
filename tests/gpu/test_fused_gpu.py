"""The fused kernels of kernels/fused.py compiled on a CUDA GPU: bf16 and fp32 against the torch
paths, the model's strided q/k views, the layers with fused_kernels=True, and capture in a
CUDA graph (replayed on new inputs)."""

from __future__ import annotations

import pytest
import torch

from raylight.kernels import fused
from raylight.kernels.activation import silu_and_mul as layer_silu_and_mul
from raylight.kernels.norm import RMSNorm
from raylight.kernels.rotary import apply_rotary_qk

from ..unit.kernels.test_fused import norm_case, rel_err, rotary_case, silu_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
TOKENS = [1, 37, 2048]


@pytest.fixture(autouse=True)
def _needs_triton():
    pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("hidden", [576, 2048, 4096])
def test_add_rms_norm(dtype, T, hidden):
    x, r, w = norm_case(T, hidden, dtype, device="cuda", strided=True)
    out, res = fused.fused_add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = fused.torch_add_rms_norm(x, r, w, 1e-5)
    assert out.dtype == ref_out.dtype and rel_err(out, ref_out) < TOL[dtype]
    assert torch.equal(res, ref_res)
    assert rel_err(fused.fused_add_rms_norm(x, None, w, 1e-5), fused.torch_add_rms_norm(x, None, w, 1e-5)) < TOL[dtype]
    # fp32 weight on bf16 activations (promotes to fp32, as the torch path does)
    w32 = w.float()
    a, b = fused.fused_add_rms_norm(x, r, w32, 1e-5)[0], fused.torch_add_rms_norm(x, r, w32, 1e-5)[0]
    assert a.dtype == b.dtype and rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_view(dtype):
    q, k, _, _ = rotary_case(37, 32, 8, 128, dtype, device="cuda")
    w = (1 + 0.1 * torch.randn(128)).to(device="cuda", dtype=dtype)
    for t in (q, k):
        assert rel_err(fused.fused_add_rms_norm(t, None, w, 1e-6), fused.torch_add_rms_norm(t, None, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("inter", [1536, 8192, 14336])
def test_silu_and_mul(dtype, T, inter):
    x = silu_case(T, inter, dtype, device="cuda", strided=True)
    assert rel_err(fused.silu_and_mul(x), fused.torch_silu_and_mul(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 64), (32, 8, 128), (32, 8, 80)])
def test_rotary_qk(dtype, T, heads, kv_heads, dim):
    q, k, cos, sin = rotary_case(T, heads, kv_heads, dim, dtype, device="cuda")
    fq, fk = fused.rotary_qk(q, k, cos, sin)
    assert rel_err(fq, fused.torch_rotary(q, cos, sin)) < TOL[dtype]
    assert rel_err(fk, fused.torch_rotary(k, cos, sin)) < TOL[dtype]


def test_layers_with_switch():
    assert fused.fused_ops_enabled(torch.device("cuda"))
    dtype = torch.bfloat16
    x, r, w = norm_case(37, 2048, dtype, device="cuda")
    norm = RMSNorm(2048, 1e-5, fused_kernels=True).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        out, res = norm(x, r)
    assert rel_err(out, fused.torch_add_rms_norm(x, r, w, 1e-5)[0]) < TOL[dtype]
    y = silu_case(37, 8192, dtype, device="cuda")
    assert rel_err(layer_silu_and_mul(y, fused_kernels=True), fused.torch_silu_and_mul(y)) < TOL[dtype]
    q, k, cos, sin = rotary_case(37, 32, 8, 64, dtype, device="cuda")
    rq, rk = apply_rotary_qk(q, k, cos, sin, fused_kernels=True)
    assert rel_err(rq, fused.torch_rotary(q, cos, sin)) < TOL[dtype]
    assert rel_err(rk, fused.torch_rotary(k, cos, sin)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_graph_capture(dtype, T):
    """All three ops captured back to back, then replayed after the inputs are overwritten in place."""
    x, r, w = norm_case(T, 2048, dtype, device="cuda", seed=1)
    y = silu_case(T, 8192, dtype, device="cuda", seed=1)
    q, k, cos, sin = rotary_case(T, 32, 8, 64, dtype, device="cuda", seed=1)
    cos, sin = cos.clone(), sin.clone()

    def step():
        return (fused.fused_add_rms_norm(x, r, w, 1e-5), fused.silu_and_mul(y), fused.rotary_qk(q, k, cos, sin))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (out, res), act, (rq, rk) = step()

    x2, r2, _ = norm_case(T, 2048, dtype, device="cuda", seed=2)
    y2 = silu_case(T, 8192, dtype, device="cuda", seed=2)
    q2, k2, cos2, sin2 = rotary_case(T, 32, 8, 64, dtype, device="cuda", seed=2)
    for dst, src in ((x, x2), (r, r2), (y, y2), (q, q2), (k, k2), (cos, cos2), (sin, sin2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_res = fused.torch_add_rms_norm(x2, r2, w, 1e-5)
    assert rel_err(out, ref_out) < TOL[dtype] and torch.equal(res, ref_res)
    assert rel_err(act, fused.torch_silu_and_mul(y2)) < TOL[dtype]
    assert rel_err(rq, fused.torch_rotary(q2, cos2, sin2)) < TOL[dtype]
    assert rel_err(rk, fused.torch_rotary(k2, cos2, sin2)) < TOL[dtype]
