#!/usr/bin/env python
"""Sweeps our Triton decode-attention kernel's tile and launch options on this GPU, per head dim.

Decode attention is about half of a W1 decode step on an H200 (1.42 of 2.97 ms at batch 256,
benchmarks/results/profile-llama-3.2-1b-20261204-203341.json) and is bound by K/V bandwidth, so the
tile width, warps and pipeline depth matter. For each head dim it times every (TILE, num_warps,
num_stages) on the decode shapes our benchmarks run (W1's batch 256 at 512 and 768 tokens of context
for head dim 64; the 8B shape's batch 1, 8 and 32 at 256 tokens for 128, with the split-KV factor
the backend would choose), CUDA events around N back-to-back launches, median of several rounds.
The best config per head dim minimises the summed time; it is printed as the value of
RAYLIGHT_DECODE_ATTN_CONFIG (kernels/attention/triton_kernels.py) and recorded with the K/V bytes
each shape reads over the measured copy bandwidth. Writes one JSON under --out.

    python scripts/tune_decode_attention.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, device_name, git_commit, measure_ceilings, write_record  # noqa: E402

BLOCK = 16
# (name, head_dim, batch, context)
SHAPES = [("w1-start", 64, 256, 512), ("w1-end", 64, 256, 768), ("8b-b1", 128, 1, 256), ("8b-b8", 128, 8, 256),
          ("8b-b32", 128, 32, 256)]
HEADS, KV_HEADS = 32, 8
CONFIGS = list(itertools.product((32, 64, 128), (2, 4, 8), (2, 3)))


def time_shape(head_dim: int, batch: int, ctx: int, cfg, reps: int = 20, rounds: int = 5) -> float:
    from raylight.kernels.attention import triton_kernels as tk
    from raylight.kernels.attention.base import AttentionSpec
    from raylight.kernels.attention.triton_backend import TritonAttentionBackend

    dev = torch.device("cuda")
    blocks_per_seq = -(-ctx // BLOCK)
    num_blocks = batch * blocks_per_seq + 1
    cache = torch.randn(num_blocks, 2, BLOCK, KV_HEADS, head_dim, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks - 1, device=dev)[: batch * blocks_per_seq].to(torch.int32)
    tables = perm.view(batch, blocks_per_seq).contiguous()  # scattered blocks, as a busy pool has them
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HEADS, head_dim, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    backend = TritonAttentionBackend(AttentionSpec(BLOCK, HEADS, KV_HEADS, head_dim, torch.bfloat16, dev))
    splits = backend.num_splits(batch, ctx)
    partials = tk.alloc_partials(batch, HEADS, head_dim, splits, dev) if splits > 1 else None
    launch = dict(TILE=cfg[0], num_warps=cfg[1], num_stages=cfg[2])

    def run():
        tk.decode_attention(out, q, cache, tables, seq_lens, batch, 0.125, None, splits, partials, launch)

    run()  # compile
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / reps / 1e3)
    return float(np.median(times)), splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to tune")
        return
    bw = measure_ceilings(torch.device("cuda"))["copy_bandwidth_GBps"] * 1e9
    results, best = {}, {}
    for head_dim in sorted({s[1] for s in SHAPES}):
        shapes = [s for s in SHAPES if s[1] == head_dim]
        totals = {}
        for cfg in CONFIGS:
            try:
                per = {name: time_shape(hd, b, ctx, cfg) for name, hd, b, ctx in shapes}
            except Exception as e:  # a config that does not fit (shared memory) is skipped
                print(f"head_dim {head_dim} {cfg}: {type(e).__name__}")
                continue
            totals[cfg] = sum(t for t, _ in per.values())
            results[f"{head_dim}:{cfg[0]},{cfg[1]},{cfg[2]}"] = {k: dict(seconds=t, splits=s) for k, (t, s) in per.items()}
        cfg = min(totals, key=totals.get)
        floor = {name: b * ctx * 2 * KV_HEADS * head_dim * 2 / bw for name, hd, b, ctx in shapes}
        chosen = results[f"{head_dim}:{cfg[0]},{cfg[1]},{cfg[2]}"]
        best[head_dim] = dict(tile=cfg[0], num_warps=cfg[1], num_stages=cfg[2], total_s=totals[cfg],
                              fraction_of_bandwidth={k: floor[k] / chosen[k]["seconds"] for k in floor})
        print(f"head_dim {head_dim}: best TILE={cfg[0]} warps={cfg[1]} stages={cfg[2]} "
              f"({totals[cfg] * 1e6:.1f} us summed), per shape "
              + ", ".join(f"{k} {v['seconds'] * 1e6:.1f} us ({floor[k] / v['seconds']:.0%} of copy bw)"
                          for k, v in chosen.items()))
    env = ";".join(f"{hd}:{b['tile']},{b['num_warps']},{b['num_stages']}" for hd, b in best.items())
    print(f"RAYLIGHT_DECODE_ATTN_CONFIG={env}")
    write_record(a.out, "tune-decode-attention", dict(
        benchmark="tune_decode_attention", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        commit=git_commit(), device=device_name("cuda"), torch=torch.__version__, shapes=SHAPES,
        copy_bandwidth_GBps=bw / 1e9, best=best, env=env, results=results, command=" ".join(sys.argv)))


if __name__ == "__main__":
    main()
