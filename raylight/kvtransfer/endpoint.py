"""Decode side, one per rank: where prefill ranks push prompt KV.

Rank 0 hosts the replica's store (the endpoint peers are told about in a `KVReservation`) and
writes the replica's `KVLayout` there; every rank runs an acceptor thread that joins the pair
groups senders open to it (kvtransfer/pairs.py) and a receiver thread per pair that writes each
arriving piece into this rank's KV cache. A sender's END adds one to `landed/<transfer_id>` in
the store; the engine (rank 0) reads that counter to know when a transfer's KV is all there.

Why receive on threads: the engine's step loop never waits for a transfer; pieces land into
blocks that no running request reads (they are reserved and not yet scheduled), so writing
them beside a forward is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from raylight.kvtransfer import cuda_ipc, pairs
from raylight.kvtransfer.layout import KVLayout

logger = logging.getLogger("raylight.kvtransfer")


_STOP = "-stop-"  # a ticket that ends the acceptor (close); pair names never take this form


class KVEndpoint:
    def __init__(self, layout: KVLayout, rank: int, kv_caches: list[torch.Tensor], store: dist.Store,
                 host: str, port: int, device: torch.device):
        self.layout, self.rank, self.kv_caches = layout, rank, kv_caches
        self.store, self.host, self.port, self.device = store, host, port, device
        self.layer_lo = layout.layers_of(rank)[0]
        self.head_lo = layout.kv_heads_of(rank)[0]
        self._stopped = False
        self._any_seen = 0  # pairs.ANY_KEY as last read (anything_landed)
        self._pairs: list[dist.ProcessGroup] = []
        # Same-node senders map this rank's caches over CUDA IPC instead of joining a pair group.
        self._ipc_token = cuda_ipc.publish(store, rank, kv_caches, device)
        self._acceptor = threading.Thread(target=self._accept, name=f"raylight-kv-accept-{rank}", daemon=True)
        self._acceptor.start()

    @classmethod
    def start(cls, layout: KVLayout, rank: int, kv_caches: list[torch.Tensor], device: torch.device,
              cpu_group: Optional[dist.ProcessGroup], host: Optional[str]) -> "KVEndpoint":
        """Collective over the replica's ranks (all call it, after their KV caches exist): rank 0 hosts
        the store and tells the others where it is."""
        if rank == 0:
            host = pairs.advertised_host(host)
            store = pairs.host_store(host)
            store.set("layout", layout.to_json())
            port = store.port
        addr = torch.zeros(66, dtype=torch.int64)
        if cpu_group is not None:
            if rank == 0:
                raw = host.encode()
                addr[0], addr[1] = port, len(raw)
                addr[2 : 2 + len(raw)] = torch.tensor(list(raw), dtype=torch.int64)
            dist.broadcast(addr, src=0, group=cpu_group)
            if rank != 0:
                port, n = int(addr[0]), int(addr[1])
                host = bytes(addr[2 : 2 + n].tolist()).decode()
                store = pairs.connect_store(host, port)
        logger.info("KV endpoint rank %d: %s:%d (layers %s, KV heads %s)", rank, host, port,
                    layout.layers_of(rank), layout.kv_heads_of(rank))
        return cls(layout, rank, kv_caches, store, host, port, device)

    # ---- rank 0: the engine's view ----
    def anything_landed(self) -> bool:
        """Whether any transfer landed or failed since the last call: one store read per engine step,
        not one per pending transfer."""
        n = self.store.add(pairs.ANY_KEY, 0)
        changed, self._any_seen = n != self._any_seen, n
        return changed

    def landed(self, transfer_id: int) -> Optional[bool]:
        """True once every sender's share of the transfer is in the caches of every rank, False while
        not, None if a sender gave up on it."""
        n = self.store.add(f"landed/{transfer_id}", 0)
        if n < 0:
            return None
        if n == 0:
            return False
        return n >= int(self.store.get(f"expect/{transfer_id}"))

    def forget(self, transfer_id: int) -> None:
        for key in (f"landed/{transfer_id}", f"expect/{transfer_id}"):
            try:
                self.store.delete_key(key)
            except Exception:
                pass

    def close(self) -> None:
        """Stops accepting pushes; on rank 0 the store (its listening socket) goes with the last reference.
        The acceptor is woken by a ticket of its own and joined first: left blocked in the store's wait
        until the interpreter exits, its wait fails in a dying thread and the process aborts ("terminate
        called without an active exception")."""
        self._stopped = True
        cuda_ipc.unpublish(self._ipc_token)
        try:
            ticket = self.store.add(f"conn/{self.rank}/n", 1) - 1
            self.store.set(f"conn/{self.rank}/{ticket}", _STOP)
        except Exception:  # the store is gone already: the acceptor's wait has failed, it returns
            pass
        self._acceptor.join(timeout=5.0)
        self.store = None

    # ---- every rank ----
    def _accept(self) -> None:
        # A store client of its own: a client blocks in `wait` holding its socket, which would stall
        # the engine's `landed` reads on a shared one.
        store = pairs.connect_store(self.host, self.port)
        ticket = 0
        while not self._stopped:
            key = f"conn/{self.rank}/{ticket}"
            try:
                store.wait([key], pairs.TICKET_WAIT)
            except Exception:  # no sender for an hour, or the store is gone (shutting down)
                if self._stopped:
                    return
                time.sleep(0.5)
                continue
            name = store.get(key).decode()
            if name == _STOP:
                return
            ticket += 1
            threading.Thread(target=self._serve, args=(name,), name=f"raylight-kv-recv-{self.rank}",
                             daemon=True).start()

    def _serve(self, name: str) -> None:
        try:
            store = pairs.connect_store(self.host, self.port)  # this thread's own (see _accept)
            group = pairs.new_pair_group(store, name, 1, self.device)
        except Exception as e:
            logger.warning("KV pair %s could not be joined: %s", name, e)
            return
        with pairs.pair_stream(self.device):  # on CUDA a stream of this thread's own: see kvtransfer/pairs.py
            self._receive(name, group, store)

    def _receive(self, name: str, group: dist.ProcessGroup, store: dist.Store) -> None:
        head = torch.zeros(pairs.HEADER_LEN, dtype=torch.int64, device=self.device)
        cuda = self.device.type == "cuda"
        staging = torch.empty(pairs.HEADER_LEN, dtype=torch.int64, pin_memory=True) if cuda else None
        try:
            while not self._stopped:
                op, tid, layer, h_lo, h_hi, n, total = pairs.recv_header(group, head, staging)[:7]
                if op == pairs.OP_CLOSE:
                    return
                if op == pairs.OP_END:
                    if cuda:
                        torch.cuda.current_stream(self.device).synchronize()  # the scatters are done
                    pairs.mark_landed(store, tid, total)
                    continue
                ids = torch.empty(n, dtype=torch.int64, device=self.device)
                pairs.recv(group, ids)
                cache = self.kv_caches[layer - self.layer_lo]
                data = torch.empty((n, *cache.shape[1:3], h_hi - h_lo, cache.shape[4]), dtype=cache.dtype,
                                   device=self.device)
                pairs.recv(group, data)
                cache[ids, :, :, h_lo - self.head_lo : h_hi - self.head_lo] = data
        except Exception as e:  # the sender went away: its unfinished transfers never count as landed
            if not self._stopped:
                logger.info("KV pair %s closed: %s", name, e)
