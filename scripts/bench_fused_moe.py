#!/usr/bin/env python
"""The MoE expert computation on one GPU, bf16, E=128, top-8, H=2048, I=768 (Qwen3-30B-A3B-like):
our Triton `fused_experts` (kernels/fused_moe.py) against two peers in the same process:
- grouped_mm: sort the (token, k) pairs by expert, gather rows, offs = cumsum of counts (int32),
  `torch._grouped_mm` over w13, SiLU-and-mul, `torch._grouped_mm` over w2, times the routing
  weight, `index_add_` back (float32) -- no host sync;
- loop: our torch path (sort once, one `.tolist()` of the counts, loop over the hit experts).
Routing from random logits through `select_experts` (renormalised top-8).

Timing: median of --reps after warm-up. Ours and grouped_mm both eagerly (CUDA events around each
call) and, for T <= --graph-max, replayed from a CUDA graph (the figure used for "ms" and the
ratio there; the loop cannot be captured, so it is always eager). FLOPs counted as
2 * T * K * 3 * H * I (three [H x I] GEMMs per routed pair); TFLOP/s = that / time.
Correctness: max relative error (max |a - b| / max |b|) of ours and grouped_mm against the loop.

--sweep first times each GEMM of ours over candidate tile configurations per T (graph replay up
to --graph-max, eager CUDA events above), uses the best for the comparison, and prints a CONFIGS table for kernels/fused_moe.py.

    python scripts/bench_fused_moe.py [--sweep] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from raylight.kernels import fused_moe, moe_align  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import git_commit  # noqa: E402  (.device_commit first: the device's .git is stale)

E, K, H, I = 128, 8, 2048, 768
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]

SMALL = [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 64, 1, 4, 4), (128, 64, 1, 4, 3), (64, 256, 1, 4, 3),
         (16, 256, 1, 2, 3), (32, 256, 1, 4, 3), (16, 128, 1, 2, 4), (32, 64, 1, 2, 4)]
LARGE = [(64, 64, 8, 4, 4), (128, 64, 8, 4, 3), (64, 128, 8, 4, 3), (128, 64, 8, 8, 4), (128, 128, 8, 8, 3),
         (256, 64, 8, 8, 3)]


def block_ms(T: int):
    if T <= 32:
        return [16]
    if T <= 256:
        return [16, 32, 64]
    if T <= 2048:
        return [32, 64, 128]
    return [64, 128]


def timed_eager(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def timed_graph(fn, reps: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    g.reset()
    return float(np.median(times))


def grouped_mm_moe(x, w13, w2, weights, ids):
    T, k = ids.shape
    n_exp = w13.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_exp, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows = order // k
    h = torch._grouped_mm(x[rows], w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None]
    out = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=x.device)
    return out.index_add_(0, rows, y).to(x.dtype)


def max_rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def sweep(T, x, w13, w2, w, ids, reps, graph: bool):
    """Best (BLOCK_M, cfg1, cfg2) for this T by timing align + each GEMM alone per candidate
    (replayed from a CUDA graph when `graph`: small T are launch-bound when eager)."""
    tw = w.float().contiguous()
    timed = timed_graph if graph else timed_eager
    best = None
    rows = []
    for bm in block_ms(T):
        align = moe_align.moe_align_block_size(ids, bm, E)
        cands = SMALL if bm <= 32 else LARGE
        t_align = timed(lambda: moe_align.moe_align_block_size(ids, bm, E), reps)
        c1 = fused_moe.gemm1(x, w13, *align, K, bm, cands[0])
        c2_dtype = torch.float32 if T * K <= fused_moe.FP32_CACHE_PAIRS else x.dtype
        res1, res2 = [], []
        for cfg in cands:
            try:
                res1.append((timed(lambda: fused_moe.gemm1(x, w13, *align, K, bm, cfg), reps), cfg))
            except Exception as exc:  # out of shared memory / registers
                print(f"  T={T} bm={bm} gemm1 {cfg}: {type(exc).__name__}")
            try:
                res2.append((timed(lambda: fused_moe.gemm2(c1, w2, *align, tw, K, bm, cfg, c2_dtype), reps), cfg))
            except Exception as exc:
                print(f"  T={T} bm={bm} gemm2 {cfg}: {type(exc).__name__}")
        if not res1 or not res2:
            continue
        (t1, cfg1), (t2, cfg2) = min(res1), min(res2)
        rows.append({"block_m": bm, "align_ms": t_align, "gemm1": [[t, list(c)] for t, c in res1],
                     "gemm2": [[t, list(c)] for t, c in res2]})
        total = t_align + t1 + t2
        if best is None or total < best[0]:
            best = (total, (bm, cfg1, cfg2))
    return (best[1] if best else None), rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--graph-max", type=int, default=512, help="CUDA graphs for T up to this")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-max", type=int, default=1 << 30, help="sweep only T up to this (table above)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    record = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__,
              "workload": {"E": E, "top_k": K, "H": H, "I": I, "dtype": "bfloat16", "routing": "random logits, select_experts renormalize"},
              "flops_formula": "2*T*K*3*H*I", "timing": f"median of {args.reps}; graph replay for T<={args.graph_max} (ours, grouped_mm), CUDA events eager otherwise and for the loop",
              "results": [], "tuned": {}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"fused-moe-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    t_start = time.time()
    for T in args.tokens:
        x = torch.randn(T, H, device=dev).to(torch.bfloat16)
        w, ids = fused_moe.select_experts(torch.randn(T, E, device=dev), K, True)
        cfg = None
        if args.sweep and T <= args.sweep_max:
            cfg, rows = sweep(T, x, w13, w2, w, ids, max(5, args.reps // 3), T <= args.graph_max)
            record["tuned"][str(T)] = {"best": cfg, "candidates": rows}
        ours = (lambda: fused_moe.triton_fused_experts(x, w13, w2, w, ids, config=cfg))
        grouped = (lambda: grouped_mm_moe(x, w13, w2, w, ids))
        loop = (lambda: fused_moe.torch_fused_experts(x, w13, w2, w, ids))
        ref = loop()
        err_ours, err_grouped = max_rel(ours(), ref), max_rel(grouped(), ref)
        flops = 2 * T * K * 3 * H * I
        entry = {"T": T, "config": cfg or fused_moe.get_config(E, H, I, T, K)}
        for name, fn, err in (("ours", ours, err_ours), ("grouped_mm", grouped, err_grouped), ("loop", loop, 0.0)):
            m = {"ms_eager": timed_eager(fn, args.reps if name != "loop" else max(5, args.reps // 3))}
            if name != "loop" and T <= args.graph_max:
                try:
                    m["ms_graph"] = timed_graph(fn, args.reps)
                except Exception as exc:
                    m["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
            m["ms"] = m.get("ms_graph", m["ms_eager"])
            m["tflops"] = flops / (m["ms"] * 1e-3) / 1e12
            m["max_rel_err_vs_loop"] = err
            entry[name] = m
        entry["ours_over_grouped"] = entry["ours"]["ms"] / entry["grouped_mm"]["ms"]
        record["results"].append(entry)
        print(f"T={T:5d} ours {entry['ours']['ms']:.4f} ms ({entry['ours']['tflops']:.1f} TF/s, err {err_ours:.1e})"
              f"  grouped {entry['grouped_mm']['ms']:.4f} ms (err {err_grouped:.1e})  loop {entry['loop']['ms']:.3f} ms"
              f"  ours/grouped {entry['ours_over_grouped']:.2f}  cfg {entry['config']}  [{time.time() - t_start:.0f}s]",
              flush=True)
        with open(path, "w") as f:  # rewritten after every size: a timeout keeps what was measured
            json.dump(record, f, indent=2)
    if args.sweep:
        print("CONFIGS[(%d, %d, %d)] = [" % (E, H, I))
        for T in [t for t in args.tokens if str(t) in record["tuned"]]:
            print(f"    ({T}, {tuple(record['tuned'][str(T)]['best']) if record['tuned'][str(T)]['best'] else None}),")
        print("]")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
