"""How the ranks of a replica form their torch.distributed world, without rank 0 sitting blind in
the rendezvous while a peer has already died.

Rank 0 hosts the TCPStore at `init_method` (tcp://host:port) and waits for every other rank to
check in (a key each), polling its launcher between looks: a rank that exits while starting
(an import error, a bad setting, a missing model file) fails rank 0 within a poll with that
rank's own error, instead of after `distributed_timeout_s` with gloo's "Timed out waiting for
clients". Only then does it build the process group on that store; the other ranks connect to
it, check in, and build theirs. Both sides call `init_process_group(store=...)`, so their keys
agree.
"""

from __future__ import annotations

import datetime
import socket
import time
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from raylight.parallel.state import backend_for

JOINED = "raylight/joined/{}"


class RankDiedError(RuntimeError):
    """A rank of the replica exited: the replica cannot run another step."""


def _address(init_method: str) -> tuple[str, int]:
    url = urlparse(init_method)
    if url.scheme != "tcp" or url.hostname is None or url.port is None:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    return url.hostname, url.port


def host_world(world_size: int, init_method: str, device: torch.device, timeout_s: float,
               dead: Callable[[], Optional[str]], poll_s: float = 0.1) -> None:
    """Rank 0: hosts the store, waits for ranks 1 .. world_size - 1 to check in while asking
    `dead()` (the launcher's) whether one has exited, then joins the world."""
    host, port = _address(init_method)
    timeout = datetime.timedelta(seconds=timeout_s)
    # Listen on init_method's address only (127.0.0.1 for local ranks, the node's IP under Serve): a store
    # TCPStore makes itself listens on every interface.
    sock = socket.create_server((host, port), reuse_port=False, backlog=max(64, world_size))
    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=sock.detach())
    keys = [JOINED.format(r) for r in range(1, world_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        gone = dead()
        if gone is not None:
            raise RankDiedError(f"a rank exited while the replica was starting: {gone}")
        if time.monotonic() > deadline:
            missing = [k.rsplit("/", 1)[1] for k in keys if not store.check([k])]
            raise TimeoutError(f"rank(s) {', '.join(missing)} did not join the replica within {timeout_s:.0f} s "
                               f"(distributed_timeout_s)")
        time.sleep(poll_s)
    _init(store, 0, world_size, device, timeout)


def join_world(rank: int, world_size: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    """A rank other than 0: connects to rank 0's store, checks in, joins the world."""
    host, port = _address(init_method)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    store.set(JOINED.format(rank), "1")
    _init(store, rank, world_size, device, timeout)


def _init(store, rank: int, world_size: int, device: torch.device, timeout: datetime.timedelta) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size, timeout=timeout)
