"""The one-shot all-reduce kernel's protocol (kernels/allreduce.py) on Triton's CPU interpreter:
each simulated rank is a forked process launching the kernel over shared host memory (mapped at
the same address in every process, as fork keeps it), as the GPU ranks do over IPC-mapped device
buffers. (Threads would not do: the interpreter keeps the program id in global state.) Calls of
varying shapes check the two-slot scheme and that every area read is emptied again; the abort
flag must free a rank whose peer never comes. The compiled kernel on two GPUs:
tests/gpu/test_custom_allreduce_gpu.py."""

from __future__ import annotations

import os
import multiprocessing

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is decorated

from raylight.kernels import fused  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not fused.kernels_interpreted(),
                                reason="needs triton, run by its CPU interpreter")

MAX_GRID, AREA = 4, 4096  # programs at most (rows beyond loop), elements per source rank and slot


class SimulatedGroup:
    """`world` ranks' buffers, flags and call counters in shared host memory; `call` runs one
    collective with a forked process per rank."""

    def __init__(self, world: int):
        self.world = world
        # all bits set: "nothing arrived" (float32 NaN 0xFFFFFFFF)
        self.bufs = [torch.full((2 * world * AREA,), -1, dtype=torch.int32).view(torch.float32).share_memory_()
                     for _ in range(world)]
        self.counters = [torch.zeros(2, dtype=torch.int32).share_memory_() for _ in range(world)]
        self.buf_addrs = torch.tensor([b.data_ptr() for b in self.bufs], dtype=torch.int64)
        self.abort = torch.zeros(1, dtype=torch.int32).share_memory_()

    def launch(self, rank, x, out, res, w, res_out, fuse, eps=1e-6):
        from raylight.kernels.allreduce import one_shot_kernel

        cols = x.shape[-1]
        rows = x.numel() // cols
        grid = min(rows, MAX_GRID)
        one_shot_kernel()[(grid,)](
            x, out, res, w, res_out, self.buf_addrs, self.counters[rank], self.abort, rows, cols, AREA, eps,
            RANK=rank, WORLD=self.world, BLOCK=1 << (cols - 1).bit_length(), FUSE_NORM=fuse, BITS=32,
            ONE_PROGRAM=grid == 1)

    def call(self, xs, res=None, w=None, ranks=None):
        shared = lambda t: t.clone().share_memory_()  # noqa: E731
        xs = [shared(x) for x in xs]
        outs = [shared(torch.full_like(x, float("nan"))) for x in xs]
        res_outs = [shared(torch.full_like(x, float("nan"))) for x in xs]
        res = shared(res) if res is not None else None
        w = shared(w) if w is not None else None
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=self.launch, args=(
            r, xs[r], outs[r], res if res is not None else xs[r], w if w is not None else xs[r], res_outs[r],
            res is not None)) for r in (ranks if ranks is not None else range(self.world))]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            alive = p.is_alive()
            if alive:
                p.kill()
            assert not alive, "a rank never finished: the barrier deadlocked"
            assert p.exitcode == 0, p.exitcode
        return outs, res_outs


@pytest.mark.parametrize("world", [2, 3])
def test_sum_over_calls_of_varying_shapes(world):
    group = SimulatedGroup(world)
    g = torch.Generator().manual_seed(world)
    # rows below, at and above the program count; column counts off the power of two; repeated so
    # both buffer slots are reused with different shapes
    for rows, cols in [(1, 64), (5, 100), (4, 33), (9, 200), (1, 64), (2, 7), (13, 150)]:
        xs = [torch.randn(rows, cols, generator=g) for _ in range(world)]
        outs, _ = group.call(xs)
        want = sum(xs)
        for out in outs:
            assert torch.allclose(out, want, atol=1e-5), (rows, cols)
        assert all(torch.equal(outs[0], o) for o in outs[1:])  # same summation order on every rank
    assert all(c.tolist() == [7, 0] for c in group.counters)  # calls counted, tickets reset
    # every area read was emptied again
    assert all(torch.equal(b.view(torch.int32), torch.full_like(b.view(torch.int32), -1)) for b in group.bufs)


def test_fused_add_rms_norm_matches_torch():
    group = SimulatedGroup(2)
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(3, 96), (6, 128)]:
        xs = [torch.randn(rows, cols, generator=g) for _ in range(2)]
        res, w = torch.randn(rows, cols, generator=g), torch.rand(cols, generator=g) + 0.5
        outs, res_outs = group.call(xs, res, w)
        s = xs[0] + xs[1] + res
        want = w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
        for out, res_out in zip(outs, res_outs):
            assert torch.allclose(res_out, s, atol=1e-5)
            assert torch.allclose(out, want, atol=1e-5)


def test_abort_frees_a_rank_whose_peer_never_comes():
    group = SimulatedGroup(2)
    group.abort.fill_(1)  # what the rank monitor does when it sees a rank exit
    x = torch.randn(2, 16)
    group.call([x, x], ranks=[0])  # rank 1 never launches: rank 0 must still return
