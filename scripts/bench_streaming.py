#!/usr/bin/env python
"""Streaming overhead: p50 inter-token latency seen by an SSE client vs the engine's own step time.

Starts the Serve app in-process on 127.0.0.1 (CPU, default SmolLM2), streams `--requests`
completions one after another and compares the client's median gap between chunks with the
median engine step time the replica reports (`raylight:engine_step_time_p50_seconds`).
Writes one JSON file under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from bench_throughput import device_name, git_commit, write_record  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from raylight.cluster.app import AppConfig, build_app

    from raylight.utils.ports import free_port

    port = free_port()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppConfig(engine_args={"device": "cpu"}, ray_actor_options={"num_cpus": args.num_cpus})),
              name="raylight", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    gaps: list[float] = []
    with httpx.Client(timeout=300) as h:
        for i in range(args.requests):
            body = {"prompt": f"Request {i}: write a story about a lighthouse.", "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            last = None
            with h.stream("POST", f"{base}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
        metrics = h.get(f"{base}/metrics").text
    step_p50 = next(float(l.split()[-1]) for l in metrics.splitlines()
                    if l.startswith("raylight:engine_step_time_p50_seconds"))
    period_p50 = next(float(l.split()[-1]) for l in metrics.splitlines()
                      if l.startswith("raylight:engine_step_period_p50_seconds"))
    itl_p50 = statistics.median(gaps)
    serve.shutdown()
    ray.shutdown()
    overhead_ms = (itl_p50 - step_p50) * 1000
    print(f"client p50 inter-token latency {itl_p50 * 1000:.2f} ms; engine p50 step {step_p50 * 1000:.2f} ms; "
          f"streaming overhead {overhead_ms:.2f} ms over {len(gaps)} gaps; engine step period p50 "
          f"{period_p50 * 1000:.2f} ms")
    record = dict(benchmark="bench_streaming", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  commit=git_commit(), device=device_name("cpu"), model="SmolLM2-135M-Instruct",
                  workload=dict(requests=args.requests, max_tokens=args.max_tokens, sequential=True),
                  client_itl_p50_ms=itl_p50 * 1000, engine_step_p50_ms=step_p50 * 1000,
                  overhead_ms=overhead_ms, engine_step_period_p50_ms=period_p50 * 1000, num_gaps=len(gaps), command=" ".join(sys.argv))
    write_record(args.out, "streaming-cpu", record)


if __name__ == "__main__":
    main()
