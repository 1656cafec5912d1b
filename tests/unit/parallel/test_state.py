"""parallel/state.py: leaving the torch.distributed world (gloo destroys; a new world can follow)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from raylight.parallel.state import ParallelConfig, ParallelGroups, init_distributed, leave_distributed

from raylight.testing.helpers import free_port


def test_leave_distributed_lets_a_new_world_start():
    for _ in range(2):  # an engine shut down, then another started in the same process
        init_distributed(0, 1, f"tcp://127.0.0.1:{free_port()}", torch.device("cpu"), timeout_s=30)
        groups = ParallelGroups.from_world(ParallelConfig())
        t = torch.ones(3)
        groups.broadcast_from_tp0(t)  # TP=1: a no-op
        assert dist.is_initialized() and t.tolist() == [1.0, 1.0, 1.0]
        leave_distributed()
        assert not dist.is_initialized()
    leave_distributed()  # idempotent
