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


def test_a_full_batch_sampled_every_hungry_way_stays_under_the_memory_cap():
    # The 1B shape's 128k vocabulary at the large-GPU defaults (1,024 sequences, 16,384 tokens a step):
    # 1,024 rows sampled with penalties, min_p, top-k/p and 20 logprobs in one step, after the KV cache
    # took what the budget left. The budget's profile samples that worst case, and leaves 1 GiB for what
    # start-up makes outside PyTorch's allocator; the whole device's use must end within the cap.
    import numpy as np

    torch.cuda.empty_cache()
    free0, total = torch.cuda.mem_get_info()
    util = 0.5
    if (total - free0) > 0.1 * total:
        pytest.skip(f"{(total - free0) / 2**30:.1f} GiB of this GPU is already in use")
    llm = LLM("llama-3.2-1b", load_format="dummy", device="cuda", max_model_len=512, gpu_memory_utilization=util)
    try:
        assert llm.engine.args.max_num_seqs == (1024 if total >= 70 * 2**30 else 256)
        torch.cuda.reset_peak_memory_stats()
        rng = np.random.default_rng(0)
        prompts = [rng.integers(100, 120000, 24).tolist() for _ in range(llm.engine.args.max_num_seqs)]
        params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                                presence_penalty=0.2, frequency_penalty=0.2, logprobs=20, max_tokens=6,
                                ignore_eos=True, seed=None)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
        assert max(r for r, _, _, _ in llm.engine.step_log) == len(prompts)  # all of them in one step
        free, _ = torch.cuda.mem_get_info()
        used, cap = total - free, util * total
        print(f"used {used / 2**30:.2f} GiB of a {cap / 2**30:.2f} GiB cap; allocator reserved "
              f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB (peak {torch.cuda.max_memory_reserved() / 2**30:.2f}), "
              f"allocated peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
              f"KV {llm.engine.kv_cache_bytes / 2**30:.2f} GiB")
        assert used <= cap, (used / 2**30, cap / 2**30)
    finally:
        del llm
        torch.cuda.empty_cache()
