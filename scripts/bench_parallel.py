#!/usr/bin/env python
"""Tensor and pipeline parallelism on GPUs: what TP=2 buys and what its collectives cost, in one run.

* batch-1 decode latency per token, llama-3.1-8b shapes (dummy weights), 128 prompt tokens, 256
  output tokens: TP=1 vs TP=2;
* W1 throughput (256 requests x 512 prompt tokens x 256 output tokens, llama-3.2-1b shapes):
  TP=1, TP=2, PP=2 (PP keeps pipeline_parallel_size micro-batches in flight), eagerly and with each
  stage's decode steps in CUDA graphs (layout `1x2g`: pipeline_cuda_graphs);
* NCCL all-reduce time at the activation sizes of those steps ([tokens, hidden] bf16, two per
  layer per step under TP) and at 256 MiB for the bus bandwidth, plus the gloo broadcast that
  carries each step's inputs to the other ranks, all measured on the same GPUs in the same run.

Each engine runs in a fresh child process (a clean GPU and one torch.distributed world each);
its ranks are that child's children. Writes one JSON under benchmarks/results via write_record.

    python scripts/bench_parallel.py                 # everything (2 GPUs)
    python scripts/bench_parallel.py --skip-w1       # batch-1 and collectives only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, device_name, git_commit, make_workload, phase_times, write_record  # noqa: E402

B1_MODEL, W1_MODEL = "llama-3.1-8b", "llama-3.2-1b"
RESULT_TAG = "BENCH_PARALLEL_RESULT "


# ---------------------------------------------------------------- one engine (child process)

def run_engine(cfg: dict) -> dict:
    """One layout on one workload: ready time, throughput, decode step times, CUDA graph use."""
    from raylight import LLM, SamplingParams
    from raylight.models.config import PRESETS

    vocab = PRESETS[cfg["model"]]["vocab_size"]
    ns = SimpleNamespace(seed=0, num_requests=cfg["num_requests"], fixed=True, input_len=cfg["input_len"],
                         output_len=cfg["output_len"])
    prompts, out_lens = make_workload(ns, vocab)
    t0 = time.perf_counter()
    llm = LLM(cfg["model"], load_format="dummy", device=cfg.get("device", "cuda"), tensor_parallel_size=cfg["tp"],
              pipeline_parallel_size=cfg["pp"], max_model_len=cfg["max_model_len"], max_num_seqs=cfg["max_num_seqs"],
              max_num_batched_tokens=cfg["max_num_batched_tokens"], attention_backend=cfg["attention_backend"],
              gpu_memory_utilization=cfg["gpu_memory_utilization"], enforce_eager=cfg["enforce_eager"],
              pipeline_cuda_graphs=cfg.get("pipeline_cuda_graphs", False))
    ready_s = time.perf_counter() - t0
    try:
        e = llm.engine
        warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        llm.generate(prompts[:2], [warm] * min(2, len(prompts)), use_tqdm=False)
        warm_steps = llm.get_metrics()["num_steps"]
        params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == sum(out_lens), (produced, sum(out_lens))
        m = llm.get_metrics()
        steps = list(e.step_log)[len(e.step_log) - (m["num_steps"] - warm_steps):]
        decode_1 = [s for reqs, _, dec, s in steps if reqs == dec == 1]
        return dict(
            tp=cfg["tp"], pp=cfg["pp"], ready_s=ready_s, elapsed_s=elapsed, output_tokens=produced,
            output_tok_s=produced / elapsed, engine_steps=m["num_steps"] - warm_steps, kv_blocks=e.num_blocks,
            cuda_graphs=e.runner.graphs is not None, cuda_graph_capture_s=e.graph_capture_s,
            attention_backend=e.attn_backend.name, phases=phase_times(steps),
            # batch-1: the median decode step is the per-token latency a client sees
            decode_ms_per_token=float(np.median(decode_1)) * 1e3 if decode_1 else None,
            rank0_params=sum(p.numel() for p in e.model.parameters()))
    finally:
        llm.shutdown()


def spawn_engine(cfg: dict, timeout_s: float) -> dict:
    """Runs `run_engine(cfg)` in a fresh interpreter; returns its result or the error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-engine", json.dumps(cfg)]
    label = f"{cfg['model']} tp={cfg['tp']} pp={cfg['pp']} x{cfg['num_requests']}"
    print(f"--- {label}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return dict(tp=cfg["tp"], pp=cfg["pp"], error=f"timed out after {timeout_s}s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            print(f"    {result['output_tok_s']:.1f} output tok/s"
                  + (f", {result['decode_ms_per_token']:.2f} ms/token at batch 1" if result["decode_ms_per_token"]
                     else "") + f", graphs={result['cuda_graphs']}, ready in {result['ready_s']:.1f}s", flush=True)
            return result
    tail = (proc.stderr or "")[-3000:]
    print(f"    failed (exit {proc.returncode}):\n{tail}", flush=True)
    return dict(tp=cfg["tp"], pp=cfg["pp"], error=f"exit {proc.returncode}", stderr_tail=tail)


# ---------------------------------------------------------------- collectives (child processes)

def _per_call(fn, calls: int, reps: int = 30) -> float:
    """Median seconds per call of `calls` back-to-back calls between two events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return float(np.median(times))


def _collective_rank(rank: int, world: int, init_method: str, sizes: dict, reps: int, out_path: str) -> None:
    import torch.distributed as dist

    from raylight.workers.step_channel import DEFAULT_CAPACITY

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world)
    gloo = dist.new_group(backend="gloo")
    from raylight.parallel.state import ParallelConfig, ParallelGroups

    groups = ParallelGroups.from_world(ParallelConfig(tensor_parallel_size=world))  # sets up the custom all-reduce
    hidden = 4096
    version = torch.cuda.nccl.version()
    result: dict = {"all_reduce": {}, "nccl_version": ".".join(map(str, version)) if isinstance(version, tuple)
                    else str(version)}
    for name, nbytes in sizes.items():
        x = torch.zeros(max(1, nbytes // 2), dtype=torch.bfloat16, device="cuda")  # zeros: sums never overflow
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t = _per_call(lambda: dist.all_reduce(x), 1, reps if nbytes < 2**26 else max(5, reps // 10))
        algbw = x.numel() * 2 / t
        # ring all-reduce moves 2 (n - 1) / n of the buffer through each link: NCCL's "bus bandwidth"
        entry = dict(bytes=x.numel() * 2, seconds=t, algbw_GBps=algbw / 1e9,
                     busbw_GBps=algbw * 2 * (world - 1) / world / 1e9)
        if nbytes < 2**26:
            # One call between a host sync each includes the ranks' launch skew; a decode step issues
            # them back to back, inside a CUDA graph: time 20 such calls and divide.
            entry["back_to_back_seconds"] = _per_call(lambda: dist.all_reduce(x), 20)
            entry["in_cuda_graph_seconds"] = _in_graph(lambda: dist.all_reduce(x))
            entry.update(_custom_times(groups, x, hidden))
        result["all_reduce"][name] = entry
    # The step broadcast: one fixed-size int64 buffer over gloo, as StepChannel sends it.
    buf = torch.zeros(DEFAULT_CAPACITY, dtype=torch.int64)
    for _ in range(20):
        dist.broadcast(buf, src=0, group=gloo)
    dist.barrier(group=gloo)
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.broadcast(buf, src=0, group=gloo)
    dist.barrier(group=gloo)
    result["gloo_step_broadcast_s"] = (time.perf_counter() - t0) / reps
    result["gloo_step_broadcast_bytes"] = DEFAULT_CAPACITY * 8
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    torch.cuda.synchronize()
    dist.distributed_c10d._abort_process_group()


def _in_graph(fn, calls: int = 20) -> float:
    """Seconds per call of `calls` back-to-back calls of fn captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    t = _per_call(g.replay, 1) / calls
    g.reset()  # before the communicator goes (pytorch#115388)
    return t


def _custom_times(groups, x: torch.Tensor, hidden: int) -> dict:
    """The one-shot IPC all-reduce (parallel/custom_allreduce.py) on the same buffer as [rows, hidden],
    alone and fused with add+RMSNorm, next to NCCL followed by our separate add+RMSNorm kernel, all
    inside CUDA graphs as a decode step runs them."""
    import torch.distributed as dist

    from raylight.kernels.fused import fused_add_rms_norm

    car = groups.custom_ar
    if car is None or x.numel() % hidden:
        return {"custom": None if car is None else "not [rows, hidden]"}
    v = x.view(-1, hidden)
    if not car.fits(v):
        return {"custom": "over the one-shot limit: NCCL"}
    res, w = torch.zeros_like(v), torch.ones(hidden, dtype=v.dtype, device=v.device)

    def nccl_then_norm():
        dist.all_reduce(v, group=groups.tp_group)
        fused_add_rms_norm(v, res, w, 1e-6)

    return {"custom_in_cuda_graph_seconds": _in_graph(lambda: car.all_reduce(v)),
            "custom_add_rms_norm_in_cuda_graph_seconds": _in_graph(lambda: car.all_reduce_add_rms_norm(v, res, w, 1e-6)),
            "nccl_then_add_rms_norm_in_cuda_graph_seconds": _in_graph(nccl_then_norm)}


def measure_collectives(sizes: dict, reps: int = 200) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from raylight.utils.ports import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collectives.json")
        mp.spawn(_collective_rank, args=(2, f"tcp://127.0.0.1:{port}", sizes, reps, out), nprocs=2)
        with open(out) as f:
            return json.load(f)


def activation_sizes() -> dict:
    """Bytes of one all-reduced activation [tokens, hidden] in bf16 for the steps benchmarked here."""
    from raylight.models.config import PRESETS

    h8, h1 = PRESETS[B1_MODEL]["hidden_size"], PRESETS[W1_MODEL]["hidden_size"]
    sizes = {"b1_decode_8b": 1 * h8 * 2, "w1_decode_256_1b": 256 * h1 * 2, "w1_prefill_2048_1b": 2048 * h1 * 2,
             "bus_bandwidth_256MiB": 2**28}
    # [rows, 4096] bf16 at more row counts: where the one-shot kernel stops paying
    sizes.update({f"rows{r}_h4096": r * 4096 * 2 for r in (8, 32, 128, 256, 512)})
    return sizes


# ---------------------------------------------------------------- the run

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--skip-b1", action="store_true")
    p.add_argument("--skip-w1", action="store_true")
    p.add_argument("--skip-collectives", action="store_true")
    p.add_argument("--w1-layouts", default="1x1,2x1,1x2,1x2g",
                   help="TPxPP layouts for W1; a trailing g: the PP stages' decode steps in CUDA graphs")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (TP=1 and TP=2)")
    p.add_argument("--timeout-s", type=float, default=1200)
    p.add_argument("--child-engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    if args.child_engine is not None:
        print(RESULT_TAG + json.dumps(run_engine(json.loads(args.child_engine))), flush=True)
        return
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs; {torch.cuda.device_count()} visible")

    base = dict(attention_backend=args.attention_backend, enforce_eager=args.enforce_eager, max_model_len=4096)
    record: dict = dict(
        benchmark="bench_parallel", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        commit=git_commit(), device=f"{torch.cuda.device_count()} x {device_name('cuda')}", torch=torch.__version__,
        command=" ".join(sys.argv))
    if not args.skip_b1:
        b1 = dict(base, model=B1_MODEL, num_requests=1, input_len=128, output_len=256, max_num_seqs=256,
                  max_num_batched_tokens=2048, gpu_memory_utilization=0.6)
        record["batch1_llama_3_1_8b"] = {f"tp{tp}": spawn_engine(dict(b1, tp=tp, pp=1), args.timeout_s)
                                         for tp in (1, 2)}
    if not args.skip_w1:
        w1 = dict(base, model=W1_MODEL, num_requests=256, input_len=512, output_len=256, max_num_seqs=256,
                  max_num_batched_tokens=2048, gpu_memory_utilization=0.9)
        record["w1_llama_3_2_1b"] = {}
        for layout in args.w1_layouts.split(","):
            graphs = layout.endswith("g")
            tp, pp = (int(v) for v in layout.rstrip("g").split("x"))
            record["w1_llama_3_2_1b"][f"tp{tp}-pp{pp}" + ("-graphs" if graphs else "")] = spawn_engine(
                dict(w1, tp=tp, pp=pp, pipeline_cuda_graphs=graphs), args.timeout_s)
    if not args.skip_collectives:
        print("--- collectives (NCCL all-reduce, gloo step broadcast) on GPUs 0 and 1", flush=True)
        coll = measure_collectives(activation_sizes())
        record["collectives"] = coll
        for name, r in coll["all_reduce"].items():
            extra = (f"; back to back {r['back_to_back_seconds'] * 1e6:.1f} us, in a CUDA graph "
                     f"{r['in_cuda_graph_seconds'] * 1e6:.1f} us" if "in_cuda_graph_seconds" in r else "")
            if "custom_in_cuda_graph_seconds" in r:
                extra += (f"; custom {r['custom_in_cuda_graph_seconds'] * 1e6:.1f} us, custom+norm "
                          f"{r['custom_add_rms_norm_in_cuda_graph_seconds'] * 1e6:.1f} us vs NCCL+norm "
                          f"{r['nccl_then_add_rms_norm_in_cuda_graph_seconds'] * 1e6:.1f} us")
            elif "custom" in r:
                extra += f"; custom: {r['custom']}"
            print(f"    all_reduce {name}: {r['bytes']} B in {r['seconds'] * 1e6:.1f} us alone, bus "
                  f"{r['busbw_GBps']:.1f} GB/s{extra}")
        print(f"    gloo step broadcast ({coll['gloo_step_broadcast_bytes']} B): "
              f"{coll['gloo_step_broadcast_s'] * 1e6:.0f} us")
        record["analysis"] = analysis(record)
        for k, v in record["analysis"].items():
            print(f"    {k}: {v}")
    write_record(args.out, "parallel-gpu", record)


def analysis(record: dict) -> dict:
    """All-reduce time per step under TP=2 (two per layer, at the step's activation size) next to the
    step itself; the bus bandwidth those small messages reach vs the large one's."""
    from raylight.models.config import PRESETS

    ar = record["collectives"]["all_reduce"]
    peak = ar["bus_bandwidth_256MiB"]["busbw_GBps"]
    out: dict = {"nccl_bus_bandwidth_GBps": peak}
    b1 = record.get("batch1_llama_3_1_8b", {})
    layers8 = PRESETS[B1_MODEL]["num_hidden_layers"]
    # as the decode graphs run them: back to back inside a CUDA graph (per-call timing where absent)
    per_step = 2 * layers8 * ar["b1_decode_8b"].get("in_cuda_graph_seconds", ar["b1_decode_8b"]["seconds"])
    out["b1_allreduce_ms_per_step_tp2"] = per_step * 1e3
    out["b1_allreduce_busbw_fraction_of_peak"] = ar["b1_decode_8b"]["busbw_GBps"] / peak
    if "custom_add_rms_norm_in_cuda_graph_seconds" in ar["b1_decode_8b"]:
        # what the TP=2 step runs now: 65 fused all-reduce+add+RMSNorm kernels in place of NCCL + norm
        e = ar["b1_decode_8b"]
        out["b1_custom_allreduce_norm_ms_per_step_tp2"] = 2 * layers8 * e["custom_add_rms_norm_in_cuda_graph_seconds"] * 1e3
        out["b1_nccl_allreduce_then_norm_ms_per_step_tp2"] = (2 * layers8 * e["nccl_then_add_rms_norm_in_cuda_graph_seconds"]
                                                             * 1e3)
    t1, t2 = (b1.get(k, {}).get("decode_ms_per_token") for k in ("tp1", "tp2"))
    if t1 and t2:
        out["b1_speedup_tp2_over_tp1"] = t1 / t2
        out["b1_allreduce_share_of_tp2_step"] = per_step * 1e3 / t2
        out["b1_tp2_ideal_ms"] = t1 / 2  # half the weights read per rank, nothing else
        out["b1_tp2_ideal_plus_allreduce_ms"] = t1 / 2 + per_step * 1e3
    layers1 = PRESETS[W1_MODEL]["num_hidden_layers"]
    w1_dec = ar["w1_decode_256_1b"]
    w1_dec_s = w1_dec.get("in_cuda_graph_seconds", w1_dec["seconds"])
    out["w1_decode_allreduce_ms_per_step_tp2"] = 2 * layers1 * w1_dec_s * 1e3
    out["w1_prefill_allreduce_ms_per_step_tp2"] = 2 * layers1 * ar["w1_prefill_2048_1b"]["seconds"] * 1e3
    w1 = record.get("w1_llama_3_2_1b", {})
    base = w1.get("tp1-pp1", {}).get("output_tok_s")
    for k, v in w1.items():
        if base and v.get("output_tok_s"):
            out[f"w1_{k}_vs_tp1"] = v["output_tok_s"] / base
    return out


if __name__ == "__main__":
    main()
