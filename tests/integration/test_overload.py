"""Overload and deadlines on a real Ray Serve app over HTTP on 127.0.0.1 (SmolLM2 on CPU, a small
engine so that 3x its capacity is a few dozen requests): every request completes or is refused with
429 + Retry-After, nothing hangs (hard client timeouts), admitted requests finish, the gauges return
to idle; a request past `request_timeout_s` gets 504 (an error event when streaming) and is aborted.
About a minute on 2 cores."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytest.importorskip("ray")

from raylight.testing.helpers import read_metrics, serve_app, wait_engines_idle

MODEL = "SmolLM2-135M-Instruct"
MAX_NUM_SEQS, MAX_QUEUED = 4, 4
CAPACITY = MAX_NUM_SEQS + MAX_QUEUED
TIMEOUT_S = 15.0  # request_timeout_s: far above a burst request's latency, short enough to test


@pytest.fixture(scope="module")
def server(smollm2_dir):
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(engine_args={"device": "cpu", "max_model_len": 2048, "max_num_seqs": MAX_NUM_SEQS},
                    ray_actor_options={"num_cpus": 2}, max_queued_requests=MAX_QUEUED, default_max_tokens=8,
                    request_timeout_s=TIMEOUT_S)
    with serve_app(cfg, "overload") as base:
        yield base


def gauges(base) -> dict[str, float]:
    return read_metrics(base)


def wait_gauges_idle(base, timeout_s=15.0) -> dict[str, float]:
    idle, m = wait_engines_idle(base, timeout_s=timeout_s)
    if not idle:
        pytest.fail(f"gauges not back to idle: {m}")
    return m


async def _burst(base: str, n: int):
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(60.0)) as c:
        async def one(i):
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True})
            body = r.json()
            return r.status_code, r.headers.get("retry-after"), body

        async def health():
            await asyncio.sleep(1.0)  # while the burst runs
            t0 = time.monotonic()
            r = await c.get("/health")
            return r.status_code, time.monotonic() - t0

        results, probe = await asyncio.wait_for(
            asyncio.gather(asyncio.gather(*(one(i) for i in range(n))), health()), timeout=90)
        return results, probe


def test_burst_at_3x_capacity_completes_or_gets_429_and_returns_to_idle(server):
    n = 3 * CAPACITY
    t0 = time.monotonic()
    results, (health_status, health_s) = asyncio.run(_burst(server, n))
    took = time.monotonic() - t0
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429, 503}, statuses
    ok = [b for s, _, b in results if s == 200]
    refused = [(s, ra, b) for s, ra, b in results if s != 200]
    assert len(ok) >= CAPACITY and refused, statuses  # the first CAPACITY always fit; the rest overflow
    assert all(b["usage"]["completion_tokens"] == 8 and b["choices"][0]["finish_reason"] == "length" for b in ok)
    for s, retry_after, body in refused:
        assert retry_after is not None and float(retry_after) > 0, (s, retry_after)
        assert set(body["error"]) >= {"message", "type", "code"}, body
    assert health_status == 200 and health_s < 5, (health_status, health_s)  # probes not starved
    wait_gauges_idle(server)
    print(f"burst of {n}: {len(ok)} ok, {len(refused)} refused, {took:.1f}s")


def test_request_past_its_deadline_gets_504_and_is_aborted(server):
    """request_timeout_s covers the whole request: ~1900 tokens cannot finish in 15 s on CPU."""
    long_body = {"model": MODEL, "prompt": "Write a very long essay about the sea.", "max_tokens": 1900,
                 "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=httpx.Timeout(TIMEOUT_S + 30)) as c:
            async def plain():
                t0 = time.monotonic()
                r = await c.post("/v1/completions", json=long_body)
                return r, time.monotonic() - t0

            async def streamed():
                t0 = time.monotonic()
                events = []
                async with c.stream("POST", "/v1/completions", json={**long_body, "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                return events, time.monotonic() - t0

            return await asyncio.gather(plain(), streamed())

    (r, plain_s), (events, stream_s) = asyncio.run(asyncio.wait_for(run(), TIMEOUT_S + 40))
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["type"] == "timeout_error" and "request_timeout_s" in err["message"], err
    assert TIMEOUT_S - 1 <= plain_s < TIMEOUT_S + 10, plain_s
    # tokens streamed, then the deadline's error event, then [DONE]
    assert len(events) > 3 and events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["type"] == "timeout_error", events[-2]
    assert not any("error" in json.loads(e) for e in events[:-2])
    assert stream_s < TIMEOUT_S + 10, stream_s
    wait_gauges_idle(server)  # both aborted in the engine: no running request, no KV held
