"""The engine's scheduler limits where the user set none (engine/llm_engine.py scheduler_defaults)."""

from __future__ import annotations

import torch

from raylight.config import EngineArgs
from raylight.engine.llm_engine import scheduler_defaults


GIB = 2**30


def test_a_large_gpu_takes_many_sequences_and_a_large_step_a_small_gpu_and_a_cpu_fewer():
    args, cuda = EngineArgs(model="m"), torch.device("cuda", 0)
    assert scheduler_defaults(args, cuda, 80 * GIB) == dict(max_num_batched_tokens=16384, max_num_seqs=1024)
    assert scheduler_defaults(args, cuda, 141 * GIB) == dict(max_num_batched_tokens=16384, max_num_seqs=1024)
    assert scheduler_defaults(args, cuda, 24 * GIB) == dict(max_num_batched_tokens=8192, max_num_seqs=256)
    assert scheduler_defaults(args, torch.device("cpu")) == dict(max_num_batched_tokens=2048, max_num_seqs=256)


def test_what_the_user_set_stays():
    args, cuda = EngineArgs(model="m", max_num_seqs=8, max_num_batched_tokens=512), torch.device("cuda", 0)
    assert scheduler_defaults(args, cuda, 80 * GIB) == {}
    assert scheduler_defaults(EngineArgs(model="m", max_num_seqs=8), cuda, 80 * GIB) == dict(
        max_num_batched_tokens=16384)


def test_a_cpu_engine_runs_with_them(model_dir):
    from raylight import LLM, SamplingParams

    llm = LLM(model_dir, device="cpu", dtype="float32")
    assert (llm.engine.args.max_num_seqs, llm.engine.args.max_num_batched_tokens) == (256, 2048)
    assert (llm.engine.scheduler.max_num_seqs, llm.engine.scheduler.max_num_batched_tokens) == (256, 2048)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
