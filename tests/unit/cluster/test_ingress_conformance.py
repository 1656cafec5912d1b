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
    assert all(s.cancelled for s in streams), [s.cancelled for s in streams]
