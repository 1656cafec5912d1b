"""Tensor and pipeline parallelism on two GPUs over NCCL, through the same executor as on CPU.

bf16 greedy outputs of TP=2 (CUDA graphs and eager), PP=2 (and TP=2 x PP=2 on four GPUs) are
scored teacher-forced by the TP=1 engine: the TP=1 logprobs of exactly the tokens the parallel
engine produced (prompt_logprobs over prompt + output). At least 95% must be TP=1's top-1; every
other one must be a bf16 near-tie by the GPU issue's rule (HF fp32 logits: the gap to TP=1's pick
below 1e-2 or below the bf16 error of the two engines, twice HF-bf16's own error there); the same
token's logprobs agree on average.
A rank killed mid-generation must fail the engine within the timeout, not hang (run in a child
interpreter, so a failure there cannot take the test session with it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from raylight import LLM, SamplingParams

from raylight.testing.helpers import make_random_hf_model, random_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ENGINE = dict(dtype="bfloat16", device="cuda", num_kv_blocks=1024, max_num_batched_tokens=64, distributed_timeout_s=60,
              max_cuda_graph_batch_size=16)
# (tp, pp, enforce_eager); under PP graphs only with pipeline_cuda_graphs (each stage's decode steps)
LAYOUTS = {"tp2-graphs": (2, 1, False), "tp2-eager": (2, 1, True), "pp2": (1, 2, True), "pp2-graphs": (1, 2, False),
           "tp2xpp2": (2, 2, True), "tp2xpp2-graphs": (2, 2, False)}
NEAR_TIE = 1e-2  # the GPU issue's bound on a mismatch's logit gap (or bf16's own error, if larger)
MEAN_LOGPROB_DIFF = 0.05  # same token, parallel vs TP=1: bf16 rounding only, on average


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama-parallel-gpu"))
    # head_dim 64 (256 / 4) for every backend; 4 query / 2 KV heads: one KV head per TP rank
    make_random_hf_model("llama", path, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM(model_dir, enforce_eager=True, **ENGINE)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_bf16_agrees_with_tp1(model_dir, reference, layout):
    import torch.distributed as dist

    tp, pp, eager = LAYOUTS[layout]
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs")
    prompts = random_prompts(13, 512, 5, 60, seed=2)
    max_tokens = [48 - 3 * (i % 4) for i in range(len(prompts))]
    llm = LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, enforce_eager=eager,
              pipeline_cuda_graphs=not eager, **ENGINE)
    try:
        assert dist.get_backend() == "nccl" and dist.get_world_size() == tp * pp
        graphs = llm.engine.runner.graphs
        assert (graphs is not None) == (not eager)
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=0) for m in max_tokens]
        outs = llm.generate(prompts, params, use_tqdm=False)
        if graphs is not None:
            assert graphs.num_replays > 0
        m = llm.get_metrics()
        assert m["kv_blocks_free"] == m["kv_blocks_total"]
    finally:
        llm.shutdown()
    assert not dist.is_initialized()

    # Teacher-forced on our tokens: TP=1's logprobs (prompt_logprobs), and HF's logits in fp32 (the
    # exact order of the candidates) and in bf16 (how far bf16 itself strays from fp32, per position).
    from transformers import AutoModelForCausalLM

    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    matched = total = 0
    diffs, mismatches = [], []
    for prompt, out in zip(prompts, outs):
        seq = out.outputs[0]
        scored = reference.generate({"prompt_token_ids": prompt + seq.token_ids},
                                    SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
        with torch.inference_mode():
            ids = torch.tensor([prompt + seq.token_ids], device="cuda")
            rows = slice(len(prompt) - 1, -1)
            exact = hf32(ids).logits[0, rows].float()
            noise = (hf16(ids).logits[0, rows].float() - exact).abs().max(dim=-1).values
        for j, tok in enumerate(seq.token_ids):
            pos = scored.prompt_logprobs[len(prompt) + j]  # TP=1's view of this position: our token and its top-1
            ours, theirs = seq.logprobs[j][tok].logprob, pos[tok].logprob
            diffs.append(abs(ours - theirs))
            total += 1
            if pos[tok].rank == 1:
                matched += 1
                continue
            best = max(pos, key=lambda t: pos[t].logprob)
            gap = abs(float(exact[j, best] - exact[j, tok]))
            mismatches.append((j, round(gap, 4), round(float(noise[j]), 4)))
    mean = sum(diffs) / len(diffs)
    print(f"{layout}: TP=1 top-1 {matched}/{total}; mismatches (step, exact gap, bf16 error) {mismatches}; "
          f"logprob diff vs TP=1 mean {mean:.4f} max {max(diffs):.4f}")
    # Not TP=1's pick: it must be a tie at bf16 resolution, the GPU issue's rule for a bf16 engine
    # (exact logits less than 1e-2 or than bf16's own error apart), here between two bf16 engines:
    # TP=1 and we may each be off by bf16's error, in opposite directions, hence twice that error.
    # (tp2-eager on H200: one of 22 mismatches had gap 0.26 against an error of 0.21; 96% top-1.)
    assert all(gap < max(NEAR_TIE, 2 * err) for _, gap, err in mismatches), (layout, mismatches)
    assert matched / total >= 0.95
    assert mean < MEAN_LOGPROB_DIFF
    del hf32, hf16
    torch.cuda.empty_cache()


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    from raylight import LLM, SamplingParams
    from raylight.workers.executor import RankDiedError

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], dtype="bfloat16", device="cuda", tensor_parallel_size=2, num_kv_blocks=1024,
                  enforce_eager=True, distributed_timeout_s=60)
        victim = llm.engine.executor.launcher.procs[0]
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        llm.generate([[1, 2, 3]], params, use_tqdm=False)  # the ranks work
        threading.Timer(1.0, os.kill, (victim.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 120:
                llm.generate([[1, 2, 3]] * 8, params, use_tqdm=False)
            print("NO ERROR", flush=True)
        except Exception as e:
            print(f"RAISED {type(e).__name__} after {time.monotonic() - t0:.1f}s: {str(e)[:200]}", flush=True)
        llm.shutdown()
        alive = [p.pid for p in llm.engine.executor.launcher.procs if p.is_alive()]
        print(f"ALIVE {alive}", flush=True)
""")


def test_killed_rank_fails_the_engine_not_hangs(model_dir, tmp_path):
    script = tmp_path / "kill_rank.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), model_dir], capture_output=True, text=True, timeout=150,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(proc.stdout[-2000:], proc.stderr[-3000:])
    raised = [line for line in proc.stdout.splitlines() if line.startswith("RAISED")]
    assert raised, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert float(raised[0].split(" after ")[1].split("s:")[0]) < 90
    assert "ALIVE []" in proc.stdout
