"""The byte path between one prefill rank and one decode rank: a two-rank process group of its
own (gloo on CPU, NCCL between GPUs), built from the decode replica's store, beside each side's
own TP/PP groups.

Rendezvous: the decode replica's rank 0 hosts a `TCPStore` (its KV endpoint). A sender takes a
ticket `conn/<dst>/<i>` there and writes a unique pair name under it; the destination rank's
acceptor thread waits for tickets in order and joins the pair group as its rank 1. Only KV bytes
and fixed int64 headers travel on a pair group; nothing is ever pickled.

Wire format, per message: an int64 header [op, transfer_id, layer, head_lo, head_hi, num_blocks,
num_pairs, 0]; for DATA then the destination block ids (int64 [num_blocks]) and the KV itself
([num_blocks, 2, block_size, head_hi - head_lo, head_dim] in the cache's dtype). END closes one
sender's share of a transfer; CLOSE ends the pair. Every tensor lives on the pair's device (NCCL
takes CUDA tensors only; the header too).

On CUDA each side's thread runs its pair traffic on a stream of its own (`pair_stream`): NCCL's
`wait()` makes the *current* stream wait for the transfer, and a receiver that posts the next
header's recv on the engine's stream would stall every forward until the next push arrives.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import uuid
from typing import Iterator, Optional

import torch
import torch.distributed as dist

HEADER_LEN = 8
OP_DATA, OP_END, OP_CLOSE = 1, 2, 3
TICKET_WAIT = datetime.timedelta(hours=1)  # an acceptor's wait for the next sender (a timeout only loops)
PAIR_TIMEOUT = datetime.timedelta(seconds=60)  # an idle pair's recv waits longer: see Receiver
IDLE_RECV = datetime.timedelta(days=365)


def header(op: int, transfer_id: int = 0, layer: int = 0, head_lo: int = 0, head_hi: int = 0,
           num_blocks: int = 0, num_pairs: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
    """`num_pairs` (END only): how many (sender rank, receiver rank) pairs the transfer's plan has,
    so the decode side knows how many ENDs make it complete. `device`: the pair's (default CPU)."""
    return torch.tensor([op, transfer_id, layer, head_lo, head_hi, num_blocks, num_pairs, 0], dtype=torch.int64,
                        device=device)


@contextlib.contextmanager
def pair_stream(device: torch.device) -> Iterator[None]:
    """The calling thread's pair traffic on `device`: on CUDA, that device current and a stream of the
    thread's own; elsewhere nothing to set."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        yield


def wait_sent(device: torch.device, timeout_s: float) -> None:
    """Host-waits until the sends queued on this thread's pair stream are done (NCCL sends return
    at once; gloo's are done when they return), for at most `timeout_s`: a receiver that stopped
    taking data must fail this transfer, not hold the sender thread forever."""
    if device.type != "cuda":
        return
    done = torch.cuda.Event()
    done.record()
    deadline = time.monotonic() + timeout_s
    pause = 1e-5
    while not done.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"KV sends not taken by the receiver within {timeout_s:.0f}s")
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


def advertised_host(configured: Optional[str]) -> str:
    """The address peers reach this node's KV endpoint at."""
    if configured:
        return configured
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return "127.0.0.1"


def host_store(host: str) -> dist.TCPStore:
    """The decode replica's store, on a free port of `host` only (a TCPStore that makes its own
    socket listens on every interface: 127.0.0.1 stays private when that is what peers use)."""
    sock = socket.create_server((host, 0), backlog=128)
    port = sock.getsockname()[1]
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=30), master_listen_fd=sock.detach())


def connect_store(host: str, port: int, timeout_s: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def new_pair_group(store: dist.Store, name: str, rank: int, device: torch.device) -> dist.ProcessGroup:
    """Rank 0 is the sender, rank 1 the receiver; both block here until the other joins (for as long
    as the store's timeout). The sender's sends give up after PAIR_TIMEOUT (a stuck receiver must not
    stall the prefill replica's other transfers); the receiver waits for the next message as long as
    the pair lives (an idle pair is no failure; a dead gloo sender ends the wait at once).

    With NCCL the sender's deadline is its own (`wait_sent`), not the communicator's: NCCL's watchdog
    takes the whole process down when an operation outlives the group's timeout (its default error
    handling), and one stuck decode replica must not kill the prefill replica."""
    prefixed = dist.PrefixStore(f"pair/{name}/", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = IDLE_RECV
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
    return dist.ProcessGroupGloo(prefixed, rank, 2, PAIR_TIMEOUT if rank == 0 else IDLE_RECV)


def open_pair(store: dist.Store, dst_rank: int, device: torch.device) -> dist.ProcessGroup:
    """Sender side: takes a ticket at destination rank `dst_rank`'s acceptor and joins the pair."""
    name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    ticket = store.add(f"conn/{dst_rank}/n", 1) - 1
    store.set(f"conn/{dst_rank}/{ticket}", name)
    return new_pair_group(store, name, 0, device)


# ---- the decode store's landing bookkeeping (written by receivers and IPC senders, read by the engine)
FAILED = -(1 << 40)  # added to a transfer's landed counter by a sender that gave up on it
ANY_KEY = "landed/any"  # bumped after every change of any transfer's counter: one read tells whether to look


def mark_landed(store: dist.Store, transfer_id: int, num_pairs: int) -> None:
    """One (sender rank, receiver rank) pair's share of a transfer is in the decode cache."""
    store.set(f"expect/{transfer_id}", str(num_pairs))
    store.add(f"landed/{transfer_id}", 1)
    store.add(ANY_KEY, 1)


def mark_failed(store: dist.Store, transfer_id: int) -> None:
    store.add(f"landed/{transfer_id}", FAILED)
    store.add(ANY_KEY, 1)


def send(group: dist.ProcessGroup, t: torch.Tensor) -> None:
    group.send([t], 1, 0).wait()


def recv(group: dist.ProcessGroup, t: torch.Tensor) -> None:
    group.recv([t], 0, 0).wait()


def recv_header(group: dist.ProcessGroup, head: torch.Tensor, staging: Optional[torch.Tensor] = None) -> list[int]:
    """The next header's values, received into `head` (on the pair's device). On CUDA the host waits
    through `staging` (pinned, HEADER_LEN int64) and a stream synchronize, which lets go of the GIL: an
    idle pair waits here until the next push comes, and the engine's own thread must keep running."""
    recv(group, head)
    if not head.is_cuda:
        return head.tolist()
    staging.copy_(head, non_blocking=True)
    torch.cuda.current_stream(head.device).synchronize()
    return staging.tolist()
