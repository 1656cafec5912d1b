"""The engine on a CUDA GPU, every attention backend, with and without CUDA graphs: greedy bf16
output agrees with HF's (teacher-forced: HF's top-1 given our prefix), and the KV cache is sized
from gpu_memory_utilization after a profiling pass."""

from __future__ import annotations

import pytest
import torch

from raylight import LLM, SamplingParams

from raylight.testing.helpers import NEAR_TIE, near_tie_report, random_prompts

pytestmark = pytest.mark.gpu


# Async scheduling is on by default on CUDA: one case runs the plain step instead.
@pytest.mark.parametrize("backend,eager,async_scheduling", [
    ("torch", True, None), ("triton", False, None), ("triton", True, None), ("flashinfer", False, None),
    ("flashinfer", True, None), ("flashinfer", False, False), ("flashinfer+triton", False, None)])
@torch.inference_mode()
def test_bf16_greedy_agrees_with_hf(gpu_llama_dir, backend, eager, async_scheduling):
    for module in backend.split("+"):
        if module != "torch":
            pytest.importorskip(module)
    # 13 prompts: decode batches 13, then fewer as they finish, pad to the captured sizes 16, 8, 4...
    prompts = random_prompts(13, 512, 5, 60, seed=2)
    max_tokens = [64 - 3 * (i % 4) for i in range(len(prompts))]
    # Memory-based sizing is tested once (torch); the rest fix the pool so earlier tests' leftovers don't matter.
    sizing = dict(gpu_memory_utilization=0.3) if backend == "torch" else dict(num_kv_blocks=2048)
    llm = LLM(gpu_llama_dir, dtype="bfloat16", device="cuda", max_num_batched_tokens=64, attention_backend=backend,
              enforce_eager=eager, max_cuda_graph_batch_size=16, async_scheduling=async_scheduling, **sizing)
    assert llm.engine.async_scheduling == (async_scheduling is not False)
    assert llm.engine.attn_backend.name == backend
    assert llm.engine.device.type == "cuda" and llm.engine.num_blocks > 0
    graphs = llm.engine.runner.graphs
    assert (graphs is None) == (eager or backend == "torch")
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                        use_tqdm=False)
    if graphs is not None:  # decode steps from the decode graphs, prefill and mixed steps from the piecewise ones
        assert graphs.num_replays > 0 and llm.engine.runner.piecewise.num_replays > 0
    matched, total, worst = near_tie_report(gpu_llama_dir, prompts, [o.outputs[0].token_ids for o in outs])
    print(f"{backend} eager={eager}: matched {matched}/{total}; mismatches (gap, HF bf16 error): {worst}")
    # Every mismatch a near-tie: ours and HF's pick closer in exact logits than 1e-2, or than the two
    # bf16 runs' errors together (each may stray by bf16's error, here HF's, in opposite directions).
    # With the fused kernels on (the CUDA default) 1x was exceeded by up to 1.26x on an H200
    # (benchmarks/results/logs/pytest-test_engine_gpu-20261122-1117.log); unfused, all were below 1x.
    assert all(gap < max(NEAR_TIE, 2 * err) for gap, err in worst), worst
    assert matched / total >= 0.95, matched / total
    m = llm.get_metrics()
    assert m["kv_blocks_free"] == m["kv_blocks_total"]
    del llm
    torch.cuda.empty_cache()
