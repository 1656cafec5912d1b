"""Torch path vs fused Triton kernel (kernels/fused.py) for each op of issue 5, on CUDA.

For the llama-3.2-1b and llama-3.1-8b layer shapes at T in (1, 256, 2048) tokens, times
  add_rms_norm  residual = x + residual; RMSNorm(residual)          [T, hidden]
  silu_and_mul  silu(gate) * up                                     [T, 2 * intermediate]
  rotary_qk     neox rotary on q [T, 32, D] and k [T, 8, D], strided views of a qkv split
with CUDA events, median over many repetitions after warm-up. At T=1 (decode) the calls are
timed inside a CUDA graph, as our decode graphs run them: N back-to-back calls are captured into
one graph and the replay time is divided by N, so launch overhead counts as it does there. Larger
T run eagerly, N calls between two events. The floor is the op's bytes moved (read + written,
counted once) over the measured device-to-device copy bandwidth. Writes one JSON under
benchmarks/results via write_record; `fused_speedup` > 1 means the fused kernel wins.

    python scripts/bench_kernels.py [--dtype bfloat16] [--reps 50] [--calls 20]

On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, device_name, git_commit, measure_ceilings, write_record  # noqa: E402

MODELS = {
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64),
    "llama-3.1-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
}
TOKENS = (1, 256, 2048)
EPS = 1e-5


def make_ops(shape: dict, T: int, dtype: torch.dtype, device: str):
    """{op: (torch_fn, fused_fn, bytes_moved)} on fresh inputs laid out as the model has them."""
    from raylight.kernels import fused
    from raylight.kernels.rotary import RotaryEmbedding

    elem = torch.tensor([], dtype=dtype).element_size()
    H, I = shape["hidden"], shape["intermediate"]
    nh, nkv, D = shape["heads"], shape["kv_heads"], shape["head_dim"]
    x = torch.randn(T, H, device=device, dtype=dtype)
    r = torch.randn(T, H, device=device, dtype=dtype)
    w = torch.randn(H, device=device, dtype=dtype)
    gate_up = torch.randn(T, 2 * I, device=device, dtype=dtype)
    qkv = torch.randn(T, (nh + 2 * nkv) * D, device=device, dtype=dtype)
    q, k, _ = qkv.split([nh * D, nkv * D, nkv * D], dim=-1)
    q, k = q.view(T, nh, D), k.view(T, nkv, D)
    rope = RotaryEmbedding(D, 8192, 500000.0, None).to(device)
    positions = torch.randint(0, 8192, (T,), device=device)
    cos = rope.cos[positions].to(dtype)[:, None, :]
    sin = rope.sin[positions].to(dtype)[:, None, :]

    def torch_rotary_qk():
        return fused.torch_rotary(q, cos, sin), fused.torch_rotary(k, cos, sin)

    return {
        "add_rms_norm": (lambda: fused.torch_add_rms_norm(x, r, w, EPS),
                         lambda: fused.fused_add_rms_norm(x, r, w, EPS),
                         (4 * T * H + H) * elem),  # read x, r, w; write out, residual
        "silu_and_mul": (lambda: fused.torch_silu_and_mul(gate_up),
                         lambda: fused.silu_and_mul(gate_up),
                         3 * T * I * elem),  # read gate, up; write out
        "rotary_qk": (torch_rotary_qk,
                      lambda: fused.rotary_qk(q, k, cos, sin),
                      (2 * T * (nh + nkv) * D + 2 * T * D) * elem),  # read q, k, cos, sin; write q, k
    }


def time_eager(fn, calls: int, reps: int, warmup: int) -> float:
    """Median seconds per call: `calls` calls between two events, `reps` times."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return float(np.median(times))


def time_graph(fn, calls: int, reps: int, warmup: int) -> float:
    """Median seconds per call of `calls` back-to-back calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    t = time_eager(graph.replay, 1, reps, warmup) / calls
    del graph
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--calls", type=int, default=20, help="calls per timed region / per captured graph")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU; nothing to measure here.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels.py needs triton for the fused kernels; nothing to measure here.")
        return 0

    device = "cuda"
    dtype = getattr(torch, args.dtype)
    ceilings = measure_ceilings(torch.device(device))
    bw = ceilings["copy_bandwidth_GBps"] * 1e9
    print(f"copy bandwidth {ceilings['copy_bandwidth_GBps']:.0f} GB/s (read + written)")
    rows = []
    header = f"{'model':14} {'T':>5} {'op':13} {'torch us':>9} {'fused us':>9} {'floor us':>9} {'speedup':>8}"
    print(header)
    for model, shape in MODELS.items():
        for T in TOKENS:
            ops = make_ops(shape, T, dtype, device)
            timer = time_graph if T == 1 else time_eager
            for op, (torch_fn, fused_fn, nbytes) in ops.items():
                t_torch = timer(torch_fn, args.calls, args.reps, args.warmup)
                t_fused = timer(fused_fn, args.calls, args.reps, args.warmup)
                floor = nbytes / bw
                rows.append(dict(model=model, tokens=T, op=op, timing="cuda_graph" if T == 1 else "eager",
                                 torch_us=t_torch * 1e6, fused_us=t_fused * 1e6, floor_us=floor * 1e6,
                                 bytes_moved=nbytes, fused_speedup=t_torch / t_fused,
                                 torch_frac_of_floor=floor / t_torch, fused_frac_of_floor=floor / t_fused))
                print(f"{model:14} {T:>5} {op:13} {t_torch * 1e6:9.2f} {t_fused * 1e6:9.2f} "
                      f"{floor * 1e6:9.2f} {t_torch / t_fused:8.2f}x")
            del ops
            torch.cuda.empty_cache()

    record = dict(
        benchmark="kernels", issue=5, commit=git_commit(), device=device_name(device),
        dtype=args.dtype, reps=args.reps, calls=args.calls, warmup=args.warmup, eps=EPS,
        torch_version=torch.__version__, triton_version=__import__("triton").__version__,
        ceilings=ceilings,
        method=("median over reps of CUDA-event time / calls; T=1 inside one CUDA graph of `calls` "
                "back-to-back calls; floor = bytes moved (read + written) / copy bandwidth"),
        results=rows,
    )
    write_record(args.out, "kernels", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
