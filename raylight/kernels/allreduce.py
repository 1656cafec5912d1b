"""One-shot all-reduce over CUDA IPC buffers, optionally fused with the residual add and RMSNorm
that follow every row-parallel layer (issue 6).

Why our own: a decode step at TP=2 all-reduces 65 tensors of a few KiB each (batch 1 on an
8B model: 8 KiB). NCCL's LL ring takes about 6 us for each inside a CUDA graph (H200,
benchmarks/results/profile-llama-3.1-8b-20261122-111011.json), a tenth of the step, and the
add+RMSNorm after it is one more launch. At these sizes the time is latency, not bandwidth: one
kernel in which every rank pushes its rows to every peer over NVLink, sums what arrives in a
fixed order (so every rank gets bitwise the same result) and normalises the row does the work in
one launch. (A first version that pulled peers' rows after a release/acquire flag handshake took
7.0 us at 8 KB and fell behind NCCL from 256 KB; this one takes 3.6 us and beats NCCL to 4 MiB:
benchmarks/results/parallel-gpu-20261122-125814.json and -132442.json.)

The protocol (push, no flags): every rank's IPC buffer holds two slots of one receive area per
source rank, [slot][source rank][rows x cols], all bits set (a NaN pattern no real value has:
writers canonicalise NaNs) wherever no data is waiting. In call k, slot k % 2, program p of
min(rows, 256) takes rows p, p + grid, ...; for each (all of one call's programs are resident
at once on a Hopper GPU, so no program waits for a peer program that cannot run):
  1. writes its input row straight into every peer's area for this rank (remote stores over
     NVLink, posted: no fence, no flag);
  2. polls its own buffer's areas for that row until no element holds the empty pattern, then sums
     every rank's row in rank order (its own from registers), so every rank gets bitwise the same
     result;
  3. sets the areas it read back to empty, and writes the output (or the residual sum and its
     RMSNorm).
Two slots suffice: a peer can be at most one call ahead (it cannot finish call k+1 without our
data of k+1, which we write only after call k, reset included, has finished), so its writes
for k+1 land in the other slot, and its writes for k+2 come after our reset of slot k % 2.
The call count k lives in device memory (a CUDA graph replays it correctly); the last program of
a call to finish advances it (a lone program, without the ticket atomic).

No multicast objects, no symmetric memory: plain cudaIpcOpenMemHandle mappings (peer access over
NVLink or PCIe), which the issue allows on the shared hosts.

A dead peer would leave the poll spinning forever; it also reads a device flag that the
replica's rank monitor sets (from a stream of its own) when it sees a rank exit, so the kernel
ends and the step fails instead of hanging the GPU.
"""

from __future__ import annotations

import functools

import torch

triton = None
tl = None


def _one_shot_kernel(inp_ptr, out_ptr, res_ptr, w_ptr, res_out_ptr,
                     bufs_ptr, counter_ptr, abort_ptr,
                     n_rows, n_cols, area_elems, eps,
                     RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, FUSE_NORM: tl.constexpr,
                     BITS: tl.constexpr, ONE_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    ty = inp_ptr.dtype.element_ty
    ity = tl.int16 if BITS == 16 else tl.int32
    empty = tl.full([BLOCK], -1, ity).to(ty, bitcast=True)  # all bits set
    slot = tl.load(counter_ptr) % 2
    for row in range(pid, n_rows, grid):
        offs = tl.cast(row, tl.int64) * n_cols + cols
        x = tl.load(inp_ptr + offs, mask=mask, other=0.0)
        x = tl.where(x != x, float("nan"), x).to(ty)  # canonical NaN: never the empty pattern
        # 1. push: my row into every peer's area for me
        for p in tl.static_range(WORLD):
            if p != RANK:
                peer = tl.load(bufs_ptr + p).to(tl.pointer_type(ty))
                tl.store(peer + (slot * WORLD + RANK) * area_elems + offs, x, mask=mask)
        # 2. gather: every peer's row from my own buffer, as it arrives; sum in rank order
        mine = tl.load(bufs_ptr + RANK).to(tl.pointer_type(ty))
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            if p == RANK:
                acc += x.to(tl.float32)
            else:
                src = mine + (slot * WORLD + p) * area_elems + offs
                v = tl.load(src, mask=mask, other=0.0, volatile=True)
                waiting = tl.sum(((v.to(ity, bitcast=True) == -1) & mask).to(tl.int32), axis=0)
                spins = 0
                while waiting > 0:
                    v = tl.load(src, mask=mask, other=0.0, volatile=True)
                    waiting = tl.sum(((v.to(ity, bitcast=True) == -1) & mask).to(tl.int32), axis=0)
                    spins += 1
                    if spins % 4096 == 0:
                        if tl.load(abort_ptr, volatile=True) != 0:
                            waiting = 0  # the replica is failing: leave, the output does not matter
                acc += v.to(tl.float32)
                tl.store(src, empty, mask=mask)  # 3. read: empty again for call k + 2
        if FUSE_NORM:
            # the rounding of all_reduce followed by kernels/fused.py's add+RMSNorm
            s = acc.to(ty).to(tl.float32)
            r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            h = (s + r).to(ty)
            tl.store(res_out_ptr + offs, h, mask=mask)
            h = h.to(tl.float32)
            var = tl.sum(h * h, axis=0) / n_cols
            h = (h * (1.0 / tl.sqrt(var + eps))).to(ty).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (w * h).to(ty), mask=mask)
        else:
            tl.store(out_ptr + offs, acc.to(ty), mask=mask)
    # the last program to finish advances the call count, after every program has read it (a lone
    # program, as at batch 1, needs no ticket: the atomic's round trip is a tenth of the call)
    if ONE_PROGRAM:
        tl.store(counter_ptr, tl.load(counter_ptr) + 1)
    elif tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel", scope="gpu") == grid - 1:
        tl.store(counter_ptr, tl.load(counter_ptr) + 1)
        tl.store(counter_ptr + 1, 0)


@functools.lru_cache(maxsize=None)
def one_shot_kernel():
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_one_shot_kernel)


def warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
