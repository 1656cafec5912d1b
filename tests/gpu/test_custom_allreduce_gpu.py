"""The one-shot IPC all-reduce (parallel/custom_allreduce.py) on two GPUs, compiled: set up through
ParallelGroups as the engine does, checked against NCCL eagerly and inside a CUDA graph replayed
with fresh inputs, interleaved with NCCL calls, plain and fused with add+RMSNorm."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_custom_allreduce_matches_nccl(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Spawned children import the target by module name, so it lives in an importable module.
    from raylight.testing.allreduce_ranks import _rank as rank_fn

    mp.spawn(rank_fn, args=(2, port, str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print(reports)
    assert all(r["custom_ar"] for r in reports), "the custom all-reduce did not set up on two local GPUs"
    for r in reports:
        assert r["errors"] == [], r["errors"][:20]
        assert r["num_calls"] > 0
