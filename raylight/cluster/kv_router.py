"""The KV-aware request router: a Ray Serve request router (Serve's extension point,
`ray.serve.request_router.RequestRouter`) configured on an engine pool (`routing: {policy: kv_aware}`,
cluster/app.py). Serve still discovers, health-checks and replaces the replicas and hands every router
their list; this class only orders them, per request, by the cost in cluster/kv_index.py.

How it learns what each replica holds (one router per deployment handle, in every process that calls
the pool: the ingress replicas, the disaggregated router):
* Load, through Serve: each replica's `record_routing_stats` (running, waiting, free blocks, its event
  log's epoch and sequence number) is collected by Serve's controller every `stats_period_s` and
  broadcast to every router with the replica list (`RunningReplica.routing_stats`).
* KV events, pulled: a task on the router's event loop calls each replica's `kv_events(epoch, seq)`
  (sent to that replica as Serve sends requests) every `event_poll_s` while this router has work
  there, has just had, or the broadcast says the replica has newer events; every `idle_poll_s` otherwise.
  The answer is the events after the router's cursor plus the replica's load, or a full snapshot of its
  cached blocks when the cursor is from another epoch (a new replica process) or fell out of the log.
  Why pull, not the broadcast: Serve keeps only each replica's latest stats and repeats the whole
  deployment's to every handle on any change, so events there would be lost between two looks and
  copied to every process; a pull is incremental, per router, and costs nothing while idle.
* What it routed itself, at once (kv_index.PredictedBlocks): requests sharing a prefix that arrive
  within one poll period stick to the replica computing it.
A replica that leaves the list (died, replaced, scaled down) has its entries dropped at once; a process
restart under the same id shows as a new epoch (in its stats or its next pull) and the same happens.

Nothing here blocks the event loop: choosing is dictionary work over the replicas (the prompt's block
hashes are computed once per request), and every pull is awaited in its own task with a timeout.
Calls that carry no prompt (stats, health, ...) get Serve's power of two choices; a call with a
`target_replica` keyword goes to that replica (the disaggregated router's `remote_prefill_failed`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from typing import Any, Optional

from raylight.cluster.kv_index import KVRouterCore

logger = logging.getLogger("raylight.kv_router")

TARGET_KWARG = "target_replica"  # the same keyword as cluster/disagg.py's TargetedRequestRouter
ROUTED_METHODS = frozenset({"generate", "prefill"})  # calls whose first argument is a GenerateCall
PULL_TIMEOUT_S = 5.0

try:
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest, RequestRouter
except ImportError:  # pragma: no cover (another Ray version)
    RequestRouter = None


def replica_name(replica) -> str:
    """A RunningReplica's id as the replica itself reports it (cluster/replica.py `_replica_id`)."""
    rid = replica.replica_id
    return str(getattr(rid, "unique_id", rid))


