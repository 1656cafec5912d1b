"""The KV-aware router's state, as plain Python (no Ray): which replica holds which prefix blocks, and the
cost of sending a prompt to each replica. `cluster/kv_router.py` plugs this into Ray Serve's request router;
`cluster/replica.py` keeps the replica side's `KVEventLog`.

Blocks are named by the engine's own chained hash (`engine/kv_cache/block_hash.py`, same block size, the
cache salt folded into the first block), cut to its first 8 bytes (`block_key`): a collision can only
mislead a routing choice, never what an engine computes.

Two sources say what a replica holds:
* `cached`: its KV events (block stored / removed), pulled from the replica (`KVEventLog.since`): the truth,
  a poll period late;
* `predicted`: what this router sent it. A routed request's blocks count as held at once (the replica is
  computing them), while the request runs and `predict_ttl_s` after, until its events arrive. Without this
  a burst of requests sharing a prefix would scatter before the first one's events come back.

Cost of replica r for a prompt of n blocks of which r holds the first o_r (Dynamo's form):
    new_r  = n - o_r                        (prefill blocks not cached there)
    cost_r = overlap_weight * new_r + load_weight * (load_r + new_r)
where load_r is r's decode load in blocks: the larger of the blocks this router's running requests hold
there (shared prefixes counted once, one partial block per request) and the replica's own report (blocks
in use; other routers' requests are only in that), and `+ new_r` is what this request would add. Lowest cost wins; ties go to the replica with fewer
running requests, then to the one this router sent fewer requests (round robin when idle).
"""

from __future__ import annotations

import collections
import time
import uuid
import weakref
from typing import Any, Iterable, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from raylight.engine.kv_cache.block_hash import block_hashes
from raylight.messages import BlockRemoved, BlockStored


class RoutingConfig(BaseModel):
    """How requests pick an engine replica (the Serve config's `routing:` section of a pool)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["default", "kv_aware"] = Field("default", description=(
        "default: Serve's own request router (power of two choices on queue length). kv_aware: the replica "
        "with the lowest cost = overlap_weight * prompt blocks it lacks + load_weight * its decode load in "
        "blocks (engines publish KV events for it; cluster/kv_router.py)."))
    overlap_weight: float = Field(1.0, ge=0, description="Weight of the prefill blocks a replica lacks.")
    load_weight: float = Field(1.0, ge=0, description="Weight of a replica's decode load (KV blocks in use).")
    event_poll_s: float = Field(0.1, gt=0, le=10, description=(
        "How often the router pulls a busy replica's KV events and load (the event lag's main part)."))
    idle_poll_s: float = Field(2.0, gt=0, le=60, description="Pull period of a replica with nothing running.")
    stats_period_s: float = Field(1.0, gt=0, description=(
        "Serve's request_routing_stats_period_s: how often Serve's controller asks each replica for its load "
        "(record_routing_stats) and tells every router."))
    predict_ttl_s: float = Field(10.0, ge=0, description=(
        "How long a finished request's blocks still count as held by its replica before its KV events "
        "confirm them (or an eviction removes them)."))
    max_prefix_blocks: int = Field(4096, ge=1, description="Most prompt blocks the router hashes per request.")

    def router_kwargs(self, block_size: int) -> dict[str, Any]:
        """Serve's `request_router_kwargs` (cluster/kv_router.py `initialize_state`)."""
        return {**self.model_dump(exclude={"policy", "stats_period_s"}), "block_size": int(block_size)}


def block_key(h: bytes) -> int:
    return int.from_bytes(h[:8], "little")


