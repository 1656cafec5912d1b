"""Soak test: steady over-capacity load on a local raylight app, with the engine replica SIGKILLed
every --kill-every seconds. Longer than the CI tests (tests/integration/test_overload.py,
test_chaos.py); run it by hand:

    python scripts/soak_chaos.py --duration 600 --kill-every 120 --concurrency 24

Every request must end with 200, 429/503 (+ Retry-After), 504 (past --request-timeout), or, for a
stream cut by a kill, an error event then [DONE] (or a dropped connection); a request that hits the
client timeout is a hang. Prints a JSON summary; exits 1 on a hang, an unexpected status, a replica
not replaced within --recover-s, or gauges not back to idle at the end."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import time

import httpx

MODEL = "SmolLM2-135M-Instruct"


def replica_pids(app: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f"ServeReplica:{app}:EngineReplica".encode() in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return out


async def one(c: httpx.AsyncClient, i: int, counts: collections.Counter, timeout_s: float) -> None:
    stream = i % 2 == 0
    body = {"model": MODEL, "prompt": f"Tell me about number {i}.", "max_tokens": random.choice([8, 32, 64]),
            "temperature": 0, "ignore_eos": True, "stream": stream}
    try:
        if not stream:
            r = await asyncio.wait_for(c.post("/v1/completions", json=body), timeout_s)
            if r.status_code in (429, 503) and not r.headers.get("retry-after"):
                counts["no_retry_after"] += 1
            counts[str(r.status_code)] += 1
            return
        async def read():
            async with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    counts[str(r.status_code)] += 1
                    return
                events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
                if events and events[-1] == "[DONE]":
                    errored = len(events) > 1 and '"error"' in events[-2]
                    counts["stream_error_event" if errored else "stream_ok"] += 1
                else:
                    counts["stream_cut"] += 1
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        counts["HANG"] += 1
    except httpx.TransportError:
        counts["connection_error"] += 1


async def soak(base: str, app: str, args) -> dict:
    counts: collections.Counter = collections.Counter()
    recoveries, failures = [], []
    end = time.monotonic() + args.duration
    next_kill = time.monotonic() + args.kill_every
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(args.client_timeout)) as c:
        i = 0
        pending: set = set()
        while time.monotonic() < end:
            while len(pending) < args.concurrency:
                pending.add(asyncio.ensure_future(one(c, i, counts, args.client_timeout)))
                i += 1
            _, pending = await asyncio.wait(pending, timeout=0.2)
            if args.kill_every and time.monotonic() >= next_kill:
                pids = replica_pids(app)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    t0 = time.monotonic()
                    while True:  # a replacement serving again
                        await asyncio.sleep(1)
                        try:
                            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
                            if r.status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        if time.monotonic() - t0 > args.recover_s:
                            failures.append(f"no replica serving {args.recover_s}s after a kill")
                            break
                    recoveries.append(round(time.monotonic() - t0, 1))
                next_kill = time.monotonic() + args.kill_every
        if pending:
            await asyncio.wait(pending, timeout=args.client_timeout + 5)
        idle = None
        for _ in range(90):  # a killed replica's busy snapshot leaves the gauges 60 s after its last report
            text = (await c.get("/metrics")).text
            m = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                 if ln.startswith("raylight:") and "{" not in ln}
            idle = (m.get("raylight:num_requests_running"), m.get("raylight:num_requests_waiting"),
                    m.get("raylight:kv_cache_usage_perc"))
            if idle == (0.0, 0.0, 0.0):
                break
            await asyncio.sleep(1)
    expected = {"200", "429", "503", "504", "stream_ok", "stream_error_event", "connection_error"}
    if counts["HANG"]:
        failures.append(f"{counts['HANG']} requests hung")
    if counts["no_retry_after"]:
        failures.append("429/503 without Retry-After")
    if set(counts) - expected - {"no_retry_after", "HANG"}:
        failures.append(f"unexpected outcomes: {sorted(set(counts) - expected)}")
    if idle != (0.0, 0.0, 0.0):
        failures.append(f"gauges not idle at the end (running, waiting, kv): {idle}")
    return {"requests": i, "outcomes": dict(counts), "recovery_s": recoveries, "failures": failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--kill-every", type=float, default=90, help="seconds between SIGKILLs (0: none)")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-queued", type=int, default=4)
    p.add_argument("--request-timeout", type=float, default=30)
    p.add_argument("--client-timeout", type=float, default=90)
    p.add_argument("--recover-s", type=float, default=120)
    p.add_argument("--out", default=None, help="folder for a JSON record (e.g. benchmarks/results)")
    args = p.parse_args()

    from raylight.cluster.app import AppConfig
    from raylight.testing.helpers import serve_app

    cfg = AppConfig(engine_args={"device": "cpu", "max_model_len": 2048, "max_num_seqs": args.max_num_seqs},
                    ray_actor_options={"num_cpus": 2}, max_queued_requests=args.max_queued,
                    request_timeout_s=args.request_timeout)
    with serve_app(cfg, "soak") as base:
        summary = asyncio.run(soak(base, "soak", args))
    print(json.dumps(summary, indent=2))
    if args.out:
        import datetime
        import subprocess

        now = datetime.datetime.now(datetime.timezone.utc)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = dict(benchmark="soak_chaos", date=now.isoformat(), commit=commit, device="cpu",
                      workload=vars(args), **summary)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"soak-chaos-cpu-{now:%Y%m%d-%H%M%S}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print("wrote", path)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
