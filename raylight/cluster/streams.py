"""One request's messages from its engine replica, read while its HTTP client is watched, and written back
whole or as SSE.

A departed client must not leave its request running or queued: every way out of reading (the client
disconnects, Serve cancels the handler because the client left, an error, the end) passes through
`EngineStream.close()`, which cancels the Serve call; that aborts the request wherever it is (Serve's
queue, the replica, the engine) and it stops counting against any limit. Serve's own cancellation of
child calls is not relied on, nor is garbage collection of an abandoned stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from raylight.cluster.http_edge import sanitize
from raylight.cluster.metrics import RequestTiming, ServerMetrics
from raylight.cluster.openai_outputs import StreamWriter, usage
from raylight.cluster.protocol import APIError, param_of
from raylight.messages import GenerateCall, ReplicaMessage
from raylight.outputs import RequestOutput

logger = logging.getLogger("raylight.ingress")

RETRY = {"Retry-After": "1"}  # on 503s: the engine is gone or going; another replica may answer


class EngineStream:
    def __init__(self, stream, request: Request, metrics: ServerMetrics):
        """`stream`: what Serve's `handle.options(stream=True).generate.remote(call)` returned."""
        self._stream = stream
        self._it = stream.__aiter__()
        self._metrics = metrics
        self._closed = False
        self._ended = False  # the replica sent its last message (a finished output or an error)
        self._reader: Optional[asyncio.Task] = None  # the task inside next(), while it waits
        self._interrupted = False  # next()'s wait was cancelled by the client's departure, not by anyone else
        # Done when the client disconnects. The body was read already (FastAPI parsed it), so the next
        # ASGI message is http.disconnect: no polling, and it is seen while the request is still queued.
        # Its callback interrupts a next() that is waiting: one watcher per request, not a future and an
        # asyncio.wait per message (17% of the ingress's CPU at saturation on our CPU).
        self._gone = asyncio.ensure_future(until_disconnect(request))
        self._gone.add_done_callback(self._on_gone)

    def _on_gone(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or self._reader is None:
            return
        self._interrupted = True
        self._reader.cancel()

    async def next(self) -> Optional[ReplicaMessage]:
        """The next message; None at the end. Raises APIError(499) once the client is gone."""
        if self._gone.done() and not self._gone.cancelled():
            self.close(client_gone=True)
            raise APIError(499, "client disconnected")
        self._reader = asyncio.current_task()
        try:
            msg = await self._it.__anext__()
        except StopAsyncIteration:
            self._ended = True
            return None
        except asyncio.CancelledError:
            self.close(client_gone=True)
            if self._interrupted:  # our own cancel (the client left): not the handler's cancellation
                self._interrupted = False
                uncancel = getattr(self._reader, "uncancel", None)  # Python 3.11+
                if uncancel is not None:
                    uncancel()
                raise APIError(499, "client disconnected") from None
            raise  # Serve ends the handler of a client that went away
        finally:
            self._reader = None
        if msg.error_status is not None or (msg.output is not None and msg.output.finished):
            self._ended = True  # the replica's generator returns after this one
        return msg

    def close(self, client_gone: bool = False) -> None:
        """Idempotent. An unfinished stream is cancelled, which aborts its request; one whose last message
        came needs nothing (a cancel is a call into Serve and Ray per request: 2.6% of the ingress's time
        at saturation on our CPU)."""
        if self._closed:
            return
        self._closed = True
        self._gone.cancel()
        if not self._ended:
            self._stream.cancel()
        if client_gone:
            self._metrics.aborted.inc()


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """Closes its event generator however the response ends. A client that leaves while a chunk is being
    sent (an OSError from send, or the ASGI task cancelled) would otherwise leave the generator suspended
    until garbage collection, its engine request still running. The source generator is closed too when
    something wrapped it (tool-call rewriting): closing a wrapper does not close what it iterates."""

    def __init__(self, content, **kwargs):
        super().__init__(content, **kwargs)
        self._source = content

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for gen in dict.fromkeys((self.body_iterator, self._source)):
                if hasattr(gen, "aclose"):
                    await gen.aclose()


def raise_if_error(msg: ReplicaMessage, metrics: ServerMetrics) -> None:
    """The replica's error message as the HTTP error the client gets; its stats go to the metrics."""
    if msg.stats is not None:
        metrics.update_replica(msg.replica_id, msg.stats)
    if msg.error_status is None:
        return
    status, text = msg.error_status, msg.error_message or "error"
    if status == 400:
        raise APIError(400, sanitize(text), param=param_of(text))
    if status == 429:
        raise APIError(429, text, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if status in (408, 504):  # past request_timeout_s: aborted in the engine
        raise APIError(status, text, "timeout_error", code="request_timeout")
    raise APIError(status, "the engine is unavailable; retry shortly", "service_unavailable", headers=RETRY)


async def first_message(es: EngineStream, metrics: ServerMetrics) -> Optional[ReplicaMessage]:
    """Reads the first message, so errors become an HTTP status before any byte is sent; closes the stream
    when it raises."""
    try:
        msg = await es.next()
        if msg is not None:
            raise_if_error(msg, metrics)
        return msg
    except APIError:
        es.close()
        raise
    except Exception as e:
        es.close()
        raise APIError(503, f"engine replica unavailable ({type(e).__name__})", "service_unavailable",
                       headers=RETRY) from None
    except BaseException:
        es.close()
        raise


async def run_to_end(es: EngineStream, metrics: ServerMetrics, timing: RequestTiming) -> RequestOutput:
    """The request's final output. A client that hangs up (or whose handler Serve cancels) aborts it, queued
    or running: the stream watches the connection while it waits."""
    try:
        first = await first_message(es, metrics)
        final = first.output if first is not None else None
        timing.token(final)
        while True:
            try:
                msg = await es.next()
            except APIError:
                raise
            except Exception:  # a replica dying mid-request (SIGKILL, OOM) is a 503, not a 500
                raise APIError(503, "engine replica lost", "service_unavailable", headers=RETRY) from None
            if msg is None:
                return final
            raise_if_error(msg, metrics)
            final = msg.output
            timing.token(final)
    finally:
        es.close()


def sse_response(es: EngineStream, first: Optional[ReplicaMessage], call: GenerateCall, rid: str,
                 writer: StreamWriter, model_name: str, metrics: ServerMetrics) -> SSEResponse:
    """The stream as OpenAI's SSE chunks (`first`: its first message, read already)."""
    timing = RequestTiming(metrics)
    created = int(time.time())
    chat, shape = writer.chat, writer.fmt.shape
    obj = "chat.completion.chunk" if chat else "text_completion"
    prompt_ids = list(first.output.prompt_token_ids) if first is not None else list(call.prompt)
    cached = first.output.num_cached_tokens if first is not None else 0

    def chunk(choices, final_usage=None, **extra) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices, **extra}
        if final_usage is not None:
            body["usage"] = final_usage
        elif shape.continuous_usage:  # vLLM's continuous_usage_stats: the counts so far in every chunk
            body["usage"] = usage(len(prompt_ids), writer.completion_tokens(), cached)
        elif shape.include_usage:
            body["usage"] = None  # OpenAI: null in every chunk but the last
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events():
        last, ended = None, False
        try:
            for i, choices in enumerate(writer.opening(call.params.n)):
                extra = {"prompt_token_ids": prompt_ids} if chat and shape.token_ids and i == 0 else {}
                yield chunk(choices, **extra)
            msg = first
            while msg is not None:
                raise_if_error(msg, metrics)
                out = last = msg.output
                timing.token(out)
                choices = writer.step(out)  # each choice's finish_reason goes out once
                if choices:
                    yield chunk(choices)
                if out.finished:
                    break
                msg = await es.next()
            ended = True
            if shape.include_usage and last is not None:
                yield chunk([], usage(len(last.prompt_token_ids), writer.completion_tokens(), last.num_cached_tokens))
            yield "data: [DONE]\n\n"
            timing.done()
        except APIError as e:  # mid-stream failure: report it in-band, then end the stream
            ended = True
            if e.status == 499:
                return  # the client is gone (the request was aborted): nobody to tell
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"  # e.g. request_timeout_s (504): error event, then [DONE]
        except Exception as e:  # the replica died mid-stream: an error event, never a silent cut
            ended = True
            logger.warning("stream %s failed: %s", rid, type(e).__name__)
            err = APIError(503, "the engine replica failed; retry", "service_unavailable")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"  # as OpenAI/vLLM: an error event, then the end of the stream
        finally:
            es.close(client_gone=not ended)  # aborts the request when the client went away mid-stream

    return SSEResponse(events(), media_type="text/event-stream")
