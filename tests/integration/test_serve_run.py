"""`serve run configs/cluster.yaml` — the real command — starts, answers a chat request, shuts down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
