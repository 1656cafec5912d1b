"""Issue 23 on the bare app (`build_api(server)`, a fake engine and tokenizer, no Ray, no model): what
the ingress does with departed clients, and request fields it checks before the engine. The same
behaviours on a real engine over real HTTP: tests/integration/test_openai_conformance.py."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray")  # ingress.py imports ray.serve (no cluster is started)

from starlette.requests import Request

from raylight.cluster.ingress import OpenAIServer
from raylight.cluster.protocol import ChatCompletionRequest, CompletionRequest
from raylight.testing.fake_engine import FakeEngine, FakeTokenizer, Stream


class QueuedEngine(FakeEngine):
    """Every request stays queued: its stream never yields."""

    def _generate(self, call):
        self.calls.append(call)
        return Stream([], endless=True)


def _request(disconnect: asyncio.Event) -> Request:
    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}, receive)


def _server(engine):
    return OpenAIServer(engine, "m", FakeTokenizer(), max_model_len=64, default_max_tokens=4)


def _aborted(server) -> float:
    return server.metrics.aborted._value.get()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_a_cancelled_handler_aborts_its_queued_request(chat, stream):
    """Serve's proxy cancels the handler of a client that left: the engine call is cancelled at once
    (Serve's own propagation to child calls is not relied on), also while nothing came back yet."""
    engine = QueuedEngine()
    server = _server(engine)
    streams = []
    make = engine._generate
    engine.generate.fn = lambda call: streams.append(make(call)) or streams[-1]

    async def main():
        req = _request(asyncio.Event())
        if chat:
            body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stream=stream)
            task = asyncio.ensure_future(server.chat_completions(body, req))
        else:
            task = asyncio.ensure_future(server.completions(CompletionRequest(prompt=[1, 2], stream=stream), req))
        while not streams:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not streams[0].cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert streams[0].cancelled and _aborted(server) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_disconnect_while_queued_aborts_the_request(stream):
    """Outside Serve (uvicorn, the test client) nothing cancels the handler: the ingress watches the
    connection itself while it waits, so a client that leaves a queued request aborts it."""
    engine = QueuedEngine()
    server = _server(engine)
    streams = []
    make = engine._generate
    engine.generate.fn = lambda call: streams.append(make(call)) or streams[-1]

    async def main():
        gone = asyncio.Event()
        task = asyncio.ensure_future(server.completions(CompletionRequest(prompt=[1, 2], stream=stream),
                                                        _request(gone)))
        await asyncio.sleep(0.05)
        gone.set()
        return await asyncio.wait_for(task, 2)

    from raylight.cluster.protocol import APIError

    with pytest.raises(APIError) as e:
        asyncio.run(main())
    assert e.value.status == 499 and streams[0].cancelled and _aborted(server) == 1


def test_one_failing_prompt_aborts_the_others():
    """A completions request with several prompts: when one fails, the others' engine requests are
    cancelled rather than left to run for nobody."""
    engine = QueuedEngine()
    server = _server(engine)
    streams = []

    def generate(call):
        from raylight.messages import ReplicaMessage

        s = Stream([ReplicaMessage(error_status=429, error_message="full")] if len(streams) == 1 else [],
                   endless=len(streams) != 1)
        streams.append(s)
        return s

    engine.generate.fn = generate

    async def main():
        return await server.completions(CompletionRequest(prompt=[[1, 2], [3, 4], [5, 6]]), _request(asyncio.Event()))

    from raylight.cluster.protocol import APIError

    with pytest.raises(APIError) as e:
        asyncio.run(main())
    assert e.value.status == 429
    # the two still running are cancelled; the failed one's stream ended with its error message
    assert [s.cancelled for s in streams] == [True, False, True]


# ---------------------------------------------------------------- request fields, checked before the engine

