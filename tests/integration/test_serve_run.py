"""`serve run configs/cluster.yaml` — the real command — starts, answers a chat request, shuts down cleanly.
With replicas that cannot start, Serve gives up after the config's max_constructor_retry_count attempts
(DEPLOY_FAILED, the replica's error in the log) and stops retrying; `serve run` itself (Ray's CLI) keeps
running until Ctrl-C, which we cannot change from the config (`raylight serve` exits instead)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from raylight.testing.helpers import free_port, wait_healthy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serve_run_cluster_yaml(smollm2_dir, tmp_path):
    with open(os.path.join(REPO, "configs", "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    port = free_port()  # the shipped file, on a free port
    config["http_options"]["port"] = port
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([serve_bin, "run", str(path)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(base, 300, still_running=lambda: proc.poll() is None):
            pytest.fail("serve run did not become healthy:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0,
                                              messages=[{"role": "user", "content": "Say hello."}])
        assert chat.choices[0].message.content
        assert chat.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("serve run did not shut down within 90 s of SIGINT")
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/health", timeout=3)


def test_serve_run_bad_model_fails_bounded_and_clear(tmp_path):
    with open(os.path.join(REPO, "configs", "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["model"] = "/nonexistent/model"  # only the replicas trip on it
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([serve_bin, "run", str(path)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    error = "ValueError: model '/nonexistent/model' is not a local directory"
    try:
        deadline = time.monotonic() + 240
        while "Failed to update the deployments" not in log_path.read_text():  # Serve's DEPLOY_FAILED
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        # At most max_constructor_retry_count attempts for each of the two deployments (the ingress loads
        # the tokenizer from the same path). The replicas' log lines reach this log out of order with the
        # controller's, so the last attempt's line may arrive after DEPLOY_FAILED: wait, then count.
        bound = 2 * config["applications"][0]["args"]["max_constructor_retry_count"]
        settle = time.monotonic() + 15
        while time.monotonic() < settle and log_path.read_text().count(error) < bound:
            time.sleep(0.5)
        time.sleep(6)  # all allowed attempts seen (or 15 s gone): one beyond them would show up by now
        attempts = log_path.read_text().count(error)
        assert 1 <= attempts <= bound, attempts  # bounded: no attempt beyond the allowed ones
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code != 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
