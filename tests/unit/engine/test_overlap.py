"""engine/overlap: which shape the one step loop takes for each engine configuration."""

from __future__ import annotations

import pytest
import torch

from raylight.config import EngineArgs
from raylight.engine.overlap import OverlapPolicy

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_defaults_by_device():
    assert OverlapPolicy.from_args(EngineArgs(), CPU) == OverlapPolicy()  # plain: nothing overlaps on CPU
    p = OverlapPolicy.from_args(EngineArgs(), CUDA)
    assert p.run_ahead and p.max_in_flight == 1 and p.name == "async-scheduling"
    p = OverlapPolicy.from_args(EngineArgs(async_scheduling=False), CUDA)
    assert p.defer_outputs and p.max_in_flight == 0 and p.name == "overlap-host-work"


def test_micro_batches_and_pipeline_stages():
    p = OverlapPolicy.from_args(EngineArgs(num_microbatches=3), CPU)
    assert p.disjoint and p.max_in_flight == 2 and not p.defer_compute and p.name == "micro-batches(3)"
    p = OverlapPolicy.from_args(EngineArgs(pipeline_parallel_size=2), CUDA)  # async scheduling is off under PP
    assert p.disjoint and p.defer_compute and p.max_in_flight == 1 and not p.run_ahead


def test_async_scheduling_cannot_be_forced_under_pp():
    with pytest.raises(ValueError, match="async_scheduling"):
        OverlapPolicy.from_args(EngineArgs(pipeline_parallel_size=2, async_scheduling=True), CPU)
    assert OverlapPolicy.from_args(EngineArgs(async_scheduling=True), CPU).run_ahead  # allowed on CPU when asked
