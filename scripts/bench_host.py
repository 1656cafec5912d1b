#!/usr/bin/env python
"""The engine's host work per decode step, by phase: what bounds a step when the device is fast.

On the H200 lent on 2026-12-04 our W1 decode step took 4.8-5.0 ms at batch 256 against a 3.0 ms graph
replay: the host (scheduling, input preparation, launches, reading tokens back, outputs) set the pace.
This bench isolates that work: `--batch` requests decode together (async scheduling, EOS ignored) on
the one-layer `llama-tiny` preset by default, whose forward costs next to nothing, and each phase is
timed with wrappers around the engine's own calls. Reported per phase: the least ms per step over
`--windows` windows of `--steps` steps (the least is the least disturbed by other processes), and
`host` = the whole step less the forward. On CUDA the forward is a graph replay's launch.

    python scripts/bench_host.py                     # CPU, batch 256
    python scripts/bench_host.py --device cuda --model-config llama-3.2-1b
Writes one JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, device_name, git_commit, wrap_timed, write_record  # noqa: E402

# (owner attribute path on the engine, method, label)
PHASES = [("scheduler", "schedule", "schedule"), ("runner", "prepare", "prepare"),
          ("runner.sampling", "metadata", "sampling_metadata"), ("runner", "forward", "forward"),
          ("runner", "_sample", "sample"), ("runner", "collect", "collect"), ("scheduler", "update", "update"),
          ("outputs", "process", "outputs")]


def wrap_phases(engine, totals: dict[str, float]) -> None:
    for path, name, label in PHASES:
        obj = engine
        for part in path.split("."):
            obj = getattr(obj, part)
        wrap_timed(obj, name, label, totals)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="llama-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    from raylight import LLM, SamplingParams

    llm = LLM(args.model_config, load_format="dummy", device=args.device, max_num_seqs=args.batch,
              max_num_batched_tokens=max(2048, args.batch * args.prompt_len // 4), async_scheduling=True,
              max_model_len=args.prompt_len + (args.windows + 1) * args.steps + 64)
    engine = llm.engine
    rng = np.random.default_rng(0)
    vocab = engine.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=(args.windows + 1) * args.steps + 32, ignore_eos=True)
    for i in range(args.batch):
        engine.enqueue(engine.make_request(rng.integers(0, vocab, args.prompt_len).tolist(), params), final_only=True)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()  # every prompt in: from here on each step is a decode of the whole batch
    for _ in range(5):
        engine.step()
    totals: dict[str, float] = {}
    wrap_phases(engine, totals)
    best: dict[str, float] = {}
    for _ in range(args.windows):
        for k in totals:
            totals[k] = 0.0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        totals["step"] = time.perf_counter() - t0
        for k, v in totals.items():
            best[k] = min(best.get(k, float("inf")), v * 1e3 / args.steps)
    assert len(engine.scheduler.running) == args.batch, "a request ended inside the measured windows"
    best["host"] = best["step"] - best["forward"]
    print(f"batch {args.batch} on {args.device}: ms per decode step (least of {args.windows} windows of "
          f"{args.steps} steps)")
    for k, v in best.items():
        print(f"  {k:18s} {v:7.3f}")
    record = dict(benchmark="host", date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                  device=device_name(args.device), model=args.model_config,
                  workload=dict(batch=args.batch, prompt_len=args.prompt_len, steps=args.steps, windows=args.windows,
                                async_scheduling=True, final_only=True),
                  ms_per_step=best, command="python scripts/bench_host.py " + " ".join(argv or sys.argv[1:]))
    write_record(args.out, f"host-{args.device}", record)
    return record


if __name__ == "__main__":
    main()
