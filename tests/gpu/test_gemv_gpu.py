"""The single-row GEMV (kernels/gemv.py) against F.linear in fp32 on random inputs: the tuned
shapes and odd ones (N not a multiple of the block, K not a multiple of BLOCK_K), bf16 and fp16,
eagerly and replayed in a CUDA graph; and `linear` routing one row to it, more rows to cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raylight.kernels import gemv
from raylight.kernels.config import KernelConfig

pytestmark = pytest.mark.gpu

SHAPES = [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168), (1000, 300), (37, 4097), (64128, 4096)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_fp32_linear(shape, dtype):
    N, K = shape
    g = torch.Generator(device="cuda").manual_seed(N + K)
    w = torch.randn(N, K, generator=g, device="cuda", dtype=dtype) * 0.05
    x = torch.randn(1, K, generator=g, device="cuda", dtype=dtype)
    ref = F.linear(x.float(), w.float())
    assert rel_err(gemv.gemv(x, w), ref) < 1e-2
    # inside a CUDA graph, with the input changed between replays
    static_x = x.clone()
    gemv.gemv(static_x, w)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.gemv(static_x, w)
    for _ in range(3):
        static_x.copy_(torch.randn(1, K, generator=g, device="cuda", dtype=dtype))
        graph.replay()
        assert rel_err(out, F.linear(static_x.float(), w.float())) < 1e-2


@pytest.mark.parametrize("shape", [(4096, 7168), (300, 1000)])
def test_gemv_with_silu_and_mul_input(shape):
    from raylight.kernels.fused import torch_silu_and_mul

    N, K = shape
    g = torch.Generator(device="cuda").manual_seed(K)
    w = torch.randn(N, K, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05
    x = torch.randn(1, 2 * K, generator=g, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(torch_silu_and_mul(x).float(), w.float())
    assert rel_err(gemv.gemv(x, w, silu_and_mul=True), ref) < 1e-2
    assert rel_err(gemv.linear(x, w, silu_and_mul=True), ref) < 1e-2
    assert rel_err(gemv.linear(x.expand(3, -1).contiguous(), w, silu_and_mul=True)[1:2], ref) < 1e-2


def test_linear_routes_one_row_to_gemv(monkeypatch):
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, weight, config=None, silu_and_mul=False, **launch:
                        calls.append(x.shape) or real(x, weight, config, silu_and_mul, **launch))
    hopper = torch.cuda.get_device_capability()[0] == 9
    x1, x4 = (torch.randn(n, 512, device="cuda", dtype=torch.bfloat16) for n in (1, 4))
    assert rel_err(gemv.linear(x1, w, b), F.linear(x1.float(), w.float(), b.float())) < 1e-2
    assert rel_err(gemv.linear(x4, w, b), F.linear(x4.float(), w.float(), b.float())) < 1e-2
    assert calls == ([(1, 512)] if hopper else [])
    gemv.linear(x1, w, kernels=KernelConfig(gemv=False))
    assert len(calls) == (1 if hopper else 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 8, 16, 32, 33, 64])
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 14336), (37, 4097), (1000, 300)])
def test_rows_kernel_matches_fp32_linear(shape, rows, dtype):
    N, K = shape
    g = torch.Generator(device="cuda").manual_seed(N + K + rows)
    w = torch.randn(N, K, generator=g, device="cuda", dtype=dtype) * 0.05
    x = torch.randn(rows, K, generator=g, device="cuda", dtype=dtype)
    assert rel_err(gemv.gemv_rows(x, w), F.linear(x.float(), w.float())) < 1e-2
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.gemv_rows(static_x, w)
    static_x.copy_(torch.randn(rows, K, generator=g, device="cuda", dtype=dtype))
    graph.replay()
    assert rel_err(out, F.linear(static_x.float(), w.float())) < 1e-2


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("rows", [8, 33])
@pytest.mark.parametrize("shape,config", [((4096, 4096), (32, 128, 4, 4, 4)), ((6144, 4096), (32, 256, 4, 3, 2)),
                                          ((1000, 300), (16, 128, 4, 3, 4))])
def test_split_k_rows_kernel_in_a_graph_of_back_to_back_calls(shape, config, rows, pdl):
    # Many split-K calls in one graph, each tile's last program summing the partials and setting its arrival
    # count back to zero for the next call, with and without PDL: every call still equals fp32's product.
    N, K = shape
    g = torch.Generator(device="cuda").manual_seed(N + K + rows)
    ws = [torch.randn(N, K, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05 for _ in range(3)]
    static_x = torch.randn(rows, K, generator=g, device="cuda", dtype=torch.bfloat16)
    first = gemv.gemv_rows(static_x, ws[0], config, pdl=pdl)  # eager, and allocates this stream's counts
    assert rel_err(first, F.linear(static_x.float(), ws[0].float())) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [gemv.gemv_rows(static_x, w, config, pdl=pdl) for w in ws * 4]
    for _ in range(3):
        static_x.copy_(torch.randn(rows, K, generator=g, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        for w, out in zip(ws * 4, outs):
            assert rel_err(out, F.linear(static_x.float(), w.float())) < 1e-2
    torch.cuda.synchronize()
    assert not any(c.any() for c in gemv._SPLIT_COUNTS.values())


def test_linear_routes_up_to_max_rows_to_the_rows_kernel(monkeypatch):
    from raylight.kernels.fused import torch_silu_and_mul

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Triton projections are routed on Hopper only")
    calls = []
    real = gemv.gemv_rows
    monkeypatch.setattr(gemv, "gemv_rows", lambda x, weight, config=None, **launch:
                        calls.append((x.shape[0], x.shape[1])) or real(x, weight, config, **launch))
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    # routed only where the table has a config for the shape at that row tile (never measured: cuBLAS)
    monkeypatch.setattr(gemv, "ROWS_CONFIGS", {(256, 512, 16): (32, 256, 4, 4), (256, 512, 32): None})
    kernels = KernelConfig(gemv_max_rows=32)
    for rows in (1, 4, 16, 17):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        assert rel_err(gemv.linear(x, w, kernels=kernels), F.linear(x.float(), w.float())) < 1e-2
        # with SiLU-and-mul at several rows the activation runs first, then the projection alone (the
        # few-row kernel where the table says so: the fused few-row variant was slower)
        x2 = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        want = F.linear(torch_silu_and_mul(x2).float(), w.float())
        assert rel_err(gemv.linear(x2, w, silu_and_mul=True, kernels=kernels), want) < 1e-2
    # one row: the single-row GEMV; 17 rows: tile 32, where the table says cuBLAS; the projection after the
    # activation gets the activation's output (512 wide), never [gate | up]
    assert calls == [(4, 512), (4, 512), (16, 512), (16, 512)]
    gemv.linear(torch.randn(8, 512, device="cuda", dtype=torch.bfloat16), w, kernels=KernelConfig(gemv_max_rows=4))
    assert len(calls) == 4  # more rows than gemv_max_rows: cuBLAS
