"""The event loop's side of a serving engine: requests stream out, aborts land within a step.

`EngineClient` is what a replica talks to: `generate` streams one request's outputs into an
asyncio.Queue, `abort`/`fail` end one, and `metrics()`/`load()`/`take_kv_events()` read the engine's
state without ever blocking the event loop on a step. The step loop itself (engine/engine_loop.py)
runs elsewhere, and the two subclasses differ only in where:

* `AsyncLLMEngine`: on a thread of this process, beside the event loop (the engine in this process;
  offline tools, tests, and tensor/pipeline-parallel replicas, whose other ranks are this
  process's Ray actors);
* `EngineProcessClient` (engine/engine_process.py): in a process of its own, with its own GIL, so the
  serving process's event loop (HTTP, Serve's streaming) never slows a step and a step never delays
  a stream.

Commands (`AddRequest`, `AbortRequest`, `RemotePrefillFailed`) go to the loop in order; each request's
outputs come back to its `OutputSink` through a ticket (a number per `generate` call), so outputs of an
aborted request never reach a later request that reuses its id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Optional

from raylight.engine.engine_loop import EngineLoop
from raylight.engine.llm_engine import LLMEngine
from raylight.messages import (AbortRequest, AddRequest, EngineState, KVPushTarget, KVReservation, OutputSink,
                               PromptType, RemotePrefillFailed)
from raylight.outputs import RequestOutput, merge_outputs
from raylight.sampling_params import SamplingParams

logger = logging.getLogger("raylight.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop crashed; the replica must be replaced."""


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_queued_requests` allows."""


class EngineClient:
    """The event loop's side of an engine loop (module docstring). Subclasses carry the commands
    (`_send`) and answer for the engine's state; `_deliver` is called with the loop's outputs (on
    another thread: the engine thread's, or the reader of the engine process's pipe)."""

    def __init__(self, max_queued_requests: Optional[int], max_num_seqs: int):
        self.max_queued_requests = max_queued_requests
        self.max_num_seqs = max_num_seqs
        self._readers: dict[str, OutputSink] = {}  # the event loop's: every request with a reader
        self._tickets: dict[int, OutputSink] = {}  # a generate call's ticket -> its reader (read by `_deliver`)
        self._ticket_ids = itertools.count()
        # Requests sent that the loop has not taken yet (request id -> ticket), less those aborted
        # meanwhile: a burst of requests whose clients left at once stops counting as waiting at once.
        self._unadmitted: dict[str, int] = {}
        self.dead: Optional[BaseException] = None
        self.num_pending = 0  # accepted but not finished (queued, waiting or running)

    # ---- what a subclass provides ----
    def _send(self, cmd: Any) -> None:
        raise NotImplementedError

    def num_running(self) -> int:
        raise NotImplementedError

    def _num_waiting_in_loop(self) -> int:
        """Requests the loop took that wait for a slot (or for their grammar)."""
        raise NotImplementedError

    def _forget(self, ticket: int) -> None:
        """A generate call ended: whatever the transport kept for its ticket can go."""

    # ---- called on the event loop ----
    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       cache_salt: Optional[str] = None, remote_prefill_threshold: Optional[int] = None,
                       kv_push: Optional[KVPushTarget] = None) -> AsyncIterator[RequestOutput]:
        """Streams this request's outputs. Validation errors (a structured-output spec that does not
        compile included) raise ValueError before the first output; breaking out (or being cancelled)
        aborts the request.

        Disaggregated serving: with `remote_prefill_threshold` (decode role) the first item is the
        request's `KVReservation`; with `kv_push` (prefill role) the prompt's KV is pushed there."""
        if self.dead is not None:
            raise EngineDeadError(f"engine loop died: {self.dead!r}")
        # Capacity is max_num_seqs running + max_queued_requests waiting: a burst the next step admits is no queue.
        queued = self.num_waiting() - max(0, self.max_num_seqs - self.num_running())
        if self.max_queued_requests is not None and queued >= self.max_queued_requests:
            raise QueueFullError(f"{queued} requests are already waiting for a free slot "
                                 f"(max_queued_requests={self.max_queued_requests})")
        if request_id in self._readers:  # (the engine would refuse it too, after it took the reader's place)
            raise ValueError(f"request_id {request_id!r} is already in use")
        sink = OutputSink(asyncio.get_running_loop(), asyncio.Queue())
        ticket = next(self._ticket_ids)
        self._readers[request_id] = sink
        self._tickets[ticket] = sink
        self.num_pending += 1
        self._unadmitted[request_id] = ticket
        self._send(AddRequest(request_id, prompt, params, cache_salt, ticket, remote_prefill_threshold, kv_push))
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
            self._tickets.pop(ticket, None)
            self._forget(ticket)
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
        self._unadmitted.pop(request_id, None)
        self._send(AbortRequest(request_id))

    def remote_prefill_failed(self, transfer_id: int, reason: str) -> None:
        """Decode role: the prefill side of this transfer failed; the request is prefilled here."""
        self._send(RemotePrefillFailed(transfer_id, reason))

    def num_waiting(self) -> int:
        return self._num_waiting_in_loop() + len(self._unadmitted)

    # ---- called where the loop's outputs arrive ----
    def _taken(self, ticket: int) -> None:
        """The loop took the AddRequest with this ticket (and every earlier one: commands keep their order)."""
        while self._unadmitted:
            try:
                rid = next(iter(self._unadmitted))
                if self._unadmitted[rid] > ticket:
                    return
                self._unadmitted.pop(rid, None)
            except (KeyError, RuntimeError, StopIteration):  # the event loop removed one meanwhile: look again
                continue

    def _deliver(self, items: list[tuple[int, Any]]) -> None:
        """A step's outputs, by ticket, to their readers (one wake-up per event loop); outputs of a
        request whose reader left are dropped."""
        batch = []
        for ticket, item in items:
            sink = self._tickets.get(ticket)
            if sink is not None:
                batch.append((sink, item))
        if batch:
            OutputSink.put_each(batch)

    def _fail_readers(self, error: BaseException) -> None:
        """The loop is gone: every reader raises `error` (their requests' outputs stop here)."""
        for sink in list(self._tickets.values()):
            sink.put(error)


class AsyncLLMEngine(EngineClient):
    """The engine loop on a thread of this process (module docstring)."""

    def __init__(self, engine: LLMEngine, max_queued_requests: Optional[int] = None,
                 max_stream_messages_per_s: Optional[float] = None):
        """`max_stream_messages_per_s`: the budget of output messages to all readers together (see
        `EngineLoop._pace_streams`); None: an output for every request at every step."""
        super().__init__(max_queued_requests, engine.scheduler.max_num_seqs)
        self.engine = engine
        self.kv_events_enabled = bool(engine.args.enable_kv_events)
        self._inbox: queue.Queue = queue.Queue()
        self._wakeup = threading.Event()
        self._stopped = False
        self.loop = EngineLoop(engine, self._deliver, max_stream_messages_per_s, wake=self._wakeup.set)
        self._thread = threading.Thread(target=self._run, name="raylight-engine-loop", daemon=True)
        self._thread.start()

    def _send(self, cmd: Any) -> None:
        self._inbox.put(cmd)
        self._wakeup.set()

    # ---- the engine's state, read on the event loop (counters the engine thread updates) ----
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def _num_waiting_in_loop(self) -> int:
        return len(self.engine.scheduler.waiting) + self.loop.num_compiling

    @property
    def last_progress(self) -> float:
        return self.loop.last_progress

    @property
    def last_step_time(self) -> float:
        return self.loop.last_step_time

    def metrics(self) -> dict[str, Any]:
        return self.loop.metrics()

    def load(self) -> EngineState:
        return self.loop.state()

    def take_kv_events(self) -> list:
        """The engine's new KV events. The engine thread appends to the pool's list while we read;
        taking a counted head with one `del` (atomic under the GIL) loses none."""
        events = getattr(getattr(self.engine.kv, "pool", None), "events", None)
        if events is None:
            return self.engine.take_kv_events()
        n = len(events)
        head = events[:n]
        del events[:n]
        return head

    def check_ranks(self) -> None:
        """Raises if a rank of a tensor/pipeline-parallel engine has died."""
        self.engine.executor.check()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def healthy(self, stall_s: float = 60.0) -> bool:
        return self.dead is None and self._thread.is_alive() and time.monotonic() - self.loop.last_progress < stall_s

    def shutdown(self) -> None:
        """Stops the loop (the engine stays: see `close`)."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def close(self) -> None:
        """Stops the loop and the engine (its other ranks)."""
        self.shutdown()
        self.engine.shutdown()

    # ---- the engine thread ----
    def _receive(self, timeout: float) -> list[Any]:
        if timeout > 0 and self._inbox.empty():
            self._wakeup.wait(timeout)
        self._wakeup.clear()
        cmds = []
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        tickets = [cmd.ticket for cmd in cmds if isinstance(cmd, AddRequest)]
        if tickets:
            self._taken(tickets[-1])
        return cmds

    def _run(self) -> None:
        try:
            self.loop.run(self._receive, lambda: self._stopped)
        except BaseException as e:  # the replica is broken: fail every waiter loudly
            logger.exception("engine loop crashed")
            self.dead = e
            self._fail_readers(EngineDeadError(f"engine loop died: {e!r}"))
