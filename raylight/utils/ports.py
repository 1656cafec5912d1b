"""A free TCP port for a server we are about to start (a torch.distributed store, a test's Serve proxy).

Why not bind(0): the OS then hands out a port from its ephemeral range, the same range it draws from for
every outgoing connection. Between our check and the server's bind, Ray alone opens dozens of
connections (workers to the GCS, raylets, the object store), and one of them can take the port: CI saw
Serve's proxy fail with "Failed to bind to address" that way. A port below the ephemeral range is never
given to an outgoing connection, so only another server binding it on purpose can collide. Ray's own
default worker ports sit at 10002-19999 and Serve's direct-ingress replicas take theirs from 30000 up
(raylight/cluster/serve_mode.py), so we draw from 20000-29999 (less where the ephemeral range starts lower).
"""

from __future__ import annotations

import random
import socket

LOW = 20000  # above Ray's default worker ports (10002-19999)
HIGH = 30000  # below Serve's direct-ingress HTTP ports (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux); IANA's 49152-65535 elsewhere."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port that `host` can bind now, outside the ephemeral range where there is room for one;
    otherwise whatever bind(0) gives."""
    hi = min(HIGH, ephemeral_range()[0])
    if hi - LOW >= 1000:
        for _ in range(tries):
            port = random.randrange(LOW, hi)
            if _bindable(host, port):
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
