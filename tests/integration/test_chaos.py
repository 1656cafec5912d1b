"""Faults on a real Ray Serve app over HTTP on 127.0.0.1 (SmolLM2 on CPU): the engine replica's
process SIGKILLed mid-stream (the client gets an error, never a hang; Serve replaces the replica and
serves again in bounded time); a rolling upgrade that stops the replica while it streams (Serve's
graceful shutdown: the running request finishes, then the new replica serves); an engine step longer
than `health_stall_s` (a stall: /health 503, the waiting request fails with 503, Serve replaces the
replica). The replica's drain and a crashed or hung loop are also tested in one process
(tests/unit/engine/test_async_engine.py). About two minutes on 2 cores."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray")

from raylight.testing.helpers import serve_app, serve_replica_pids

MODEL = "SmolLM2-135M-Instruct"
APP = "chaos"
STALL_S = 2.0  # health_stall_s after the upgrade: decode steps take ~0.05 s, a 1800-token prefill seconds


def config(**kw):
    from raylight.cluster.app import AppConfig

    return AppConfig(engine_args={"device": "cpu", "max_model_len": 2048, "max_num_seqs": 4},
                     ray_actor_options={"num_cpus": 2}, max_queued_requests=8, default_max_tokens=8,
                     graceful_shutdown_timeout_s=60, **kw)


@pytest.fixture(scope="module")
def server(smollm2_dir):
    with serve_app(config(), APP) as base:
        yield base


def replica_pids() -> list[int]:
    return serve_replica_pids(APP, "EngineReplica")


def completion_ok(base, timeout_s=30) -> bool:
    try:
        r = httpx.post(f"{base}/v1/completions", timeout=timeout_s,
                       json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    except httpx.HTTPError:
        return False


def stream_body(max_tokens):
    return {"model": MODEL, "prompt": "Write a long story about a lighthouse.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}


def test_sigkill_replica_mid_stream_errors_then_serve_replaces_it(server):
    assert completion_ok(server)
    [pid] = replica_pids()
    events, error = [], None
    plain = {}

    def non_streaming():  # a non-streaming request on the same replica when it dies
        try:
            plain["r"] = httpx.post(f"{server}/v1/completions", timeout=30,
                                    json={**stream_body(1500), "stream": False})
        except httpx.TransportError as e:
            plain["r"] = e

    other = threading.Thread(target=non_streaming, daemon=True)
    other.start()
    time.sleep(1.0)  # it is decoding on the replica before the stream starts
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0)) as c:  # a hang fails on the read timeout
            with c.stream("POST", f"{server}/v1/completions", json=stream_body(1500)) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if len(events) == 3:
                        os.kill(pid, signal.SIGKILL)
    except httpx.TransportError as e:  # the ingress lost the replica mid-stream and dropped the connection
        error = e
    took = time.monotonic() - t0
    assert not isinstance(error, httpx.TimeoutException), "the stream hung after the replica died"
    # The ingress reports the lost replica in-band (an error event, then [DONE]); a dropped connection
    # is the fallback a client must also handle. Never a hang, a silent end or a full answer.
    if error is None:
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
        assert json.loads(events[-2])["error"]["type"] == "service_unavailable"
    assert took < 30, took
    other.join(30)
    r = plain["r"]  # the ingress answers 503 + Retry-After (not 500), or the connection drops
    assert not isinstance(r, httpx.TimeoutException), "the non-streaming request hung"
    if not isinstance(r, httpx.TransportError):
        assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
        assert r.json()["error"]["type"] == "service_unavailable"
    # Serve replaces the replica; a new request succeeds within a bounded time.
    deadline = time.monotonic() + 120
    while not completion_ok(server):
        assert time.monotonic() < deadline, "no replica serving 120 s after the SIGKILL"
        time.sleep(1)
    assert replica_pids() and pid not in replica_pids()
    print(f"stream error after {took:.1f}s ({type(error).__name__ if error else 'error event'}); "
          f"serving again {time.monotonic() - t0:.1f}s after the kill")


def test_rolling_upgrade_drains_the_running_stream(server):
    """Row 33: a redeploy with a changed engine config stops the old replica gracefully (Serve's
    graceful_shutdown_timeout_s from AppConfig): its running stream finishes with every token."""
    from ray import serve

    from raylight.cluster.app import build_app

    [old] = replica_pids()
    events, redeployed = [], threading.Event()

    def redeploy():  # the next test wants a short stall threshold: this is the config change
        serve.run(build_app(config(health_stall_s=STALL_S)), name=APP, route_prefix="/")
        redeployed.set()

    with httpx.Client(timeout=httpx.Timeout(60.0)) as c:
        with c.stream("POST", f"{server}/v1/completions", json=stream_body(160)) as r:
            assert r.status_code == 200
            upgrader = None
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 2 and upgrader is None:
                    upgrader = threading.Thread(target=redeploy, daemon=True)
                    upgrader.start()
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in ch for ch in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for ch in chunks if ch["choices"] and ch["choices"][0]["text"]) >= 150  # all ~160 tokens
    upgrader.join(120)
    assert redeployed.is_set(), "the upgrade did not finish"
    assert completion_ok(server)
    assert old not in replica_pids()


def test_stalled_engine_step_fails_waiting_request_and_replica_is_replaced(server):
    """Row 29: a step that makes no progress for health_stall_s (here a real one: an 1800-token
    prefill in one step on CPU, against STALL_S) turns /health to 503, fails the request waiting on
    it with 503 + Retry-After instead of leaving it hanging, and Serve's check_health replaces the
    replica."""
    import asyncio

    [old] = replica_pids()
    long_prompt = [(i * 7919) % 40000 + 100 for i in range(1800)]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=httpx.Timeout(60.0)) as c:
            async def waiting():
                return await c.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt,
                                                             "max_tokens": 4, "temperature": 0})

            async def probe():
                statuses = []
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30 and 503 not in statuses:
                    await asyncio.sleep(0.25)
                    statuses.append((await c.get("/health")).status_code)
                return statuses

            return await asyncio.gather(waiting(), probe())

    r, statuses = asyncio.run(asyncio.wait_for(run(), 90))
    assert 503 in statuses, statuses
    assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
    assert r.json()["error"]["type"] == "service_unavailable"
    t0 = time.monotonic()
    while not completion_ok(server):
        assert time.monotonic() - t0 < 120, "no replica serving 120 s after the stall"
        time.sleep(1)
    assert old not in replica_pids()
    print(f"health 503 after {len(statuses)} probes; serving again {time.monotonic() - t0:.1f}s later")
