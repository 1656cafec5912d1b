#!/usr/bin/env python
"""Batch-1 projections of the 8B model at TP=1 and TP=2 shapes: cuBLAS (F.linear, and torch.mv)
against our Triton GEMV (kernels/gemv.py) over a sweep of its launch configurations. With
`--rows 8 32`, the few-row kernel (`gemv_rows`) against cuBLAS at those row counts instead (decode at
batch 8 and 32; the weight is read once per call, so the floor is the same as at one row).

Each method runs N back-to-back calls inside one CUDA graph (as decode graphs run them), each
call on a different copy of the weight so that the set exceeds L2 and every call reads HBM; the
replay time / N is the time per call. The floor is the weight's bytes over the measured copy
bandwidth. Prints the best configuration per shape and writes one JSON under benchmarks/results.

    python scripts/bench_gemv.py
    python scripts/bench_gemv.py --rows 2 8 32
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, device_name, git_commit, measure_ceilings, write_record  # noqa: E402

H, I, V = 4096, 14336, 128256
SHAPES = {  # name: (N, K) of weight [N, K]
    "tp1_qkv": (6144, H), "tp1_o": (H, H), "tp1_gate_up": (2 * I, H), "tp1_down": (H, I), "tp1_lm_head": (V, H),
    "tp2_qkv": (3072, H), "tp2_o": (H, H // 2), "tp2_gate_up": (I, H), "tp2_down": (H, I // 2),
    "tp2_lm_head": (V // 2, H),
}
SWEEP = [(bn, bk, w, s) for (bn, bk), w, s in itertools.product(
    [(4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256), (2, 2048)], (4, 8), (3, 4))]
ROWS_SWEEP = [(bn, bk, w, s) for (bn, bk), w, s in itertools.product(
    [(16, 128), (16, 256), (16, 512), (32, 128), (32, 256), (64, 128), (64, 256)], (4, 8), (3, 4))]
# ... and split over K (a fifth entry): more programs where N alone gives too few (o_proj, qkv)
ROWS_SWEEP += [(bn, bk, 4, s, sk) for (bn, bk), s, sk in itertools.product(
    [(16, 128), (32, 128), (32, 256), (64, 128)], (3, 4), (2, 4))]


def per_call(fn, calls: int, reps: int) -> float:
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    g.reset()
    return float(np.median(times))


def sweep_configs(fn, configs, ref, calls, reps):
    """Times fn(i, config) for every config that compiles and agrees with `ref`; returns
    {str(config): microseconds or the reason it was left out}."""
    out = {}
    for cfg in configs:
        try:
            err = ((fn(0, cfg).float() - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                out[str(cfg)] = f"error {err:.3g}"
                continue
            out[str(cfg)] = per_call(lambda i, c=cfg: fn(i, c), calls, reps) * 1e6
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
            out[str(cfg)] = f"{type(e).__name__}: {str(e)[:100]}"
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rows", type=int, nargs="*", default=[],
                   help="measure the few-row kernel at these row counts (2..64) instead of the single-row GEMV")
    p.add_argument("--shapes", nargs="*", default=[], choices=sorted(SHAPES),
                   help="only these weight shapes (default: all of them; with --rows, those of TP=1)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    from raylight.kernels.gemv import ROWS_DEFAULT, format_config, gemv, gemv_rows, row_tile

    torch.manual_seed(0)
    dev = torch.device("cuda")
    copy_bw = measure_ceilings(dev)["copy_bandwidth_GBps"] * 1e9
    results = {}
    table = {}  # (N, K[, row tile]) -> the best config, or None where cuBLAS was faster
    for name, (N, K) in SHAPES.items():
        if args.shapes and name not in args.shapes:
            continue
        if args.rows and not name.startswith("tp1_"):
            continue  # the few-row kernel is for the batch-8/32 decode of the 8B model at TP=1
        nbytes = N * K * 2
        copies = max(2, -(-(512 << 20) // nbytes))  # > L2 many times over
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        calls = copies
        for rows in args.rows or [1]:
            x = torch.randn(rows, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            key = name if not args.rows else f"{name}_rows{rows}"
            entry = {"N": N, "K": K, "rows": rows, "bytes": nbytes, "floor_us": nbytes / copy_bw * 1e6}
            entry["cublas_linear_us"] = per_call(lambda i: F.linear(x, ws[i]), calls, args.reps) * 1e6
            if args.rows:
                sweep = sweep_configs(lambda i, c: gemv_rows(x, ws[i], c), ROWS_SWEEP, ref, calls, args.reps)
                default = sweep.get(str(ROWS_DEFAULT))
            else:
                entry["cublas_mv_us"] = per_call(lambda i: torch.mv(ws[i], x[0]), calls, args.reps) * 1e6
                sweep = sweep_configs(lambda i, c: gemv(x, ws[i], c), SWEEP, ref, calls, args.reps)
                default = sweep.get(str((8, 512, 4, 4)))
            timed = {k: v for k, v in sweep.items() if isinstance(v, float)}
            best = min(timed, key=timed.get)
            entry.update(triton_sweep_us=sweep, triton_best_config=best, triton_best_us=timed[best],
                         triton_default_us=default)
            entry["best_vs_cublas_linear"] = entry["cublas_linear_us"] / timed[best]
            win = timed[best] < entry["cublas_linear_us"]
            best_cfg = tuple(int(v) for v in best.strip("()").split(","))
            # The best config again with programmatic dependent launch (kernels/pdl.py), alone and with the
            # weight prefetch ahead of its wait: back-to-back calls as in a decode graph (0 where no PDL here).
            call = gemv if not args.rows else gemv_rows
            for pf in (None, 256, 1024):
                label = "pdl_us" if pf is None else f"pdl_prefetch{pf}_us"
                try:
                    entry[label] = per_call(lambda i: call(x, ws[i], best_cfg, pdl=True, prefetch=pf or 0),
                                            calls, args.reps) * 1e6
                except Exception as e:  # noqa: BLE001 - reported, not fatal to the sweep
                    entry[label] = f"{type(e).__name__}: {str(e)[:100]}"
            if args.rows:
                table[(N, K, row_tile(rows))] = best_cfg if win else None
            else:  # the single-row kernel's table has no cuBLAS entries: its best config either way
                table[(N, K)] = best_cfg
            results[key] = entry
            pdl = {k[:-3]: v for k, v in entry.items() if k.startswith("pdl") and isinstance(v, float)}
            print(f"{key:18s} N={N:6d} K={K:6d}: floor {entry['floor_us']:.1f} us; cuBLAS linear "
                  f"{entry['cublas_linear_us']:.1f}; triton best {timed[best]:.1f} {best} (default {default}); "
                  + " ".join(f"{k} {v:.1f}" for k, v in pdl.items()), flush=True)
        del ws
        torch.cuda.empty_cache()
    record = dict(benchmark="bench_gemv", commit=git_commit(), device=device_name("cuda"), rows=args.rows or [1],
                  torch=torch.__version__, copy_GBps=copy_bw / 1e9, shapes=results)
    # The winners as kernels/gemv.py's table (RAYLIGHT_GEMV_CONFIG / RAYLIGHT_GEMV_ROWS_CONFIG): gpu_run.sh passes
    # gemv.env / gemv-rows.env on to the stages after this one; the line is what goes into the tables once committed.
    var, env_file = ("RAYLIGHT_GEMV_ROWS_CONFIG", "gemv-rows.env") if args.rows else ("RAYLIGHT_GEMV_CONFIG", "gemv.env")
    record["config_line"] = format_config(table)
    print(f"{var}={record['config_line']}")
    with open(os.path.join(args.out, env_file), "w") as f:
        f.write(record["config_line"] + "\n")
    write_record(args.out, "gemv" if not args.rows else "gemv-rows", record)


if __name__ == "__main__":
    main()
