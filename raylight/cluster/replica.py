"""The engine-replica deployment: one `LLMEngine` whose step loop runs beside Serve's event loop.

Messages to and from the ingress are typed: `GenerateCall` in, `ReplicaMessage`s out (an
output, or an error with the HTTP status the ingress should answer with).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, AsyncIterator, Optional

from raylight.config import EngineArgs
from raylight.messages import GenerateCall, ReplicaMessage, ReplicaStats

logger = logging.getLogger("raylight.replica")


class EngineReplica:
    """Serve deployment class (wrapped by `serve.deployment` in cluster/app.py)."""

    def __init__(self, engine_args: dict[str, Any], max_queued_requests: Optional[int] = None,
                 cpu_threads: Optional[int] = None, placement=None, request_timeout_s: Optional[float] = None,
                 health_stall_s: float = 60.0):
        """`placement`: the PlacementPlan this replica's placement group was made from (TP x PP > 1):
        this actor is rank 0 and starts the other ranks as Ray actors in their bundles.
        `request_timeout_s`, `health_stall_s`: see AppConfig."""
        import torch

        from raylight.engine.async_engine import AsyncLLMEngine
        from raylight.engine.llm_engine import LLMEngine

        # Ray sets OMP_NUM_THREADS to the actor's CPU count (1 by default); use what we were given.
        threads = cpu_threads or int(float(os.environ.get("OMP_NUM_THREADS", "0") or 0)) or os.cpu_count()
        torch.set_num_threads(max(1, threads))
        self.replica_id = _replica_id()
        self.engine = LLMEngine(EngineArgs(**engine_args), placement=placement)
        self.async_engine = AsyncLLMEngine(self.engine, max_queued_requests, request_timeout_s, health_stall_s)
        logger.info("replica %s ready (%d torch threads)", self.replica_id, torch.get_num_threads())

    async def generate(self, call: GenerateCall) -> AsyncIterator[ReplicaMessage]:
        from raylight.engine.async_engine import (EngineDeadError, EngineDrainingError, QueueFullError,
                                                  RequestTimeoutError)

        try:
            async for out in self.async_engine.generate(call.prompt, call.params, call.request_id, call.cache_salt):
                msg = ReplicaMessage(output=out, replica_id=self.replica_id)
                if out.finished:
                    msg.stats = self._metrics()
                yield msg
        except ValueError as e:
            yield self._error(400, str(e))
        except QueueFullError as e:
            yield self._error(429, str(e))
        except RequestTimeoutError as e:  # the engine request is aborted already
            yield self._error(504, str(e))
        except (EngineDeadError, EngineDrainingError) as e:
            yield self._error(503, str(e))

    def _error(self, status: int, message: str) -> ReplicaMessage:
        return ReplicaMessage(error_status=status, error_message=message, stats=self._metrics(),
                              replica_id=self.replica_id)

    def _metrics(self) -> dict[str, Any]:
        m = self.engine.get_metrics()
        periods = sorted(self.async_engine.step_periods)
        m["step_period_p50_s"] = periods[len(periods) // 2] if periods else 0.0
        return m

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(self.replica_id, self._metrics(), self.async_engine.last_step_time,
                            self.async_engine.healthy())

    async def health(self) -> bool:
        return self.async_engine.healthy()

    def check_health(self) -> None:
        """Serve's health probe: a dead or stalled engine loop, or a dead rank of a tensor/pipeline
        parallel replica (even an idle one), gets this replica replaced."""
        if not self.async_engine.healthy():
            raise RuntimeError(f"engine loop unhealthy (dead={self.async_engine.dead!r}, "
                               f"last progress {time.monotonic() - self.async_engine.last_progress:.0f}s ago)")
        self.engine.executor.check()

    def __del__(self):
        """Serve's graceful shutdown (serve shutdown/SIGTERM, a rolling upgrade, scale-down) calls this
        on the replica's event loop after it stopped routing here and let the running requests finish
        for up to the deployment's `graceful_shutdown_timeout_s` (AppConfig): it returns the coroutine
        `drain_and_stop()`, which Serve awaits. Called by the garbage collector (no running loop), it
        stops the engine at once."""
        import asyncio

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
        aborted = await self.async_engine.drain(grace_s)
        if aborted:
            logger.warning("replica %s aborted %d requests at shutdown", self.replica_id, aborted)
        self._stop()
        return aborted

    def _stop(self) -> None:
        eng = self.async_engine
        eng.shutdown()
        eng.engine.shutdown()


def _replica_id() -> str:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return str(getattr(ctx, "replica_tag", None) or getattr(ctx, "replica_id", "replica"))
    except Exception:
        return f"local-{os.getpid()}"
