#!/usr/bin/env python
"""What one streamed message costs a Ray Serve replica: the price our stream pacing is set against.

A two-deployment Serve app on a local Ray: `Streamer` yields `--tokens` ReplicaMessages per stream (each
a RequestOutput of one token with a 128-token prompt: the shape an engine replica streams), and `Reader`
reads `--streams` such streams at once through a streaming handle, as our ingress does. Reported per
concurrency: messages per second, and the streaming replica's CPU time per message (process CPU over the
run, both deployments on this machine's cores). The engine replica pays this on its event loop, beside
the engine thread and under the same GIL (PoolConfig.max_stream_messages_per_s, README "Serving").

    python scripts/bench_serve_messages.py
Writes one JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, device_name, git_commit, write_record  # noqa: E402


def build_app():
    from ray import serve

    from raylight.messages import ReplicaMessage
    from raylight.outputs import CompletionOutput, RequestOutput

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Streamer:
        async def stream(self, n: int):
            for i in range(n):
                c = CompletionOutput(0, "w" * i, list(range(i)), delta_text=" w", delta_token_ids=[i])
                yield ReplicaMessage(output=RequestOutput("r", None, list(range(128)), [c], False), replica_id="x")

        async def cpu_s(self) -> float:
            return time.process_time()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Reader:
        def __init__(self, streamer):
            self.streamer = streamer

        async def run(self, streams: int, n: int):
            handle = self.streamer.options(stream=True)
            cpu0 = await self.streamer.cpu_s.remote()
            t0 = time.perf_counter()

            async def one() -> int:
                return sum([1 async for _ in handle.stream.remote(n)])

            counts = await asyncio.gather(*(one() for _ in range(streams)))
            wall = time.perf_counter() - t0
            return sum(counts), wall, await self.streamer.cpu_s.remote() - cpu0

    return Reader.bind(Streamer.bind())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--messages", type=int, default=10_000, help="messages per concurrency level, in all")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        handle = serve.run(build_app(), name="serve-messages", route_prefix=None)
        for streams in args.streams:
            per_stream = max(1, args.messages // streams)
            msgs, wall, cpu = handle.run.remote(streams, per_stream).result()
            rows.append(dict(streams=streams, messages=msgs, wall_s=wall, messages_per_s=msgs / wall,
                             replica_cpu_us_per_message=cpu / msgs * 1e6))
            print(f"{streams:4d} streams: {msgs} messages in {wall:.2f} s = {msgs / wall:.0f}/s; "
                  f"streaming replica CPU {cpu / msgs * 1e6:.0f} us per message")
    finally:
        serve.shutdown()
        ray.shutdown()
    import ray as _ray

    record = dict(benchmark="serve_messages", date=datetime.datetime.now().isoformat(timespec="seconds"),
                  commit=git_commit(), device=device_name("cpu"), ray=_ray.__version__, results=rows,
                  command="python scripts/bench_serve_messages.py " + " ".join(argv or sys.argv[1:]))
    write_record(args.out, "serve-messages-cpu", record)
    return record


if __name__ == "__main__":
    main()
