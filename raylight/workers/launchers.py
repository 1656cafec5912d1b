"""Where the ranks other than 0 run: child processes of the engine's (offline `LLM`), or Ray
actors in the replica's placement group (under Serve). Either way a launcher starts them,
says whether one has died, and stops them.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional, Protocol

import torch

from raylight.workers.worker import RankSpec, local_rank_main, run_rank


class Launcher(Protocol):
    def init_method(self) -> str:
        """The torch.distributed rendezvous address, at rank 0 (this process)."""

    def start(self, spec: RankSpec) -> None:
        """Starts ranks 1 .. world_size - 1; returns at once."""

    def dead(self) -> Optional[str]:
        """A description of a rank that has exited, or None while all run."""

    def stop(self, timeout_s: float) -> None:
        """Waits up to timeout_s for the ranks to exit (after rank 0 told them to), then kills the rest."""


def _free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalRanks:
    """Ranks as child processes (torch.multiprocessing, spawn), rank r on GPU r when on CUDA.

    As with any spawn-based launcher, a script that creates the engine at import time must guard
    it with `if __name__ == "__main__":` (each child re-imports the main module)."""

    def __init__(self, world_size: int, device_type: str):
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world_size} ranks need {world_size} "
                             f"GPUs on this machine (one each); {torch.cuda.device_count()} are visible")
        self.world_size = world_size
        self.procs: list[Any] = []
        # Ranks share this machine's cores: a rank's torch threads spinning on another's core only slow both.
        self.threads = max(1, (os.cpu_count() or 1) // world_size)

    def init_method(self) -> str:
        return f"tcp://127.0.0.1:{_free_port('127.0.0.1')}"

    def start(self, spec: RankSpec) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        for rank in range(1, self.world_size):
            p = ctx.Process(target=local_rank_main, args=(spec, rank, self.threads), daemon=True,
                            name=f"raylight-rank{rank}")
            p.start()
            self.procs.append(p)

    def dead(self) -> Optional[str]:
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                return f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def stop(self, timeout_s: float) -> None:
        for p in self.procs:
            p.join(timeout=timeout_s)
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

        current_placement_group()  # fail now, with the planner's message, outside a placement group
        self.plan = plan
        self.actors: list[Any] = []
        self.runs: list[Any] = []  # each rank's `run` call: finishes when the rank ends

    def init_method(self) -> str:
        import ray

        return f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"

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
