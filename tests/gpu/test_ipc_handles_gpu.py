"""The custom all-reduce's buffer exchange without pickle: a buffer described as JSON
(utils/cuda_ipc_handles.py) in one process is opened by another (parallel/custom_allreduce._open)
and both see the same memory. One GPU suffices: the two processes share it."""

import json
import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_buffer_opens_in_another_process():
    from raylight.testing.ipc_child import open_and_write
    from raylight.utils.cuda_ipc_handles import describe

    buf = torch.arange(64, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=open_and_write, args=(json.dumps(describe(buf)), q))
    p.start()
    assert q.get(timeout=120) == list(range(8))
    assert q.get(timeout=60) == "written"
    p.join(timeout=60)
    assert p.exitcode == 0
    assert buf[8:16].tolist() == [7] * 8
