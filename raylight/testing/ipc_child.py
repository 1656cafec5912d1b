"""A spawned process's side of tests/gpu/test_ipc_handles_gpu.py (a spawned process imports its target
by module name, and tests/ is not importable)."""

import json

import torch


def open_and_write(desc: str, q) -> None:
    from raylight.parallel.custom_allreduce import _open

    t = _open(json.loads(desc), torch.device("cuda", 0))
    q.put(t[:8].tolist())
    t[8:16] = 7  # written here, read in the parent
    torch.cuda.synchronize()
    q.put("written")
