"""The MoE expert computation of kernels/fused_moe.py on CPU: routing and the torch path against
HF transformers' Qwen3-MoE / Mixtral / Qwen2-MoE code (bit for bit in float32) and the naive
reference; the Triton path and moe_align_block_size run by Triton's interpreter (float32, tiny
shapes). The GPU twin is tests/gpu/test_fused_moe_gpu.py; it reuses `moe_case` and `rel_err`."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first decorated

from raylight.kernels import fused, fused_moe, moe_align  # noqa: E402

INTERPRETED = not torch.cuda.is_available() and fused.kernels_interpreted()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs triton, run by its CPU interpreter")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def moe_case(T, E, K, H, I, dtype=torch.float32, device="cpu", seed=0):
    """x, w13, w2 scaled like a trained layer (outputs O(1)), routing from random logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    logits = torch.randn(T, E, generator=g)
    w, ids = fused_moe.select_experts(logits, K, True)
    cast = dict(device=device, dtype=dtype)
    return x.to(**cast), w13.to(**cast), w2.to(**cast), w.to(device), ids.to(device)


# --- routing -----------------------------------------------------------------------------------


def _hf():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
def test_select_experts_matches_qwen_routers(dtype, norm):
    _hf()
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    for cfg_cls, router_cls in ((Qwen3MoeConfig, Qwen3MoeTopKRouter), (Qwen2MoeConfig, Qwen2MoeTopKRouter)):
        cfg = cfg_cls(hidden_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
        router = router_cls(cfg).to(dtype)
        with torch.no_grad():
            router.weight.normal_()
            logits, scores, idx = router(torch.randn(50, 32, dtype=dtype))
        w, ids = fused_moe.select_experts(logits, 4, norm, round_to=logits.dtype)
        assert w.dtype == torch.float32 and ids.dtype == torch.int64
        assert torch.equal(ids, idx)
        assert torch.equal(w, scores.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_experts_matches_mixtral_router(dtype):
    _hf()
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    torch.manual_seed(1)
    router = MixtralTopKRouter(MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)).to(dtype)
    with torch.no_grad():
        router.weight.normal_()
        logits, scores, idx = router(torch.randn(50, 32, dtype=dtype))
    w, ids = fused_moe.select_experts(logits, 2, True)
    assert torch.equal(ids, idx) and scores.dtype == torch.float32 and torch.equal(w, scores)


# --- torch path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_torch_path_is_hf_expert_loop_in_fp32(family):
    """Bit for bit HF's eager expert loop in float32 (greedy outputs are compared with HF's)."""
    _hf()
    if family == "qwen3":
        from transformers import Qwen3MoeConfig as Cfg
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts
        cfg = Cfg(hidden_size=64, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=3)
    else:
        from transformers import MixtralConfig as Cfg
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts
        cfg = Cfg(hidden_size=64, intermediate_size=48, num_local_experts=8, num_experts_per_tok=3)
    experts = Experts(cfg)
    x, w13, w2, w, ids = moe_case(41, 8, 3, 64, 48)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
        hf = experts(x, ids, w)
    assert torch.equal(fused_moe.fused_experts(x, w13, w2, w, ids), hf)


@pytest.mark.parametrize("T", [1, 5, 64])
def test_torch_path_vs_reference_fp32(T):
    x, w13, w2, w, ids = moe_case(T, 16, 4, 64, 32)
    out = fused_moe.fused_experts(x, w13, w2, w, ids)
    assert out.shape == (T, 64) and out.dtype == torch.float32
    assert rel_err(out, fused_moe.moe_reference(x, w13, w2, w, ids)) < 1e-6


def test_torch_path_bf16():
    x, w13, w2, w, ids = moe_case(33, 16, 4, 128, 64, dtype=torch.bfloat16)
    out = fused_moe.fused_experts(x, w13, w2, w, ids)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, fused_moe.moe_reference(x, w13, w2, w, ids)) < 1e-2


def test_minus_one_entries_and_empty_rows():
    x, w13, w2, w, ids = moe_case(9, 8, 2, 32, 16)
    ids[0, 1] = -1
    ids[4] = -1
    out = fused_moe.fused_experts(x, w13, w2, w, ids)
    assert torch.equal(out[4], torch.zeros(32))
    keep = ids.clone()
    keep[0, 1] = ids[0, 0]  # same expert twice with weight 0 for the dropped entry == dropping it
    w0 = w.clone()
    w0[0, 1] = 0
    w0[4] = 0
    keep[4] = 0
    assert rel_err(out, fused_moe.moe_reference(x, w13, w2, w0, keep)) < 1e-6


def test_edge_shapes():
    x, w13, w2, w, ids = moe_case(0, 8, 2, 32, 16)
    assert fused_moe.fused_experts(x, w13, w2, w, ids).shape == (0, 32)
    x, w13, w2, w, ids = moe_case(6, 1, 1, 32, 16)  # E_loc = 1
    assert rel_err(fused_moe.fused_experts(x, w13, w2, w, ids), fused_moe.moe_reference(x, w13, w2, w, ids)) < 1e-6
    x, w13, w2, w, ids = moe_case(12, 8, 2, 32, 16)
    ids[:, 0] = 5  # all tokens to one expert (and a second one elsewhere)
    ids[:, 1] = torch.where(ids[:, 1] == 5, 2, ids[:, 1])
    assert rel_err(fused_moe.fused_experts(x, w13, w2, w, ids), fused_moe.moe_reference(x, w13, w2, w, ids)) < 1e-6


