"""An app with two ingress replicas (ServerConfig.ingress_replicas) on a real Ray Serve app over real
HTTP: every scrape of /metrics, whichever replica Serve's proxy sends it to, counts every request
(each replica's own plus what its sibling shared, cluster/ingress_peers.py), and both replicas post."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytest.importorskip("ray")

from raylight.testing.helpers import read_metrics, serve_app

MODEL = "SmolLM2-135M-Instruct"
APP = "raylight-two-ingress"


@pytest.fixture(scope="module")
def server(smollm2_dir):
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(model=smollm2_dir, served_model_name=MODEL, ingress_replicas=2, engine_process=False,
                    engine_args={"device": "cpu", "dtype": "float32", "max_model_len": 512, "max_num_seqs": 8,
                                 "num_kv_blocks": 128},
                    ray_actor_options={"num_cpus": 0})
    with serve_app(cfg, APP) as base:
        yield base


def test_every_scrape_counts_every_request(server):
    n, max_tokens = 16, 3

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            async def one(i):
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": f"Count to {i}:", "temperature": 0,
                                                          "max_tokens": max_tokens, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["usage"]["prompt_tokens"]
            return await asyncio.gather(*[one(i) for i in range(n)])

    before = read_metrics(server)  # a scrape before any request: the sharing of a replica starts anyway
    assert before.get("raylight:generation_tokens_total", 0) == 0
    prompt_tokens = sum(asyncio.run(burst()))
    deadline = time.time() + 20
    while True:  # the replicas post every second: within a few the sums are whole
        m = read_metrics(server, labelled=True)
        if m.get('raylight:request_success_total{finished_reason="length"}') == n:
            break
        assert time.time() < deadline, f"scrapes never counted all {n} requests: {m}"
        time.sleep(0.5)
    for _ in range(12):  # scrapes land on either replica: each must count all requests
        m = read_metrics(server, labelled=True)
        assert m['raylight:request_success_total{finished_reason="length"}'] == n
        assert m["raylight:generation_tokens_total"] == n * max_tokens
        assert m["raylight:prompt_tokens_total"] == prompt_tokens
        assert m["raylight:e2e_request_latency_seconds_count"] == n
        assert m["raylight:time_to_first_token_seconds_count"] == n

    import ray

    from raylight.cluster.ingress_peers import NAMESPACE

    hub = ray.get_actor(f"raylight-ingress-peers:{APP}", namespace=NAMESPACE)
    posted = ray.get(hub.post.remote("test-reader", []))  # what each ingress replica last posted
    assert len(posted) == 2, list(posted)
    done = [sum(v for name, _, v in s if name == "raylight:request_success_total") for s in posted.values()]
    assert sum(done) == n, done
