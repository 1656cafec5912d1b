"""A slow reader that never drains its stream (reliability checklist row 24), on a real Ray Serve app over
HTTP on 127.0.0.1 (SmolLM2 on CPU). The client is a raw socket with a tiny receive buffer that reads the
response headers and then stops reading.

What Serve does with such a reader: the ingress replica's stream to Serve's HTTP proxy has no flow control,
so the engine generates at full speed and its KV blocks are freed when the request ends, however slowly the
client reads; the kernel's send buffer fills (about 1.7 MB on loopback), then uvicorn pauses the proxy's
writes for that connection, and what is left waits in the proxy, at most the response itself (bounded by
max_tokens, and by request_timeout_s when set). Other clients are served meanwhile. When the client closes,
the proxy wakes, cancels the request, and the engine aborts it. Serve's proxy has no write timeout: a reader
that stays connected and never reads keeps its buffered response in the proxy until it closes.
About 45 s on 2 cores (a third of it starting Ray and the model)."""

from __future__ import annotations

import json
import socket
import struct
import time

import httpx
import pytest

pytest.importorskip("ray")

from raylight.testing.helpers import read_metrics, serve_app, wait_engines_idle

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(smollm2_dir):
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(engine_args={"device": "cpu", "max_model_len": 2048, "max_num_seqs": 32},
                    ray_actor_options={"num_cpus": 2}, default_max_tokens=8)
    with serve_app(cfg, "slow-reader") as base:
        yield base


def metrics(base) -> dict[str, float]:
    return read_metrics(base, timeout=30)


def wait_idle(base, aborted: float, timeout_s: float = 30.0) -> dict[str, float]:
    """Waits until no request runs or waits, every KV block is free, and request_aborted_total is `aborted`."""
    idle, m = wait_engines_idle(base, timeout_s=timeout_s, timeout=30,
                                until=lambda m: m["raylight:request_aborted_total"] == aborted)
    if not idle:
        pytest.fail(f"not idle with {aborted} aborted after {timeout_s:.0f}s: {m}")
    return m


def others_are_served(base) -> None:
    """Another client gets a full answer and a health check meanwhile."""
    r = httpx.post(f"{base}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200


def open_stalled_stream(base, body: dict) -> socket.socket:
    """POSTs a streaming chat request from a socket with a tiny receive buffer (set before connecting, so the
    window it advertises stays tiny), reads the response headers byte by byte, and reads nothing more."""
    port = int(base.rsplit(":", 1)[1])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = s.recv(1)
        assert byte, f"connection closed in the headers: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/event-stream" in head.lower() and b"transfer-encoding: chunked" in head.lower(), head
    return s


def server_send_queue(base, client: socket.socket):
    """Bytes the proxy's socket of this connection has written that the client has not acknowledged (its
    send queue, from /proc/net/tcp); None where there is no /proc/net/tcp."""
    server_port, client_port = int(base.rsplit(":", 1)[1]), client.getsockname()[1]
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if local == server_port and remote == client_port:
            return int(fields[4].split(":")[0], 16)
    return None


def read_events(s: socket.socket) -> list[str]:
    """Reads the chunked SSE body to its end and returns the payloads of its `data:` lines."""
    buf = b""

    def need(n):
        nonlocal buf
        while len(buf) < n:
            more = s.recv(65536)
            assert more, "the stream ended before its last chunk"
            buf += more

    body = b""
    while True:
        while b"\r\n" not in buf:
            need(len(buf) + 1)
        line, buf = buf.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        need(size + 2)
        body, buf = body + buf[:size], buf[size + 2:]
        if size == 0:
            break
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


def test_a_stalled_stream_backs_up_into_the_proxy_others_are_served_and_closing_aborts_it(server):
    before = metrics(server)
    # 16 choices with 20 alternatives each: ~180 KB of events a second, enough to fill the kernel's send
    # buffer in seconds; 1000 tokens cannot finish within the test (~100 s), so the close finds it running.
    s = open_stalled_stream(server, {
        "model": MODEL, "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "max_tokens": 1000, "n": 16, "logprobs": True, "top_logprobs": 20, "temperature": 1.0, "seed": 0,
        "ignore_eos": True, "stream": True})
    try:
        queued = server_send_queue(server, s)
        if queued is None:
            pytest.skip("needs /proc/net/tcp to see the proxy's send queue")
        # The proxy's writes stop once the kernel's buffers are full: its send queue stops growing while the
        # engine still generates. Other clients are served throughout.
        history, deadline, last_check = [queued], time.monotonic() + 90, 0.0
        while not (history[-1] > 0 and len(history) >= 5 and len(set(history[-5:])) == 1):
            assert time.monotonic() < deadline, f"the proxy's send queue never stopped growing: {history[-10:]}"
            if time.monotonic() - last_check > 3:
                others_are_served(server)
                last_check = time.monotonic()
            time.sleep(0.5)
            history.append(server_send_queue(server, s))
        blocked_at = history[-1]
        m = metrics(server)
        assert m["raylight:num_requests_running"] >= 1, m  # still generating: the engine was not held back
        assert m["raylight:kv_cache_free_blocks"] < m["raylight:kv_cache_total_blocks"], m
        others_are_served(server)
        assert server_send_queue(server, s) == blocked_at  # still stalled: the proxy wrote nothing more
    finally:
        # The client gives up: RST (SO_LINGER 0), as a process that dies does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    print(f"proxy send queue stalled at {blocked_at} bytes")
    # The proxy notices, cancels the request; the engine aborts it and frees its blocks.
    wait_idle(server, aborted=before["raylight:request_aborted_total"] + 1)
    others_are_served(server)


def test_a_reader_that_reads_nothing_does_not_hold_the_engine_and_gets_at_most_max_tokens(server):
    before = metrics(server)
    max_tokens = 32
    s = open_stalled_stream(server, {
        "model": MODEL, "messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    try:
        # The request ends in the engine and frees its KV blocks while the client has read nothing of the
        # body: its output waits in the proxy and the kernel, not in the engine. It was not aborted.
        wait_idle(server, aborted=before["raylight:request_aborted_total"])
        others_are_served(server)
        events = read_events(s)  # the reader comes back: the whole stream, no more than max_tokens
    finally:
        s.close()
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == max_tokens, chunks[-1]
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert finishes == ["length"], finishes
    deltas = [ch for c in chunks for ch in c["choices"] if ch["delta"].get("content")]
    assert 0 < len(deltas) <= max_tokens