# --- moe_align_block_size -------------------------------------------------------------------------


def check_layout(ids: torch.Tensor, block: int, E: int, sorted_ids, expert_ids, ntp):
    """The layout's invariants, on any device (order inside an expert's group is free)."""
    ids, sorted_ids, expert_ids = ids.cpu().reshape(-1), sorted_ids.cpu().long(), expert_ids.cpu().long()
    TK = ids.numel()
    counts = torch.bincount(ids[ids >= 0], minlength=E)
    padded = (counts + block - 1) // block * block
    total = int(padded.sum())
    n_blocks = moe_align.max_blocks(TK, block, E)
    assert int(ntp.cpu()[0]) == total and sorted_ids.numel() == n_blocks * block and expert_ids.numel() == n_blocks
    assert total <= n_blocks * block
    start = 0
    for e in range(E):
        seg = sorted_ids[start:start + int(padded[e])]
        assert all(int(b) == e for b in expert_ids[start // block:(start + int(padded[e])) // block])
        real = seg[seg < TK]
        assert (seg[int(counts[e]):] == TK).all()
        assert sorted(real.tolist()) == torch.nonzero(ids == e).flatten().tolist()
        start += int(padded[e])
    assert (expert_ids[total // block:] == -1).all()
    assert (sorted_ids[total:] == TK).all()


@pytest.mark.parametrize("block", [16, 64])
def test_torch_align(block):
    _, _, _, _, ids = moe_case(37, 8, 3, 8, 8)
    ids[2, 0] = -1
    check_layout(ids, block, 8, *moe_align.torch_moe_align_block_size(ids, block, 8))


@interpreted
@pytest.mark.parametrize("T,E,K,block", [(1, 8, 2, 16), (37, 8, 3, 16), (50, 20, 4, 32), (0, 4, 2, 16)])
def test_triton_align(T, E, K, block):
    _, _, _, _, ids = moe_case(T, E, K, 8, 8)
    if T > 2:
        ids[2, 0] = -1
    out = moe_align.moe_align_block_size(ids, block, E)
    check_layout(ids, block, E, *out)
    ref = moe_align.torch_moe_align_block_size(ids, block, E)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))  # the interpreter runs the atomics in order


# --- Triton path (interpreted) ----------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("T,E,K,H,I", [(1, 8, 2, 64, 32), (7, 6, 3, 64, 32), (40, 4, 2, 48, 40), (5, 1, 1, 32, 16)])
def test_triton_path_interpreted(T, E, K, H, I):
    x, w13, w2, w, ids = moe_case(T, E, K, H, I)
    if T > 3:
        ids[0, -1] = -1
        ids[3] = -1
    out = fused_moe.fused_experts(x, w13, w2, w, ids, use_triton=True)
    ref = fused_moe.fused_experts(x, w13, w2, w, ids, use_triton=False)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-5
    if T > 3:
        assert torch.equal(out[3], torch.zeros(H))


@interpreted
def test_triton_path_configs_and_edges():
    x, w13, w2, w, ids = moe_case(20, 4, 2, 64, 32)
    ref = fused_moe.moe_reference(x, w13, w2, w, ids)
    for cfg in [(16, (16, 32, 1, 4, 1), (32, 16, 2, 4, 1)), (32, (32, 64, 4, 4, 1), (64, 32, 1, 4, 1))]:
        assert rel_err(fused_moe.triton_fused_experts(x, w13, w2, w, ids, config=cfg), ref) < 1e-5
    ids[:] = 1  # everything on one expert, twice per token
    ref = fused_moe.moe_reference(x, w13, w2, w, ids)
    assert rel_err(fused_moe.fused_experts(x, w13, w2, w, ids, use_triton=True), ref) < 1e-5
    x0 = x[:0]
    assert fused_moe.fused_experts(x0, w13, w2, w[:0], ids[:0], use_triton=True).shape == (0, 64)


def test_fit_config_shrinks_to_shared_memory():
    limit = 232448  # H200
    big = (128, 64, 8, 8, 4)
    assert fused_moe.fit_config(big, 128, 2, 2, limit) == big  # the bf16 table entry fits as tuned
    bn, bk, _, _, stages = fused_moe.fit_config(big, 128, 2, 4, limit * 3 // 4)  # fp32: shrinks
    assert stages * (128 * bk + 2 * bk * bn) * 4 <= limit * 3 // 4 and stages >= 2
    assert fused_moe.fit_config((64, 64, 8, 4, 4), 64, 1, 4, limit * 3 // 4) == (64, 64, 8, 4, 4)
    assert fused_moe.fit_config((256, 64, 8, 8, 3), 128, 1, 2, limit) == (256, 64, 8, 8, 3)
