"""Start-up failures fail fast. `raylight serve` with replicas that cannot start (a model path that
does not exist: only the replica constructors trip on it) exits non-zero within a bounded time,
with the replica's own error once, and never prints the URL; Ctrl-C exits without a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from raylight.testing.helpers import free_port

RAYLIGHT = os.path.join(os.path.dirname(sys.executable), "raylight")


def _serve_cmd(*extra: str) -> list[str]:
    return [RAYLIGHT, "serve", "--port", str(free_port()), "--num-cpus", "1", *extra]


def test_raylight_serve_bad_model_exits_nonzero_with_the_replicas_error(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(_serve_cmd("--model", "/nonexistent/model"), capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "raylight serving" not in out and "http://" not in proc.stdout, out[-3000:]
    assert "failed to deploy" in proc.stderr and "replicas failed to start" in proc.stderr, out[-3000:]
    assert "ValueError: model '/nonexistent/model' is not a local directory" in proc.stderr, out[-3000:]
    assert proc.stderr.count("/nonexistent/model' is not a local directory") == 1, out[-3000:]  # once
    assert "Traceback" not in out, out[-3000:]
    assert elapsed < 180, elapsed


def test_raylight_serve_ctrl_c_exits_without_traceback(tmp_path):
    """SIGINT while Ray and Serve start (the replicas keep failing meanwhile): a clean exit."""
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(_serve_cmd("--model", "/nonexistent/model"), stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Started Serve" not in (tmp_path / "serve.log").read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "serve.log").read_text()
    assert rc in (0, 1, 130), out[-3000:]  # 1: the deploy failed before the signal landed
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]


def test_raylight_serve_prints_the_url_once_running_and_stops_on_ctrl_c(smollm2_dir, tmp_path):
    import httpx

    port = free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([RAYLIGHT, "serve", "--port", str(port), "--num-cpus", "1", "--model", smollm2_dir,
                             "--device", "cpu", "--kv-cache-memory", str(2**26)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "raylight serving" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        # The URL comes once the app is RUNNING: it answers at once.
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
