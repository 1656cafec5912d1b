"""Prefill side, one per rank: pushes each layer's KV to the decode ranks as soon as the layer has
run, while the next layers compute.

The model runner names the step's pushes (`begin_step`, from the step's `KVPush`es, the same on
every rank); a forward hook on each decoder layer gathers that layer's blocks of every push into
one contiguous tensor (`_layer_done`: on the compute stream, so a block freed and reused after the
step cannot change what is sent) and queues it; a sender thread slices it into the pieces each
decode rank needs (kvtransfer/layout.py) and sends them over pair groups (kvtransfer/pairs.py).
After a request's last chunk each pair gets an END.

A decode endpoint on the same node, when both sides are CUDA, is written over CUDA IPC instead
(kvtransfer/cuda_ipc.py: its caches mapped here once, a push is a device-to-device copy on a side
stream, no communicator); the first chunk of a transfer picks its transport, the rest follow it.

Connections are lazy and bounded: at most `max_peers` pair groups per rank, the least recently
used closed beyond that. A decode endpoint that cannot be reached or fails mid-send marks its
transfers failed in its store (when it is still reachable), so the decode side prefills locally
at once instead of waiting for its lease.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from raylight.kvtransfer import cuda_ipc, pairs
from raylight.kvtransfer.layout import KVLayout, Piece, plan_pieces
from raylight.messages import KVPush

logger = logging.getLogger("raylight.kvtransfer")
RETRY_AFTER_S = 5.0  # an endpoint that failed is not tried again for this long


@dataclass
class _Remote:
    """A decode replica as seen from this rank: its store, its layout, our share of the plan."""

    store: dist.Store
    layout: KVLayout
    pieces: list[Piece]  # ours (src_rank == this rank)
    num_pairs: int  # in the whole plan (every END says it)
    groups: dict[int, dist.ProcessGroup] = field(default_factory=dict)  # dst rank -> pair group


@dataclass
class SenderStats:
    blocks_sent: int = 0
    bytes_sent: int = 0
    transfers_done: int = 0
    transfers_failed: int = 0
    send_seconds: float = 0.0


class KVSender:
    def __init__(self, layout: KVLayout, rank: int, kv_caches: list[torch.Tensor], device: torch.device,
                 max_peers: int = 64, transport: str = "auto"):
        self.layout, self.rank, self.kv_caches, self.device = layout, rank, kv_caches, device
        self.transport = transport  # EngineArgs.kv_transport: 'pairs' never takes CUDA IPC
        self.layer_lo = layout.layers_of(rank)[0]
        self.head_lo = layout.kv_heads_of(rank)[0]
        self.max_peers = max_peers
        self.stats = SenderStats()
        self._pushes: list[tuple[KVPush, torch.Tensor]] = []
        self._queue: queue.Queue = queue.Queue()
        self._remotes: dict[tuple[str, int], _Remote] = {}
        self._down: dict[tuple[str, int], float] = {}  # endpoints that failed -> when
        self._failed: set[int] = set()  # transfer ids given up on
        self._lru: collections.OrderedDict = collections.OrderedDict()  # (endpoint, dst rank) -> None
        self.ipc = cuda_ipc.IpcPusher(layout, rank, kv_caches, device, self.stats)
        self._routes: dict[int, Optional[cuda_ipc.IpcPeer]] = {}  # transfer id -> its IPC peer (None: pairs)
        self.transports: dict[tuple[str, int], str] = {}  # endpoint -> the transport its last new transfer took
        self._thread = threading.Thread(target=self._run, name=f"raylight-kv-send-{rank}", daemon=True)
        self._thread.start()

    def install(self, model: torch.nn.Module) -> None:
        """Hooks every local decoder layer of `model` (models keep them in `model.model.local_layers`)."""
        for i, layer in enumerate(model.model.local_layers):
            layer.register_forward_hook(lambda _m, _in, _out, i=i: self._layer_done(i))

    # ---- the forward's thread ----
    def begin_step(self, pushes: list[KVPush]) -> None:
        routed = [(p, self._route(p)) for p in pushes]
        self.ipc.begin_step([(p, peer) for p, peer in routed if peer is not None])
        self._pushes = [(p, torch.tensor(p.src_block_ids, dtype=torch.int64).to(self.device, non_blocking=True))
                        for p, peer in routed if peer is None]

    def _route(self, push: KVPush) -> Optional[cuda_ipc.IpcPeer]:
        """The IPC peer a transfer's chunks are copied to, or None (pair groups): its first chunk decides."""
        tid = push.transfer_id
        if tid in self._routes:
            peer = self._routes[tid]
        else:
            key = (push.host, push.port)
            peer, why = self.ipc.peer(key) if self.transport == "auto" else (None, "kv_transport='pairs'")
            transport = cuda_ipc.TRANSPORT if peer is not None else "pairs"
            if self.transports.get(key) != transport:
                self.transports[key] = transport
                if peer is not None:
                    logger.info("KV push rank %d -> %s:%d: CUDA IPC (%s)", self.rank, *key, peer.how)
                else:
                    logger.info("KV push rank %d -> %s:%d: pair groups (%s)%s", self.rank, *key,
                                "nccl" if self.device.type == "cuda" else "gloo", f"; no CUDA IPC: {why}" if why else "")
            self._routes[tid] = peer
        if push.last:
            self._routes.pop(tid, None)
        return peer

    def _layer_done(self, i: int) -> None:
        self.ipc.layer_done(i)
        if not self._pushes:
            return
        cache = self.kv_caches[i]
        for push, src in self._pushes:
            data = cache.index_select(0, src)  # a copy: the blocks may be reused after the step
            ready = None
            if self.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            self._queue.put(("data", push, self.layer_lo + i, data, ready))

    def end_step(self) -> None:
        self.ipc.end_step()
        for push, _ in self._pushes:
            if push.last:
                self._queue.put(("end", push, 0, None, None))
        self._pushes = []

    def close(self) -> None:
        self._queue.put(None)
        self.ipc.close()

    # ---- the sender thread ----
    def _run(self) -> None:
        with pairs.pair_stream(self.device):  # on CUDA: this device, a stream of this thread's own
            self._send_loop()

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, push, layer, data, ready = item
            if push.transfer_id in self._failed:
                if kind == "end":
                    self._failed.discard(push.transfer_id)
                continue
            key = (push.host, push.port)
            t0 = time.perf_counter()
            try:
                remote = self._remote(key)
                if kind == "data":
                    if ready is not None:
                        ready.synchronize()
                        # made on the compute stream, read on ours: not reused before our reads are done
                        data.record_stream(torch.cuda.current_stream())
                    self._send_layer(key, remote, push, layer, data)
                else:
                    # every DATA of the transfer taken by its receivers (NCCL returns at once), within a deadline
                    pairs.wait_sent(self.device, pairs.PAIR_TIMEOUT.total_seconds())
                    for dst in sorted({p.dst_rank for p in remote.pieces}):
                        pairs.send(self._group(key, remote, dst), pairs.header(
                            pairs.OP_END, push.transfer_id, num_pairs=remote.num_pairs, device=self.device))
                    self.stats.transfers_done += 1
                self.stats.send_seconds += time.perf_counter() - t0
            except Exception as e:
                self._give_up(key, push, e)
                if kind == "end":
                    self._failed.discard(push.transfer_id)

    def _send_layer(self, key, remote: _Remote, push: KVPush, layer: int, data: torch.Tensor) -> None:
        ids = torch.tensor(push.dst_block_ids, dtype=torch.int64, device=self.device)
        for p in remote.pieces:
            if not p.layer_lo <= layer < p.layer_hi:
                continue
            part = data[:, :, :, p.head_lo - self.head_lo : p.head_hi - self.head_lo].contiguous()
            group = self._group(key, remote, p.dst_rank)
            pairs.send(group, pairs.header(pairs.OP_DATA, push.transfer_id, layer, p.head_lo, p.head_hi, len(ids),
                                           device=self.device))
            pairs.send(group, ids)
            pairs.send(group, part)
            self.stats.bytes_sent += part.numel() * part.element_size()
        if layer == self.layer_lo:  # count each block once per transfer chunk, not per layer
            self.stats.blocks_sent += len(ids)

    def _remote(self, key: tuple[str, int]) -> _Remote:
        remote = self._remotes.get(key)
        if remote is not None:
            return remote
        since = self._down.get(key)
        if since is not None and time.monotonic() - since < RETRY_AFTER_S:
            raise ConnectionError(f"KV endpoint {key[0]}:{key[1]} failed {time.monotonic() - since:.1f}s ago")
        store = pairs.connect_store(*key)
        layout = KVLayout.from_json(store.get("layout"))
        plan = plan_pieces(self.layout, layout)
        remote = _Remote(store, layout, [p for p in plan if p.src_rank == self.rank],
                         len({(p.src_rank, p.dst_rank) for p in plan}))
        self._remotes[key] = remote
        self._down.pop(key, None)
        return remote

    def _group(self, key, remote: _Remote, dst: int) -> dist.ProcessGroup:
        lru_key = (key, dst)
        group = remote.groups.get(dst)
        if group is None:
            while len(self._lru) >= self.max_peers:
                (old_key, old_dst), _ = self._lru.popitem(last=False)
                self._close_pair(old_key, old_dst)
            group = remote.groups[dst] = pairs.open_pair(remote.store, dst, self.device)
        self._lru[lru_key] = None
        self._lru.move_to_end(lru_key)
        return group

    def _close_pair(self, key, dst: int) -> None:
        remote = self._remotes.get(key)
        group = remote.groups.pop(dst, None) if remote is not None else None
        if group is not None:
            try:
                pairs.send(group, pairs.header(pairs.OP_CLOSE, device=self.device))
            except Exception:
                pass

    def _give_up(self, key, push: KVPush, err: Exception) -> None:
        logger.warning("KV push of transfer %d to %s:%d failed: %s", push.transfer_id, key[0], key[1], err)
        self.stats.transfers_failed += 1
        self._failed.add(push.transfer_id)
        remote = self._remotes.pop(key, None)
        self._down[key] = time.monotonic()
        for group in (remote.groups.values() if remote is not None else ()):
            abort = getattr(group, "abort", None)  # NCCL: end the sends still queued to the stuck receiver
            if abort is not None:
                try:
                    abort()
                except Exception:
                    pass
        for lru_key in [k for k in self._lru if k[0] == key]:
            del self._lru[lru_key]
        try:  # tell the decode side now rather than at its lease's end
            store = remote.store if remote is not None else pairs.connect_store(*key, timeout_s=2.0)
            pairs.mark_failed(store, push.transfer_id)
        except Exception:
            pass
