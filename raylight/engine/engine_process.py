"""The engine in a process of its own, beside the serving process that started it.

Why: in one process the engine thread shares the GIL with Serve's event loop, and every streamed
message, HTTP read and Ray call there holds it while the thread waits to launch the next step. On the
H200 (sharegpt mix, 1,024 requests at once) the served engine's steps took 9.1 ms against 4.6 ms
offline, and at one request a second 2.0 ms against 1.17 ms. With its own process (vLLM V1's
EngineCore shape) the step loop has its own GIL, and the replica's process only moves messages.

Shape: `EngineProcessClient` (the replica's side, an `EngineClient`) starts
`python -m raylight.engine.engine_process FD PARENT_PID` with one end of a Unix socket pair it made (a
pair, not a listening socket: only this parent and child hold its ends, so pickled messages are as safe
as multiprocessing's own pipes) and sends `EngineProcessStart`. The child builds the `LLMEngine`
(model, KV cache, warm-up, CUDA graphs), answers `EngineProcessReady` (or `EngineProcessFailed` with
the traceback) and runs `EngineLoop` (engine/engine_loop.py) on its main thread:

* commands (`AddRequest` without a grammar, `AbortRequest`, `RemotePrefillFailed`, `StopEngine`) are
  read at the start of every turn; structured-output grammars compile in the child, off the step;
* every output batch goes back at once as an `EngineUpdate` with the engine's gauges (`EngineState`),
  the last ticket the loop took (the client's count of requests not yet admitted), new KV events, and
  the full metrics when a request finished or every METRICS_EVERY_S; an idle loop sends one a second,
  a busy one at least every STATE_EVERY_S (health: the client's `last_progress`).

The client writes commands from a sender thread (the event loop never blocks on a full socket) and
reads updates on a reader thread, handing outputs to the readers' queues with one wake-up per batch.
The child exits when told, when its parent dies (`watch_parent`) or when the socket closes; if it dies,
every reader gets `EngineDeadError` and the replica reports itself unhealthy (Serve replaces it).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Optional

from raylight.engine.async_engine import EngineClient, EngineDeadError
from raylight.messages import (AbortRequest, AddRequest, EngineProcessFailed, EngineProcessReady, EngineProcessStart, EngineState,
                               EngineUpdate, StopEngine)
from raylight.outputs import RequestOutput
from raylight.utils.child_process import child_env, watch_parent

logger = logging.getLogger("raylight.engine_process")

STATE_EVERY_S = 0.02  # a busy loop sends its gauges at least this often, outputs or not
METRICS_EVERY_S = 0.25  # and its full metrics (also when a request finishes, at most every METRICS_MIN_GAP_S)
METRICS_MIN_GAP_S = 0.05
RECEIVE_FOR_S = 0.005  # a turn reads commands at most this long before it steps
STOP_TIMEOUT_S = 30.0  # finishing the steps in flight and stopping other ranks; then it is killed


class EngineProcessClient(EngineClient):
    """An engine in its own process, driven from this one's event loop (module docstring)."""

    def __init__(self, engine_args: dict[str, Any], max_queued_requests: Optional[int] = None,
                 max_stream_messages_per_s: Optional[float] = None, threads: Optional[int] = None,
                 placement=None, gc_freeze: bool = False):
        """Blocks until the engine is ready (model loaded, warmed up); raises RuntimeError with the
        child's traceback if it could not start. `placement`: the PlacementPlan of a replica over
        several ranks (a Serve replica), with its placement group's id (`group_id`): the engine process
        joins this Ray cluster and starts the other ranks as actors in that group. `gc_freeze`: once ready,
        the child's start-up objects leave the garbage collector's walks (utils/gc_heap.py)."""
        ours, theirs = socket.socketpair()
        level = logging.getLevelName(logging.getLogger("raylight").getEffectiveLevel())
        self._closing = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raylight.engine.engine_process", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),), env=child_env(), close_fds=True)
        theirs.close()
        self.conn = Connection(ours.detach())
        start = EngineProcessStart(dict(engine_args), int(threads or os.cpu_count() or 1), str(level),
                                   max_stream_messages_per_s, [p for p in sys.path if p], gc_freeze=gc_freeze)
        if placement is not None:
            import ray

            ctx = ray.get_runtime_context()
            start.placement = placement
            start.ray_address, start.ray_namespace = ctx.gcs_address, ctx.namespace
            start.ray_runtime_env = dict(ctx.runtime_env or {}) or None
        self.conn.send(start)
        ready = self._recv_first()
        super().__init__(max_queued_requests, ready.max_num_seqs)
        self.kv_events_enabled = ready.kv_events_enabled
        self.state: EngineState = ready.state
        self._metrics: dict[str, Any] = ready.metrics
        self._kv_events: collections.deque = collections.deque()  # the reader appends, take_kv_events pops
        self._prompts: dict[int, tuple[Optional[str], list[int]]] = {}  # by ticket, while its request runs
        self.last_progress = time.monotonic()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._write, name="raylight-engine-send", daemon=True)
        self._reader = threading.Thread(target=self._read, name="raylight-engine-recv", daemon=True)
        self._sender.start()
        self._reader.start()
        logger.info("engine process %d ready", self.proc.pid)

    def _recv_first(self) -> EngineProcessReady:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            msg = None
        if isinstance(msg, EngineProcessReady):
            return msg
        self._kill()
        if isinstance(msg, EngineProcessFailed):
            raise RuntimeError(f"the engine process could not start:\n{msg.error}")
        raise RuntimeError(f"the engine process exited while starting (exit code {self.proc.poll()}); "
                           "its output is in this replica's log")

    # ---- the engine's state, as last reported ----
    @property
    def last_step_time(self) -> float:
        return self.state.last_step_time

    def num_running(self) -> int:
        return self.state.num_running

    def _num_waiting_in_loop(self) -> int:
        return self.state.num_waiting

    def metrics(self) -> dict[str, Any]:
        m = dict(self._metrics)
        s = self.state  # newer than the metrics: its gauges win
        m.update(num_running=s.num_running, kv_blocks_free=s.kv_blocks_free, kv_blocks_total=s.kv_blocks_total,
                 kv_cache_usage=s.kv_cache_usage)
        return m

    def load(self) -> EngineState:
        return self.state

    def take_kv_events(self) -> list:
        events = self._kv_events
        return [events.popleft() for _ in range(len(events))]

    def check_ranks(self) -> None:
        """The engine process watches its own ranks (a dead one crashes its loop, which ends it)."""
        if self.dead is not None:
            raise RuntimeError(f"engine process died: {self.dead!r}")

    def has_unfinished(self) -> bool:
        return self.state.has_unfinished or bool(self._unadmitted)

    def healthy(self, stall_s: float = 60.0) -> bool:
        return (self.dead is None and self.proc.poll() is None
                and time.monotonic() - self.last_progress < stall_s)

    # ---- commands out, updates in ----
    def _send(self, cmd: Any) -> None:
        self._outbox.put(cmd)

    def _write(self) -> None:
        while True:
            cmd = self._outbox.get()
            try:
                self.conn.send(cmd)
            except (OSError, ValueError):  # the process is gone: the reader reports it
                return
            if isinstance(cmd, StopEngine):
                return

    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                if isinstance(msg, EngineUpdate):
                    self._apply(msg)
                elif isinstance(msg, EngineProcessFailed):
                    raise RuntimeError(f"the engine process's loop crashed:\n{msg.error}")
        except BaseException as e:
            if self._closing:
                return
            if isinstance(e, (EOFError, OSError)):
                self.proc.poll()
                e = RuntimeError(f"the engine process exited (exit code {self.proc.returncode})")
            logger.error("%s", e)
            self.dead = e
            self._fail_readers(EngineDeadError(f"engine loop died: {e}"))

    def _apply(self, msg: EngineUpdate) -> None:
        self.last_progress = time.monotonic()
        if msg.taken >= 0:
            self._taken(msg.taken)
        self.state = msg.state
        if msg.kv_events:
            self._kv_events.extend(msg.kv_events)
        if msg.metrics is not None:
            self._metrics = msg.metrics
        if msg.outputs:
            for ticket, item in msg.outputs:
                if isinstance(item, RequestOutput):
                    self._restore_prompt(ticket, item)
            self._deliver(msg.outputs)

    def _restore_prompt(self, ticket: int, out: RequestOutput) -> None:
        """Puts back the prompt the engine process sent only with the request's first output."""
        if out.prompt_token_ids is None:
            out.prompt, out.prompt_token_ids = self._prompts.get(ticket, (None, []))
        elif not out.finished:
            self._prompts[ticket] = (out.prompt, out.prompt_token_ids)
        if out.finished:
            self._prompts.pop(ticket, None)

    def _forget(self, ticket: int) -> None:
        self._prompts.pop(ticket, None)

    # ---- stopping ----
    def shutdown(self) -> None:
        self.close()

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stops the engine (steps in flight finish, other ranks stop) and waits for its process."""
        if self._closing:
            return
        self._closing = True
        self._outbox.put(StopEngine())
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("engine process %d did not stop within %.0fs; killed", self.proc.pid, timeout_s)
        self._kill()
        self._fail_readers(EngineDeadError("the engine stopped"))

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self.conn.close()
        except OSError:
            pass

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------- the engine process

class _EngineProcess:
    """The child's side: the engine, its loop, and the socket to the parent."""

    def __init__(self, engine, conn: Connection, max_stream_messages_per_s: Optional[float]):
        from raylight.engine.engine_loop import EngineLoop

        self.engine = engine
        self.conn = conn
        self.loop = EngineLoop(engine, self._send_outputs, max_stream_messages_per_s, scheduled=self._scheduled)
        self.stopped = False
        self._taken = -1
        self._prompt_sent: set[str] = set()  # requests whose prompt went with an earlier output
        self._last_sent = 0.0
        self._last_metrics = 0.0

    def ready(self) -> EngineProcessReady:
        return EngineProcessReady(self.engine.scheduler.max_num_seqs, bool(self.engine.args.enable_kv_events),
                                  self.loop.state(), self._metrics())

    def run(self) -> None:
        self.loop.run(self._receive, lambda: self.stopped, self._after_turn)

    def _receive(self, timeout: float) -> list[Any]:
        cmds: list[Any] = []
        if not self.conn.poll(timeout):
            return cmds
        end = time.monotonic() + RECEIVE_FOR_S
        while True:
            cmd = self.conn.recv()  # EOFError: the parent is gone; the process ends
            if isinstance(cmd, StopEngine):
                self.stopped = True
                return cmds
            if isinstance(cmd, AddRequest):
                self._taken = cmd.ticket
            elif isinstance(cmd, AbortRequest):
                self._prompt_sent.discard(cmd.request_id)
            cmds.append(cmd)
            if not self.conn.poll(0) or time.monotonic() >= end:  # a steady stream of requests must not hold the step
                return cmds

    def _metrics(self) -> dict[str, Any]:
        self._last_metrics = time.monotonic()
        return self.loop.metrics()

    def _send(self, outputs: list[tuple[int, Any]], finished: bool) -> None:
        now = time.monotonic()
        since = now - self._last_metrics
        # A finish refreshes the metrics (counters a client reads right after its request), but at saturation
        # requests finish every step: at most every METRICS_MIN_GAP_S then, and always once all are done.
        due = since >= METRICS_EVERY_S or finished and (
            since >= METRICS_MIN_GAP_S or not self.engine.has_unfinished_requests())
        metrics = self._metrics() if due else None
        self.conn.send(EngineUpdate(outputs, self._taken, self.loop.state(), self.engine.take_kv_events(), metrics))
        self._last_sent = now

    def _send_outputs(self, items: list[tuple[int, Any]]) -> None:
        finished = False
        for ticket, item in items:
            if isinstance(item, RequestOutput):
                # A request's prompt (text and ids: thousands of tokens for a long one) crosses once, with
                # its first output; the client puts it back into the later ones (`_restore_prompt`).
                rid = item.request_id
                if rid in self._prompt_sent:
                    item.prompt, item.prompt_token_ids = None, None
                else:
                    self._prompt_sent.add(rid)
                if item.finished:
                    self._prompt_sent.discard(rid)
                    finished = True
            elif isinstance(item, BaseException):
                finished = True
        self._send(items, finished)

    def _scheduled(self) -> None:
        """A step is about to run: its requests count as running now, not only once it ends (a long step)."""
        if time.monotonic() - self._last_sent >= STATE_EVERY_S:
            self._send([], False)

    def _after_turn(self) -> None:
        busy = self.engine.has_unfinished_requests()
        if time.monotonic() - self._last_sent >= (STATE_EVERY_S if busy else 0.0):
            self._send([], False)  # an idle turn (one a second) or a busy stretch without outputs
        if not busy:
            self.engine.executor.check()  # a dead rank ends the loop (and this process)


