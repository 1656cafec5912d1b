"""Where the ranks other than 0 run: child processes of the engine's (offline `LLM`), or Ray
actors in the replica's placement group (under Serve). Either way a launcher starts them,
says whether one has died, and stops them.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle  # only to hand our own RankSpec to our own child, over its stdin pipe (see rank_main)
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Protocol

import torch

from raylight.utils.child_process import child_env
from raylight.utils.ports import free_port
from raylight.workers.worker import RankSpec, run_rank


class Launcher(Protocol):
    def init_method(self) -> str:
        """The torch.distributed rendezvous address, at rank 0 (this process)."""

    def start(self, spec: RankSpec) -> None:
        """Starts ranks 1 .. world_size - 1; returns at once."""

    def dead(self) -> Optional[str]:
        """A description of a rank that has exited, or None while all run."""

    def stop(self, timeout_s: float) -> None:
        """Waits up to timeout_s for the ranks to exit (after rank 0 told them to), then kills the rest."""


class _RankProcess:
    """One rank's child process (`python -m raylight.workers.rank_main`), with the part of
    multiprocessing.Process's interface the engine and its tests use. Its stderr is passed on to
    ours line by line, and its last lines are kept: they hold its error if it dies."""

    TAIL_LINES = 25

    def __init__(self, spec: RankSpec, rank: int, threads: int):
        env = child_env()  # the child imports raylight from where we did
        level = logging.getLevelName(logging.getLogger("raylight").getEffectiveLevel())
        self.rank = rank
        self.name = f"raylight-rank{rank}"
        self.tail: collections.deque[str] = collections.deque(maxlen=self.TAIL_LINES)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raylight.workers.rank_main", str(rank), str(threads), str(level),
             str(os.getpid())],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._pump, name=f"{self.name}-stderr", daemon=True)
        self._reader.start()
        try:  # the spec, through the pipe we just made (never a socket): see rank_main
            self.proc.stdin.write(pickle.dumps(spec))
            self.proc.stdin.close()
        except OSError:  # it died before reading: dead() reports it, with its output
            pass

    def _pump(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            self.tail.append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
            except Exception:  # our stderr is gone (interpreter exit): keep draining the pipe
                pass
        self.proc.stderr.close()

    @property
    def exitcode(self) -> Optional[int]:
        return self.proc.poll()

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join(self, timeout: Optional[float] = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def error(self) -> str:
        """Its last lines of output (once it has exited: waits briefly for the pipe to drain)."""
        self._reader.join(timeout=2.0)
        lines = list(self.tail)
        for i in range(len(lines) - 1, -1, -1):  # from its last traceback on, if there is one
            if lines[i].startswith("Traceback"):
                lines = lines[max(0, i - 1):]
                break
        return "\n".join(lines)[-3000:]


class LocalRanks:
    """Ranks as child processes of this one (`python -m raylight.workers.rank_main`, the RankSpec
    handed over on the child's stdin), rank r on GPU r when on CUDA. Unlike multiprocessing's
    spawn this does not re-run the parent's `__main__`, so an engine made from `python -c`, stdin
    or a notebook starts its ranks too. A rank ends itself when this process goes away."""

    def __init__(self, world_size: int, device_type: str):
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world_size} ranks need {world_size} "
                             f"GPUs on this machine (one each); {torch.cuda.device_count()} are visible")
        self.world_size = world_size
        self.procs: list[_RankProcess] = []
        # Ranks share this machine's cores: a rank's torch threads spinning on another's core only slow both.
        self.threads = max(1, (os.cpu_count() or 1) // world_size)

    def init_method(self) -> str:
        return f"tcp://127.0.0.1:{free_port('127.0.0.1')}"

    def start(self, spec: RankSpec) -> None:
        for rank in range(1, self.world_size):
            self.procs.append(_RankProcess(spec, rank, self.threads))

    def dead(self) -> Optional[str]:
        for p in self.procs:
            if p.exitcode is not None:
                msg = f"rank {p.rank} (pid {p.pid}) exited with code {p.exitcode}"
                err = p.error()
                return f"{msg}; its output ended with:\n{err}" if err else msg
        return None

    def stop(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


class RankActor:
    """A Ray actor that is one rank (wrapped by `ray.remote` at launch, so importing this module
    does not need Ray). `run` blocks for the rank's whole life."""

    def run(self, spec: RankSpec, rank: int) -> int:
        # Ray hands the actor its GPU as the only visible one.
        device = torch.device("cuda", 0) if spec.device_type == "cuda" else torch.device("cpu")
        return run_rank(spec, rank, device)

    def pid(self) -> int:
        return os.getpid()


class RayRanks:
    """Ranks as Ray actors, each pinned to its stage's bundle of the placement group this process
    (the Serve replica, rank 0) runs in. Ray ends them with the replica (it owns them)."""

    def __init__(self, plan):
        from raylight.placement import current_placement_group

        current_placement_group(plan.group_id)  # fail now, with the planner's message, outside a placement group
        self.plan = plan
        self.actors: list[Any] = []
        self.runs: list[Any] = []  # each rank's `run` call: finishes when the rank ends

    def init_method(self) -> str:
        import ray

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port('')}"

    def start(self, spec: RankSpec) -> None:
        import ray

        from raylight.placement import current_rank_actor_options

        cls = ray.remote(RankActor)
        for rank in range(1, self.plan.world_size):
            opts = current_rank_actor_options(self.plan, rank)
            actor = cls.options(**opts, max_restarts=0, name=None).remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(spec, rank))

    def dead(self) -> Optional[str]:
        import ray

        ready, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for ref in ready:
            rank = self.runs.index(ref) + 1
            try:
                ray.get(ref)
                return f"rank {rank} (Ray actor) returned"
            except Exception as e:
                return f"rank {rank} (Ray actor) failed: {str(e).strip().splitlines()[-1][:500]}"
        return None

    def stop(self, timeout_s: float) -> None:
        import ray

        if self.runs:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        for actor in self.actors:
            ray.kill(actor)
