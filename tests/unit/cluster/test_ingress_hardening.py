"""Issue 14 hardening of the HTTP ingress, on the app `build_api(server)` builds, with a fake engine
and tokenizer (no Ray, no model): body limits, the event loop under a huge prompt, error shapes,
fields we do not implement, the context window, tenancy (keys and prefix-cache salts), metrics.
Each test names the reliability checklist rows (/work/shared/reference/reliability.md, (a)) it covers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ray")  # ingress.py imports ray.serve (no cluster is started)

from fastapi.testclient import TestClient

from raylight.cluster.http_edge import combine_salts, tenant_salt
from raylight.cluster.ingress import OpenAIServer, build_api
from raylight.cluster.protocol import ChatCompletionRequest
from raylight.engine.request import Request, RequestStatus
from raylight.sampling_params import SamplingParams
from raylight.testing.fake_engine import KV_BLOCKS, FakeEngine, FakeTokenizer

MSG = [{"role": "user", "content": "hi"}]


def _server(engine=None, tokenizer=None, max_model_len=64, **kw):
    return OpenAIServer(engine or FakeEngine(), "m", tokenizer if tokenizer is not None else FakeTokenizer(),
                        max_model_len=max_model_len, default_max_tokens=4, **kw)


def _client(**kw):
    server = _server(**kw)
    return TestClient(build_api(server)), server


def _err(r, status, param=...):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not ...:
        assert body["error"]["param"] == param, body
    msg = body["error"]["message"]
    assert "Traceback" not in msg and " File " not in msg and "0x" not in msg
    return body["error"]


# ---------------------------------------------------------------- 1. body size, event loop (rows 13, 18)

def test_over_limit_body_gets_413_before_it_is_read():
    client, server = _client(max_request_body_bytes=4096)
    big = {"model": "m", "prompt": "a" * 10_000}
    err = _err(client.post("/v1/completions", json=big), 413, None)
    assert err["code"] == "request_too_large"
    # chunked (no Content-Length): counted as it arrives, refused once past the limit, not read whole
    sent = []

    async def chunks():
        for i in range(100):
            sent.append(i)
            yield b"x" * 1024

    async def post_chunked():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})

    r = asyncio.run(post_chunked())
    assert "content-length" not in r.request.headers
    _err(r, 413, None)
    assert len(sent) < 10  # refused at the 5th KiB, not read whole
    assert server.engine.calls == []
    # under the limit still works
    assert client.post("/v1/completions", json={"model": "m", "prompt": [1, 2]}).status_code == 200


def test_models_stays_fast_while_a_huge_prompt_is_tokenized():
    """Tokenizing runs off the event loop: a slow tokenizer (1.5 s per call) does not stall /v1/models."""
    server = _server(tokenizer=FakeTokenizer(slow_s=1.5))
    app = build_api(server)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            big = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "word " * 4000}))
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            models = await c.get("/v1/models")
            fast = time.perf_counter() - t0
            return await big, models, fast

    big, models, fast = asyncio.run(run())
    assert models.status_code == 200 and fast < 0.5, fast
    # the prompt is over the window: refused from its head alone, with OpenAI's context-length error
    err = _err(big, 400, "prompt")
    assert err["code"] == "context_length_exceeded" and "maximum context length is 64 tokens" in err["message"]


def test_tokenizing_is_time_capped():
    server = _server(tokenizer=FakeTokenizer(slow_s=2.0), max_model_len=100_000, tokenize_timeout_s=0.3)
    client = TestClient(build_api(server))
    t0 = time.perf_counter()
    err = _err(client.post("/v1/completions", json={"prompt": "x" * 200}), 400, "prompt")
    assert err["code"] == "tokenize_timeout" and time.perf_counter() - t0 < 1.5


def test_chat_template_kwargs_cannot_override_the_call():  # row 13
    client, server = _client()
    for kwargs in ({"tokenize": False}, {"chat_template": "{% for x in range(10**9) %}{% endfor %}"},
                   {"enable_thinking": {"nested": 1}}):
        _err(client.post("/v1/chat/completions", json={"messages": MSG, "chat_template_kwargs": kwargs}), 400)
    _err(client.post("/v1/chat/completions", json={"messages": MSG, "chat_template": "{{ 1 }}"}), 400,
         "chat_template")
    assert server.engine.calls == []
    ok = client.post("/v1/chat/completions", json={"messages": MSG, "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------- 2. error shapes (rows 1, 22)

def test_unknown_routes_and_methods_are_openai_shaped():
    client, _ = _client()
    err = _err(client.get("/v1/nope"), 404, None)
    assert err["type"] == "not_found_error"
    r = client.get("/v1/completions")
    _err(r, 405, None)
    assert "POST" in r.headers.get("allow", "")


@pytest.mark.parametrize("raw", [b'{"prompt": [1, 2', b"\xff\xfe\x00garbage", b'{"prompt": "\xff"}', b"[]", b"12",
                                 b'"text"', b""])
def test_malformed_bodies_are_openai_shaped_without_offsets(raw):  # row 1
    client, server = _client()
    err = _err(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
    assert err["param"] in (None, "prompt")
    assert not (err["param"] or "x").isdigit()
    assert server.engine.calls == []


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}, {"content": "x"}]}, "messages.1.role"),
    ({"messages": MSG, "n": "many"}, "n"),
    ({"messages": MSG, "stream_options": {"include_usage": "perhaps"}}, "stream_options.include_usage"),
    ({"messages": "hello"}, "messages"),
])
def test_validation_errors_name_the_field_path(body, param):  # row 1
    client, _ = _client()
    _err(client.post("/v1/chat/completions", json=body), 400, param)


def test_error_messages_are_sanitized():  # row 22
    from raylight.cluster.http_edge import sanitize

    client, _ = _client()
    err = _err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "raise"}]}), 400,
               "messages")
    assert "/usr/lib" not in err["message"] and "0x7f" not in err["message"] and "/srv" not in err["message"]
    assert err["message"].startswith("chat template failed: RuntimeError: template error at <path>")
    # ordinary text with slashes is kept
    assert sanitize("roles must alternate user/assistant/user") == "roles must alternate user/assistant/user"
    assert sanitize("cannot open /opt/models/x.bin at 0xdeadbeef") == "cannot open <path> at <address>"


# ---------------------------------------------------------------- 3. accepted and silently wrong (rows 2, 4, 10)

# Structured outputs and tools are implemented (issue 19): their bad values are in
# tests/unit/cluster/test_structured_api.py.
@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("bad_words", ["x"]), ("prompt_embeds", "AAAA"), ("use_beam_search", True),
    ("logits_processors", ["x"]), ("mm_processor_kwargs", {"fps": 1}), ("length_penalty", 0.5),
    ("logprob_token_ids", [1]), ("priority", 1), ("session_id", "s"), ("vllm_xargs", {"a": 1}),
    ("kv_transfer_params", {"a": 1}), ("spaces_between_special_tokens", False), ("stream_interval", 4),
    ("thinking_token_budget", 10), ("repetition_detection", {"n": 3}), ("return_token_offsets", True),
])
def test_unimplemented_fields_get_400_naming_them(field, value):  # rows 2, 10, 11
    client, server = _client()
    err = _err(client.post("/v1/chat/completions", json={"messages": MSG, field: value}), 400, field)
    assert "not supported" in err["message"]
    assert server.engine.calls == []
    if field not in ("functions", "function_call"):
        _err(client.post("/v1/completions", json={"prompt": [1], field: value}), 400, field)


def test_no_op_values_of_unimplemented_fields_are_accepted():  # row 2
    client, _ = _client()
    for extra in ({"tool_choice": "none"}, {"tools": []}, {"response_format": {"type": "text"}},
                  {"parallel_tool_calls": False}, {"some_future_openai_field": 1}):
        r = client.post("/v1/chat/completions", json={"messages": MSG, **extra})
        assert r.status_code == 200, (extra, r.text)


@pytest.mark.parametrize("role", ["robot", "", "USER", None])
def test_unknown_roles_get_400(role):
    client, server = _client()
    _err(client.post("/v1/chat/completions", json={"messages": [{"role": role, "content": "x"}]}), 400,
         "messages.0.role")
    assert server.engine.calls == []


def test_known_roles_are_accepted():
    roles = ["system", "developer", "user", "assistant", "tool"]
    assert [m.role for m in ChatCompletionRequest(messages=[{"role": r, "content": "x"} for r in roles]).messages] == roles


def test_stop_reason_is_null_on_eos_and_the_id_on_stop_token_ids():
    def run(params, tokens, eos=frozenset({2})):
        req = Request("r", [5, 6], params, max_tokens=10, eos_token_ids=eos)
        for t in tokens:
            req.append_output_token(t)
            status = req.check_stop(100)
            if status is not None:
                return status, req.stop_reason
        return None, req.stop_reason

    assert run(SamplingParams(max_tokens=10), [7, 2]) == (RequestStatus.FINISHED_STOPPED, None)
    assert run(SamplingParams(max_tokens=10, stop_token_ids=[9]), [7, 9]) == (RequestStatus.FINISHED_STOPPED, 9)
    # an EOS id the caller also lists in stop_token_ids: they asked for it, they get the id
    assert run(SamplingParams(max_tokens=10, stop_token_ids=[2]), [2]) == (RequestStatus.FINISHED_STOPPED, 2)


def test_context_window_is_enforced_not_silently_cut():  # row 4
    client, server = _client(max_model_len=64)
    err = _err(client.post("/v1/completions", json={"prompt": list(range(1, 61)), "max_tokens": 10}), 400,
               "max_tokens")
    assert err["message"].startswith("This model's maximum context length is 64 tokens. However, you requested "
                                      "70 tokens (60 in the messages, 10 in the completion).")
    assert err["code"] == "context_length_exceeded"
    _err(client.post("/v1/completions", json={"prompt": list(range(1, 65))}), 400, "prompt")
    _err(client.post("/v1/completions", json={"prompt": "y" * 64}), 400, "prompt")
    msgs = [{"role": "user", "content": "z" * 40}]  # 40 + <user> + <assistant> = 57 tokens
    err = _err(client.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 8}), 400,
               "max_completion_tokens")
    assert "(57 in the messages, 8 in the completion)" in err["message"]
    _err(client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8}), 400, "max_tokens")
    assert server.engine.calls == []
    # fitting exactly, or no explicit max_tokens (the default is cut to the room left): accepted
    assert client.post("/v1/completions", json={"prompt": list(range(1, 61)), "max_tokens": 4}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": msgs}).status_code == 200


# ---------------------------------------------------------------- 5. tenancy (rows 19, 35)

def test_several_keys_each_with_its_own_prefix_cache_salt():  # rows 19, 35
    engine = FakeEngine()
    client, server = _client(engine=engine, api_key="key-a", api_keys=["key-b"])
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    body = {"prompt": [1, 2, 3, 4]}
    first = client.post("/v1/completions", json=body, headers=a).json()
    again = client.post("/v1/completions", json=body, headers=a).json()
    other = client.post("/v1/completions", json=body, headers=b).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 4  # same tenant: a prefix hit
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the other tenant: none
    salts = [c.cache_salt for c in engine.calls]
    assert salts[0] == salts[1] != salts[2] and None not in salts
    assert all("key-" not in s for s in salts)  # a keyed hash, never the key
    assert salts[0] == tenant_salt("key-a") and salts[2] == tenant_salt("key-b")
    # a client salt combines with the tenant's: B sending A's salt reaches nothing of A's
    client.post("/v1/completions", json={**body, "cache_salt": "s"}, headers=a)
    client.post("/v1/completions", json={**body, "cache_salt": "s"}, headers=b)
    assert engine.calls[-2].cache_salt != engine.calls[-1].cache_salt
    assert engine.calls[-2].cache_salt not in salts and engine.calls[-2].cache_salt != "s"
    assert combine_salts(None, "s") == "s" and combine_salts(None, None) is None


def test_the_prefix_cache_keys_of_two_tenants_differ():  # row 35: what the engine's block hashes see
    from raylight.engine.kv_cache.block_hash import block_hashes

    ids = list(range(64))
    a, b = tenant_salt("key-a"), tenant_salt("key-b")
    assert block_hashes(ids, 16, a) == block_hashes(ids, 16, a)
    assert not set(block_hashes(ids, 16, a)) & set(block_hashes(ids, 16, b))


def test_auth_is_openai_shaped_and_guards_every_path():  # row 19
    client, _ = _client(api_keys=["k1", "k2"])
    for headers in ({}, {"Authorization": "Bearer k3"}, {"Authorization": "k1"}, {"Authorization": "Bearer k1 "},
                    {"Authorization": "Bearer "}):
        err = _err(client.get("/v1/models", headers=headers), 401, None)
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    for key in ("k1", "k2"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/v1/models/", follow_redirects=False).status_code == 401  # trailing slash still guarded
    r = client.options("/metrics")  # a bare OPTIONS: no data
    assert r.status_code == 401 and "raylight:" not in r.text
    assert client.options("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 405
    assert client.get("/health").status_code == 200
    # auth before the body: a huge body without a key is a 401, not a 413 (nothing else is learned)
    assert client.post("/v1/completions", content=b"x" * 20_000_000).status_code == 401


def test_an_open_server_has_no_tenant_salt():
    engine = FakeEngine()
    client, _ = _client(engine=engine)
    client.post("/v1/completions", json={"prompt": [1]})
    client.post("/v1/completions", json={"prompt": [1], "cache_salt": "c"})
    assert [c.cache_salt for c in engine.calls] == [None, "c"]


# ---------------------------------------------------------------- 4. metrics (row 23)

def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_disconnect_mid_stream_bumps_aborted_and_blocks_come_back():  # row 23
    import uvicorn

    from raylight.testing.helpers import free_port

    engine = FakeEngine(endless=True)
    server = _server(engine=engine)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_api(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while not uv.started and time.time() < deadline:
            time.sleep(0.05)
        text = httpx.get(f"{base}/metrics").text
        assert _metric(text, "raylight:request_aborted_total") == 0
        assert _metric(text, "raylight:kv_cache_free_blocks") == KV_BLOCKS
        with httpx.Client(timeout=10) as h:
            with h.stream("POST", f"{base}/v1/completions", json={"prompt": [1, 2], "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # kept open: closing the iterator closes the connection
                while not next(lines).startswith("data: "):
                    pass
                assert _metric(httpx.get(f"{base}/metrics").text, "raylight:kv_cache_free_blocks") == KV_BLOCKS - 4
        deadline = time.time() + 10
        while time.time() < deadline:
            text = httpx.get(f"{base}/metrics").text
            if _metric(text, "raylight:request_aborted_total") == 1:
                break
            time.sleep(0.1)
        assert _metric(text, "raylight:request_aborted_total") == 1, text
        assert _metric(text, "raylight:kv_cache_free_blocks") == _metric(text, "raylight:kv_cache_total_blocks")
        assert _metric(text, "raylight:num_requests_running") == 0
    finally:
        uv.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------- checklist rows 3, 5, 6, 7, 9 over HTTP

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": ""}, "prompt"),  # row 3
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": [1], "max_tokens": 0}, "max_tokens"),  # row 5
    ("/v1/completions", {"prompt": [1], "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {"prompt": [1], "max_tokens": 10**12}, "max_tokens"),
    ("/v1/completions", {"prompt": [1], "max_tokens": None, "min_tokens": 10**6}, "min_tokens"),
    ("/v1/completions", {"prompt": [1], "best_of": 10**9}, "best_of"),  # row 6 (n: the engine's max_n)
    ("/v1/completions", {"prompt": [1], "logprobs": 21}, "logprobs"),  # row 7
    ("/v1/completions", {"prompt": [1], "logprobs": 30, "stream": True}, "logprobs"),
    ("/v1/completions", {"prompt": [1], "prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 30}, "logprobs"),
    ("/v1/completions", {"prompt": [1], "seed": 2**64}, "seed"),  # row 9
    ("/v1/completions", {"prompt": [1], "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": [1], "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": [1], "stop": ["x"] * 10_000}, "stop"),
    ("/v1/completions", {"prompt": [1], "stop": ["x" * 5000]}, "stop"),
    ("/v1/completions", {"prompt": [1], "stop_token_ids": [1] * 10_000}, "stop_token_ids"),
])
def test_bad_parameters_get_400_before_the_engine(path, body, param):
    client, server = _client()
    _err(client.post(path, json=body), 400, param)
    assert server.engine.calls == []


@pytest.mark.parametrize("raw, param", [(b'{"prompt": [1], "temperature": NaN}', "temperature"),
                                        (b'{"prompt": [1], "top_p": Infinity}', "top_p")])
def test_nan_and_infinity_get_400(raw, param):  # row 9
    client, server = _client()
    _err(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400, param)
    assert server.engine.calls == []


def test_a_replica_failing_mid_stream_ends_with_an_error_event():  # checklist (b) 6
    engine = FakeEngine(endless=True)
    make = engine._generate

    class Dying:
        def __init__(self, stream):
            self.stream = stream

        def __aiter__(self):
            return self

        async def __anext__(self):
            if self.stream.msgs:
                return self.stream.msgs.pop(0)
            raise RuntimeError("actor died at 0xdead in /srv/replica.py")

        def cancel(self):
            self.stream.cancel()

    engine.generate.fn = lambda call: Dying(make(call))
    client, server = _client(engine=engine)
    r = client.post("/v1/completions", json={"prompt": [1], "stream": True})
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"error"' in events[-2]  # an error event, then the end
    assert "0xdead" not in r.text and "/srv" not in r.text
    assert "raylight:request_aborted_total 0.0" in client.get("/metrics").text  # not a client abort


def test_token_id_prompt_outside_the_vocabulary_is_a_400_even_with_echo():
    # (the fuzzer's case: a negative id used to reach the echo's decode before the engine's check)
    client, _ = _client()
    for prompt in ([[-32]], [5, -1], [[1, 2], [-7]]):
        err = _err(client.post("/v1/completions", json={"model": "m", "prompt": prompt, "echo": True}), 400, "prompt")
        assert "outside the vocabulary" in err["message"]
    err = _err(client.post("/v1/completions", json={"model": "m", "prompt": [[1], []]}), 400, "prompt")
    assert "empty" in err["message"]


def test_an_undecodable_echo_is_a_400_not_a_500():
    class Narrow(FakeTokenizer):
        def decode(self, ids, **_):
            raise OverflowError("out of range integral type conversion attempted")

    client, _ = _client(tokenizer=Narrow())
    _err(client.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "echo": True}), 400, "prompt")
