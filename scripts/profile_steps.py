#!/usr/bin/env python
"""Where a step's time goes on the GPU: torch.profiler over the engine's own steps, by phase.

Runs the W1 shape by default (dummy llama-3.2-1b, N requests x L prompt tokens, EOS ignored) through
`LLM.engine.step()` and profiles three windows separately:
  prefill  the first step (only prompt chunks),
  mixed    the following steps while some prompts are still being prefilled,
  decode   `--decode-steps` steps once every request decodes.
For each window it reports the wall time per step, the GPU kernel time per step, and the top kernels
by GPU time (and the top host ops by self CPU time, where a host-bound step spends its time).
`--workload-file` takes the requests from a saved workload instead (bench_throughput's --save-workload,
e.g. the sharegpt mix: prompts and output lengths of their own), with the mixed window capped at
`--mixed-steps` steps, since such a mix keeps prefilling beside decodes for most of its run.
The profiler slows the host, so wall times here are upper bounds; kernel times are not affected.
Writes one JSON under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import (REPO, add_kernel_flags, device_name, fused_kernels_on, git_commit,  # noqa: E402
                              kernel_args, load_workload_file, write_record)


def summarize(prof, steps: int, wall_s: float, top: int) -> dict:
    kernels, host = {}, {}
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", 0) or 0
        if dev_us > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(ev.key, [0.0, 0])
            k[0] += dev_us
            k[1] += ev.count
        elif ev.device_type == torch.autograd.DeviceType.CPU and ev.self_cpu_time_total > 0:
            host[ev.key] = host.get(ev.key, 0.0) + ev.self_cpu_time_total
    total = sum(v[0] for v in kernels.values())
    top_k = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    top_h = sorted(host.items(), key=lambda kv: -kv[1])[:top]
    return dict(steps=steps, wall_ms_per_step=wall_s * 1e3 / max(1, steps),
                gpu_kernel_ms_per_step=total / 1e3 / max(1, steps),
                top_kernels=[dict(name=n[:160], ms_per_step=v[0] / 1e3 / max(1, steps), calls_per_step=v[1] / max(1, steps),
                                  share=v[0] / max(total, 1e-9)) for n, v in top_k],
                top_host_ops=[dict(name=n[:160], ms_per_step=v / 1e3 / max(1, steps)) for n, v in top_h])


def profiled(engine, n_steps: int, until=None):
    """Steps the engine under the profiler: `n_steps` steps, or until `until()` is true."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    steps = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        while steps < n_steps and engine.has_unfinished_requests() and not (until and until()):
            engine.step()
            steps += 1
        sync()
        wall = time.perf_counter() - t0
    return prof, steps, wall


