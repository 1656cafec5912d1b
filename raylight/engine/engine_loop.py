"""The serving step loop: one owner of an `LLMEngine` that takes commands, steps while there is work,
and hands every output to whoever asked for it.

It runs wherever the engine lives: on a thread of the replica's process (`AsyncLLMEngine`) or as the
main loop of the engine's own process (engine/engine_process.py). Both give it the same two things: a
`receive(timeout)` that returns the commands that arrived (waiting up to `timeout` for the first), and
a `deliver(items)` that takes a step's `(target, item)` pairs: `target` is the ticket the
`AddRequest` carried, `item` a `RequestOutput`, a `KVReservation` or the
`ValueError` that refuses a request.

Structured-output grammars compile here, off the step: a request whose grammar is still compiling
waits beside the loop (it is not admitted, so it holds no KV) and is admitted, or refused within the
compile time cap, at a later turn; the loop keeps stepping the others meanwhile.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from typing import Any, Callable, Iterable, Optional

from raylight.engine.llm_engine import LLMEngine
from raylight.messages import AbortRequest, AddRequest, EngineState, RemotePrefillFailed

logger = logging.getLogger("raylight.engine_loop")

IDLE_WAIT_S = 1.0  # an idle loop still turns this often (health: `last_progress`)
COMPILE_POLL_S = 0.005  # how often an otherwise idle loop looks at a compiling grammar (a process has no wake-up)


class EngineLoop:
    def __init__(self, engine: LLMEngine, deliver: Callable[[list[tuple[Any, Any]]], None],
                 max_stream_messages_per_s: Optional[float] = None, wake: Optional[Callable[[], None]] = None,
                 scheduled: Optional[Callable[[], None]] = None):
        """`wake`: makes a waiting `receive` return (a finished compile calls it); None: polled.
        `scheduled`: called within each step once it is scheduled, before it runs (LLMEngine.step)."""
        self.engine = engine
        self.deliver = deliver
        self.max_stream_messages_per_s = max_stream_messages_per_s
        self.wake = wake
        self.scheduled = scheduled
        self._targets: dict[str, Any] = {}  # admitted requests -> where their outputs go
        # Requests whose grammar compiles: request_id -> (command, future, submission time); the time cap
        # counts from the later of submission and the vocabulary being ready (GrammarCompileService.deadline)
        self._compiling: dict[str, tuple[AddRequest, concurrent.futures.Future, float]] = {}
        self.last_progress = time.monotonic()  # last step end, or last idle turn
        self.last_step_time = 0.0
        self.idle_seconds_total = 0.0  # waiting for work (a served run's gaps between bursts)
        # Start-to-start times of consecutive busy steps: the cadence tokens come out at.
        self.step_periods: collections.deque[float] = collections.deque(maxlen=1024)
        self._last_step_start: Optional[float] = None

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def run(self, receive: Callable[[float], Iterable[Any]], stopped: Callable[[], bool],
            after_turn: Optional[Callable[[], None]] = None) -> None:
        """Turns until `stopped()`; an exception out of the engine ends it (the caller fails everyone)."""
        engine = self.engine
        while not stopped():
            if engine.has_unfinished_requests():
                commands = receive(0.0)
            else:
                self._last_step_start = None  # idle gaps are not step periods
                self.last_progress = idle_from = time.monotonic()
                commands = receive(self._idle_wait())
                self.idle_seconds_total += time.monotonic() - idle_from
            for cmd in commands:
                self.handle(cmd)
            if self._compiling:
                self._admit_compiled()
            if engine.has_unfinished_requests():
                self._step()
            if after_turn is not None:
                after_turn()

    def _idle_wait(self) -> float:
        """How long an idle turn may wait: until the next compile's time cap, when grammars compile."""
        if not self._compiling:
            return IDLE_WAIT_S
        if self.wake is None:
            return COMPILE_POLL_S
        deadlines = [self.engine.grammars.deadline(c[2]) for c in self._compiling.values()]
        if None in deadlines:  # the vocabulary is being built: its caps start once it is ready
            return COMPILE_POLL_S
        return min(IDLE_WAIT_S, max(0.0, min(deadlines) - time.monotonic()) + 0.001)

    def _step(self) -> None:
        t0 = time.perf_counter()
        if self._last_step_start is not None:
            self.step_periods.append(t0 - self._last_step_start)
        self._last_step_start = t0
        self._pace_streams()
        self._deliver_outputs(self.engine.step(emit=self._deliver_outputs, scheduled=self.scheduled))
        self.last_step_time = time.perf_counter() - t0
        self.last_progress = time.monotonic()

    # ---- commands ----
    def handle(self, cmd: Any) -> None:
        if isinstance(cmd, AddRequest):
            spec = cmd.params.structured_outputs
            if spec is not None and cmd.grammar is None:
                fut = self.engine.grammars.submit(spec)
                if self.wake is not None:
                    fut.add_done_callback(lambda _: self.wake())
                self._compiling[cmd.request_id] = (cmd, fut, time.monotonic())
            else:
                self._admit(cmd)
        elif isinstance(cmd, RemotePrefillFailed):
            self.engine.remote_prefill_failed(cmd.transfer_id, cmd.reason)
        elif isinstance(cmd, AbortRequest):
            compiling = self._compiling.pop(cmd.request_id, None)
            if compiling is not None:
                compiling[1].cancel()  # queued: never runs; running: finishes in its thread, result dropped
            self._targets.pop(cmd.request_id, None)
            self.engine.abort_request([cmd.request_id])
        else:
            raise TypeError(f"not an engine command: {type(cmd).__name__}")

    def _admit(self, cmd: AddRequest) -> None:
        eng = self.engine
        try:
            if cmd.remote_prefill_threshold is not None:
                first = eng.reserve_remote(cmd.prompt, cmd.params, cmd.request_id, cmd.cache_salt,
                                           cmd.remote_prefill_threshold, grammar=cmd.grammar)
                self.deliver([(cmd.ticket, first)])
            else:
                eng.add_request(cmd.prompt, cmd.params, cmd.request_id, cmd.cache_salt, kv_push=cmd.kv_push,
                                grammar=cmd.grammar)
            self._targets[cmd.request_id] = cmd.ticket
        except Exception as e:  # bad input: reaches the caller before any output
            self.deliver([(cmd.ticket, e if isinstance(e, ValueError) else ValueError(str(e)))])

    def _admit_compiled(self) -> None:
        now = time.monotonic()
        for rid, (cmd, fut, submitted) in list(self._compiling.items()):
            give_up = self.engine.grammars.deadline(submitted)
            if fut.done():
                del self._compiling[rid]
                try:
                    cmd.grammar = fut.result()
                except Exception as e:  # a bad spec: ValueError with the reason
                    self.deliver([(cmd.ticket, e if isinstance(e, ValueError) else ValueError(str(e)))])
                    continue
                self._admit(cmd)
            elif give_up is not None and now >= give_up:
                del self._compiling[rid]
                fut.cancel()
                self.deliver([(cmd.ticket, self.engine.grammars.timed_out(cmd.params.structured_outputs))])

    # ---- outputs ----
    def _pace_streams(self) -> None:
        """Every streamed output costs the serving process a message: an event-loop wake-up, a generator
        step and, on Ray Serve, a streamed object (0.25-0.6 ms of CPU each on our CPU). At 256 streams
        and a step every few milliseconds the messages, not the model, would set the pace; so past the
        budget each running request (waiting ones send nothing) gets an output at most every
        `running / budget` seconds, carrying every token since its last (first and last outputs are
        never held back). Below it (few streams, slow steps) all go."""
        budget, n = self.max_stream_messages_per_s, len(self.engine.scheduler.running)
        period = self.step_periods[-1] if self.step_periods else 0.0
        slow_enough = not budget or period <= 0 or n / period <= budget
        self.engine.outputs.min_interval_s = 0.0 if slow_enough else n / budget

    def _deliver_outputs(self, outputs) -> None:
        items = []
        for out in outputs:
            target = self._targets.get(out.request_id)
            if target is not None:
                items.append((target, out))
                if out.finished:
                    del self._targets[out.request_id]
        if items:
            self.deliver(items)

    # ---- what the client reads ----
    def state(self) -> EngineState:
        """The engine's gauges now (requests compiling a grammar count as waiting)."""
        eng = self.engine
        kv, sched = eng.kv, eng.scheduler
        return EngineState(len(sched.running), len(sched.waiting) + len(self._compiling), kv.num_free_blocks,
                           kv.num_blocks, kv.usage(), self.last_step_time, eng.has_unfinished_requests())

    def metrics(self) -> dict[str, Any]:
        """The engine's metrics with the loop's own: the median step period and the idle time."""
        m = self.engine.get_metrics()
        periods = sorted(self.step_periods)
        m["step_period_p50_s"] = periods[len(periods) // 2] if periods else 0.0
        m["idle_seconds_total"] = self.idle_seconds_total
        return m
