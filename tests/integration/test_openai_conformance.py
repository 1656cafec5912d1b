"""Issue 23, API conformance: what OpenAI clients, vLLM users and evaluation harnesses rely on, checked on
the real server (SmolLM2 on CPU, the OpenAI app over real HTTP; the ingress talks to its engine replica
in-process instead of through Ray, raylight/testing/local_server.py) with the official `openai` client,
and raw HTTP where the client hides a field."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from raylight.testing.local_server import local_server

MODEL = "smol"
MAX_QUEUED = 2


@pytest.fixture(scope="module")
def served(smollm2_dir):
    args = {"model": smollm2_dir, "device": "cpu", "max_model_len": 1024, "max_num_seqs": 2,
            "max_num_batched_tokens": 256}
    with local_server(args, max_queued_requests=MAX_QUEUED, served_model_name=MODEL) as (base, replica):
        yield base, replica


@pytest.fixture(scope="module")
def base(served):
    return served[0]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


def _wait(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s}s")
        time.sleep(0.02)
    return True


def _aborted(base) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("raylight:request_aborted_total "):
            return float(line.split()[1])
    return 0.0


def _idle(replica) -> bool:
    m = replica.engine.get_metrics()
    return (m["num_running"] == 0 and m["num_waiting"] == 0 and replica.async_engine.num_waiting() == 0
            and m["kv_blocks_free"] == m["kv_blocks_total"])


LONG = {"model": MODEL, "max_tokens": 600, "temperature": 0, "ignore_eos": True}


# ---------------------------------------------------------------- 1. departed clients (checklist row 23)

def test_departed_clients_are_aborted_where_they_wait_and_stop_counting(served):
    """Two long streams fill both engine slots; four more clients wait behind them (streaming and not,
    chat and completions) and give up after 0.5 s: each is aborted while still queued, the queue is
    empty again at once (a new request is not refused with 429), and closing the two streams frees
    everything."""
    base, replica = served
    aborted = _aborted(base)
    with httpx.Client(timeout=60) as h:
        running = []
        for i in range(2):
            ctx = h.stream("POST", f"{base}/v1/completions", json={**LONG, "prompt": f"Story {i}:", "stream": True})
            r = ctx.__enter__()
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            running.append((ctx, lines))  # dropping the line iterator would close the stream
        assert replica.engine.get_metrics()["num_running"] == 2

        def give_up(path, body):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{base}{path}", json=body, timeout=0.5)

        waiting = [("/v1/completions", {**LONG, "prompt": "Wait A"}),
                   ("/v1/completions", {**LONG, "prompt": "Wait B", "stream": True}),
                   ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": "Wait C"}]}),
                   ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": "Wait D"}],
                                             "stream": True})]
        threads = [threading.Thread(target=give_up, args=w) for w in waiting[:MAX_QUEUED]]
        for t in threads:
            t.start()
        _wait(lambda: replica.async_engine.num_waiting() == MAX_QUEUED, 5, "queued")
        for t in threads:
            t.join()
        t0 = time.monotonic()
        _wait(lambda: replica.async_engine.num_waiting() == 0, 2, "dequeued after the clients left")
        assert time.monotonic() - t0 < 1.0
        # the queue has room again: the next two wait (then give up) instead of getting 429
        threads = [threading.Thread(target=give_up, args=w) for w in waiting[MAX_QUEUED:]]
        for t in threads:
            t.start()
        _wait(lambda: replica.async_engine.num_waiting() == MAX_QUEUED, 5, "queued again")
        for t in threads:
            t.join()
        _wait(lambda: replica.async_engine.num_waiting() == 0, 2, "dequeued again")
        assert replica.engine.get_metrics()["num_running"] == 2
        for ctx, _ in running:
            ctx.__exit__(None, None, None)
    _wait(lambda: _idle(replica), 3, "idle after the streams closed")
    assert _aborted(base) == aborted + 6
