"""One-shot all-reduce over CUDA IPC buffers, optionally fused with the residual add and RMSNorm
that follow every row-parallel layer (issue 6).

Why our own: a decode step at TP=2 all-reduces 65 tensors of a few KiB each (batch 1 on an
8B model: 8 KiB). NCCL's LL ring takes about 6 us for each inside a CUDA graph (H200,
benchmarks/results/profile-llama-3.1-8b-20261122-111011.json), a tenth of the step, and the
add+RMSNorm after it is one more launch. At these sizes the time is latency, not bandwidth: one
kernel in which every rank reads every peer's copy over NVLink, sums in a fixed order (so every
rank gets bitwise the same result) and normalises the row, does the work in one launch.

The protocol, per program (CTA) `pid` of a fixed grid of `GRID` programs:
  1. copy this rank's rows (rows pid, pid + GRID, ...) into its own IPC buffer, in the region
     owned by (parity, pid);
  2. write `epoch` into every peer's flag slot [pid, my rank] (release, system scope), then
     wait until every peer has written `epoch` into our slots [pid, peer] (acquire);
  3. read the region (parity, pid) of every rank's buffer, sum, and write the output rows.
`epoch` is this program's call counter, kept in device memory (so a CUDA graph replays it
correctly) and equal on every rank because every rank launches the same calls with the same
fixed grid. Rows map to programs and regions the same way in every call, so a program only ever
races with the same program of the previous call; alternating parity between consecutive calls
keeps a fast rank's next write away from the region a slow peer may still be reading: by the
time a rank writes a parity again, its wait in between saw every peer start the later call.

No multicast objects, no symmetric memory: plain cudaIpcOpenMemHandle mappings (peer access over
NVLink or PCIe), which the issue allows on the shared hosts.

A dead peer would leave the wait spinning forever; the spin also polls a device flag that the
replica's rank monitor sets (from a stream of its own) when it sees a rank exit, so the kernel
ends and the step fails instead of hanging the GPU.
"""

from __future__ import annotations

import functools

import torch

triton = None
tl = None


def _one_shot_kernel(inp_ptr, out_ptr, res_ptr, w_ptr, res_out_ptr,
                     bufs_ptr, flags_ptr, counter_ptr, abort_ptr,
                     n_rows, n_cols, region_elems, eps,
                     RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, FUSE_NORM: tl.constexpr):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    ty = inp_ptr.dtype.element_ty
    epoch = tl.load(counter_ptr + pid) + 1
    tl.store(counter_ptr + pid, epoch)
    region = tl.cast((epoch % 2) * grid + pid, tl.int64) * region_elems
    own = tl.load(bufs_ptr + RANK).to(tl.pointer_type(ty)) + region

    # 1. this rank's rows into its own buffer
    for row in range(pid, n_rows, grid):
        j = (row - pid) // grid
        x = tl.load(inp_ptr + tl.cast(row, tl.int64) * n_cols + cols, mask=mask)
        tl.store(own + j * n_cols + cols, x, mask=mask)
    tl.debug_barrier()  # every thread's copy is done before the flag says so

    # 2. tell the peers, then wait for them
    for p in tl.static_range(WORLD):
        if p != RANK:
            peer_flags = tl.load(flags_ptr + p).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    my_flags = tl.load(flags_ptr + RANK).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        if p != RANK:
            seen = tl.atomic_add(my_flags + pid * WORLD + p, 0, sem="acquire", scope="sys")
            spins = 0
            while seen < epoch:
                seen = tl.atomic_add(my_flags + pid * WORLD + p, 0, sem="acquire", scope="sys")
                spins += 1
                if spins % 1024 == 0:
                    if tl.load(abort_ptr, volatile=True) != 0:
                        seen = epoch  # the replica is failing: leave, the output does not matter
    tl.debug_barrier()

    # 3. sum every rank's copy, in rank order on every rank
    for row in range(pid, n_rows, grid):
        j = (row - pid) // grid
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            buf = tl.load(bufs_ptr + p).to(tl.pointer_type(ty)) + region
            # .cg: straight from L2/NVLink, never a stale L1 line from two calls ago (same region)
            acc += tl.load(buf + j * n_cols + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        offs = tl.cast(row, tl.int64) * n_cols + cols
        if FUSE_NORM:
            # the rounding of all_reduce followed by kernels/fused.py's add+RMSNorm
            s = acc.to(ty).to(tl.float32)
            r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = (s + r).to(ty)
            tl.store(res_out_ptr + offs, x, mask=mask)
            h = x.to(tl.float32)
            var = tl.sum(h * h, axis=0) / n_cols
            h = (h * (1.0 / tl.sqrt(var + eps))).to(ty).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (w * h).to(ty), mask=mask)
        else:
            tl.store(out_ptr + offs, acc.to(ty), mask=mask)


@functools.lru_cache(maxsize=None)
def one_shot_kernel():
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_one_shot_kernel)


def warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
