"""Expert-parallel dispatch/combine (parallel/ep_buffer.py) over NCCL, two processes, one GPU each:
the same contract checks as tests/unit/parallel/test_ep_buffer.py (gloo), with torch's CUDA sync
debug mode raising inside the no-host-sync sections, plus low-latency and num_worst_tokens
dispatch/combine captured in a CUDA graph and replayed with fresh inputs."""

from __future__ import annotations

import json
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_ep_contract_over_nccl(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Spawned children import the target by module name, so it lives in an importable module.
    from raylight.testing.ep_ranks import CHECKS, gpu_rank, scenarios

    mp.spawn(gpu_rank, args=(2, port, str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = {f"{sc}/{c}" for sc in scenarios(2) for c in CHECKS} | {"graph/ll_capture", "graph/worst_capture"}
    bad = []
    for r, rep in enumerate(reports):
        missing = want - set(rep)
        assert not missing, f"rank {r}: checks did not run: {sorted(missing)}"
        bad += [f"rank {r} {k}: {v[:3]}" for k, v in rep.items() if v]
    assert not bad, "\n".join(bad)