def prompt_keys(token_ids: Sequence[int], block_size: int, cache_salt: Optional[str] = None,
                max_blocks: int = 4096) -> list[int]:
    """Keys of the prompt blocks a replica could have cached: the engine matches at most (n - 1) //
    block_size full blocks (the last prompt position is always computed), hashed as the engine hashes."""
    n = min((len(token_ids) - 1) // block_size, max_blocks) if token_ids else 0
    if n <= 0:
        return []
    return [block_key(h) for h in block_hashes(list(token_ids[: n * block_size]), block_size, cache_salt)]


# ---------------------------------------------------------------- the replica side

class KVEventLog:
    """A replica's KV events, numbered, for routers that pull them (`since`). `epoch` is new per replica
    process: a router holding another epoch's cursor (the replica restarted, or it never asked) gets a
    snapshot of everything cached instead, as does one whose cursor fell out of the bounded log."""

    def __init__(self, capacity: int = 65536):
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.capacity = capacity
        self.entries: collections.deque = collections.deque()  # (seq, t, stored, keys)
        self.cached: set[int] = set()

    def add(self, events: Iterable, t: Optional[float] = None) -> int:
        """Engine events (`BlockStored` / `BlockRemoved`, engine/kv_cache/block_pool.py), seen at `t`."""
        t = time.time() if t is None else t
        n = 0
        for ev in events:
            if isinstance(ev, BlockStored):
                keys, stored = tuple(block_key(h) for h in ev.block_hashes), True
                self.cached.update(keys)
            elif isinstance(ev, BlockRemoved):
                keys, stored = tuple(block_key(h) for h in ev.block_hashes), False
                self.cached.difference_update(keys)
            else:
                continue
            self.seq += 1
            self.entries.append((self.seq, t, stored, keys))
            n += 1
        while len(self.entries) > self.capacity:
            self.entries.popleft()
        return n

    def since(self, epoch: str, seq: int) -> dict[str, Any]:
        """What a router whose cursor is (`epoch`, `seq`) is missing: the entries after `seq`, or a snapshot."""
        first = self.entries[0][0] if self.entries else self.seq + 1
        if epoch != self.epoch or seq < first - 1 or seq > self.seq:
            return {"epoch": self.epoch, "seq": self.seq, "snapshot": list(self.cached), "t": time.time()}
        skip = seq - first + 1
        events = [self.entries[i] for i in range(skip, len(self.entries))] if skip < len(self.entries) else []
        return {"epoch": self.epoch, "seq": self.seq, "events": events}


# ---------------------------------------------------------------- the router side

class PrefixIndex:
    """Block key -> replicas holding it, and replica -> its keys."""

    def __init__(self):
        self.by_replica: dict[str, set[int]] = {}
        self.owners: dict[int, set[str]] = {}

    def add(self, replica: str, keys: Iterable[int]) -> None:
        mine = self.by_replica.setdefault(replica, set())
        for k in keys:
            if k not in mine:
                mine.add(k)
                self.owners.setdefault(k, set()).add(replica)

    def remove(self, replica: str, keys: Iterable[int]) -> None:
        mine = self.by_replica.get(replica)
        if not mine:
            return
        for k in keys:
            if k in mine:
                mine.discard(k)
                owners = self.owners.get(k)
                if owners is not None:
                    owners.discard(replica)
                    if not owners:
                        del self.owners[k]

    def drop(self, replica: str) -> None:
        keys = self.by_replica.get(replica)
        if keys:
            self.remove(replica, list(keys))
        self.by_replica.pop(replica, None)

    def replace(self, replica: str, keys: Iterable[int]) -> None:
        self.drop(replica)
        self.add(replica, keys)

    def holders(self, key: int) -> set[str]:
        return self.owners.get(key, set())

    def size(self, replica: Optional[str] = None) -> int:
        if replica is not None:
            return len(self.by_replica.get(replica, ()))
        return sum(len(s) for s in self.by_replica.values())


class PredictedBlocks:
    """Blocks this router sent to each replica: held while a request runs (its unique blocks are the
    router's view of the replica's decode load), then kept `ttl_s` as a prediction of the replica's cache."""

    def __init__(self, ttl_s: float = 10.0):
        self.ttl_s = ttl_s
        self.index = PrefixIndex()
        self.refs: dict[tuple[str, int], int] = {}
        self.expiry: dict[tuple[str, int], float] = {}
        self.running: dict[str, tuple[str, list[int]]] = {}  # request id -> (replica, keys)
        self.active_keys: collections.Counter = collections.Counter()  # replica -> keys with refs > 0
        self.active_requests: collections.Counter = collections.Counter()

    def start(self, request_id: str, replica: str, keys: list[int]) -> None:
        if request_id in self.running:
            self.finish(request_id)
        self.running[request_id] = (replica, keys)
        self.active_requests[replica] += 1
        self.index.add(replica, keys)
        for k in set(keys):
            ref = (replica, k)
            n = self.refs.get(ref, 0)
            self.refs[ref] = n + 1
            if n == 0:
                self.active_keys[replica] += 1
                self.expiry.pop(ref, None)

    def finish(self, request_id: str, now: Optional[float] = None) -> Optional[str]:
        entry = self.running.pop(request_id, None)
        if entry is None:
            return None
        replica, keys = entry
        now = time.monotonic() if now is None else now
        self.active_requests[replica] -= 1
        for k in set(keys):
            ref = (replica, k)
            n = self.refs.get(ref, 0) - 1
            if n > 0:
                self.refs[ref] = n
            else:
                self.refs.pop(ref, None)
                self.active_keys[replica] -= 1
                self.expiry[ref] = now + self.ttl_s
        return replica

    def forget(self, replica: str, keys: Iterable[int]) -> None:
        """Evicted there: no longer predicted (running requests' blocks stay)."""
        gone = [k for k in keys if (replica, k) in self.expiry]
        for k in gone:
            del self.expiry[(replica, k)]
        self.index.remove(replica, gone)

    def sweep(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        done = [ref for ref, t in self.expiry.items() if t <= now]
        for replica, k in done:
            del self.expiry[(replica, k)]
            self.index.remove(replica, (k,))

    def drop(self, replica: str) -> None:
        self.index.drop(replica)
        for ref in [r for r in self.refs if r[0] == replica]:
            del self.refs[ref]
        for ref in [r for r in self.expiry if r[0] == replica]:
            del self.expiry[ref]
        for rid in [rid for rid, (rep, _) in self.running.items() if rep == replica]:
            del self.running[rid]
        self.active_keys.pop(replica, None)
        self.active_requests.pop(replica, None)

    def load_blocks(self, replica: str) -> int:
        """Unique blocks of this router's running requests there, plus one partial block per request."""
        return self.active_keys.get(replica, 0) + self.active_requests.get(replica, 0)


def overlaps(keys: Sequence[int], replicas: Sequence[str], indexes: Sequence[PrefixIndex]) -> dict[str, int]:
    """Per replica, how many leading `keys` any of `indexes` says it holds."""
    out = {r: 0 for r in replicas}
    live = set(replicas)
    for i, k in enumerate(keys):
        holders: set[str] = set()
        for index in indexes:
            holders |= index.holders(k)
        live &= holders
        if not live:
            break
        for r in live:
            out[r] = i + 1
    return out


def costs(num_blocks: int, overlap: dict[str, int], load: dict[str, float], overlap_weight: float = 1.0,
          load_weight: float = 1.0) -> dict[str, float]:
    """Dynamo's cost per replica (module docstring); lower is better."""
    out = {}
    for r, o in overlap.items():
        new = max(0, num_blocks - o)
        out[r] = overlap_weight * new + load_weight * (load.get(r, 0.0) + new)
    return out


_ROUTERS: "weakref.WeakSet[KVRouterCore]" = weakref.WeakSet()


def live_routers() -> list["KVRouterCore"]:
    """The KV-aware routers of this process (their handles' request routers), for /metrics."""
    return list(_ROUTERS)


def router_stats(stats: Optional[Iterable[dict[str, Any]]] = None) -> dict[str, Any]:
    """`KVRouterCore.stats()` summed over routers (by default this process's live ones)."""
    out: dict[str, Any] = {"routed_overlap": 0, "routed_load": 0, "index_blocks": 0, "event_lag_sum_s": 0.0,
                           "event_lag_count": 0, "routed_to": {}, "index_by_replica": {}}
    for s in (r.stats() for r in live_routers()) if stats is None else stats:
        for k in ("routed_overlap", "routed_load", "index_blocks", "event_lag_sum_s", "event_lag_count"):
            out[k] += s.get(k, 0)
        for key in ("routed_to", "index_by_replica"):
            for rid, n in s.get(key, {}).items():
                out[key][rid] = out[key].get(rid, 0) + n
    return out


class KVRouterCore:
    """Everything the KV-aware request router decides with, for one deployment, in one process."""

    def __init__(self, block_size: int = 16, overlap_weight: float = 1.0, load_weight: float = 1.0,
                 predict_ttl_s: float = 10.0, max_prefix_blocks: int = 4096, **_ignored):
        self.block_size, self.max_prefix_blocks = int(block_size), int(max_prefix_blocks)
        self.overlap_weight, self.load_weight = float(overlap_weight), float(load_weight)
        self.cached = PrefixIndex()
        self.predicted = PredictedBlocks(predict_ttl_s)
        self.cursor: dict[str, tuple[str, int]] = {}  # replica -> (epoch, seq) applied
        self.reports: dict[str, dict[str, Any]] = {}  # replica -> newest load report
        self.finished_at: dict[str, float] = {}  # replica -> when one of our requests there last ended
        self.routed: collections.Counter = collections.Counter()  # "overlap" / "load"
        self.routed_to: collections.Counter = collections.Counter()  # replica -> requests
        self.lag_sum, self.lag_count, self.lag_last = 0.0, 0, 0.0
        self.snapshots = 0
        _ROUTERS.add(self)

    # ---- what replicas tell us ----
    def apply(self, replica: str, msg: dict[str, Any], now: Optional[float] = None) -> None:
        """A replica's answer to `kv_events` (KVEventLog.since plus its load)."""
        now = time.time() if now is None else now
        self.report(replica, msg)
        epoch, seq = msg.get("epoch"), int(msg.get("seq", 0))
        if epoch is None:
            return
        if "snapshot" in msg:
            keys = msg["snapshot"]
            self.cached.replace(replica, keys)
            self.snapshots += 1
        else:
            old_epoch, old_seq = self.cursor.get(replica, (None, -1))
            if old_epoch != epoch:  # another process: what we knew of it is void
                self.cached.drop(replica)
                old_seq = 0
            for s, t, stored, keys in msg.get("events", ()):
                if s <= old_seq:
                    continue
                if stored:
                    self.cached.add(replica, keys)
                    lag = max(0.0, now - float(t))
                    self.lag_sum += lag
                    self.lag_count += 1
                    self.lag_last = lag
                else:
                    self.cached.remove(replica, keys)
                    self.predicted.forget(replica, keys)
        self.cursor[replica] = (epoch, seq)

    def report(self, replica: str, stats: Optional[dict[str, Any]]) -> None:
        """A load report (`record_routing_stats` through Serve, or a pull); the newest one counts. A new
        epoch in it means the replica restarted under the same id: its index entries go."""
        if not stats or "t" not in stats:
            return
        old = self.reports.get(replica)
        if old is not None and old.get("t", 0.0) > stats["t"]:
            return
        epoch = stats.get("epoch")
        cur = self.cursor.get(replica)
        if epoch is not None and cur is not None and cur[0] != epoch:
            self.cached.drop(replica)
            self.cursor.pop(replica, None)
        self.reports[replica] = stats

    def wants_events(self, replica: str) -> bool:
        """The replica's report says it has events we have not applied."""
        rep, cur = self.reports.get(replica), self.cursor.get(replica)
        if rep is None or cur is None:
            return True
        return rep.get("epoch") != cur[0] or int(rep.get("seq", 0)) > cur[1]

    def cursor_of(self, replica: str) -> tuple[str, int]:
        return self.cursor.get(replica, ("", -1))

    def remove_replica(self, replica: str) -> None:
        """Gone (died, replaced, scaled down): nothing of it is routed on again."""
        self.cached.drop(replica)
        self.predicted.drop(replica)
        self.cursor.pop(replica, None)
        self.reports.pop(replica, None)
        self.finished_at.pop(replica, None)

    def keep_only(self, replicas: Iterable[str]) -> None:
        keep = set(replicas)
        known = set(self.cached.by_replica) | set(self.predicted.index.by_replica) | set(self.cursor) | set(
            self.reports) | set(self.predicted.active_requests)
        for r in known - keep:
            self.remove_replica(r)

    # ---- choosing ----
    def keys(self, token_ids: Sequence[int], cache_salt: Optional[str] = None) -> list[int]:
        return prompt_keys(token_ids, self.block_size, cache_salt, self.max_prefix_blocks)

    def load(self, replica: str) -> float:
        local = self.predicted.load_blocks(replica)
        rep = self.reports.get(replica)
        # A report from before one of our requests there ended still counts its blocks: our own count is
        # exact for our requests, so such a report is left out until a newer one comes.
        if rep and "kv_blocks_total" in rep and rep.get("t", 0.0) >= self.finished_at.get(replica, 0.0):
            reported = float(rep["kv_blocks_total"]) - float(rep.get("kv_blocks_free", rep["kv_blocks_total"]))
            return max(float(local), reported)
        return float(local)

    def rank(self, keys: Sequence[int], replicas: Sequence[str], num_blocks: Optional[int] = None,
             now: Optional[float] = None) -> list[tuple[float, str, int]]:
        """(cost, replica, overlap blocks), best first; `num_blocks`: the prompt's length in blocks."""
        self.predicted.sweep(time.monotonic() if now is None else now)
        n = len(keys) if num_blocks is None else num_blocks
        over = overlaps(keys, replicas, (self.cached, self.predicted.index))
        c = costs(n, over, {r: self.load(r) for r in replicas}, self.overlap_weight, self.load_weight)
        order = sorted(replicas, key=lambda r: (c[r], self.predicted.active_requests.get(r, 0),
                                                self.routed_to.get(r, 0), r))
        return [(c[r], r, over[r]) for r in order]

    def routed_request(self, request_id: str, replica: str, keys: list[int], overlap: int) -> None:
        """The request went to `replica` (counted by overlap when that replica had some of it)."""
        if request_id not in self.predicted.running:  # a second look at the same request counts once
            self.routed["overlap" if overlap > 0 else "load"] += 1
            self.routed_to[replica] += 1
        self.predicted.start(request_id, replica, keys)

    def moved(self, request_id: str, replica: str) -> None:
        """Serve sent the request elsewhere than our first choice (that one was full)."""
        entry = self.predicted.running.get(request_id)
        if entry is not None and entry[0] != replica:
            self.routed_to[entry[0]] -= 1
            self.routed_to[replica] += 1
            self.predicted.start(request_id, replica, entry[1])

    def finished(self, request_id: str) -> Optional[str]:
        """The request ended; returns its replica (None if unknown)."""
        replica = self.predicted.finish(request_id)
        if replica is not None:
            self.finished_at[replica] = time.time()
        return replica

    def stats(self) -> dict[str, Any]:
        return {"routed_overlap": self.routed["overlap"], "routed_load": self.routed["load"],
                "index_blocks": self.cached.size(), "predicted_blocks": self.predicted.index.size(),
                "event_lag_sum_s": self.lag_sum, "event_lag_count": self.lag_count, "event_lag_last_s": self.lag_last,
                "snapshots": self.snapshots, "routed_to": dict(self.routed_to),
                "index_by_replica": {r: len(keys) for r, keys in self.cached.by_replica.items()}}