def main(argv: list[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    watch_parent(parent)
    conn = Connection(fd)
    start: EngineProcessStart = conn.recv()
    sys.path.extend(p for p in start.sys_path if p not in sys.path)  # ours first, then what only the parent had
    logging.basicConfig(level=start.log_level,
                        format="%(asctime)s %(levelname)s engine-process %(name)s: %(message)s")
    try:
        import torch

        from raylight.config import EngineArgs
        from raylight.engine.llm_engine import LLMEngine

        torch.set_num_threads(max(1, start.threads))
        if start.placement is not None:  # the other ranks: Ray actors this process starts in the replica's group
            import ray

            ray.init(address=start.ray_address, namespace=start.ray_namespace, runtime_env=start.ray_runtime_env,
                     log_to_driver=False, configure_logging=False)
        engine = LLMEngine(EngineArgs(**start.engine_args), placement=start.placement)
        proc = _EngineProcess(engine, conn, start.max_stream_messages_per_s)
        conn.send(proc.ready())
    except BaseException:
        _report_and_exit(conn)
    if start.gc_freeze:
        from raylight.utils.gc_heap import freeze_heap

        freeze_heap("engine process")
    try:
        proc.run()
    except EOFError:  # the parent closed its end: nobody to serve
        os._exit(0)
    except BaseException:
        logger.exception("engine loop crashed")
        _report_and_exit(conn)
    try:
        engine.shutdown()
    finally:
        conn.close()
    os._exit(0)


def _report_and_exit(conn: Connection) -> None:
    text = traceback.format_exc()
    sys.stderr.write(text)
    sys.stderr.flush()
    try:
        conn.send(EngineProcessFailed(text[-6000:]))
    except Exception:
        pass
    os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
