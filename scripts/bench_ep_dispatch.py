#!/usr/bin/env python
"""Expert-parallel dispatch/combine on NCCL (raylight/parallel/ep_buffer.py): time and GB/s versus
tokens per rank, DeepEP's workload (hidden 7168, 256 experts, top-8, bf16, uniform random routing).

    torchrun --nproc-per-node 2 scripts/bench_ep_dispatch.py            # N >= 2 GPUs, one per rank
    torchrun --nproc-per-node 8 scripts/bench_ep_dispatch.py --tokens 128 4096 --ll-tokens 128
    torchrun --nproc-per-node 2 scripts/bench_ep_dispatch.py --device cpu --tokens 16 --ll-tokens 8 \
        --hidden 256 --experts 16 --iters 2     # gloo smoke run of the same code, writes nothing

Normal mode: layout, dispatch (count exchange + host sync + payload) and combine (payload back +
fp32 reduce) per tokens/rank in --tokens. Low-latency mode: dispatch and combine with
Tmax = tokens/rank for --ll-tokens (the wire buffer is E * Tmax * H * 2 bytes per rank, so LL stops
at a few hundred tokens, as DeepEP's own LL benchmark does at 128).

Figures per op: the median over iterations of the slowest rank (each iteration starts behind a
barrier). "logical" bytes count every received row, local ones included (DeepEP's convention);
"remote" bytes only rows that crossed to another GPU; LL "wire" bytes are what all_to_all_single
moves. Rank 0 writes one JSON under benchmarks/results via write_record.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, git_commit, write_record  # noqa: E402

from raylight.parallel.ep_buffer import EPBuffer  # noqa: E402


def timed(fn, iters: int, warmup: int, dev: torch.device) -> tuple[float, object]:
    """Median seconds of fn() over iters, slowest rank; returns the last result too."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:  # --device cpu: a gloo smoke run of the same code
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    t = torch.tensor([float(np.median(times))], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item(), out


def routing(t: int, experts: int, k: int, seed: int, dev: torch.device):
    g = torch.Generator(device=dev).manual_seed(seed)
    scores = torch.rand(t, experts, device=dev, generator=g)
    w, idx = scores.topk(k, dim=1)
    return idx, (w / w.sum(1, keepdim=True)).float()


def bench_normal(buf: EPBuffer, t: int, k: int, iters: int, warmup: int, dev: torch.device) -> dict:
    rank, h = buf.rank, buf.hidden
    topk, w = routing(t, buf.num_experts, k, rank, dev)
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    layout_s, layout = timed(lambda: buf.get_dispatch_layout(topk, buf.num_experts), iters, warmup, dev)
    per_rank, _, per_expert, in_rank, _ = layout
    kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
              topk_idx=topk, topk_weights=w)
    dispatch_s, res = timed(lambda: buf.dispatch(x, **kw), iters, warmup, dev)
    recv_x, handle = res[0], res[4]
    combine_s, comb = timed(lambda: buf.combine(recv_x, handle), iters, warmup, dev)
    cached_s, _ = timed(lambda: buf.dispatch(x, handle=handle), iters, warmup, dev)

    # Correctness once: combine(dispatch(x)) = x * (#ranks that received each token), bf16 rounding.
    want = (x.float() * in_rank.sum(1, keepdim=True)).bfloat16()
    ok = torch.allclose(comb[0].float(), want.float(), rtol=1e-2, atol=1e-2)
    recv_rows = recv_x.shape[0]
    remote_rows = recv_rows - handle.recv_splits[rank]
    okt = torch.tensor([int(ok)], device=dev)
    dist.all_reduce(okt, op=dist.ReduceOp.MIN)  # every rank correct
    row_bytes = h * 2
    logical, remote = recv_rows * row_bytes, remote_rows * row_bytes  # rank 0's rows (routing is uniform)
    return dict(tokens_per_rank=t, layout_ms=layout_s * 1e3, dispatch_ms=dispatch_s * 1e3,
                cached_dispatch_ms=cached_s * 1e3, combine_ms=combine_s * 1e3,
                received_MB=logical / 1e6, remote_MB=remote / 1e6,
                dispatch_logical_GBps=logical / dispatch_s / 1e9, dispatch_remote_GBps=remote / dispatch_s / 1e9,
                cached_dispatch_logical_GBps=logical / cached_s / 1e9,
                combine_logical_GBps=logical / combine_s / 1e9, combine_remote_GBps=remote / combine_s / 1e9,
                correct_all_ranks=bool(okt.item()))


def bench_low_latency(buf: EPBuffer, t: int, k: int, iters: int, warmup: int, dev: torch.device) -> dict:
    rank, h, e = buf.rank, buf.hidden, buf.num_experts
    topk, w = routing(t, e, k, 100 + rank, dev)
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    dispatch_s, res = timed(lambda: buf.low_latency_dispatch(x, topk, t, e, use_fp8=False), iters, warmup, dev)
    recv_x, recv_count, handle = res[0], res[1], res[2]
    combine_s, comb = timed(lambda: buf.low_latency_combine(recv_x, topk, w, handle), iters, warmup, dev)
    ok = torch.allclose(comb[0].float(), x.float() * w.sum(1, keepdim=True), rtol=2e-2, atol=2e-2)
    okt = torch.tensor([int(ok)], device=dev)
    dist.all_reduce(okt, op=dist.ReduceOp.MIN)
    pairs = int(recv_count.sum().item())
    logical = pairs * h * 2  # one row per (token, expert) pair, as DeepEP counts LL traffic
    wire = e * t * h * 2
    return dict(tokens_per_rank=t, dispatch_us=dispatch_s * 1e6, combine_us=combine_s * 1e6,
                received_pairs=pairs, logical_MB=logical / 1e6, wire_MB=wire / 1e6,
                dispatch_logical_GBps=logical / dispatch_s / 1e9, dispatch_wire_GBps=wire / dispatch_s / 1e9,
                combine_logical_GBps=logical / combine_s / 1e9, combine_wire_GBps=wire / combine_s / 1e9,
                correct_all_ranks=bool(okt.item()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--ll-tokens", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the same code over gloo, a smoke test (no record written, times meaningless)")
    args = p.parse_args()

    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        raise SystemExit("run under torchrun with --nproc-per-node >= 2")
    normal_buf = EPBuffer(dist.group.WORLD, args.experts, args.hidden)
    normal = []
    for t in args.tokens:
        normal.append(bench_normal(normal_buf, t, args.topk, args.iters, args.warmup, dev))
        if rank == 0:
            print("normal", normal[-1], flush=True)
    ll = []
    for t in args.ll_tokens:
        ll_buf = EPBuffer(dist.group.WORLD, args.experts, args.hidden, t)
        ll.append(bench_low_latency(ll_buf, t, args.topk, args.iters, args.warmup, dev))
        if rank == 0:
            print("low_latency", ll[-1], flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0 and dev.type == "cuda":
        record = dict(
            benchmark="ep_dispatch", date=datetime.datetime.now().isoformat(timespec="seconds"),
            commit=git_commit(), device=torch.cuda.get_device_name(), num_gpus=world,
            torch=torch.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())),
            workload=dict(hidden=args.hidden, experts=args.experts, topk=args.topk, dtype="bfloat16",
                          routing="uniform random top-k per token", iters=args.iters, warmup=args.warmup,
                          timing="median over iterations of the slowest rank; dispatch includes the "
                                 "count exchange and host sync"),
            normal=normal, low_latency=ll)
        write_record(args.out, f"ep-dispatch-{world}gpu", record)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
