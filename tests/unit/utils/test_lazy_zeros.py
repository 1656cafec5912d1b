"""The CPU KV cache's allocation (raylight/utils/lazy_zeros.py): zeros like torch.zeros, but its pages
exist only once written, and a forked child writes to its own copy."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from raylight.utils.lazy_zeros import zeros


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zeros_are_zero_writable_and_shaped_like_torch_zeros(dtype):
    t = zeros((5, 2, 16, 3, 8), dtype, torch.device("cpu"))
    assert t.shape == (5, 2, 16, 3, 8) and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros_like(t))
    t[3, 1] = 2.5
    assert t.sum().item() == 2.5 * 16 * 3 * 8 and torch.equal(t[2], torch.zeros_like(t[2]))
    assert zeros((0, 4), dtype, "cpu").shape == (0, 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_untouched_pages_take_no_memory():
    before = _rss_bytes()
    t = zeros((256, 1024, 1024), torch.float32, "cpu")  # 1 GiB
    assert _rss_bytes() - before < 64 * 2**20
    t[0].fill_(1.0)  # one 4 MiB row: only its pages become resident
    assert 4 * 2**20 <= _rss_bytes() - before < 64 * 2**20
    assert t[0].sum().item() == 1024 * 1024 and t[1:].abs().sum().item() == 0


def _write_in_child(t):
    t.fill_(7.0)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_writes_to_its_own_copy():
    t = zeros((4, 4), torch.float32, "cpu")
    child = mp.get_context("fork").Process(target=_write_in_child, args=(t,))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and t.abs().sum().item() == 0
