"""Programmatic dependent launch (kernels/pdl.py) on a Hopper GPU: launching our Triton kernels early
changes when they start, never what they compute (and neither does the rotary + KV write kernel). The engine's greedy tokens with PDL equal those
without it, token for token, at batch 1 (the single-row GEMV path) and at a few rows (the few-row
kernel), eagerly and from CUDA graphs; a graph of dependent kernels launched this way gives the
same bits as without."""

from __future__ import annotations

import pytest
import torch

from raylight import LLM, SamplingParams
from raylight.kernels import fused, gemv
from raylight.kernels.pdl import PDL_MAX_TOKENS, launch_options
from raylight.testing.helpers import random_prompts

pytestmark = pytest.mark.gpu


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_launch_options_turn_pdl_on_only_where_asked_and_supported():
    x = torch.zeros(1, device="cuda")
    assert launch_options(False, x) == {"PDL": False}
    assert launch_options(True, torch.zeros(1)) == {"PDL": False}  # CPU
    assert launch_options(True, x) == ({"PDL": True, "launch_pdl": True} if _hopper() else {"PDL": False})
    # steps of more tokens than PDL_MAX_TOKENS launch as before (cuBLAS GEMMs carry them)
    many = torch.zeros(PDL_MAX_TOKENS + 1, 8, device="cuda")
    assert launch_options(True, many) == {"PDL": False}
    assert launch_options(True, many[:PDL_MAX_TOKENS]) == launch_options(True, x)


@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9+")
@torch.inference_mode()
def test_a_graph_of_dependent_kernels_gives_the_same_bits_with_pdl():
    # norm -> projection -> norm -> ... 40 deep, each kernel reading the previous one's output: a kernel
    # that ran ahead of its input would change the result. With PDL alone and with the weight prefetch
    # ahead of the wait.
    g = torch.Generator(device="cuda").manual_seed(0)
    H = 4096
    ws = [torch.randn(H, H, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
    norm_w = torch.rand(H, generator=g, device="cuda", dtype=torch.bfloat16) + 0.5
    x0 = torch.randn(1, H, generator=g, device="cuda", dtype=torch.bfloat16)

    def chain(x, pdl, prefetch=0):
        residual = torch.zeros_like(x)
        for i in range(40):
            h, residual = fused.fused_add_rms_norm(x, residual, norm_w, 1e-5, pdl)
            x = gemv.gemv(h, ws[i % len(ws)], pdl=pdl, prefetch=prefetch)
            if i % 8 == 7:  # and the few-row kernel, on the same row twice
                x = gemv.gemv_rows(h.expand(2, -1).contiguous(), ws[i % len(ws)], pdl=pdl, prefetch=prefetch)[1:]
        return x

    outs = {}
    for pdl, prefetch in ((False, 0), (True, 0), (True, 1024)):
        static_x = x0.clone()
        chain(static_x, pdl, prefetch)  # compiled before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(static_x, pdl, prefetch)
        results = []
        for step in range(3):
            static_x.copy_(x0 * (step + 1))
            graph.replay()
            results.append(out.clone())
        outs[pdl, prefetch] = torch.stack(results)
        eager = chain(x0 * 3, pdl, prefetch)
        assert torch.equal(eager, results[-1])
    assert torch.equal(outs[False, 0], outs[True, 0]) and torch.equal(outs[False, 0], outs[True, 1024])


def _engine_tokens(model_dir, monkeypatch, pdl: bool, prefetch: int, rope_kv: bool) -> list:
    monkeypatch.setenv("RAYLIGHT_GEMV_PREFETCH", str(prefetch))
    prompts = random_prompts(6, 512, 5, 120, seed=5)
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", max_num_batched_tokens=256, num_kv_blocks=512,
              max_cuda_graph_batch_size=8, pdl=pdl, gemv_max_rows=8, rope_kv=rope_kv)
    try:
        kernels = llm.engine.model.kernels
        assert (kernels.pdl, kernels.gemv_prefetch, kernels.gemv_max_rows, kernels.rope_kv) == (pdl, prefetch, 8,
                                                                                                rope_kv)
        one = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
                           use_tqdm=False)
        many = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
                            use_tqdm=False)
        return [o.outputs[0].token_ids for o in one + many]
    finally:
        del llm
        torch.cuda.empty_cache()


_BASE: dict = {}  # the plain engine's tokens, computed once for every configuration below


# One case per configuration (PDL, prefetched weight columns, the rotary + KV write kernel), each against
# the plain engine: a failure names the configuration it came from.
@pytest.mark.skipif(not _hopper(), reason="PDL needs compute capability 9+")
@pytest.mark.parametrize("pdl, prefetch, rope_kv", [(True, 0, False), (True, 512, False), (False, 0, True),
                                                    (True, 512, True)])
@torch.inference_mode()
def test_engine_greedy_tokens_with_pdl_equal_those_without(gpu_llama_dir, monkeypatch, few_rows_everywhere,
                                                           pdl, prefetch, rope_kv):
    if "tokens" not in _BASE:
        _BASE["tokens"] = _engine_tokens(gpu_llama_dir, monkeypatch, False, 0, False)
    assert _engine_tokens(gpu_llama_dir, monkeypatch, pdl, prefetch, rope_kv) == _BASE["tokens"]
