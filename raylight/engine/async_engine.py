"""The engine loop off the asyncio event loop: requests stream out, aborts land within a step.

One thread owns the `LLMEngine` and runs `step()` while there is work. Requests and aborts
cross over through a thread-safe queue drained at the start of every step; outputs come back
to each request's asyncio.Queue via `call_soon_threadsafe`. The event loop never blocks on a
step, so streaming, aborts and health checks stay responsive while the model computes.

Failure modes, each ending a request with a typed error rather than a hang:
- `request_timeout_s`: a request (queued, waiting or running: the whole request, like Ray Serve's
  `request_timeout_s`) that has not finished by its deadline raises `RequestTimeoutError`; its
  engine request is aborted at the next step, which frees its blocks.
- a stalled loop (no step finished for `stall_s` while there is work): `healthy()` declares the
  engine dead, every waiting request gets `EngineDeadError` and new ones are refused.
- a crashed loop: the same, from the engine thread.
- `drain()` (replica shutdown): new requests get `EngineDrainingError`; accepted ones may finish
  within the grace period, then the rest are aborted with `EngineDrainingError`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import AsyncIterator, Optional

from raylight.engine.llm_engine import LLMEngine
from raylight.messages import AbortRequest, AddRequest, OutputSink, PromptType
from raylight.outputs import RequestOutput
from raylight.sampling_params import SamplingParams

logger = logging.getLogger("raylight.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop crashed; the replica must be replaced."""


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_queued_requests` allows."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its `request_timeout_s` deadline; it was aborted in the engine."""


class EngineDrainingError(RuntimeError):
    """The replica is shutting down: it takes no new requests, and aborts those left at the end
    of its grace period."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: Optional[int] = None,
                 request_timeout_s: Optional[float] = None, stall_s: float = 60.0):
        """`request_timeout_s`: deadline of a whole request from its arrival (None: none).
        `stall_s`: a step that has not finished after this long marks the engine dead."""
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.request_timeout_s = request_timeout_s
        self.stall_s = stall_s
        self.draining = False
        # The sinks of requests being streamed, by request id: the event loop's view (the engine
        # thread has its own, `_sinks`), so failures found off the engine thread reach every waiter.
        self._live: dict[str, OutputSink] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[str, OutputSink] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self.dead: Optional[BaseException] = None
        self.last_progress = time.monotonic()  # last step end, or last idle check
        self.last_step_time = 0.0
        self.num_pending = 0  # accepted but not finished (queued, waiting or running)
        # Start-to-start times of consecutive busy steps: the cadence tokens come out at.
        self.step_periods: collections.deque[float] = collections.deque(maxlen=1024)
        self._last_step_start: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="raylight-engine-loop", daemon=True)
        self._thread.start()

    # ---- called on the event loop ----
    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       cache_salt: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Streams this request's outputs. Validation errors raise ValueError before the first
        output; breaking out (or being cancelled) aborts the request."""
        if self.dead is not None:
            raise EngineDeadError(f"engine loop died: {self.dead!r}")
        if self.draining:
            raise EngineDrainingError("the replica is shutting down; retry on another replica")
        if self.max_queued_requests is not None and self.num_queued() >= self.max_queued_requests:
            raise QueueFullError(f"{self.num_queued()} requests are already waiting for a free slot "
                                 f"(max_queued_requests={self.max_queued_requests})")
        timeout = self.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        sink = OutputSink(asyncio.get_running_loop(), asyncio.Queue())
        self.num_pending += 1
        self._live[request_id] = sink
        self._inbox.put(AddRequest(request_id, prompt, params, cache_salt, sink))
        self._wakeup.set()
        finished = False
        try:
            while True:
                if deadline is None:
                    item = await sink.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(sink.queue.get(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise RequestTimeoutError(f"request {request_id} did not finish within "
                                                  f"request_timeout_s={timeout:g}s; it was aborted") from None
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self.num_pending -= 1
            if self._live.get(request_id) is sink:
                del self._live[request_id]
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))
        self._wakeup.set()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    def num_queued(self) -> int:
        """Requests that must wait for a running slot: those not running yet beyond the slots free
        under max_num_seqs (a burst that the next step admits is not a queue). What
        `max_queued_requests` bounds, so capacity is max_num_seqs + max_queued_requests."""
        sched = self.engine.scheduler
        return max(0, self.num_waiting() - max(0, sched.max_num_seqs - len(sched.running)))

    def healthy(self, stall_s: Optional[float] = None) -> bool:
        """False once the loop crashed, exited, or made no progress for `stall_s` (default: the
        engine's). A stall found here marks the engine dead: the requests waiting on it fail with
        EngineDeadError now (the step may never return) and new ones are refused."""
        if self.dead is None and not self._stopped:
            since = time.monotonic() - self.last_progress
            if since >= (self.stall_s if stall_s is None else stall_s):
                self.declare_dead(TimeoutError(f"no engine step finished in {since:.0f}s (stalled)"))
            elif not self._thread.is_alive():
                self.declare_dead(RuntimeError("the engine thread exited"))
        return self.dead is None and self._thread.is_alive()

    def declare_dead(self, cause: BaseException) -> None:
        """Fails every request being streamed with EngineDeadError and refuses new ones; the loop
        stops after the step it is in (if it ever returns). Thread-safe."""
        if self.dead is None:
            logger.error("engine declared dead: %r", cause)
            self.dead = cause
        self._stopped = True
        self._wakeup.set()
        err = EngineDeadError(f"engine loop died: {cause!r}")
        for sink in list(self._live.values()):
            sink.put(err)

    async def drain(self, grace_s: float) -> int:
        """Graceful shutdown: refuses new requests (EngineDrainingError), waits up to `grace_s` for
        the accepted ones to finish, then aborts the rest (their callers get EngineDrainingError and
        their blocks are freed at the next step). Returns how many were aborted."""
        self.draining = True
        end = time.monotonic() + grace_s
        while self._live and time.monotonic() < end and self.dead is None:
            await asyncio.sleep(0.05)
        left = list(self._live.values())
        for sink in left:
            sink.put(EngineDrainingError(f"the replica shut down before this request finished "
                                         f"(grace period {grace_s:g}s); it was aborted"))
        if left:
            await asyncio.sleep(0)  # let the waiters run their aborts
        return len(left)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- the engine thread ----
    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, AddRequest):
                try:
                    self.engine.add_request(item.prompt, item.params, item.request_id, item.cache_salt)
                    self._sinks[item.request_id] = item.sink
                except Exception as e:  # bad input: reaches the caller before any output
                    item.sink.put(e if isinstance(e, ValueError) else ValueError(str(e)))
            else:  # AbortRequest
                self._sinks.pop(item.request_id, None)
                self.engine.abort_request([item.request_id])

    def _deliver(self, outputs) -> None:
        if self.dead is not None:  # declared dead while this step ran: its waiters have their error
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.put(out)
                if out.finished:
                    del self._sinks[out.request_id]

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._last_step_start = None  # idle gaps are not step periods
                    self.last_progress = time.monotonic()
                    self._wakeup.wait(timeout=min(1.0, self.stall_s / 4))  # idle is progress
                    self._wakeup.clear()
                    continue
                t0 = time.perf_counter()
                if self._last_step_start is not None:
                    self.step_periods.append(t0 - self._last_step_start)
                self._last_step_start = t0
                self._deliver(self.engine.step(emit=self._deliver))
                self.last_step_time = time.perf_counter() - t0
                self.last_progress = time.monotonic()
        except BaseException as e:  # the replica is broken: fail every waiter loudly
            logger.exception("engine loop crashed")
            if self.dead is None:
                self.dead = e
            err = EngineDeadError(f"engine loop died: {e!r}")
            for sink in self._sinks.values():
                try:
                    sink.put(err)
                except RuntimeError:  # its event loop is closed: nobody waits there
                    pass
            self._sinks.clear()
