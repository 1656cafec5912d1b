"""The engine loop off the asyncio event loop: requests stream out, aborts land within a step.

One thread owns the `LLMEngine` and runs `step()` while there is work. Requests and aborts
cross over through a thread-safe queue drained at the start of every step; outputs come back
to each request's asyncio.Queue via `call_soon_threadsafe`. The event loop never blocks on a
step, so streaming, aborts and health checks stay responsive while the model computes.
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
from raylight.messages import (AbortRequest, AddRequest, KVPushTarget, KVReservation, OutputSink, PromptType,
                               RemotePrefillFailed)
from raylight.outputs import RequestOutput, merge_outputs
from raylight.sampling_params import SamplingParams

logger = logging.getLogger("raylight.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop crashed; the replica must be replaced."""


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_queued_requests` allows."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: Optional[int] = None,
                 max_stream_messages_per_s: Optional[float] = None):
        """`max_stream_messages_per_s`: the budget of output messages to all readers together (see
        `_pace_streams`); None: an output for every request at every step."""
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.max_stream_messages_per_s = max_stream_messages_per_s
        self._inbox: queue.Queue = queue.Queue()
        # Requests in the inbox that the engine thread has not taken yet, less those aborted meanwhile:
        # a burst of requests whose clients left at once stops counting as waiting at once, not at the
        # next drain. (set.add/discard from the two threads are atomic under the GIL.)
        self._unadmitted: set[str] = set()
        self._sinks: dict[str, OutputSink] = {}  # the engine thread's: admitted requests' sinks
        self._readers: dict[str, OutputSink] = {}  # the event loop's: every request with a reader
        self._wakeup = threading.Event()
        self._stopped = False
        self.dead: Optional[BaseException] = None
        self.last_progress = time.monotonic()  # last step end, or last idle check
        self.last_step_time = 0.0
        self.idle_seconds_total = 0.0  # waiting for work (a served run's gaps between bursts)
        self.num_pending = 0  # accepted but not finished (queued, waiting or running)
        # Start-to-start times of consecutive busy steps: the cadence tokens come out at.
        self.step_periods: collections.deque[float] = collections.deque(maxlen=1024)
        self._last_step_start: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="raylight-engine-loop", daemon=True)
        self._thread.start()

    # ---- called on the event loop ----
    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       cache_salt: Optional[str] = None, remote_prefill_threshold: Optional[int] = None,
                       kv_push: Optional[KVPushTarget] = None) -> AsyncIterator[RequestOutput]:
        """Streams this request's outputs. Validation errors raise ValueError before the first
        output; breaking out (or being cancelled) aborts the request.

        Disaggregated serving: with `remote_prefill_threshold` (decode role) the first item is the
        request's `KVReservation`; with `kv_push` (prefill role) the prompt's KV is pushed there."""
        if self.dead is not None:
            raise EngineDeadError(f"engine loop died: {self.dead!r}")
        # Capacity is max_num_seqs running + max_queued_requests waiting: a burst the next step admits is no queue.
        queued = self.num_waiting() - max(0, self.engine.scheduler.max_num_seqs - len(self.engine.scheduler.running))
        if self.max_queued_requests is not None and queued >= self.max_queued_requests:
            raise QueueFullError(f"{queued} requests are already waiting for a free slot "
                                 f"(max_queued_requests={self.max_queued_requests})")
        grammar = None
        if params.structured_outputs is not None:  # compiled off the step loop, within its time cap (ValueError: 400)
            grammar = await self.engine.grammars.compile_async(params.structured_outputs)
        if request_id in self._readers:  # (the engine would refuse it too, after it took the reader's place)
            raise ValueError(f"request_id {request_id!r} is already in use")
        sink = OutputSink(asyncio.get_running_loop(), asyncio.Queue())
        self._readers[request_id] = sink
        self.num_pending += 1
        self._unadmitted.add(request_id)
        self._inbox.put(AddRequest(request_id, prompt, params, cache_salt, sink, remote_prefill_threshold, kv_push,
                                   grammar))
        self._wakeup.set()
        finished = False
        held = None  # read while merging, not yet delivered
        try:
            while True:
                item, held = (held if held is not None else await sink.queue.get()), None
                if isinstance(item, BaseException):
                    raise item
                # Outputs that piled up while our reader was busy go out as one (deltas joined): a reader
                # that falls behind (a loaded replica, a slow client) gets fewer, larger messages.
                while isinstance(item, RequestOutput) and not item.finished and not sink.queue.empty():
                    nxt = sink.queue.get_nowait()
                    if not isinstance(nxt, RequestOutput):
                        held = nxt
                        break
                    item = merge_outputs(item, nxt)
                yield item
                if not isinstance(item, KVReservation) and item.finished:
                    finished = True
                    return
        finally:
            self.num_pending -= 1
            self._readers.pop(request_id, None)  # (ids are unique among readers: checked above)
            if not finished:
                self.abort(request_id)

    def fail(self, request_id: str, error: BaseException) -> bool:
        """Ends a request from the event loop (a deadline passed, the replica drains): its reader raises
        `error` after the outputs queued, aborting it. False when it has no reader (yet)."""
        sink = self._readers.get(request_id)
        if sink is not None:
            sink.put(error)
        return sink is not None

    def abort(self, request_id: str) -> None:
        self._unadmitted.discard(request_id)
        self._inbox.put(AbortRequest(request_id))
        self._wakeup.set()

    def remote_prefill_failed(self, transfer_id: int, reason: str) -> None:
        """Decode role: the prefill side of this transfer failed; the request is prefilled here."""
        self._inbox.put(RemotePrefillFailed(transfer_id, reason))
        self._wakeup.set()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._unadmitted)

    def healthy(self, stall_s: float = 60.0) -> bool:
        return self.dead is None and self._thread.is_alive() and time.monotonic() - self.last_progress < stall_s

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
                self._unadmitted.discard(item.request_id)
                try:
                    if item.remote_prefill_threshold is not None:
                        item.sink.put(self.engine.reserve_remote(item.prompt, item.params, item.request_id,
                                                                 item.cache_salt, item.remote_prefill_threshold,
                                                                 grammar=item.grammar))
                    else:
                        self.engine.add_request(item.prompt, item.params, item.request_id, item.cache_salt,
                                                kv_push=item.kv_push, grammar=item.grammar)
                    self._sinks[item.request_id] = item.sink
                except Exception as e:  # bad input: reaches the caller before any output
                    item.sink.put(e if isinstance(e, ValueError) else ValueError(str(e)))
            elif isinstance(item, RemotePrefillFailed):
                self.engine.remote_prefill_failed(item.transfer_id, item.reason)
            else:  # AbortRequest
                self._sinks.pop(item.request_id, None)
                self.engine.abort_request([item.request_id])

    def _pace_streams(self) -> None:
        """Every streamed output costs this process a message: an event-loop wake-up, a generator step
        and, on Ray Serve, a streamed object (0.25-0.6 ms of CPU each on our CPU), beside the engine
        thread and under the same GIL. At 256 streams and a step every few milliseconds the messages,
        not the model, would set the pace; so past the budget each running request (waiting ones send
        nothing) gets an output at most every `running / budget` seconds, carrying every token since its
        last (first and last outputs are never held back). Below it (few streams, slow steps) all go."""
        budget, n = self.max_stream_messages_per_s, len(self.engine.scheduler.running)
        period = self.step_periods[-1] if self.step_periods else 0.0
        slow_enough = not budget or period <= 0 or n / period <= budget
        self.engine.outputs.min_interval_s = 0.0 if slow_enough else n / budget

    def _deliver(self, outputs) -> None:
        items = []
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                items.append((sink, out))
                if out.finished:
                    del self._sinks[out.request_id]
        if items:
            OutputSink.put_each(items)

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._last_step_start = None  # idle gaps are not step periods
                    self.last_progress = idle_from = time.monotonic()
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    self.idle_seconds_total += time.monotonic() - idle_from
                    continue
                t0 = time.perf_counter()
                if self._last_step_start is not None:
                    self.step_periods.append(t0 - self._last_step_start)
                self._last_step_start = t0
                self._pace_streams()
                self._deliver(self.engine.step(emit=self._deliver))
                self.last_step_time = time.perf_counter() - t0
                self.last_progress = time.monotonic()
        except BaseException as e:  # the replica is broken: fail every waiter loudly
            logger.exception("engine loop crashed")
            self.dead = e
            err = EngineDeadError(f"engine loop died: {e!r}")
            for sink in self._sinks.values():
                sink.put(err)
            self._sinks.clear()
