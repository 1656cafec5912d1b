"""Rank 0's side of a replica split over tensor_parallel_size x pipeline_parallel_size ranks.

The engine's process is rank 0: TP rank 0 of the last pipeline stage (see parallel/state.py),
so it holds the scheduler, samples, and keeps all per-request state. The executor

* starts ranks 1 .. N-1 (child processes for offline use, Ray actors in the replica's placement
  group under Serve), joins the torch.distributed world with them, and builds rank 0's part of
  the model and KV cache with the same `build_rank` they run;
* sends every step's `StepInputs` to them in one gloo broadcast (`dispatch`, called by the
  ModelRunner before it runs the step itself); each rank then runs the same forward and the
  same logits calls, so their TP collectives and PP hand-offs pair up with rank 0's;
* watches them: a rank that exits fails the engine's next step (and the current one, whose
  collectives with the dead rank raise) instead of leaving it hanging; on CUDA, where NCCL
  would wait for the dead peer until the timeout, the process groups are aborted;
* stops them on `shutdown()`, or when the executor is garbage collected or the interpreter exits.

With one rank there is nothing to start: the executor only builds the model, and `dispatch` is
never called.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from raylight.config import EngineArgs
from raylight.kernels.config import KernelConfig
from raylight.models.loader import ResolvedModel
from raylight.parallel.state import ParallelGroups, leave_distributed
from raylight.workers.launchers import Launcher, LocalRanks, RayRanks
from raylight.messages import RankReport, StepInputs
from raylight.workers.rendezvous import RankDiedError, host_world
from raylight.workers.step_channel import StepChannel
from raylight.workers.worker import RankModel, RankSpec, build_rank, parallel_config, rank_report

logger = logging.getLogger("raylight.executor")

STOP_TIMEOUT_S = 15.0


__all__ = ["Executor", "RankDiedError"]


class Executor:
    def __init__(self, args: EngineArgs, resolved: ResolvedModel, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, placement=None):
        """`placement`: the replica's PlacementPlan when it runs under Serve (its ranks become Ray actors
        in the current placement group); None runs them as child processes of this one."""
        config = parallel_config(args)
        config.layer_ranges(resolved.arch.num_hidden_layers)  # a bad split fails here, before any process starts
        self.world_size = config.world_size
        self.launcher: Optional[Launcher] = None
        self.channel: Optional[StepChannel] = None
        self._monitor: Optional[_Monitor] = None
        if self.world_size == 1:
            groups = ParallelGroups.single(config)
        else:
            if dist.is_initialized():
                raise RuntimeError("this process already belongs to a torch.distributed world (another engine with "
                                   "tensor_parallel_size x pipeline_parallel_size > 1?): shut it down first")
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", 0)  # local rank r drives GPU r
            self.launcher = RayRanks(placement) if placement is not None else LocalRanks(self.world_size, device.type)
            init_method = self.launcher.init_method()
            spec = RankSpec(args, resolved, dtype, max_model_len, self.world_size, init_method, device.type)
            self.launcher.start(spec)
            self._monitor = _Monitor(self.launcher, nccl=device.type == "cuda")
        self._finalizer = weakref.finalize(self, _stop, self.launcher, self._monitor, [None])
        try:
            if self.launcher is not None:
                # Watches the ranks while it waits for them: one that dies starting fails us now, with its error.
                host_world(self.world_size, init_method, device, args.distributed_timeout_s, self.launcher.dead)
                groups = ParallelGroups.from_world(config, KernelConfig.from_args(args))
            self.rank: RankModel = build_rank(args, resolved, groups, device, dtype, max_model_len)
        except BaseException as e:
            # A ValueError (a bad setting, raised by every rank alike) stands as it is; a collective's
            # error is most likely a peer that died: name it before the shutdown reaps it.
            err = e if isinstance(e, ValueError) else self._explain(e)
            self.shutdown()
            if err is e:
                raise
            raise err from e
        if self.launcher is not None:
            if groups.custom_ar is not None:
                self._monitor.on_death.append(groups.custom_ar.abort)
            self.channel = StepChannel(groups.cpu_group, 0)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _stop, self.launcher, self._monitor, [self.channel])
            logger.info("replica of %d ranks (tp=%d, pp=%d) ready; this process is rank 0 (layers %s)",
                        self.world_size, config.tensor_parallel_size, config.pipeline_parallel_size,
                        self.rank.model.layer_range)

    @property
    def groups(self) -> ParallelGroups:
        return self.rank.groups

    def dispatch(self, inputs: StepInputs) -> None:
        """Sends a step to every other rank; rank 0 runs it right after."""
        if self._monitor.dead is not None:  # what the monitor last saw: no per-step query of the ranks
            raise RankDiedError(f"{self._monitor.dead}: the replica cannot run further steps")
        try:
            self.channel.send(inputs)
        except Exception as e:
            raise self._explain(e) from e

    def collect_reports(self, num_steps: int = 0) -> list[RankReport]:
        """Every rank's `RankReport`, in rank order (rank 0's own first). Between steps only: under
        pipeline parallelism with steps in flight, a peer answers only after those steps, which may
        wait on this rank."""
        own = rank_report(self.rank, num_steps)
        if self.channel is None:
            return [own]
        if self._monitor.dead is not None:
            raise RankDiedError(f"{self._monitor.dead}: the replica cannot run further steps")
        try:
            return self.channel.gather_reports(own)
        except Exception as e:
            raise self._explain(e) from e

    def check(self) -> None:
        """Raises RankDiedError when a rank has exited (asks the ranks now: for health checks)."""
        if self._finalizer.alive is False:
            raise RankDiedError("the replica's ranks were shut down")
        dead = self._monitor.dead if self._monitor is not None else None
        if dead is None and self.launcher is not None:
            dead = self.launcher.dead()
        if dead is not None:
            raise RankDiedError(f"{dead}: the replica cannot run further steps")

    def shutdown(self) -> None:
        """Stops every other rank and leaves the torch.distributed world; idempotent."""
        rank = getattr(self, "rank", None)  # None when building this rank failed
        for part in (rank.kv_endpoint, rank.kv_sender) if rank is not None else ():
            if part is not None:
                part.close()  # the KV endpoint's store stops listening; the sender's thread ends
        if rank is not None and self.launcher is not None and self._all_ranks_alive():
            # Before the NCCL communicators the graphs captured go away (else the device may never finish:
            # NCCL was aborted).
            rank.release_graphs()
        self._finalizer()

    def _all_ranks_alive(self) -> bool:
        return (self._monitor is None or self._monitor.dead is None) and self.launcher.dead() is None

    def _explain(self, e: BaseException) -> BaseException:
        """A collective failing because a peer died reads as gloo's socket error; name the rank instead."""
        if self.launcher is None or isinstance(e, RankDiedError):
            return e
        dead = self.launcher.dead()
        return RankDiedError(f"{dead}: {type(e).__name__}: {e}") if dead is not None else e


