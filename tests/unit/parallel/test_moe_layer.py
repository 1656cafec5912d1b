"""`FusedMoE` sharded over 2 and 4 gloo ranks equals the single-process layer (float32): expert
parallel through both token movers (fixed-shape low-latency and normal dispatch), with the initial
placement and a shuffled one with redundant experts (the output must not depend on which replica
serves a token), and tensor parallel (every expert split by features)."""

from __future__ import annotations

import pytest

from raylight.testing.moe_ranks import compare
from raylight.testing.parallel_ranks import run_ranks


@pytest.mark.parametrize("world,expert_parallel,redundant", [
    (2, True, 0), (2, True, 4), (4, True, 4), (2, False, 0), (4, False, 0)],
    ids=["ep2", "ep2-redundant", "ep4-redundant", "tp2", "tp4"])
def test_sharded_layer_equals_single_process(world, expert_parallel, redundant):
    for errors in run_ranks(compare, world, expert_parallel, redundant):
        assert errors and max(errors.values()) < 1e-5, errors
