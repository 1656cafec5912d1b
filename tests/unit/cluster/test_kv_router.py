"""The KV-aware router's index and cost (cluster/kv_index.py), the replica's event log, and the Serve request
router class (cluster/kv_router.py) with fake replicas, no Ray cluster.

* the router hashes a prompt exactly as the engine's KV cache manager does (same blocks, same salt rule), so
  a prefix the engine cached is a prefix the router finds;
* events (stored / removed) and snapshots keep the index equal to the replica's cache; a new epoch (restart)
  or a replica leaving Serve's list drops its entries;
* the cost is Dynamo's: overlap_weight * uncached blocks + load_weight * (load + new blocks); overlap wins
  until load outweighs it; ties spread round robin;
* routed requests count as held at once (a burst sharing a prefix sticks), then expire unless confirmed.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from raylight.cluster.kv_index import (KVEventLog, KVRouterCore, PredictedBlocks, PrefixIndex, RoutingConfig,
                                       block_key, costs, overlaps, prompt_keys)
from raylight.engine.kv_cache.manager import KVCacheManager
from raylight.engine.request import Request
from raylight.messages import BlockRemoved, BlockStored
from raylight.sampling_params import SamplingParams

BS = 4


def engine_cache(prompts, salt=None, num_blocks=64):
    """A KV cache manager with events, after computing `prompts` (each cached in full)."""
    kv = KVCacheManager(num_blocks, BS, enable_caching=True, record_events=True)
    reqs = []
    for i, ids in enumerate(prompts):
        req = Request(f"r{i}", list(ids), SamplingParams(max_tokens=1), 1, cache_salt=salt)
        hits, _ = kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, req.num_tokens - len(hits) * BS, hits)
        reqs.append(req)
    return kv, reqs


def test_router_hashes_like_the_engine():
    prompt = list(range(1, 23))  # 22 tokens: 5 full blocks; the engine can match at most (22 - 1) // 4 = 5
    for salt in (None, "tenant-a"):
        kv, _ = engine_cache([prompt], salt)
        log = KVEventLog()
        log.add(kv.take_events())
        keys = prompt_keys(prompt, BS, salt)
        assert len(keys) == 5 and set(keys) <= log.cached
    assert prompt_keys(prompt, BS, "a") != prompt_keys(prompt, BS, "b")  # the salt rule: no sharing across salts
    assert prompt_keys(prompt, BS, "a")[0] != prompt_keys(prompt, BS, None)[0]
    assert prompt_keys(list(range(8)), BS) == prompt_keys(list(range(9)), BS)[:1]  # last position never matched
    assert prompt_keys([], BS) == [] and prompt_keys(list(range(100)), BS, max_blocks=3) == prompt_keys(
        list(range(13)), BS)


def test_event_log_cursor_snapshot_and_bound():
    log = KVEventLog(capacity=3)
    h = [bytes([i]) * 32 for i in range(6)]
    log.add([BlockStored((h[0], h[1]), None), BlockStored((h[2],), h[1])], t=1.0)
    first = log.since("", -1)  # a router that never asked: a snapshot
    assert set(first["snapshot"]) == {block_key(x) for x in h[:3]} and first["seq"] == 2
    log.add([BlockRemoved((h[0],))], t=2.0)
    inc = log.since(log.epoch, 2)
    assert [(s, stored, keys) for s, _, stored, keys in inc["events"]] == [(3, False, (block_key(h[0]),))]
    assert log.since(log.epoch, 3)["events"] == []
    log.add([BlockStored((h[3],), None), BlockStored((h[4],), None), BlockStored((h[5],), None)])
    assert "snapshot" in log.since(log.epoch, 2)  # fell out of the bounded log
    assert "snapshot" in log.since("other-epoch", 6)  # restarted replica
    assert log.cached == {block_key(x) for x in (h[1], h[2], h[3], h[4], h[5])}


def test_index_follows_events_and_restarts():
    core = KVRouterCore(block_size=BS)
    log = KVEventLog()
    kv, _ = engine_cache([list(range(1, 18))])
    log.add(kv.take_events(), t=time.time() - 0.5)
    core.apply("A", {**log.since(*core.cursor_of("A")), "t": time.time()})
    keys = prompt_keys(list(range(1, 18)), BS)
    assert core.cached.size("A") == 4 and overlaps(keys, ["A", "B"], [core.cached]) == {"A": 4, "B": 0}
    kv2, _ = engine_cache([list(range(1, 18)), list(range(50, 60))])
    log.add(kv2.take_events(), t=time.time() - 0.25)
    log.add([BlockRemoved((kv2.req_blocks["r0"][3].block_hash,))])
    core.apply("A", {**log.since(*core.cursor_of("A")), "t": time.time()})
    assert overlaps(keys, ["A"], [core.cached]) == {"A": 3}
    assert core.lag_count >= 1 and 0.2 < core.stats()["event_lag_last_s"] < 5
    # A restarted process under the same id: its report carries a new epoch; what we knew goes.
    core.report("A", {"t": time.time() + 1, "epoch": "new", "seq": 0, "kv_blocks_total": 10, "kv_blocks_free": 10})
    assert core.cached.size("A") == 0 and core.wants_events("A")
    # Serve's list no longer has B: nothing of it stays.
    core.predicted.start("q", "B", keys)
    core.keep_only(["A"])
    assert core.predicted.index.size() == 0 and core.predicted.load_blocks("B") == 0


def test_cost_function():
    c = costs(10, {"A": 8, "B": 0}, {"A": 5, "B": 0}, overlap_weight=1.0, load_weight=1.0)
    assert c == {"A": 1 * 2 + (5 + 2), "B": 10 + (0 + 10)}
    assert costs(10, {"A": 8, "B": 0}, {"A": 20, "B": 0}) == {"A": 24, "B": 20}  # load outweighs the overlap
    assert costs(10, {"A": 8}, {"A": 3}, overlap_weight=0.0, load_weight=2.0) == {"A": 10}


def test_rank_prefers_overlap_then_load_then_round_robin():
    core = KVRouterCore(block_size=BS)
    a = prompt_keys(list(range(100, 141)), BS)  # 10 blocks
    core.cached.add("B", a[:8])
    ranked = core.rank(a, ["A", "B", "C"])
    assert ranked[0][1] == "B" and ranked[0][2] == 8
    # Heavy load on B (its report: 40 blocks in use) sends the same prompt elsewhere.
    core.report("B", {"t": 1.0, "kv_blocks_total": 100, "kv_blocks_free": 60})
    assert core.rank(a, ["A", "B", "C"])[0][1] != "B"
    # No overlap anywhere, idle: round robin over the replicas.
    core2 = KVRouterCore(block_size=BS)
    picks = []
    for i in range(9):
        best = core2.rank(prompt_keys(list(range(i * 50, i * 50 + 20)), BS), ["A", "B", "C"])[0][1]
        core2.routed_request(f"r{i}", best, [], 0)
        core2.finished(f"r{i}")
        picks.append(best)
    assert sorted(picks) == ["A"] * 3 + ["B"] * 3 + ["C"] * 3
    assert core2.stats()["routed_load"] == 9 and core2.stats()["routed_overlap"] == 0


def test_burst_sticks_before_any_event_and_predictions_expire():
    core = KVRouterCore(block_size=BS, predict_ttl_s=5.0)
    prefixes = [list(range(1000 * p, 1000 * p + 40)) for p in range(4)]
    chosen = {}
    for i in range(16):  # 4 prefixes interleaved, 4 requests each, all in flight at once
        p = i % 4
        keys = prompt_keys(prefixes[p] + [7000 + i, 7001 + i, 7002 + i, 7003 + i, 1], BS)
        best = core.rank(keys, ["A", "B", "C", "D"])[0]
        core.routed_request(f"r{i}", best[1], keys, best[2])
        chosen.setdefault(p, set()).add(best[1])
    assert all(len(s) == 1 for s in chosen.values()), chosen  # each prefix on one replica
    assert len(set().union(*chosen.values())) == 4  # and the prefixes spread
    assert core.stats()["routed_overlap"] == 12
    for i in range(16):
        core.finished(f"r{i}")
    assert all(core.predicted.load_blocks(r) == 0 for r in "ABCD")
    now = time.monotonic()
    core.predicted.sweep(now + 1)
    assert core.predicted.index.size() > 0  # still predicted...
    core.predicted.sweep(now + 6)
    assert core.predicted.index.size() == 0  # ...until the ttl


def test_predicted_load_counts_shared_blocks_once():
    p = PredictedBlocks()
    keys = [1, 2, 3, 4]
    p.start("a", "A", keys)
    p.start("b", "A", keys[:3] + [9])
    assert p.load_blocks("A") == 5 + 2  # unique blocks + one partial block per request
    p.forget("A", [1])  # evicted while running: the running requests still hold it
    assert 1 in p.index.by_replica["A"]
    p.finish("a")
    p.finish("b")
    p.forget("A", [1, 2])
    assert p.index.by_replica["A"] == {3, 4, 9} and p.load_blocks("A") == 0


def test_prefix_index():
    idx = PrefixIndex()
    idx.add("A", [1, 2, 3])
    idx.add("B", [1, 2])
    assert overlaps([1, 2, 3, 4], ["A", "B", "C"], [idx]) == {"A": 3, "B": 2, "C": 0}
    idx.replace("A", [5])
    assert idx.holders(1) == {"B"} and idx.size() == 3
    idx.drop("B")
    assert idx.owners == {5: {"A"}}


def test_routing_config():
    cfg = RoutingConfig(policy="kv_aware", overlap_weight=2.0)
    kw = cfg.router_kwargs(32)
    assert kw["block_size"] == 32 and kw["overlap_weight"] == 2.0 and "policy" not in kw
    with pytest.raises(ValueError):
        RoutingConfig(policy="random")
    with pytest.raises(ValueError):
        RoutingConfig(overlap_weight=-1)


def test_app_config_routing():
    from raylight.cluster.app import AppConfig, DisaggAppConfig

    cfg = AppConfig(engine_args={"load_format": "dummy"}, routing={"policy": "kv_aware", "load_weight": 0.5})
    assert cfg.routing.policy == "kv_aware" and AppConfig(engine_args={"load_format": "dummy"}).routing.policy \
        == "default"
    d = DisaggAppConfig(engine_args={"load_format": "dummy"}, decode={"routing": {"policy": "kv_aware"}})
    assert d.decode.routing.policy == "kv_aware" and d.prefill.routing.policy == "default"
    with pytest.raises(ValueError):
        AppConfig(routing={"policy": "kv_aware", "bogus": 1})


# ---------------------------------------------------------------- the Serve request router, fake replicas

ray_serve = pytest.importorskip("ray.serve")


class FakeReplica:
    def __init__(self, name, stats=None):
        self.replica_id = SimpleNamespace(unique_id=name)
        self.routing_stats = stats or {}
        self.max_ongoing_requests = 100


def make_router(**kwargs):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from raylight.cluster.kv_router import KVAwareRequestRouter

    r = KVAwareRequestRouter(deployment_id=DeploymentID(name="EngineReplica", app_name="t"),
                             handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(block_size=BS, **kwargs)
    r._ensure_poller = lambda: None  # no pulls in these tests
    return r


def pending(call, method="generate", iid="i0", **kwargs):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    return PendingRequest(args=[call], kwargs=kwargs, metadata=RequestMetadata(
        request_id=iid, internal_request_id=iid, call_method=method))


def test_serve_router_choose_replicas():
    from raylight.messages import GenerateCall

    async def main():
        router = make_router()
        reps = [FakeReplica(n) for n in "ABC"]
        prompt = list(range(1, 42))
        router.core.cached.add("C", prompt_keys(prompt, BS)[:6])
        ranks = await router.choose_replicas(reps, pending(GenerateCall("x", prompt, SamplingParams())))
        assert [r.replica_id.unique_id for rank in ranks for r in rank][0] == "C" and len(ranks) == 3
        assert router.core.predicted.active_requests["C"] == 1
        router.on_request_routed(pending(None, iid="i0"), SimpleNamespace(unique_id="A"), None)
        assert router.core.predicted.active_requests["C"] == 0 and router.core.predicted.active_requests["A"] == 1
        router.on_request_completed(SimpleNamespace(unique_id="A"), "i0")
        assert router.core.predicted.load_blocks("A") == 0
        # Targeted calls go to their replica; calls without a prompt get two random choices.
        ranks = await router.choose_replicas(reps, pending(None, "remote_prefill_failed", "i1", target_replica="B"))
        assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [["B"]]
        ranks = await router.choose_replicas(reps, pending(None, "stats", "i2"))
        assert len(ranks) == 1 and len(ranks[0]) == 2
        assert router.core.stats()["routed_overlap"] == 1

    asyncio.run(main())


def test_metrics_of_the_routers_in_this_process():
    from raylight.cluster.metrics import ServerMetrics

    core = KVRouterCore(block_size=BS)
    core.cached.add("A", [1, 2, 3])
    core.routed_request("r1", "A", [1, 2], 2)
    core.routed_request("r2", "B", [7], 0)
    core.lag_sum, core.lag_count = 0.3, 3
    text = ServerMetrics().render()[0].decode()
    assert 'raylight:kv_router_requests_routed_total{by="overlap"}' in text
    assert 'raylight:kv_router_replica_requests_total{replica="B"}' in text
    assert "raylight:kv_router_index_blocks" in text and "raylight:kv_router_event_lag_seconds_count" in text
    del core


def test_build_app_plugs_the_router_in():
    from raylight.cluster.app import build_app
    from raylight.cluster.kv_router import KVAwareRequestRouter

    def pool(args):
        return build_app(args)._bound_deployment.init_args[0]._bound_deployment

    kv = pool({"engine_args": {"load_format": "dummy", "block_size": 32}, "routing": {"policy": "kv_aware"}})
    rc = kv._deployment_config.request_router_config
    assert rc.request_router_class.endswith(KVAwareRequestRouter.__name__) and rc.request_router_kwargs[
        "block_size"] == 32
    assert kv.init_args[0]["enable_kv_events"] is True
    default = pool({"engine_args": {"load_format": "dummy"}})
    assert "KVAware" not in default._deployment_config.request_router_config.request_router_class
    assert not default.init_args[0].get("enable_kv_events")
    # The disaggregated app: the decode pool routed by KV (and still targeted), the prefill pool by default.
    app = build_app({"engine_args": {"load_format": "dummy"}, "decode": {"routing": {"policy": "kv_aware"}}})
    router = app._bound_deployment.init_args[0]._bound_deployment
    decode, prefill = (a._bound_deployment for a in router.init_args[:2])
    assert "KVAware" in decode._deployment_config.request_router_config.request_router_class
    assert "KVAware" not in prefill._deployment_config.request_router_config.request_router_class


def test_a_disaggregated_routers_bundle_reaches_the_ingress_metrics():
    from raylight.cluster.kv_index import router_stats
    from raylight.cluster.metrics import ServerMetrics

    remote = {"id": "disagg-router-1", **router_stats([{"routed_overlap": 5, "routed_load": 2, "index_blocks": 9,
                                                          "event_lag_sum_s": 0.5, "event_lag_count": 5,
                                                          "routed_to": {"D1": 7}}])}
    m = ServerMetrics()
    m.update_replica("D1", {"replicas": {}, "kv_router": remote})
    text = m.render()[0].decode()
    assert 'raylight:kv_router_replica_requests_total{replica="D1"} 7.0' in text
    assert float(text.split("\nraylight:kv_router_index_blocks ")[1].split()[0]) >= 9  # + this process's routers


def test_a_report_older_than_our_last_finish_is_left_out():
    core = KVRouterCore(block_size=BS)
    core.routed_request("r", "A", [1, 2, 3], 0)
    core.report("A", {"t": time.time(), "kv_blocks_total": 100, "kv_blocks_free": 60})
    assert core.load("A") == 40  # the report (other routers' requests too) outweighs our 3 + 1
    core.finished("r")
    assert core.load("A") == 0  # that report still counted our request
    core.report("A", {"t": time.time() + 0.01, "kv_blocks_total": 100, "kv_blocks_free": 90})
    assert core.load("A") == 10
