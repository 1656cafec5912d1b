"""The server with each replica's engine in its own process (PoolConfig.engine_process, the GPU
default), on a real Ray Serve app over real HTTP: greedy outputs equal the offline engine's token for
token, streamed and not; a client that leaves frees its blocks; structured outputs compile in the
engine process; the metrics come from there; and an engine process that dies makes /health fail."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from raylight.testing.helpers import leave_stream, read_metrics, serve_app, wait_engines_idle

MODEL = "SmolLM2-135M-Instruct"
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 1024, "max_num_seqs": 8, "num_kv_blocks": 256}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(model=smollm2_dir, served_model_name=MODEL, engine_args=ENGINE, engine_process=True,
                    ray_actor_options={"num_cpus": 1}, default_max_tokens=16)
    with serve_app(cfg, "raylight-engine-process") as base:
        yield base


def test_greedy_outputs_equal_the_offline_engine_streamed_and_not(server, smollm2_dir):
    from raylight.llm import LLM
    from raylight.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,"]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120) as c:
            async def one(p, stream):
                if not stream:
                    r = await c.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0,
                                                   extra_body={"ignore_eos": True})
                    return r.choices[0].text
                s = await c.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
                return "".join([ch.choices[0].text async for ch in s if ch.choices])
            return await asyncio.gather(*[one(p, s) for s in (False, True) for p in prompts])

    texts = asyncio.run(run())
    want = LLM(model=smollm2_dir, **ENGINE).generate(prompts, SamplingParams(max_tokens=20, temperature=0.0,
                                                                            ignore_eos=True), use_tqdm=False)
    assert texts == [o.outputs[0].text for o in want] * 2


def test_a_client_that_leaves_frees_its_blocks_and_structured_outputs_work(server):
    body = {"model": MODEL, "prompt": "Write a very long essay about the sea.", "max_tokens": 900,
            "temperature": 0, "ignore_eos": True, "stream": True}
    leave_stream(server, body)
    idle, m = wait_engines_idle(server)
    if not idle:
        pytest.fail(f"request not aborted: {m}")
    with httpx.Client(timeout=60) as h:
        r = h.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Colors: ", "max_tokens": 8,
                                                     "guided_choice": ["red", "blue"]})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("red", "blue")
        r = h.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4,
                                                     "structured_outputs": {"regex": "(("}})
        assert r.status_code == 400
    m = read_metrics(server)
    assert m["raylight:generation_tokens_total"] > 0 and m["raylight:time_to_first_token_seconds_count"] > 0


def engine_processes(parents: list[int]) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"raylight.engine.engine_process" in cmd and ppid in parents:
            pids.append(int(d))
    return pids


def test_a_dead_engine_process_fails_the_health_check(server):
    from raylight.testing.helpers import serve_replica_pids

    replicas = serve_replica_pids("raylight-engine-process", "EngineReplica")
    engines = engine_processes(replicas)
    assert len(replicas) == 1 and len(engines) == 1, (replicas, engines)
    os.kill(engines[0], signal.SIGKILL)
    deadline = time.time() + 15
    while time.time() < deadline and httpx.get(f"{server}/health", timeout=10).status_code == 200:
        time.sleep(0.2)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 503
