"""The engine in its own process on a CUDA GPU (engine/engine_process.py, the serving default there):
greedy bf16 outputs streamed from the child follow HF's under the near-tie rule, the child used CUDA
graphs, and it stops cleanly, giving its GPU memory back."""

from __future__ import annotations

import asyncio

import pytest
import torch

from raylight.engine.engine_process import EngineProcessClient
from raylight.sampling_params import SamplingParams
from raylight.testing.helpers import NEAR_TIE, near_tie_report, random_prompts

pytestmark = pytest.mark.gpu


def test_engine_process_on_gpu_follows_hf_and_stops_cleanly(gpu_llama_dir):
    prompts = random_prompts(13, 512, 5, 60, seed=2)
    params = [SamplingParams(temperature=0.0, max_tokens=64 - 3 * (i % 4), ignore_eos=True) for i in range(13)]
    free_before = torch.cuda.mem_get_info()[0]
    client = EngineProcessClient(dict(model=gpu_llama_dir, dtype="bfloat16", device="cuda", num_kv_blocks=2048,
                                      max_num_batched_tokens=64, max_cuda_graph_batch_size=16), threads=2)
    try:
        async def one(i):
            return [o async for o in client.generate(prompts[i], params[i], f"r{i}")]

        async def main():
            return await asyncio.gather(*[one(i) for i in range(len(prompts))])

        streams = asyncio.run(main())
        m = client.metrics()
        assert m["num_steps"] > 0 and m["kv_blocks_free"] == m["kv_blocks_total"]
        assert m["cuda_graph_replays"] > 0 and m["piecewise_graph_replays"] > 0  # decode and prefill steps
        assert torch.cuda.mem_get_info()[0] < free_before  # the child holds the model and the KV cache
    finally:
        client.close()
    assert client.proc.returncode == 0
    outs = [s[-1].outputs[0].token_ids for s in streams]
    assert all(len(o) == p.max_tokens for o, p in zip(outs, params))
    matched, total, worst = near_tie_report(gpu_llama_dir, prompts, outs)
    print(f"engine process: matched {matched}/{total}; mismatches (gap, HF bf16 error): {worst}")
    assert all(gap < max(NEAR_TIE, 2 * err) for gap, err in worst), worst
    assert matched / total >= 0.95, matched / total
