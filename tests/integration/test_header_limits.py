"""Huge and numerous request headers (reliability checklist row 18, CVE-2025-48956) on a real Ray Serve app
over HTTP on 127.0.0.1 (SmolLM2 on CPU), sent from raw sockets so that nothing in a client library trims or
refuses them.

Serve's HTTP proxy runs uvicorn with httptools, which sets no limit on the size or number of headers: without
ours, a 10 MB header or 100,000 headers were answered 200. The ingress's Guard (raylight/cluster/http_edge.py)
refuses more than MAX_HEADER_COUNT headers, or more than MAX_HEADER_BYTES of them, with an OpenAI-shaped 431
before authentication and before any route, and the server keeps serving. The proxy itself still reads the
whole header block into memory first (httptools joins a value's pieces as they arrive); a front proxy with
its own header limits (nginx's large_client_header_buffers) bounds that. About 25 s on 2 cores, most of it
starting Ray and the model."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

pytest.importorskip("ray")

from raylight.cluster.http_edge import MAX_HEADER_BYTES, MAX_HEADER_COUNT
from raylight.testing.helpers import serve_app

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-headers"
AUTH = b"Authorization: Bearer " + KEY.encode() + b"\r\n"


@pytest.fixture(scope="module")
def server(smollm2_dir):
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(engine_args={"device": "cpu", "max_model_len": 512, "max_num_seqs": 4, "kv_cache_memory": 2**26},
                    ray_actor_options={"num_cpus": 2}, api_key=KEY, default_max_tokens=4)
    with serve_app(cfg, "header-limits") as base:
        yield base


def send_raw(base, request: bytes, timeout_s: float = 30) -> tuple[int, dict]:
    """Sends `request` as is and reads one response; (status, JSON body or {}). A server that hangs fails
    on the socket timeout."""
    s = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=timeout_s)
    try:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):  # answered (and closed) before it read everything
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            assert more, f"connection closed without a response: {data!r}"
            data += more
        head, body = data.split(b"\r\n\r\n", 1)
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(headers.get(b"content-length", b"0"))
        while len(body) < length:
            more = s.recv(65536)
            assert more, "connection closed in the body"
            body += more
    finally:
        s.close()
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body[:length]) if length else {})


def get_models(extra: bytes, auth: bytes = AUTH) -> bytes:
    return b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + extra + b"\r\n"


def assert_431(status: int, body: dict) -> None:
    assert status == 431, (status, body)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == "request_header_fields_too_large", body


def still_serving(base) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{base}/v1/models", headers=auth, timeout=30).status_code == 200
    r = httpx.post(f"{base}/v1/completions", headers=auth, timeout=60,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


def test_huge_headers_get_431_and_the_server_keeps_serving(server):
    # a big but ordinary header (a large cookie or token) is fine
    status, body = send_raw(server, get_models(b"X-Big: " + b"a" * 8192 + b"\r\n"))
    assert status == 200 and body["data"][0]["id"] == MODEL, (status, body)
    # one header of 100 KB, 1 MB, 10 MB: 431, also without a key (before authentication) and on /health
    for size in (100_000, 1_000_000, 10_000_000):
        assert_431(*send_raw(server, get_models(b"X-Big: " + b"a" * size + b"\r\n")))
    assert_431(*send_raw(server, get_models(b"X-Big: " + b"a" * 100_000 + b"\r\n", auth=b"")))
    assert_431(*send_raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"))
    # many small headers that add up past the byte limit
    pad = b"v" * 1000
    n = MAX_HEADER_BYTES // 1000 + 10
    assert n < MAX_HEADER_COUNT
    assert_431(*send_raw(server, get_models(b"".join(b"X-H%d: %s\r\n" % (i, pad) for i in range(n)))))
    still_serving(server)


def test_too_many_headers_get_431_and_the_server_keeps_serving(server):
    def many(n):
        return b"".join(b"X-H%d: v\r\n" % i for i in range(n))

    status, _ = send_raw(server, get_models(many(100)))
    assert status == 200
    for n in (MAX_HEADER_COUNT + 1, 10_000, 100_000):
        assert_431(*send_raw(server, get_models(many(n))))
    # a request with a body: refused from its headers, the body never read
    payload = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4}).encode()
    assert_431(*send_raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + many(1000)
                         + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)))
    still_serving(server)
