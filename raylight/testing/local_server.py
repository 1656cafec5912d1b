"""The real OpenAI server in one process, without Ray: an `EngineReplica` (a real engine) behind the
`OpenAIServer` app, served by uvicorn on a free port. Tests talk to it with the official `openai`
client or raw HTTP, as to a deployed server; what differs is only the transport between the ingress
and the replica (Serve's handle here is `LocalHandle`, which streams through an asyncio task the way
Serve's streaming call does, and cancels it the way Serve's `cancel()` does)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Iterator, Optional


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class LocalStream:
    """What `handle.options(stream=True).generate.remote(call)` returns: the replica's messages, pumped by
    a task of their own (as a Serve streaming call runs in the replica); `cancel()` cancels that task,
    which closes the replica's generator and so aborts the engine request."""

    def __init__(self, agen):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(agen))
        self.cancelled = False

    async def _pump(self, agen) -> None:
        try:
            async for msg in agen:
                await self._queue.put(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the replica failed: the reader gets the exception
            await self._queue.put(e)
        finally:
            await agen.aclose()
            self._queue.put_nowait(StopAsyncIteration())

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if isinstance(item, StopAsyncIteration):
            self._queue.put_nowait(item)  # stays ended
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


class LocalHandle:
    """The parts of Serve's deployment handle to an `EngineReplica` that `OpenAIServer` uses."""

    def __init__(self, replica):
        self.replica = replica
        self.streams: list[LocalStream] = []
        self.generate = _Call(self._generate)
        self.health = _Call(replica.health)
        self.stats = _Call(replica.stats)

    def options(self, **_):
        return self

    def _generate(self, call) -> LocalStream:
        stream = LocalStream(self.replica.generate(call))
        self.streams.append(stream)
        return stream


@contextlib.contextmanager
def local_server(engine_args: dict[str, Any], max_queued_requests: Optional[int] = None,
                 default_max_tokens: int = 16, served_model_name: str = "model", api_key: Optional[str] = None,
                 start_timeout_s: float = 60) -> Iterator[tuple[str, Any]]:
    """Yields (base URL, the EngineReplica) of a server on 127.0.0.1; stops both afterwards."""
    import uvicorn

    from raylight.cluster.ingress import OpenAIServer, build_api
    from raylight.cluster.replica import EngineReplica
    from raylight.testing.helpers import free_port

    replica = EngineReplica(engine_args, max_queued_requests=max_queued_requests, cpu_threads=1)
    eng = replica.engine
    server = OpenAIServer(LocalHandle(replica), served_model_name, eng.tokenizer, eng.max_model_len, api_key=api_key,
                          default_max_tokens=default_max_tokens)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_api(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="raylight-local-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not uv.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise TimeoutError("the local server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", replica
    finally:
        uv.should_exit = True
        thread.join(10)
        replica._stop()