def _client(engine=None, max_model_len=64):
    from fastapi.testclient import TestClient

    from raylight.cluster.ingress import build_api

    server = OpenAIServer(engine or FakeEngine(), "m", FakeTokenizer(), max_model_len=max_model_len,
                          default_max_tokens=4)
    return TestClient(build_api(server)), server


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("extra", [
    {"priority": 0}, {"length_penalty": 1.0}, {"spaces_between_special_tokens": True}, {"stream_interval": 1},
    {"thinking_token_budget": -1}, {"return_mm_kwargs": True}, {"bad_words": []}, {"use_beam_search": False},
    {"return_token_offsets": False}, {"routed_experts_prompt_start": 0}, {"session_id": None},
])
def test_no_op_values_of_unimplemented_vllm_extras_are_accepted(extra):
    client, _ = _client()
    assert client.post("/v1/completions", json={"prompt": [1, 2], **extra}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": MSG, **extra}).status_code == 200


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": [1]}),
                                        ("/v1/chat/completions", {"messages": MSG})])
def test_stream_options_without_stream_is_a_400(path, body):
    client, server = _client()
    for stream in ({}, {"stream": False}):
        r = client.post(path, json={**body, **stream, "stream_options": {"include_usage": True}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    assert server.engine.calls == []
    ok = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert ok.status_code == 200


def test_chat_extras_without_an_implementation_get_400():
    client, server = _client()
    for field, value in (("add_special_tokens", True), ("documents", [{"text": "x"}]), ("return_prompt_text", True)):
        r = client.post("/v1/chat/completions", json={"messages": MSG, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert server.engine.calls == []


def test_truncation_to_the_window_leaves_room_for_max_tokens():
    client, server = _client(max_model_len=64)
    prompt = list(range(1, 81))  # 80 tokens, past the 64-token window
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "truncate_prompt_tokens": -1})
    assert r.status_code == 200, r.text
    assert server.engine.calls[-1].prompt == prompt[-56:] and r.json()["usage"]["prompt_tokens"] == 56
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8})  # no truncation: refused, not cut
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_invocations_routes_by_the_body():
    client, server = _client()
    chat = client.post("/invocations", json={"messages": MSG})
    comp = client.post("/invocations", json={"prompt": [1, 2]})
    assert chat.json()["object"] == "chat.completion" and comp.json()["object"] == "text_completion"
    for raw, param in ((b'{"input": "x"}', "messages"), (b"[1]", None), (b'{"prompt": [1', None),
                       (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
                       (b'{"prompt": [1], "n": "two"}', "n")):
        r = client.post("/invocations", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (raw, r.text)
    assert len(server.engine.calls) == 2


def test_tokenizer_info_and_load():
    client, _ = _client()
    info = client.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "FakeTokenizer" and "chat_template" in info
    assert client.get("/load").json() == {"server_load": 0}
    from fastapi.testclient import TestClient

    from raylight.cluster.ingress import build_api

    bare = TestClient(build_api(OpenAIServer(FakeEngine(), "m", None, max_model_len=64)))
    r = bare.get("/tokenizer_info")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stream_that_ended_is_not_cancelled(stream):
    """A request whose replica sent its last message needs no cancel (each is a call into Serve and Ray):
    only streams still running when the ingress lets go are cancelled."""
    engine = FakeEngine()
    streams = []
    make = engine.generate.fn

    def generate(call):
        streams.append(make(call))
        return streams[-1]

    engine.generate.fn = generate
    client, server = _client(engine)
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "stream": stream})
    assert r.status_code == 200, r.text
    assert len(streams) == 1 and not streams[0].cancelled and _aborted(server) == 0


def test_a_disconnect_interrupts_the_waiting_read_and_leaves_the_task_usable():
    """EngineStream.next waits on the replica's stream alone; the client's departure cancels that wait
    from a callback. The caller gets 499, and its task is not left cancelling (it may still clean up)."""
    import sys

    from raylight.cluster.metrics import ServerMetrics
    from raylight.cluster.protocol import APIError
    from raylight.cluster.streams import EngineStream

    async def main():
        gone = asyncio.Event()
        stream = Stream([], endless=True)
        es = EngineStream(stream, _request(gone), ServerMetrics())
        asyncio.get_running_loop().call_later(0.05, gone.set)
        with pytest.raises(APIError) as e:
            await es.next()
        assert e.value.status == 499 and stream.cancelled
        await asyncio.sleep(0.01)  # no CancelledError left pending on this task
        if sys.version_info >= (3, 11):
            assert asyncio.current_task().cancelling() == 0
        with pytest.raises(APIError):  # and once gone, every later read says so at once
            await es.next()
        return es._metrics.aborted._value.get()

    assert asyncio.run(main()) == 1
