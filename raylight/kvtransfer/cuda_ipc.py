"""Same-node KV push over CUDA IPC: the decode ranks' KV cache tensors are mapped once into the
prefill process, and a push is a device-to-device copy of the block slices. No communicator.

Decode side (`publish`, from KVEndpoint): each rank writes `ipc/<rank>` into the replica's store, a
JSON object: the node's identity (hostname and boot id), the process id, a token naming the caches
in this process (a prefill engine in the same process uses the tensors themselves: CUDA cannot
open an IPC handle in the process that exported it), the device's UUID, and per layer the fields
of `untyped_storage()._share_cuda_()` (bytes hex-encoded; nothing is pickled) with the tensor's
shape, stride, offset and dtype.

Prefill side (`IpcPusher`, from KVSender): the first transfer to a decode endpoint reads its layout
and handles and rebuilds each cache with `torch.UntypedStorage._new_shared_cuda` (on the decode
GPU's index in this process, found by UUID; another GPU of the node is written through peer
access). Each decoder layer's forward hook records an event on the compute stream; a side stream
waits on it and copies that layer's blocks (`dst[dst_ids, :, :, heads] = src[src_ids, :, :, heads]`)
while the next layers compute. At the end of the step the compute stream waits for the side stream,
so blocks freed after the step are not overwritten while being read. After a request's last chunk a
completion thread waits for the copies and does, per (this rank, decode rank) pair of the plan,
what the receiver does for a pair group's END (`expect/<tid>`, `landed/<tid>`): the decode engine's
`KVEndpoint.landed` works unchanged.

A transfer keeps the transport of its first chunk (KVSender asks `route` once per transfer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from raylight.kernels import kv_copy
# The IPC handle fields as JSON-safe dicts (shared with parallel/custom_allreduce.py); re-exported.
from raylight.utils.cuda_ipc_handles import decode_share, describe, encode_share, view  # noqa: F401
from raylight.kvtransfer import pairs
from raylight.kvtransfer.layout import KVLayout, Piece, plan_pieces

logger = logging.getLogger("raylight.kvtransfer")

TRANSPORT = "cuda_ipc"
RETRY_AFTER_S = 30.0  # an endpoint found unusable for IPC (or unreachable) is asked again after this
CONNECT_TIMEOUT_S = 5.0  # the forward thread connects to a new endpoint's store: bounded
MAX_RUNS = 4  # a piece whose (src, dst) block ids form at most this many consecutive runs is copied run by run

# Caches published by this process: token -> weak references to each layer's tensor.
_PUBLISHED: dict[str, list[weakref.ref]] = {}
# Tests only: let CPU tensors take the same-process path (the whole push logic, without CUDA).
ALLOW_CPU = False


class Unavailable(Exception):
    """IPC cannot reach this endpoint (another node, not CUDA, no handles, an open failed)."""


# ---------------------------------------------------------------- identity and handle encoding

def node_id() -> str:
    """This machine, as two processes that can share GPU memory agree on it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def device_uuid(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    try:
        return str(torch.cuda.get_device_properties(_index(device)).uuid)
    except Exception:
        return None


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# ---------------------------------------------------------------- decode side

def publish(store: dist.Store, rank: int, kv_caches: list[torch.Tensor], device: torch.device) -> Optional[str]:
    """Writes `ipc/<rank>` (see the module doc); never raises (a sender then uses the pair path)."""
    token = uuid.uuid4().hex
    try:
        _PUBLISHED[token] = [weakref.ref(t) for t in kv_caches]
        info: dict[str, Any] = {"node": node_id(), "pid": os.getpid(), "token": token,
                                "device_uuid": device_uuid(device), "layers": []}
        if device.type == "cuda":
            try:
                info["layers"] = [describe(t) for t in kv_caches]
            except Exception as e:  # e.g. an allocator that cannot export: same-process peers only
                logger.warning("KV endpoint rank %d: no CUDA IPC handles (%s); peers use pair groups", rank, e)
        store.set(f"ipc/{rank}", json.dumps(info))
        return token
    except Exception as e:
        logger.warning("KV endpoint rank %d: could not publish CUDA IPC handles: %s", rank, e)
        return None


def unpublish(token: Optional[str]) -> None:
    if token is not None:
        _PUBLISHED.pop(token, None)


def _local_index(info: dict[str, Any]) -> int:
    """The decode GPU's index in this process (processes may see different CUDA_VISIBLE_DEVICES)."""
    want = info.get("device_uuid")
    if want:
        for i in range(torch.cuda.device_count()):
            if device_uuid(torch.device("cuda", i)) == want:
                return i
        raise Unavailable(f"the decode GPU {want} is not visible in this process")
    return int(info["layers"][0]["device"])


def open_caches(info: dict[str, Any], device: torch.device) -> tuple[list[torch.Tensor], str]:
    """A decode rank's KV caches as tensors this process writes into, and how they were reached."""
    if info.get("node") != node_id():
        raise Unavailable(f"on another node ({info.get('node')})")
    if info.get("pid") == os.getpid():
        refs = _PUBLISHED.get(info.get("token", ""))
        caches = [r() for r in refs] if refs is not None else None
        if caches is None or any(c is None for c in caches):
            raise Unavailable("published by this process, but its caches are gone")
        if device.type != "cuda" and not ALLOW_CPU:
            raise Unavailable("not CUDA")
        if caches and caches[0].device.type != device.type:
            raise Unavailable("the two caches are on different kinds of device")
        return caches, "same process"
    if device.type != "cuda":
        raise Unavailable("not CUDA")
    layers = info.get("layers") or []
    if not layers:
        raise Unavailable("the decode rank published no CUDA IPC handles")
    index = _local_index(info)
    torch.cuda.init()
    caches = []
    try:
        for d in layers:
            storage = torch.UntypedStorage._new_shared_cuda(*decode_share(d, index))
            caches.append(view(storage, d, torch.device("cuda", index)))
    except Exception as e:
        raise Unavailable(f"cudaIpcOpenMemHandle failed: {e}") from e
    return caches, f"mapped cuda:{index}"


# ---------------------------------------------------------------- prefill side

def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the maximal runs where both id lists go up by one."""
    out: list[list[int]] = []
    for s, d in zip(src, dst):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1][2] += 1
        else:
            out.append([s, d, 1])
    return [tuple(r) for r in out]


def copy_blocks(dst: torch.Tensor, dst_ids: torch.Tensor, dst_heads: slice, src: torch.Tensor,
                src_ids: torch.Tensor, src_heads: slice, block_runs: Optional[list] = None) -> None:
    """dst[dst_ids, :, :, dst_heads] = src[src_ids, :, :, src_heads] (caches [blocks, 2, bs, heads, dim]);
    with `block_runs`, one slice copy per run instead of a gather and a scatter."""
    if block_runs is not None:
        for s, d, n in block_runs:
            dst[d : d + n, :, :, dst_heads].copy_(src[s : s + n, :, :, src_heads], non_blocking=True)
        return
    if (src_heads == slice(0, src.shape[3]) and dst_heads == slice(0, dst.shape[3])
            and kv_copy.can_copy(dst, src)):
        kv_copy.copy_blocks(dst, dst_ids, src, src_ids)  # one pass: see kernels/kv_copy.py
        return
    # index_select + index_copy_: row kernels over whole blocks, several times faster on a GPU than
    # the gather and index_put of advanced indexing (measured on an H200: 363 GB/s with those).
    part = src.index_select(0, src_ids)
    if src_heads != slice(0, src.shape[3]):
        part = part[:, :, :, src_heads]
    if part.device != dst.device:
        part = part.to(dst.device, non_blocking=True)
    target = dst if dst_heads == slice(0, dst.shape[3]) else dst[:, :, :, dst_heads]
    target.index_copy_(0, dst_ids, part)


@dataclass
class IpcPeer:
    """One decode endpoint, mapped: its ranks' caches and our share of the plan."""

    key: tuple[str, int]
    store: dist.Store  # the completion thread's (the forward thread used it only to open)
    layout: KVLayout
    pieces: list[Piece]  # ours (src_rank == our rank)
    num_pairs: int  # in the whole plan
    caches: dict[int, list[torch.Tensor]]  # dst rank -> its layers' caches, as tensors here
    how: str
    broken: bool = False  # its store failed: the decode replica is gone

    @property
    def dst_ranks(self) -> list[int]:
        return sorted({p.dst_rank for p in self.pieces})


@dataclass
class _StepPush:
    tid: int
    peer: IpcPeer
    last: bool
    num_blocks: int
    src_ids: torch.Tensor
    dst_ids: dict[torch.device, torch.Tensor]  # the destination ids on each destination device
    runs: Optional[list]


@dataclass
class _Done:
    """One step's IPC work, for the completion thread."""

    event: Any  # torch.cuda.Event after the step's copies (None on CPU: already done)
    timings: list  # (start, end) CUDA events around each layer's copies, or seconds on CPU
    nbytes: int
    nblocks: int
    finished: list = field(default_factory=list)  # (tid, peer, ok)


class IpcPusher:
    """The IPC half of one prefill rank's KVSender (see the module doc)."""

    def __init__(self, layout: KVLayout, rank: int, kv_caches: list[torch.Tensor], device: torch.device, stats):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.layout, self.rank, self.kv_caches, self.device, self.stats = layout, rank, kv_caches, device, stats
        self.layer_lo = layout.layers_of(rank)[0]
        self.head_lo = layout.kv_heads_of(rank)[0]
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.peers: dict[tuple[str, int], IpcPeer] = {}
        self._unusable: dict[tuple[str, int], float] = {}  # endpoint -> when IPC was found unusable
        self._step: list[_StepPush] = []
        self._timings: list = []
        self._nbytes = 0
        self._failed: set[int] = set()  # transfers whose copy raised: their later chunks are dropped
        self._done: queue.Queue = queue.Queue()
        self.copy_seconds = 0.0  # side-stream time of the copies (CUDA events), for the bandwidth
        self.bytes_copied = 0
        self._thread = threading.Thread(target=self._complete, name=f"raylight-kv-ipc-{rank}", daemon=True)
        self._thread.start()

    # ---- the forward's thread ----
    def peer(self, key: tuple[str, int]) -> tuple[Optional[IpcPeer], str]:
        """The mapped endpoint, or None and why not (asked again after RETRY_AFTER_S)."""
        peer = self.peers.get(key)
        if peer is not None and not peer.broken:
            return peer, ""
        if peer is not None:
            del self.peers[key]
            self._unusable[key] = time.monotonic()
            return None, "its store failed"
        since = self._unusable.get(key)
        if since is not None and time.monotonic() - since < RETRY_AFTER_S:
            return None, ""
        try:
            peer = self._open(key)
        except Exception as e:
            self._unusable[key] = time.monotonic()
            return None, str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
        self._unusable.pop(key, None)
        self.peers[key] = peer
        return peer, ""

    def _open(self, key: tuple[str, int]) -> IpcPeer:
        if self.device.type != "cuda" and not ALLOW_CPU:
            raise Unavailable("this rank is not on CUDA")
        store = pairs.connect_store(*key, timeout_s=CONNECT_TIMEOUT_S)
        layout = KVLayout.from_json(store.get("layout"))
        plan = plan_pieces(self.layout, layout)
        ours = [p for p in plan if p.src_rank == self.rank]
        caches, hows = {}, set()
        for dst in sorted({p.dst_rank for p in ours}):
            if not store.check([f"ipc/{dst}"]):
                raise Unavailable(f"decode rank {dst} published no IPC record")
            caches[dst], how = open_caches(json.loads(store.get(f"ipc/{dst}")), self.device)
            hows.add(how)
            lo, hi = layout.layers_of(dst)
            if len(caches[dst]) != hi - lo:
                raise Unavailable(f"decode rank {dst} published {len(caches[dst])} layers, its layout has {hi - lo}")
        return IpcPeer(key, store, layout, ours, len({(p.src_rank, p.dst_rank) for p in plan}), caches,
                       ", ".join(sorted(hows)))

    def begin_step(self, pushes: list[tuple[Any, IpcPeer]]) -> None:
        """This step's pushes routed here (KVPush, its peer)."""
        self._step, self._timings, self._nbytes = [], [], 0
        for push, peer in pushes:
            if push.transfer_id in self._failed:
                if push.last:
                    self._failed.discard(push.transfer_id)
                continue
            src_ids = torch.tensor(push.src_block_ids, dtype=torch.int64)
            dst_ids = torch.tensor(push.dst_block_ids, dtype=torch.int64)
            devices = {c[0].device for c in peer.caches.values() if c}
            r = runs(push.src_block_ids, push.dst_block_ids)
            self._step.append(_StepPush(
                push.transfer_id, peer, push.last, len(push.src_block_ids),
                src_ids.to(self.device, non_blocking=True),
                {d: dst_ids.to(d, non_blocking=True) for d in devices},
                r if len(r) <= MAX_RUNS else None))

    def layer_done(self, i: int) -> None:
        if not self._step:
            return
        layer = self.layer_lo + i
        src = self.kv_caches[i]
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self.side.wait_event(ready)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ctx = torch.cuda.stream(self.side)
        else:
            t0 = time.perf_counter()
            ctx = contextlib.nullcontext()
        with ctx:
            if self.cuda:
                start.record(self.side)
            for sp in self._step:
                if sp.tid in self._failed or sp.peer.broken:
                    continue
                try:
                    self._nbytes += self._copy_layer(sp, layer, src)
                except Exception as e:
                    logger.warning("KV push of transfer %d over CUDA IPC failed at layer %d: %s", sp.tid, layer, e)
                    self._failed.add(sp.tid)
            if self.cuda:
                end.record(self.side)
        self._timings.append((start, end) if self.cuda else time.perf_counter() - t0)

    def _copy_layer(self, sp: _StepPush, layer: int, src: torch.Tensor) -> int:
        nbytes = 0
        for p in sp.peer.pieces:
            if not p.layer_lo <= layer < p.layer_hi:
                continue
            d_lo = sp.peer.layout.layers_of(p.dst_rank)[0]
            d_head = sp.peer.layout.kv_heads_of(p.dst_rank)[0]
            dst = sp.peer.caches[p.dst_rank][layer - d_lo]
            if self.cuda and dst.device != self.device:  # another GPU: its current stream waits for ours
                with torch.cuda.device(dst.device):
                    torch.cuda.current_stream(dst.device).wait_stream(self.side)
            copy_blocks(dst, sp.dst_ids[dst.device], slice(p.head_lo - d_head, p.head_hi - d_head),
                        src, sp.src_ids, slice(p.head_lo - self.head_lo, p.head_hi - self.head_lo), sp.runs)
            if self.cuda and dst.device != self.device:  # and ours waits for the writes there
                self.side.wait_stream(torch.cuda.current_stream(dst.device))
            nbytes += sp.num_blocks * 2 * src.shape[2] * (p.head_hi - p.head_lo) * src.shape[4] * src.element_size()
        return nbytes

    def end_step(self) -> None:
        if not self._step:
            return
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.side)
            # The step's blocks may be freed and reused once it ends: nothing may write them before
            # the copies have read them.
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            for sp in self._step:  # the id tensors were read on the side stream
                sp.src_ids.record_stream(self.side)
                if self.device in sp.dst_ids:
                    sp.dst_ids[self.device].record_stream(self.side)
        done = _Done(event, self._timings, self._nbytes, sum(sp.num_blocks for sp in self._step))
        for sp in self._step:
            if sp.last:
                done.finished.append((sp.tid, sp.peer, sp.tid not in self._failed))
                self._failed.discard(sp.tid)
        self._step, self._timings = [], []
        self._done.put(done)

    def close(self) -> None:
        self._done.put(None)

    # ---- the completion thread ----
    def _complete(self) -> None:
        while (done := self._done.get()) is not None:
            try:
                if done.event is not None:
                    done.event.synchronize()
                    secs = sum(s.elapsed_time(e) for s, e in done.timings) / 1e3
                else:
                    secs = sum(done.timings)
            except Exception as e:  # a CUDA error: nothing of this step can be trusted
                logger.warning("KV push over CUDA IPC: waiting for the copies failed: %s", e)
                done.finished = [(tid, peer, False) for tid, peer, _ in done.finished]
                secs = 0.0
            self.copy_seconds += secs
            self.bytes_copied += done.nbytes
            self.stats.bytes_sent += done.nbytes
            self.stats.blocks_sent += done.nblocks
            self.stats.send_seconds += secs
            for tid, peer, ok in done.finished:
                self._finish(tid, peer, ok)

    def _finish(self, tid: int, peer: IpcPeer, ok: bool) -> None:
        try:
            if not ok or peer.broken:
                raise RuntimeError("a copy failed" if not ok else "the endpoint's store failed before")
            for _ in peer.dst_ranks:  # what a pair's END does on the decode side, once per pair of ours
                pairs.mark_landed(peer.store, tid, peer.num_pairs)
            self.stats.transfers_done += 1
        except Exception as e:
            logger.warning("KV push of transfer %d to %s:%d over CUDA IPC failed: %s", tid, *peer.key, e)
            self.stats.transfers_failed += 1
            try:
                pairs.mark_failed(peer.store, tid)
            except Exception:
                peer.broken = True
