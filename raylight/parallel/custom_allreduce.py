"""The TP group's all-reduce for small tensors: a one-shot kernel over CUDA IPC buffers
(kernels/allreduce.py), used where it applies and NCCL everywhere else.

Applies when: CUDA, every rank of the TP group on one node with peer access to every other,
a contiguous bf16/fp16/fp32 tensor whose rows fit one program (hidden size <= 16384) and that
fits the buffer (`max_bytes`, by default 8 MiB / TP: 4 MiB at TP=2; W1's 256-row decode steps
at hidden 2048 are 1 MiB). Prefill steps' large all-reduces stay with NCCL, which is
bandwidth-optimal there. `KernelConfig.custom_allreduce` off (engine argument `custom_allreduce`,
env RAYLIGHT_CUSTOM_ALLREDUCE=0/1 overrides) turns it off: NCCL for everything.

Setup is collective over the whole world (every rank calls `CustomAllReduce.create`), checks
the kernel against NCCL on test tensors, and gives up (returns None, NCCL stays) on a failure
that Python sees: peer access refused, IPC unavailable, a mismatch. (A fault inside the kernel,
such as an illegal address, ends the CUDA context like any kernel fault.)

Why not NCCL's own small-message paths or torch's symmetric memory: NCCL's LL ring costs 9-10 us
per 8 KB call inside a CUDA graph on two H200s, and symmetric memory may create multicast objects,
which these shared hosts forbid. Measured in the same runs (scripts/bench_parallel.py): 3.6 us at
8 KB, 8.7 us at 1 MiB, 19.8 us at 4 MiB against NCCL's 9.6, 17.2 and 35.2 us.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import torch
import torch.distributed as dist

from raylight.kernels import allreduce as kernels
from raylight.utils.cuda_ipc_handles import decode_share, describe, view

_GATHER_BYTES = 4096  # one rank's buffer description (about 400 bytes of JSON) in the start-up exchange

logger = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_COLS = 16384


class CustomAllReduce:
    """One TP group's IPC buffers and the launches of the one-shot kernel. Not thread-safe: like
    NCCL calls, all launches come from the thread that runs the model."""

    def __init__(self, rank: int, world: int, device: torch.device, bufs: torch.Tensor, keep: list,
                 max_bytes: int, max_grid: int = 256):
        self.rank, self.world, self.device = rank, world, device
        self.max_bytes, self.max_grid = max_bytes, max_grid
        self.bufs = bufs  # int64 [world]: device addresses of every rank's buffer (peers' mapped here)
        self.counter = torch.zeros(2, dtype=torch.int32, device=device)  # call count, programs done
        self.abort_flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._abort_stream: Optional[torch.cuda.Stream] = None
        self._keep = keep  # own buffer and the peers' mapped tensors, alive as long as we are
        self.num_calls = 0

    @classmethod
    def create(cls, tp_group: dist.ProcessGroup, cpu_group: dist.ProcessGroup, tp_ranks: list[int],
               device: torch.device, max_bytes: Optional[int] = None, enabled: bool = True
               ) -> Optional["CustomAllReduce"]:
        """Collective over the world (every rank calls it, each with its own TP group's ranks), even with
        `enabled` False (then every rank returns None)."""
        world, rank = len(tp_ranks), tp_ranks.index(dist.get_rank())
        max_bytes = (max_bytes or (8 << 20) // world) // 16 * 16
        ok, why, mine = True, "", None
        try:
            peers = [d for d in range(torch.cuda.device_count()) if d != device.index]
            if device.type != "cuda" or not enabled or world > 8:
                ok, why = False, "off" if not enabled else "not CUDA / more than 8 ranks"
            elif not all(torch.cuda.can_device_access_peer(device.index, d) for d in peers):
                ok, why = False, "no peer access between this node's GPUs"
            else:
                # two slots x one area per source rank, all bits set: "nothing arrived"
                mine = torch.full((2 * world * max_bytes,), 0xFF, dtype=torch.uint8, device=device)
                torch.cuda.synchronize(device)  # filled before a peer maps it
        except Exception as e:  # noqa: BLE001 - any failure means: stay with NCCL
            ok, why = False, f"{type(e).__name__}: {e}"
        shared = None
        if ok:
            try:
                shared = describe(mine)
            except Exception as e:  # noqa: BLE001
                ok, why = False, f"{type(e).__name__}: {e}"
        everyone = _all_gather_json(shared, cpu_group)
        group_shares = [everyone[r] for r in tp_ranks]
        if ok and any(s is None for s in group_shares):
            ok, why = False, "a peer could not set up its buffer"
        keep, addrs = [mine], []
        if ok:
            try:
                for r, d in enumerate(group_shares):
                    t = mine if r == rank else _open(d, device)
                    keep.append(t)
                    addrs.append(t.data_ptr())
            except Exception as e:  # noqa: BLE001
                ok, why = False, f"{type(e).__name__}: {e}"
        car = None
        if ok:
            car = cls(rank, world, device, torch.tensor(addrs, dtype=torch.int64, device=device), keep, max_bytes)
            try:
                car._self_check(tp_group)
            except Exception as e:  # noqa: BLE001
                car, why = None, f"self-check failed: {type(e).__name__}: {e}"
        # Every rank of the group must agree, or one rank would wait in the kernel for a peer on NCCL.
        verdicts = _all_gather_json(car is not None, cpu_group)
        if not all(verdicts[r] for r in tp_ranks):
            logger.warning("custom all-reduce off for TP ranks %s (%s): NCCL for every all-reduce",
                           tp_ranks, why or "a peer failed")
            return None
        logger.info("custom all-reduce on for TP ranks %s: one-shot up to %d KiB", tp_ranks, max_bytes >> 10)
        return car

    # ---- what fits ----
    def fits(self, x: torch.Tensor) -> bool:
        if x.dim() == 0 or x.dtype not in DTYPES or not x.is_contiguous() or x.device != self.device:
            return False
        return 0 < x.shape[-1] <= MAX_COLS and x.numel() * x.element_size() <= self.max_bytes

    # ---- calls ----
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group, in a new tensor (x untouched)."""
        out = torch.empty_like(x)
        self._launch(x, out, x, x, out, fuse=False, eps=0.0)
        return out

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(all_reduce(x) + residual) * weight, all_reduce(x) + residual), in one kernel."""
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        self._launch(x, out, residual, weight, res_out, fuse=True, eps=eps)
        return out, res_out

    def can_fuse(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        return (self.fits(x) and residual.shape == x.shape and residual.dtype == x.dtype
                and residual.is_contiguous() and weight.dtype == x.dtype and weight.is_contiguous()
                and weight.numel() == x.shape[-1])

    def _launch(self, x, out, residual, weight, res_out, fuse: bool, eps: float) -> None:
        cols = x.shape[-1]
        rows = x.numel() // cols
        block = 1 << (cols - 1).bit_length()
        grid = max(1, min(rows, self.max_grid))
        kernels.one_shot_kernel()[(grid,)](
            x, out, residual, weight, res_out, self.bufs, self.counter, self.abort_flag,
            rows, cols, self.max_bytes // x.element_size(), float(eps),
            RANK=self.rank, WORLD=self.world, BLOCK=block, FUSE_NORM=fuse, BITS=8 * x.element_size(),
            ONE_PROGRAM=grid == 1, num_warps=kernels.warps_for(block))
        self.num_calls += 1

    def abort(self) -> None:
        """Lets every kernel still waiting for a peer return (from any thread: the rank monitor's).
        The flag is written from a stream of its own, which runs beside the spinning kernel."""
        with torch.cuda.device(self.device):
            self._abort_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._abort_stream):
                self.abort_flag.fill_(1)

    def _self_check(self, tp_group: dist.ProcessGroup) -> None:
        """The kernel's sum and fused norm against NCCL and torch on test tensors: more rows than
        programs, odd widths, both buffer slots. Every rank launches every call before judging:
        a rank that stopped early would leave its peers waiting in the kernel for it."""
        g = torch.Generator(device=self.device).manual_seed(1234 + self.rank)
        problems = []
        for rows, cols in ((1, 4096), (3 * self.max_grid + 5, 1000), (2, 8), (1, 4096)):
            x = torch.randn(rows, cols, generator=g, device=self.device, dtype=torch.bfloat16)
            if not self.fits(x):
                continue
            ref = x.clone()
            dist.all_reduce(ref, group=tp_group)
            got = self.all_reduce(x)
            res = torch.randn_like(x)
            w = torch.rand(cols, device=self.device, dtype=x.dtype) + 0.5
            normed, res_out = self.all_reduce_add_rms_norm(x, res, w, 1e-6)
            # NCCL rounds after each step of its ring; we round once: equal at TP=2, close beyond.
            if not torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2 * self.world):
                problems.append(f"sum of {rows}x{cols} off NCCL's by {(got.float() - ref.float()).abs().max().item()}")
            s = (ref.float() + res.float()).to(x.dtype)
            h = s.float()
            want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
            if ((res_out.float() - s.float()).abs().max().item() > 0.05 * self.world
                    or (normed.float() - want.float()).abs().max().item() > 0.05):
                problems.append(f"fused add+RMSNorm of {rows}x{cols} off torch's")
        torch.cuda.synchronize(self.device)
        if problems:
            raise RuntimeError("; ".join(problems))


def _all_gather_json(value, group: dist.ProcessGroup) -> list:
    """Every rank's JSON-able `value`, as uint8 tensors over the gloo group: no pickle on the socket."""
    raw = json.dumps(value).encode()
    if len(raw) > _GATHER_BYTES - 4:
        raise ValueError(f"{len(raw)} bytes do not fit the {_GATHER_BYTES}-byte exchange")
    buf = torch.zeros(_GATHER_BYTES, dtype=torch.uint8)
    buf[:4] = torch.tensor(list(len(raw).to_bytes(4, "little")), dtype=torch.uint8)
    buf[4 : 4 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buf, group=group)
    values = []
    for b in out:
        n = int.from_bytes(bytes(b[:4].tolist()), "little")
        values.append(json.loads(bytes(b[4 : 4 + n].tolist()).decode()))
    return values


def _open(d: dict, device: torch.device) -> torch.Tensor:
    """A peer's buffer, mapped on GPU `device` (ours) rather than on the peer's: a kernel on our GPU
    may only touch peer memory mapped in our own context, where cudaIpcOpenMemHandle enables peer
    access. No IPC event to wait for: the peer synchronised before sharing."""
    torch.cuda.init()  # _new_shared_cuda does not initialise CUDA itself (a fresh process segfaults)
    share = list(decode_share(d, device.index))
    share[-1] = False  # event_sync_required
    storage = torch.UntypedStorage._new_shared_cuda(*share)
    return view(storage, d, device)
