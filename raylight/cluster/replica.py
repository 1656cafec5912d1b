"""The engine-replica deployment: one `LLMEngine` whose step loop runs beside Serve's event loop.

Messages to and from the ingress are typed: `GenerateCall` in, `ReplicaMessage`s out (an
output, or an error with the HTTP status the ingress should answer with).

Each request is guarded (`RequestWatch`): it ends with a typed error, never a hang, and its engine request
is aborted (blocks freed at the next step) when it passes `request_timeout_s` (504), when the engine
loop stalls for `health_stall_s` or dies (503; a stall is sticky: the replica stays unhealthy until
Serve replaces it, and new requests get 503), or when the drain at shutdown ends (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import Any, AsyncIterator, Optional

from raylight.cluster.autoscaling import SLORecorder, new_tokens
from raylight.cluster.kv_index import KVEventLog
from raylight.config import EngineArgs
from raylight.messages import GenerateCall, KVReservation, ReplicaMessage, ReplicaStats
from raylight.outputs import RequestOutput, merge_outputs

logger = logging.getLogger("raylight.replica")
POLL_S = 0.25  # how often the running requests' deadlines, the engine's health and the drain are checked
KV_TICK_S = 0.05  # how often the engine's KV events are moved into the replica's log (when a router pulls)


class RequestWatch:
    """One task per replica checks, every POLL_S, each running request's deadline, the engine's health
    and the drain, and ends the requests that must end: the engine's reader of that request raises the
    error (`AsyncLLMEngine.fail`), which aborts its engine request. (Each request polling on its own cost
    a task and a timer per output and per POLL_S on the event loop, under the engine thread's GIL: 4,096
    wake-ups a second at 1,024 requests.)"""

    def __init__(self, failure, fail):
        """`failure(request_id, deadline, now)`: the exception that must end that request now, or None;
        `fail(request_id, error)`: ends it (AsyncLLMEngine.fail), False when it has no reader yet."""
        self.failure, self.fail = failure, fail
        # Keyed by the call, not the request id: a caller may reuse a running request's id.
        self.deadlines: dict[object, tuple[str, Optional[float]]] = {}
        self.task: Optional[asyncio.Task] = None

    def add(self, key: object, request_id: str, deadline: Optional[float]) -> None:
        self.deadlines[key] = (request_id, deadline)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, key: object) -> None:
        self.deadlines.pop(key, None)

    def check(self) -> None:
        now = time.monotonic()
        for key, (rid, deadline) in list(self.deadlines.items()):
            err = self.failure(rid, deadline, now)
            # A request whose reader has not started yet (its grammar still compiling) is tried again
            # at the next check.
            if err is not None and self.fail(rid, err):
                del self.deadlines[key]

    async def _run(self) -> None:
        while self.deadlines:
            await asyncio.sleep(POLL_S)
            self.check()


class RequestTimeoutError(RuntimeError):
    """The request ran past `request_timeout_s`; its engine request was aborted (504)."""


class ReplicaUnavailableError(RuntimeError):
    """The engine stalled or died, or the replica is shutting down (503)."""


class EngineReplica:
    """Serve deployment class (wrapped by `serve.deployment` in cluster/app.py)."""

    def __init__(self, engine_args: dict[str, Any], max_queued_requests: Optional[int] = None,
                 cpu_threads: Optional[int] = None, placement=None, request_timeout_s: Optional[float] = None,
                 health_stall_s: float = 60.0, max_stream_messages_per_s: Optional[float] = None,
                 gil_switch_interval_s: Optional[float] = None, engine_process: Optional[bool] = None,
                 gc_freeze: bool = False):
        """`placement`: the PlacementPlan this replica's placement group was made from (TP x PP > 1):
        rank 0 (this actor's engine, on its thread or in its process) starts the other ranks as Ray actors
        in their bundles.
        `request_timeout_s`, `health_stall_s`: see AppConfig; `max_stream_messages_per_s`,
        `gil_switch_interval_s`: see PoolConfig (the interval is this process's: the actor is the replica's own).
        `engine_process`: the engine in a process of its own (engine/engine_process.py) instead of a thread
        of this one; None: on a GPU. With `placement` that process starts the other ranks' Ray actors.
        `gc_freeze`: once started, this process's (and the engine process's) start-up objects leave the garbage
        collector's walks (utils/gc_heap.py)."""
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPU count (1 by default); use what we were given.
        threads = max(1, cpu_threads or int(float(os.environ.get("OMP_NUM_THREADS", "0") or 0)) or os.cpu_count())
        if gil_switch_interval_s is not None:
            sys.setswitchinterval(gil_switch_interval_s)
        self.replica_id = _replica_id()
        args = EngineArgs(**engine_args)
        if engine_process is None:
            from raylight.engine.llm_engine import resolve_device

            engine_process = resolve_device(args.device).type == "cuda"
        self.engine = None  # the LLMEngine, when it runs in this process (a thread beside the event loop)
        if engine_process:
            from raylight.engine.engine_process import EngineProcessClient

            if placement is not None:  # the engine process is no Ray worker: it gets our group by its id
                import dataclasses

                from raylight.placement import current_placement_group

                placement = dataclasses.replace(placement, group_id=current_placement_group().id.hex())

            self.async_engine = EngineProcessClient(args.model_dump(exclude_none=True), max_queued_requests,
                                                    max_stream_messages_per_s, threads, placement, gc_freeze)
        else:
            from raylight.engine.async_engine import AsyncLLMEngine
            from raylight.engine.llm_engine import LLMEngine

            torch.set_num_threads(threads)
            self.engine = LLMEngine(args, placement=placement)
            self.async_engine = AsyncLLMEngine(self.engine, max_queued_requests, max_stream_messages_per_s)
        self.watch = RequestWatch(self._failure, self.async_engine.fail)
        self.request_timeout_s, self.health_stall_s = request_timeout_s, health_stall_s
        self.stalled: Optional[str] = None  # why the engine was declared unusable (sticky)
        self.drain_end: Optional[float] = None  # set by drain_and_stop: no new requests; leftovers end then
        self.drain_expired = False  # set by drain_and_stop once it has counted the leftovers: guards end them
        # KV-aware routing (cluster/kv_router.py): the engine's KV events, numbered for routers that pull them.
        self.kv_log = KVEventLog() if self.async_engine.kv_events_enabled else None
        self._kv_ticker: Optional[asyncio.Task] = None
        if self.kv_log is not None:
            _quiet_kv_pulls()
        self.slo = SLORecorder()  # TTFT/ITL for SLO autoscaling (cluster/autoscaling.py)
        logger.info("replica %s ready (%d torch threads, engine %s)", self.replica_id, threads,
                    "in its own process" if engine_process else "on a thread of the replica's")
        if gc_freeze:
            from raylight.utils.gc_heap import freeze_heap

            freeze_heap("engine replica")

    async def generate(self, call: GenerateCall) -> AsyncIterator[ReplicaMessage]:
        async with contextlib.aclosing(self._generate(call)) as msgs:  # closing this closes that: abort
            async for msg in msgs:
                yield msg

    async def _generate(self, call: GenerateCall, **engine_kwargs) -> AsyncIterator[ReplicaMessage]:
        """`generate`, with keyword arguments for the engine's generate (the disaggregated roles in
        cluster/roles.py pass `remote_prefill_threshold` or `kv_push`)."""
        from raylight.engine.async_engine import EngineDeadError, QueueFullError

        watch_key = object()  # this call's entry in the RequestWatch
        try:
            if self.drain_end is not None:
                raise ReplicaUnavailableError("the replica is shutting down; retry on another replica")
            if not self.engine_ok():
                raise ReplicaUnavailableError(f"engine unusable: {self.stalled}")
            deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
            agen = self.async_engine.generate(call.prompt, call.params, call.request_id, call.cache_salt,
                                              **engine_kwargs)
            clock = self.slo.request()
            held, sent_output = None, False  # a non-streaming call's outputs between its first and its last
            self.watch.add(watch_key, call.request_id, deadline)
            async with contextlib.aclosing(agen) as outs:
                async for out in outs:  # a caller that goes away closes the generator: the request aborts
                    clock.tokens(new_tokens(out))
                    if isinstance(out, RequestOutput):
                        if not call.stream and sent_output and not out.finished:
                            held = out if held is None else merge_outputs(held, out)
                            continue  # each message costs the replica CPU beside the engine: only what is read
                        if held is not None:
                            out, held = merge_outputs(held, out), None
                        sent_output = True
                    yield self._message(out)
        except ValueError as e:
            yield self._error(400, str(e))
        except QueueFullError as e:
            yield self._error(429, str(e))
        except RequestTimeoutError as e:  # the engine request is aborted already
            yield self._error(504, str(e))
        except (EngineDeadError, ReplicaUnavailableError) as e:
            yield self._error(503, str(e))
        finally:
            self.watch.discard(watch_key)

    def _failure(self, request_id: str, deadline: Optional[float], now: float) -> Optional[Exception]:
        """Why this request, with this deadline, must end now (RequestWatch), or None."""
        if deadline is not None and now >= deadline:
            return RequestTimeoutError(f"request {request_id} did not finish within request_timeout_s="
                                       f"{self.request_timeout_s:g}s; it was aborted")
        if self.drain_expired:
            return ReplicaUnavailableError("the replica shut down before this request finished; aborted")
        if not self.engine_ok():
            return ReplicaUnavailableError(f"engine unusable: {self.stalled}")
        return None

    def engine_ok(self) -> bool:
        """False once the engine loop died or made no progress for `health_stall_s` while it had
        work; then for good (the step may never return): Serve's check_health replaces the replica."""
        eng = self.async_engine
        if self.stalled is None and not eng.healthy(self.health_stall_s):
            since = time.monotonic() - eng.last_progress
            self.stalled = f"engine loop died: {eng.dead!r}" if eng.dead is not None else (
                f"no engine step finished in {since:.0f}s (stalled)")
            logger.error("replica %s unhealthy: %s", self.replica_id, self.stalled)
        return self.stalled is None

    def _message(self, out) -> ReplicaMessage:
        if isinstance(out, KVReservation):  # a disaggregated decode request's first item, for the router
            return ReplicaMessage(reservation=out, replica_id=self.replica_id)
        msg = ReplicaMessage(output=out, replica_id=self.replica_id)
        if out.finished:
            msg.stats = self._metrics()
        return msg

    def _error(self, status: int, message: str) -> ReplicaMessage:
        return ReplicaMessage(error_status=status, error_message=message, stats=self._metrics(),
                              replica_id=self.replica_id)

    def _metrics(self) -> dict[str, Any]:
        return self.async_engine.metrics()

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(self.replica_id, self._metrics(), self.async_engine.last_step_time, self.engine_ok())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this while the pool autoscales (every look_back_period_s / 5 s): TTFT and ITL bucket
        counts since the previous call, waiting and running requests, KV usage (cluster/autoscaling.py)."""
        load = self.async_engine.load()
        return self.slo.take(max(0, self.async_engine.num_pending - load.num_running), load.num_running,
                             load.kv_cache_usage)

    # ---- KV-aware routing (cluster/kv_router.py) ----
    def _load(self) -> dict[str, Any]:
        load = self.async_engine.load()
        return {"num_running": load.num_running, "num_waiting": self.async_engine.num_waiting(),
                "kv_blocks_free": load.kv_blocks_free, "kv_blocks_total": load.kv_blocks_total, "t": time.time()}

    def _kv_drain(self) -> None:
        """Moves the engine's new KV events into the log, stamped now."""
        events = self.async_engine.take_kv_events()
        if events:
            self.kv_log.add(events)

    async def _kv_tick(self) -> None:
        """Drains every KV_TICK_S, so an event's stamp (the event lag's start) is at most that late."""
        while True:
            self._kv_drain()
            await asyncio.sleep(KV_TICK_S)

    async def kv_events(self, epoch: str = "", seq: int = -1) -> dict[str, Any]:
        """What a router with cursor (`epoch`, `seq`) has not seen (kv_index.KVEventLog.since), and the load."""
        if self.kv_log is None:
            return {}
        if self._kv_ticker is None or self._kv_ticker.done():
            self._kv_ticker = asyncio.ensure_future(self._kv_tick())
        self._kv_drain()
        return {**self.kv_log.since(str(epoch), int(seq)), **self._load()}

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's controller asks this every `request_routing_stats_period_s` and passes it to every router
        of the deployment: the load and how far the KV event log is. Empty without KV events (the default
        router reads none of it, and an unchanging answer makes Serve broadcast nothing)."""
        if self.kv_log is None:
            return {}
        self._kv_drain()
        return {**self._load(), "epoch": self.kv_log.epoch, "seq": self.kv_log.seq}

    async def health(self) -> bool:
        return self.engine_ok() and self.drain_end is None

    def check_health(self) -> None:
        """Serve's health probe: a dead or stalled engine loop, or a dead rank of a tensor/pipeline
        parallel replica (even an idle one), gets this replica replaced."""
        if not self.engine_ok():
            raise RuntimeError(f"engine loop unhealthy: {self.stalled}")
        self.async_engine.check_ranks()

    def __del__(self):
        """Serve's graceful shutdown (serve shutdown/SIGTERM, a rolling upgrade, scale-down) calls this
        on the replica's event loop after it stopped routing here and let the running requests finish
        for up to the deployment's `graceful_shutdown_timeout_s` (AppConfig): it returns the coroutine
        `drain_and_stop()`, which Serve awaits. Called by the garbage collector (no running loop), it
        stops the engine at once."""
        if getattr(self, "async_engine", None) is None:
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._stop()
            return None
        return self.drain_and_stop()

    async def drain_and_stop(self, grace_s: float = 0.0) -> int:
        """Requests still arriving get 503; those still running after `grace_s` are aborted with a 503
        (an error event, not a severed stream), their blocks freed; then the engine stops. Returns how
        many were aborted."""
        self.drain_end = time.monotonic() + grace_s
        while self.async_engine.num_pending and time.monotonic() < self.drain_end:
            await asyncio.sleep(0.05)
        aborted = self.async_engine.num_pending
        self.drain_expired = True  # only now: a guard ending its request first would hide it from the count
        while (self.async_engine.num_pending or self.async_engine.has_unfinished()) and \
                time.monotonic() < self.drain_end + 2 * POLL_S + 1:
            await asyncio.sleep(0.05)  # the guards end them within a poll; the engine aborts them at its next step
        if aborted:
            logger.warning("replica %s aborted %d requests at shutdown", self.replica_id, aborted)
        self._stop()
        return aborted

    def _stop(self) -> None:
        ticker = getattr(self, "_kv_ticker", None)
        if ticker is not None:
            ticker.cancel()
        self.async_engine.close()


def _quiet_kv_pulls() -> None:
    """Serve writes an access-log line per call; the routers' KV-event pulls (several a second while busy)
    would drown the requests' lines, so their successful ones are left out (failures still show)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(getattr(f, "raylight_kv_pulls", False) for f in serve_logger.filters):
        def keep(record: logging.LogRecord) -> bool:
            return not (getattr(record, "serve_access_log", False) and " kv_events OK " in f" {record.msg} ")

        keep.raylight_kv_pulls = True
        serve_logger.addFilter(keep)


def _replica_id() -> str:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return str(getattr(ctx, "replica_tag", None) or getattr(ctx, "replica_id", "replica"))
    except Exception:
        return f"local-{os.getpid()}"