if RequestRouter is not None:
    class KVAwareRequestRouter(RequestRouter):
        """Serve request router of an engine pool with `routing.policy: kv_aware` (module docstring).
        Requests are matched to the replica chosen for them (no FIFO hand-over: a choice made for one
        prompt must not serve another)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initialize_state()

        def initialize_state(self, **kwargs):
            self.core = KVRouterCore(**kwargs)
            self.event_poll_s = float(kwargs.get("event_poll_s", 0.1))
            self.idle_poll_s = float(kwargs.get("idle_poll_s", 2.0))
            self._keys: dict[str, tuple[list[int], int]] = {}  # internal request id -> (keys, prompt blocks)
            self._pulls: dict[str, asyncio.Task] = {}
            self._last_pull: dict[str, float] = {}
            self._recent: dict[str, float] = {}  # replica -> until when it counts as busy
            self._poller: Optional[asyncio.Task] = None
            self.pull_failures = 0

        # ---- Serve's hooks ----
        async def choose_replicas(self, candidate_replicas, pending_request=None):
            self._ensure_poller()
            if not candidate_replicas:
                return []
            if pending_request is None:
                return self._two_choices(candidate_replicas)
            target = (pending_request.kwargs or {}).get(TARGET_KWARG)
            if target:
                hit = [r for r in candidate_replicas if replica_name(r) == target]
                if hit:
                    return [hit]
            call = pending_request.args[0] if pending_request.args else None
            prompt = getattr(call, "prompt", None)
            if pending_request.metadata.call_method not in ROUTED_METHODS or not isinstance(prompt, list):
                return self._two_choices(candidate_replicas)
            iid = pending_request.metadata.internal_request_id
            if iid not in self._keys:
                bs = self.core.block_size
                self._keys[iid] = (self.core.keys(prompt, getattr(call, "cache_salt", None)),
                                   max(0, (len(prompt) - 1) // bs))
                # Cancelled before Serve sent it anywhere: no completion will come, so let go of it here.
                pending_request.future.add_done_callback(lambda f, iid=iid: f.cancelled() and self._cancelled(iid))
            keys, nblocks = self._keys[iid]
            by_name = {replica_name(r): r for r in candidate_replicas}
            ranked = self.core.rank(keys, list(by_name), nblocks)
            _, best, overlap = ranked[0]
            self.core.routed_request(iid, best, keys, overlap)
            self._recent[best] = time.monotonic() + 2 * self.event_poll_s + 1.0
            ranks = [[by_name[name]] for _, name, _ in ranked[:3]]
            if len(ranked) > 3:
                ranks.append([by_name[name] for _, name, _ in ranked[3:]])
            return ranks

        def on_request_routed(self, pending_request, replica_id, result) -> None:
            """Serve sent it to `replica_id`: normally our first choice; if that one was full, move the
            request's blocks to where it went."""
            self.core.moved(pending_request.metadata.internal_request_id,
                            str(getattr(replica_id, "unique_id", replica_id)))

        def on_request_completed(self, replica_id, internal_request_id: str) -> None:
            self._keys.pop(internal_request_id, None)
            replica = self.core.finished(internal_request_id)
            if replica is not None:  # its last blocks were stored: look soon
                self._recent[replica] = time.monotonic() + 2 * self.event_poll_s + 1.0

        def _cancelled(self, iid: str) -> None:
            self._keys.pop(iid, None)
            self.core.finished(iid)

        def update_replicas(self, replicas):
            super().update_replicas(replicas)
            names = set()
            for r in replicas:
                name = replica_name(r)
                names.add(name)
                try:
                    self.core.report(name, dict(r.routing_stats or {}))
                except Exception:  # stats are advisory
                    logger.debug("bad routing stats from %s", name, exc_info=True)
            self.core.keep_only(names)
            for name in [n for n in self._pulls if n not in names]:
                self._pulls.pop(name).cancel()
            for d in (self._last_pull, self._recent):
                for name in [n for n in d if n not in names]:
                    del d[name]
            self._ensure_poller()

        def on_replica_actor_died(self, replica_id):
            super().on_replica_actor_died(replica_id)
            self.core.remove_replica(str(getattr(replica_id, "unique_id", replica_id)))

        # ---- the pull ----
        def _ensure_poller(self) -> None:
            if self._poller is None or self._poller.done():
                # A fresh context: the poller is no request's child (a client's cancel must not reach it).
                self._poller = self._event_loop.create_task(self._poll_loop(), context=contextvars.Context())

        async def _poll_loop(self) -> None:
            while True:
                await asyncio.sleep(self.event_poll_s)
                try:
                    self._poll_once(time.monotonic())
                except Exception:
                    logger.exception("KV router poll failed")

        def _poll_once(self, now: float) -> None:
            for r in list(self._replicas_list):
                name = replica_name(r)
                if name in self._pulls:
                    continue
                busy = (self.core.predicted.active_requests.get(name, 0) > 0 or now < self._recent.get(name, 0.0)
                        or self.core.wants_events(name))
                period = self.event_poll_s if busy else self.idle_poll_s
                if now - self._last_pull.get(name, float("-inf")) >= period:
                    self._pulls[name] = asyncio.ensure_future(self._pull(name, r))

        async def _pull(self, name: str, replica) -> None:
            try:
                epoch, seq = self.core.cursor_of(name)
                rid = f"kv-events-{uuid.uuid4().hex[:12]}"
                meta = RequestMetadata(request_id=rid, internal_request_id=rid, call_method="kv_events")
                # As Serve's router sends a request (the replica counts it, and answers on its event loop).
                result = replica.try_send_request(PendingRequest(args=[epoch, seq], kwargs={}, metadata=meta),
                                                  with_rejection=False)
                msg = await asyncio.wait_for(result.get_async(), PULL_TIMEOUT_S)
                if isinstance(msg, dict) and name in {replica_name(r) for r in self._replicas_list}:
                    self.core.apply(name, msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the replica is busy, going or gone: Serve's list decides which
                self.pull_failures += 1
                logger.debug("KV events pull from %s failed: %r", name, e)
            finally:
                self._last_pull[name] = time.monotonic()
                if self._pulls.get(name) is asyncio.current_task():
                    del self._pulls[name]

        # ---- calls without a prompt ----
        def _two_choices(self, candidates) -> list[list[Any]]:
            return [random.sample(list(candidates), min(2, len(candidates)))]
else:  # pragma: no cover
    KVAwareRequestRouter = None


def request_router_config(routing, block_size: int):
    """Serve's RequestRouterConfig for a pool with `routing.policy: kv_aware` (a kv_index.RoutingConfig)."""
    from ray.serve.config import RequestRouterConfig

    if KVAwareRequestRouter is None:  # pragma: no cover
        raise ValueError("routing.policy kv_aware needs Ray Serve's request router API (ray >= 2.46)")
    return RequestRouterConfig(request_router_class=KVAwareRequestRouter,
                               request_router_kwargs=routing.router_kwargs(block_size),
                               request_routing_stats_period_s=routing.stats_period_s,
                               request_routing_stats_timeout_s=max(5.0, 3 * routing.stats_period_s))