def python_profile(engine, n_steps: int, top: int) -> list[dict]:
    """cProfile over decode steps: the Python functions a host-bound step spends its time in."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_steps):
        engine.step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, fn) -> (cc, nc, tottime, cumtime, callers)
    by_self = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    # And by cumulative time, our own functions and the libraries we call per step: the step's tree.
    ours = [kv for kv in stats.items() if any(s in kv[0][0] for s in ("raylight", "/main/", "flashinfer", "graphs.py"))]
    by_cum = sorted(ours, key=lambda kv: -kv[1][3])[:2 * top]
    return [dict(name=f"{os.path.basename(f)}:{line}:{fn}", tottime_ms_per_step=v[2] * 1e3 / n_steps,
                 cumtime_ms_per_step=v[3] * 1e3 / n_steps, calls_per_step=v[1] / n_steps, order=order)
            for order, rows in (("self", by_self), ("cumulative", by_cum)) for (f, line, fn), v in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="llama-3.2-1b")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="auto", help="cpu only to smoke-test the script")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="profiles rank 0 (its NCCL kernels' time "
                   "includes waiting for the other ranks)")
    add_kernel_flags(p)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--workload-file", default=None, help="requests from a saved workload ({name, prompts, "
                   "output_lens}, bench_throughput --save-workload) instead of N x input-len")
    p.add_argument("--mixed-steps", type=int, default=10_000, help="most steps the mixed window profiles")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    from raylight import LLM, SamplingParams

    llm = LLM(args.model_config, load_format="dummy", attention_backend=args.attention_backend,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager, device=args.device,
              tensor_parallel_size=args.tensor_parallel_size,
              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, **kernel_args(args))
    engine = llm.engine
    vocab = engine.arch.vocab_size
    rng = np.random.default_rng(0)
    if args.workload_file:
        workload, prompts, out_lens = load_workload_file(args.workload_file)
        params_of = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    else:
        workload = None
        prompts = [rng.integers(100, vocab - 1, args.input_len).tolist() for _ in range(args.num_requests)]
        params_of = [SamplingParams(temperature=0.0, max_tokens=2 * args.decode_steps + 64, ignore_eos=True)
                     ] * len(prompts)
    llm.generate([p[::-1] for p in prompts[:2]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    for prompt, params in zip(prompts, params_of):  # as LLM.generate queues them: only the final output
        engine.enqueue(engine.make_request(prompt, params), final_only=True)
    sched = engine.scheduler

    def all_decoding() -> bool:
        return all(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running) and not sched.waiting

    phases = {}
    phases["prefill"] = summarize(*profiled(engine, 1), top=args.top)
    phases["mixed"] = summarize(*profiled(engine, args.mixed_steps, until=all_decoding), top=args.top)
    for _ in range(3):  # settle: async steps still in flight from the mixed phase
        engine.step()
    phases["decode"] = summarize(*profiled(engine, args.decode_steps), top=args.top)
    phases["decode"]["host_python"] = python_profile(engine, args.decode_steps, args.top)
    while engine.has_unfinished_requests():
        engine.step()
    # Again on fresh prompts, under cProfile instead: where the host spends a prefill/mixed step.
    for prompt, params in zip(prompts, params_of):
        engine.enqueue(engine.make_request(prompt[1:] + prompt[:1], params), final_only=True)
    phases["mixed"]["host_python"] = python_profile(engine, phases["mixed"]["steps"] + 1, args.top)
    while engine.has_unfinished_requests():
        engine.step()

    for name, ph in phases.items():
        print(f"\n=== {name}: {ph['steps']} steps, wall {ph['wall_ms_per_step']:.2f} ms/step, "
              f"GPU kernels {ph['gpu_kernel_ms_per_step']:.2f} ms/step")
        for k in ph["top_kernels"]:
            print(f"  {k['ms_per_step']:8.3f} ms {k['share']:6.1%} x{k['calls_per_step']:6.1f}  {k['name'][:110]}")
        print("  -- host (self CPU):")
        for h in ph["top_host_ops"][:12]:
            print(f"  {h['ms_per_step']:8.3f} ms  {h['name'][:110]}")
        if "host_python" in ph:
            print("  -- host Python (cProfile, tottime / cumtime per step; by self time, then by cumulative):")
            for h in ph["host_python"]:
                print(f"  {h['tottime_ms_per_step']:8.3f} {h['cumtime_ms_per_step']:8.3f} ms x{h['calls_per_step']:6.1f}  {h['name']}")
    record = dict(benchmark="profile_steps", date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), commit=git_commit(),
                  device=device_name(engine.device.type), torch=torch.__version__, model=args.model_config,
                  attention_backend=engine.attn_backend.name,
                  workload=dict(num_requests=len(prompts), input_len=None if workload else args.input_len,
                                workload_file=workload, max_num_seqs=engine.args.max_num_seqs,
                                tensor_parallel_size=args.tensor_parallel_size,
                                max_num_batched_tokens=engine.args.max_num_batched_tokens,
                                async_scheduling=engine.async_scheduling,
                                fused_kernels=fused_kernels_on(engine),
                                fi_decode_tensor_cores=getattr(engine.attn_backend, "_use_tensor_cores", None)),
                  phases=phases, command=" ".join(sys.argv))
    write_record(args.out, f"profile-{args.model_config}", record)
    llm.shutdown()


if __name__ == "__main__":
    main()