class _Monitor:
    """Polls the ranks from a daemon thread. When one exits, remembers which; on CUDA also aborts the
    NCCL communicators, because a collective waiting for the dead peer would otherwise wait until
    the NCCL timeout (gloo notices the closed connection by itself)."""

    def __init__(self, launcher: Launcher, nccl: bool, poll_s: float = 0.5):
        self.launcher, self.nccl, self.poll_s = launcher, nccl, poll_s
        self.dead: Optional[str] = None
        # Called before the NCCL abort: ends kernels that wait for a peer outside NCCL (custom all-reduce).
        self.on_death: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raylight-rank-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            dead = self.launcher.dead()
            if dead is None:
                continue
            self.dead = dead
            logger.error("%s; failing the replica", dead)
            # Kernels that wait for the dead peer outside NCCL first: NCCL's abort frees device
            # memory, which waits for every running kernel, one of them ours.
            for abort in self.on_death:
                try:
                    abort()
                except Exception:
                    logger.warning("could not abort %s", abort, exc_info=True)
            if self.nccl and dist.is_initialized():
                try:
                    dist.distributed_c10d._abort_process_group()
                except Exception:
                    logger.warning("could not abort the NCCL process groups", exc_info=True)
            return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _stop(launcher: Optional[Launcher], monitor: Optional[_Monitor], channel_box: list) -> None:
    """Shutdown (explicit, on garbage collection, or at exit): tell live ranks to stop, wait for them,
    kill the rest, leave the world. Holds no reference to the executor."""
    if launcher is None:
        return
    if monitor is not None:
        monitor.stop()
    channel = channel_box[0]
    if channel is not None and launcher.dead() is None:
        try:
            channel.send_stop()
        except Exception:  # a rank died meanwhile: the kill below ends the others
            logger.debug("stop message not delivered", exc_info=True)
    launcher.stop(STOP_TIMEOUT_S if channel is not None else 0.0)
    try:
        leave_distributed()
    except Exception:
        logger.debug("leaving the torch.distributed world failed", exc_info=True)
