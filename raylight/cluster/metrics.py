"""Prometheus metrics of the server, names prefixed `raylight:`.

Latencies, token counts and client aborts are observed in the ingress (what clients see); engine gauges
and counters (queue lengths, KV usage and free blocks, prefix cache, preemptions, the disaggregated KV
handoff) come from snapshots the replicas attach to their last message of each request, summed over
replicas (a disaggregated router forwards its replicas' snapshots together). A mixture-of-experts model
with EPLB adds expert balancedness (the worst replica's) and rebalance counters.
"""

from __future__ import annotations

import asyncio
import numbers
import re
import time
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.metrics_core import Metric

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class _ReplicaCollector:
    """Sums the replicas' last snapshots. A snapshot that shows work in flight and has not been refreshed
    for `stale_s` is left out of the gauges: its replica died or stalled (a live busy replica reports with
    every request it finishes), and its queue must not show as load for ever. So is a replica Serve no
    longer runs (`retain`: scaled down, replaced), idle or not: its KV blocks are gone. Counters keep every
    snapshot, so they never go down."""

    def __init__(self, stale_s: float = 60.0):
        self.stale_s = stale_s
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}
        self.gone: set[str] = set()

    def _live(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [s for rid, s in self.snapshots.items() if rid not in self.gone and (
                now - self.seen.get(rid, now) < self.stale_s or not (s.get("num_running") or s.get("num_waiting")))]

    def retain(self, running: set[str]) -> None:
        """Serve runs exactly the replicas with these unique ids: the others' snapshots leave the gauges."""
        self.gone = {rid for rid in self.snapshots if _unique_id(rid) not in running}

    def _sum(self, key: str, snapshots: Optional[list[dict[str, Any]]] = None) -> float:
        return float(sum(v for s in (self.snapshots.values() if snapshots is None else snapshots)
                         if isinstance(v := s.get(key, 0), numbers.Real)))

    def collect(self):
        live = self._live()
        gauges = {
            "raylight:num_requests_running": ("Requests running in the engines", self._sum("num_running", live)),
            "raylight:num_requests_waiting": ("Requests waiting in the engines", self._sum("num_waiting", live)),
        }
        total = self._sum("kv_blocks_total", live)
        gauges["raylight:kv_cache_free_blocks"] = ("Free KV cache blocks (summed over replicas)",
                                                   self._sum("kv_blocks_free", live))
        gauges["raylight:kv_cache_total_blocks"] = ("KV cache blocks (summed over replicas)", total)
        gauges["raylight:kv_cache_usage_perc"] = (
            "Fraction of KV cache blocks in use", (total - self._sum("kv_blocks_free", live)) / total if total else 0.0)
        queries = self._sum("prefix_cache_queries")
        gauges["raylight:prefix_cache_hit_rate"] = (
            "Prompt tokens found in the prefix cache / looked up", self._sum("prefix_cache_hit_tokens") / queries
            if queries else 0.0)
        steps = [s.get("step_time_p50_s", 0.0) for s in live]
        gauges["raylight:engine_step_time_p50_seconds"] = (
            "Median engine step time (recent steps; the slowest replica)", max(steps) if steps else 0.0)
        periods = [s.get("step_period_p50_s", 0.0) for s in live]
        gauges["raylight:engine_step_period_p50_seconds"] = (
            "Median start-to-start time of consecutive busy engine steps (the slowest replica)",
            max(periods) if periods else 0.0)
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "raylight:num_preemptions": ("Requests preempted for lack of KV blocks", "preemptions"),
            "raylight:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
            "raylight:prefix_cache_hits": ("Prompt tokens found in the prefix cache", "prefix_cache_hit_tokens"),
            # Two scrapes give a window's mean step time, rows and tokens per step, and how long the engine
            # loops sat idle: where a served run loses to the offline engine on the same requests.
            "raylight:engine_steps": ("Engine steps run", "num_steps"),
            "raylight:engine_step_seconds": ("Wall time of engine steps (busy time)", "step_seconds_total"),
            "raylight:engine_step_rows": ("Sequences scheduled, summed over steps", "step_rows_total"),
            "raylight:engine_step_tokens": ("Tokens scheduled (prompt and decode), summed over steps",
                                            "step_tokens_total"),
            "raylight:engine_idle_seconds": ("Time engine loops waited with no request", "idle_seconds_total"),
        }
        for name, (doc, key) in counters.items():
            yield CounterMetricFamily(name, doc, value=self._sum(key))
        yield from self._disagg(live)
        yield from self._eplb(live)

    def _eplb(self, live: list[dict[str, Any]]):
        """Expert load balance of MoE replicas with EPLB. Balancedness is mean load / max load over the EP
        ranks, 1.0 when perfectly even, in vLLM's form (sum over layers of the mean / sum of the max) and
        SGLang's (mean over layers of each layer's mean / max); the gauge is the MINIMUM over the live replicas
        that report it, because the worst-balanced replica sets the fleet's tail latency. Replicas without
        the key (dense models, MoE without EPLB) are skipped, and with none reporting no sample is emitted:
        a made-up 1.0 would read as "perfectly balanced" for a model that has no experts, and would hide a
        fleet whose MoE replicas all died behind a healthy-looking value (an absent series is what
        `absent()` alerts look for)."""
        family = GaugeMetricFamily("raylight:expert_balancedness", "Expert load balancedness (mean / max load "
                                   "over EP ranks; 1 = even), the worst live replica's", labels=["definition"])
        for definition in ("vllm", "sglang"):
            values = [v for s in live if _is_number(v := s.get(f"expert_balancedness_{definition}"))]
            if values:
                family.add_metric([definition], float(min(values)))
        if family.samples:
            yield family
        for name, doc, key in (
                ("raylight:eplb_rebalances", "Expert re-placements done by EPLB, summed over replicas",
                 "eplb_rebalances"),
                ("raylight:eplb_bytes_moved", "Expert weight bytes EPLB moved between ranks, summed over replicas",
                 "eplb_bytes_moved")):
            yield CounterMetricFamily(name, doc, value=self._sum(key))

    def _disagg(self, live: list[dict[str, Any]]):
        """Disaggregated prefill/decode: the KV handoff (decode and prefill replicas report these keys;
        a colocated replica none, which reads as 0)."""
        for name, doc, key in (
                ("raylight:kv_reservations_held", "Decode-side KV reservations held (awaiting a push, or "
                 "quarantined after a failed one)", "kv_reservations_held"),
                ("raylight:kv_blocks_quarantined", "Decode KV blocks held back after a failed or aborted push "
                 "(until no late write can land)", "kv_blocks_quarantined")):
            yield GaugeMetricFamily(name, doc, value=self._sum(key, live))
        seconds, sent = self._sum("kv_push_seconds_total"), self._sum("kv_bytes_sent")
        yield GaugeMetricFamily("raylight:kv_push_bandwidth_bytes_per_second",
                                "KV bytes pushed / time prefill replicas spent pushing, since start",
                                value=sent / seconds if seconds else 0.0)
        counters = {
            "raylight:kv_remote_prefills": ("Prompts prefilled on a prefill replica and pushed to decode",
                                            "kv_remote_prefills"),
            "raylight:kv_blocks_received": ("KV blocks received by decode replicas", "kv_blocks_received"),
            "raylight:kv_bytes_received": ("KV bytes received by decode replicas", "kv_bytes_received"),
            "raylight:kv_transfer_seconds": ("Time from reservation to landed KV, summed over remote prefills",
                                             "kv_transfer_seconds_total"),
            "raylight:kv_blocks_sent": ("KV blocks pushed by prefill replicas", "kv_blocks_sent"),
            "raylight:kv_bytes_sent": ("KV bytes pushed by prefill replicas", "kv_bytes_sent"),
            "raylight:kv_push_seconds": ("Time prefill replicas spent pushing KV", "kv_push_seconds_total"),
            "raylight:kv_pushes_failed": ("KV pushes a prefill replica could not complete", "kv_pushes_failed"),
        }
        for name, (doc, key) in counters.items():
            yield CounterMetricFamily(name, doc, value=self._sum(key))
        for name, doc, key in (
                ("raylight:kv_local_prefills", "Disaggregated requests prefilled on their decode replica, by "
                 "reason (short, prompt_logprobs, no_prefill, a failed handoff's reason, ...)", "kv_local_prefills"),
                ("raylight:kv_handoff_failures", "KV handoffs that fell back to local prefill, by reason",
                 "kv_handoff_failures")):
            family = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, value in sorted(self._sum_by_label(key).items()):
                family.add_metric([reason], value)
            yield family

    def _sum_by_label(self, key: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.snapshots.values():
            counts = s.get(key)
            if isinstance(counts, dict):
                for label, n in counts.items():
                    out[str(label)] = out.get(str(label), 0.0) + float(n or 0)
        return out


def _unique_id(replica_id: str) -> str:
    """Serve's unique replica id inside our snapshot key (str of a ReplicaID: "Replica(id='abc', ...)")."""
    m = re.search(r"id='([^']+)'", replica_id)
    return m.group(1) if m else replica_id


async def running_replica_ids(timeout_s: float = 2.0) -> Optional[set[str]]:
    """The unique ids of every replica Serve runs now (any app, any state), or None when it cannot say
    (not under Serve, controller slow). One controller call, off the event loop."""
    def fetch() -> Optional[set[str]]:
        from ray.serve.context import _get_global_client  # Serve's own client, as serve.status() uses

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        details = client.get_serve_details()
        return {str(r["replica_id"]) for app in (details.get("applications") or {}).values()
                for d in (app.get("deployments") or {}).values() for r in d.get("replicas") or ()}

    import ray

    if not ray.is_initialized():  # a server outside Ray (tests, embedding): asking would start a Ray
        return None
    try:
        return await asyncio.wait_for(asyncio.to_thread(fetch), timeout_s)
    except Exception:
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class _RouterCollector:
    """The KV-aware request routers of this process (cluster/kv_router.py, one per engine-pool handle) and
    those a disaggregated router reported (its bundle's "kv_router"): requests routed by prefix overlap vs by
    load alone, per replica, the index size and the event lag."""

    def __init__(self):
        self.remote: dict[str, dict[str, Any]] = {}  # a disaggregated router's id -> its routers' stats

    def collect(self):
        from raylight.cluster.kv_index import live_routers, router_stats

        s = router_stats([r.stats() for r in live_routers()] + list(self.remote.values()))
        by = CounterMetricFamily("raylight:kv_router_requests_routed", "Requests the KV-aware router sent to "
                                 "a replica holding part of their prompt (overlap) or by load alone (load)",
                                 labels=["by"])
        by.add_metric(["overlap"], float(s["routed_overlap"]))
        by.add_metric(["load"], float(s["routed_load"]))
        yield by
        yield GaugeMetricFamily("raylight:kv_router_index_blocks", "Blocks in the KV-aware router's index "
                                "(over replicas, from their KV events)", value=float(s["index_blocks"]))
        yield SummaryMetricFamily("raylight:kv_router_event_lag_seconds", "Time from a replica storing a "
                                  "block to the router knowing", count_value=s["event_lag_count"],
                                  sum_value=float(s["event_lag_sum_s"]))
        for name, doc, key in (
                ("raylight:kv_router_replica_requests", "Requests the KV-aware router sent to each replica",
                 "routed_to"),
                ("raylight:kv_router_replica_index_blocks", "Blocks the KV-aware router's index holds for each "
                 "replica (a replica gone from Serve's list is dropped)", "index_by_replica")):
            family = (CounterMetricFamily if key == "routed_to" else GaugeMetricFamily)(name, doc, labels=["replica"])
            for rid, n in sorted(s[key].items()):
                family.add_metric([rid], float(n))
            yield family


def _shared_samples(family):
    """A family's samples as (name, sorted labels, value), less the per-process `_created` ones (meaningless
    summed over processes)."""
    return [(sm.name, tuple(sorted(sm.labels.items())), sm.value) for sm in family.samples
            if not sm.name.endswith("_created")]


class _SummedRequests:
    """The request metrics of this ingress plus those its sibling ingress replicas last shared (`peers`:
    ingress id -> samples), family by family: with several ingress replicas behind Serve's proxy a scrape
    reaches one of them, and must still count every request."""

    def __init__(self, own: CollectorRegistry):
        self.own = own
        self.peers: dict[str, list[tuple[str, tuple[tuple[str, str], ...], float]]] = {}

    def collect(self):
        extra: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for samples in self.peers.values():
            for name, labels, value in samples:
                extra[name, labels] = extra.get((name, labels), 0.0) + value
        for fam in self.own.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            names = set()
            for name, labels, value in _shared_samples(fam):
                names.add(name)
                out.add_sample(name, dict(labels), value + extra.pop((name, labels), 0.0))
            for (name, labels), value in sorted(extra.items()):  # label values only a sibling has seen yet
                if name in names:
                    out.add_sample(name, dict(labels), value)
                    del extra[name, labels]
            yield out


class ServerMetrics:
    def __init__(self):
        own = self._own = CollectorRegistry()  # what this ingress observed itself
        self.ttft = Histogram("raylight:time_to_first_token_seconds", "Time to first token", registry=own,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("raylight:inter_token_latency_seconds", "Time between streamed tokens", registry=own,
                             buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("raylight:e2e_request_latency_seconds", "End-to-end request latency", registry=own,
                             buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("raylight:prompt_tokens", "Prompt tokens processed", registry=own)
        self.generation_tokens = Counter("raylight:generation_tokens", "Tokens generated", registry=own)
        self.requests = Counter("raylight:request_success", "Finished requests", ["finished_reason"], registry=own)
        self.aborted = Counter("raylight:request_aborted", "Requests aborted because their client went away "
                               "before the end", registry=own)
        self.registry = r = CollectorRegistry()
        self._requests = _SummedRequests(own)
        r.register(self._requests)
        self._replicas = _ReplicaCollector()
        r.register(self._replicas)
        self._routers = _RouterCollector()
        r.register(self._routers)

    def request_samples(self) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        """This ingress's own request metrics as (sample name, labels, value): what it shares with its siblings."""
        return [sample for fam in self._own.collect() for sample in _shared_samples(fam)]

    def set_peers(self, peers: dict[str, list]) -> None:
        """The other ingress replicas' last shared request samples (cluster/ingress_peers.py)."""
        self._requests.peers = {k: [(n, tuple(tuple(x) for x in labels), float(v)) for n, labels, v in samples]
                                for k, samples in peers.items()}

    def update_replica(self, replica_id: str, stats: dict[str, Any]) -> None:
        """One replica's snapshot, or a disaggregated router's bundle of several (`{"replicas": {id:
        snapshot}}`). A snapshot with a `snapshot_t` replaces only an older one of its replica (a bundle
        repeats what the router heard last, which must not make a dead replica look alive)."""
        if isinstance(stats.get("kv_router"), dict) and stats["kv_router"].get("id"):
            self._routers.remote[str(stats["kv_router"]["id"])] = stats["kv_router"]
        if isinstance(stats.get("replicas"), dict):
            for rid, snapshot in stats["replicas"].items():
                if isinstance(snapshot, dict):
                    self.update_replica(rid, snapshot)
            return
        old = self._replicas.snapshots.get(replica_id)
        t = stats.get("snapshot_t")
        if old is not None and t is not None and old.get("snapshot_t", float("-inf")) >= t:
            return
        self._replicas.snapshots[replica_id] = stats
        self._replicas.seen[replica_id] = time.monotonic()
        self._replicas.gone.discard(replica_id)  # it speaks: it runs

    def retain_replicas(self, running: Optional[set[str]]) -> None:
        """Leaves replicas Serve no longer runs out of the gauges (None: unknown, keep all)."""
        if running is not None:
            self._replicas.retain(running)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"


class RequestTiming:
    """Latency as the client sees it: TTFT, gaps between tokens, end to end."""

    def __init__(self, metrics: "ServerMetrics"):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: Optional[float] = None
        self.generated = 0
        self.prompt = 0
        self.finish_reasons: list[str] = []

    def token(self, out) -> None:
        if out is None:
            return
        now = time.perf_counter()
        new = sum(len(c.delta_token_ids) for c in out.outputs)
        if new:
            if self.last is None:
                self.metrics.ttft.observe(now - self.start)
            else:  # a message may carry several tokens (paced or lagging streams): the gap is theirs to share
                per_token = (now - self.last) / new
                for _ in range(new):
                    self.metrics.itl.observe(per_token)
            self.last = now
            self.generated += new
        self.prompt = len(out.prompt_token_ids)
        if out.finished:
            self.finish_reasons = [c.finish_reason or "abort" for c in out.outputs]

    def done(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        self.metrics.prompt_tokens.inc(self.prompt)
        self.metrics.generation_tokens.inc(self.generated)
        for reason in self.finish_reasons:
            self.metrics.requests.labels(finished_reason=reason).inc()
