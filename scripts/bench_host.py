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
import asyncio
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
    p.add_argument("--mode", choices=["offline", "served", "both"], default="both",
                   help="offline: LLM-style batch (final outputs only); served: through the replica's AsyncLLMEngine")
    p.add_argument("--stream-messages-per-s", type=float, default=500.0,
                   help="served: the replica's max_stream_messages_per_s (its default; 0: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on CPU the forward's OpenMP pool of one thread does not compete with the "
                        "engine thread's own in served mode; the forward is not what this measures)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    record = dict(benchmark="host", date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                  device=device_name(args.device), model=args.model_config,
                  workload=dict(batch=args.batch, prompt_len=args.prompt_len, steps=args.steps, windows=args.windows,
                                async_scheduling=True, stream_messages_per_s=args.stream_messages_per_s,
                                torch_threads=args.threads),
                  command="python scripts/bench_host.py " + " ".join(argv or sys.argv[1:]))
    modes = ["offline", "served"] if args.mode == "both" else [args.mode]
    for mode in modes:
        best = measure(args, mode)
        print(f"{mode}: batch {args.batch} on {args.device}, ms per decode step (least of {args.windows} windows "
              f"of {args.steps} steps)")
        for k, v in best.items():
            print(f"  {k:18s} {v:7.3f}")
        record[f"{mode}_ms_per_step"] = best
    write_record(args.out, f"host-{args.device}", record)
    return record


def measure(args, mode: str) -> dict[str, float]:
    import torch

    from raylight import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model_config, load_format="dummy", device=args.device, max_num_seqs=args.batch,
              max_num_batched_tokens=max(2048, args.batch * args.prompt_len // 4), async_scheduling=True,
              max_model_len=args.prompt_len + (args.windows + 2) * args.steps + 64)
    engine = llm.engine
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, engine.arch.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=(args.windows + 2) * args.steps + 32, ignore_eos=True)
    totals: dict[str, float] = {}
    wrap_phases(engine, totals)
    if mode == "served":
        best = asyncio.run(served(engine, prompts, params, args, totals))
    else:
        for p in prompts:  # only the finished output: an offline batch
            engine.enqueue(engine.make_request(p, params), final_only=True)
        while not all_decoding(engine, args.batch):
            engine.step()

        def window() -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            return time.perf_counter() - t0

        best = least_over_windows(args, totals, window)
    best["host"] = best["step"] - best["forward"]
    return best


def all_decoding(engine, batch: int) -> bool:
    running = engine.scheduler.running
    return len(running) == batch and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)


def least_over_windows(args, totals: dict[str, float], window) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(args.windows):
        for k in totals:
            totals[k] = 0.0
        totals["step"] = window()
        for k, v in totals.items():
            best[k] = min(best.get(k, float("inf")), v * 1e3 / args.steps)
    return best


async def served(engine, prompts, params, args, totals) -> dict[str, float]:
    """The same batch through a replica's AsyncLLMEngine: the engine steps on its own thread and
    every request streams its outputs to an asyncio reader (Ray and HTTP left out)."""
    from raylight.engine.async_engine import AsyncLLMEngine

    ae = AsyncLLMEngine(engine, max_stream_messages_per_s=args.stream_messages_per_s or None)
    messages = [0]

    async def reader(i: int, p: list[int]) -> None:
        async for _ in ae.generate(p, params, f"served-{i}"):
            messages[0] += 1

    tasks = [asyncio.ensure_future(reader(i, p)) for i, p in enumerate(prompts)]
    try:
        while not all_decoding(engine, len(prompts)):
            await asyncio.sleep(0.005)
        windows = []

        async def window() -> tuple[float, int]:
            n0, t0 = engine.num_steps, time.perf_counter()
            while engine.num_steps - n0 < args.steps:
                await asyncio.sleep(0.02)  # rarely: this loop shares the GIL with the engine thread
            return time.perf_counter() - t0, engine.num_steps - n0

        best: dict[str, float] = {}
        for _ in range(args.windows):
            m0 = messages[0]
            for k in totals:
                totals[k] = 0.0
            totals["step"], steps = await window()
            windows.append((messages[0] - m0) / steps)
            for k, v in totals.items():
                best[k] = min(best.get(k, float("inf")), v * 1e3 / steps)
        best["messages_per_step"] = sum(windows) / len(windows)  # a mean: paced streams send in bursts
        return best
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ae.shutdown()


if __name__ == "__main__":
    main()
