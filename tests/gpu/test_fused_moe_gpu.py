"""The fused MoE Triton path of kernels/fused_moe.py compiled on a CUDA GPU: against the torch path
in bf16 at Qwen3-30B-A3B-like shapes (E=128, top-8, H=2048, I=768), fp32 at a small shape, -1
entries, the device-side moe_align_block_size layout, and a decode-size call captured in a CUDA
graph and replayed on new routing."""

from __future__ import annotations

import pytest
import torch

from raylight.kernels import fused_moe, moe_align

from ..unit.kernels.test_fused_moe import check_layout, moe_case, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

E, K, H, I = 128, 8, 2048, 768


@pytest.fixture(autouse=True)
def _needs_triton():
    pytest.importorskip("triton")


@pytest.mark.parametrize("T", [1, 7, 64, 1000, 4096])
def test_triton_vs_torch_bf16(T):
    x, w13, w2, w, ids = moe_case(T, E, K, H, I, dtype=torch.bfloat16, device="cuda", seed=T)
    out = fused_moe.fused_experts(x, w13, w2, w, ids)  # default: Triton on CUDA
    ref = fused_moe.fused_experts(x, w13, w2, w, ids, use_triton=False)
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, fused_moe.moe_reference(x, w13, w2, w, ids)) < 1.5e-2


def test_triton_fp32_and_minus_one():
    x, w13, w2, w, ids = moe_case(300, 16, 4, 256, 128, device="cuda")
    ids[::3, 1] = -1
    ids[5] = -1
    out = fused_moe.fused_experts(x, w13, w2, w, ids)
    assert rel_err(out, fused_moe.fused_experts(x, w13, w2, w, ids, use_triton=False)) < 1e-5
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    assert fused_moe.fused_experts(x[:0], w13, w2, w[:0], ids[:0]).shape == (0, 256)


@pytest.mark.parametrize("T,block", [(1, 16), (16, 16), (333, 16), (4096, 64), (5000, 128)])
def test_align_layout_on_device(T, block):
    _, _, _, _, ids = moe_case(T, E, K, 8, 8, device="cuda", seed=T)
    ids[::7, 0] = -1
    check_layout(ids, block, E, *moe_align.moe_align_block_size(ids, block, E))


def test_cuda_graph_decode():
    T = 8
    x, w13, w2, w, ids = moe_case(T, E, K, H, I, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_moe.fused_experts(x, w13, w2, w, ids)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_moe.fused_experts(x, w13, w2, w, ids)
    for seed in (1, 2):
        x2, _, _, w_new, ids_new = moe_case(T, E, K, H, I, dtype=torch.bfloat16, device="cuda", seed=seed)
        ids_new[0, 3] = -1
        x.copy_(x2)
        w.copy_(w_new)
        ids.copy_(ids_new)
        g.replay()
        torch.cuda.synchronize()
        ref = fused_moe.fused_experts(x, w13, w2, w, ids, use_triton=False)
        assert rel_err(out, ref) < 1e-2
