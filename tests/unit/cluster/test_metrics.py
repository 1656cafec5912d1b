"""cluster/metrics: a replica that died busy stops counting as load once its snapshot is stale; its
counters stay (they never go down); idle and fresh snapshots count."""

from __future__ import annotations

from raylight.cluster.metrics import ServerMetrics


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_a_dead_busy_replica_stops_counting_as_load():
    m = ServerMetrics()
    busy = dict(num_running=8, num_waiting=7, kv_blocks_total=100, kv_blocks_free=10, preemptions=3)
    idle = dict(num_running=0, num_waiting=0, kv_blocks_total=100, kv_blocks_free=100, preemptions=2)
    m.update_replica("dead", busy)
    m.update_replica("alive", idle)
    text = m.render()[0].decode()
    assert _value(text, "raylight:num_requests_running") == 8 and _value(text, "raylight:kv_cache_free_blocks") == 110
    m._replicas.seen["dead"] -= m._replicas.stale_s + 1  # nothing heard from it since: it died mid-work
    text = m.render()[0].decode()
    assert _value(text, "raylight:num_requests_running") == 0 and _value(text, "raylight:num_requests_waiting") == 0
    assert _value(text, "raylight:kv_cache_free_blocks") == 100 and _value(text, "raylight:kv_cache_total_blocks") == 100
    assert _value(text, "raylight:num_preemptions_total") == 5  # counters keep the dead replica's share
    m._replicas.seen["alive"] -= m._replicas.stale_s + 1  # an idle replica is simply idle: it still counts
    assert _value(m.render()[0].decode(), "raylight:kv_cache_total_blocks") == 100


def test_replicas_serve_no_longer_runs_leave_the_gauges_but_not_the_counters():
    """After a scale-down the removed replica's idle snapshot must not count its KV blocks any more;
    its counters stay (they never go down); a replica heard from again counts again."""
    from raylight.cluster.metrics import ServerMetrics

    m = ServerMetrics()
    ids = ["Replica(id='a1', deployment='EngineReplica', app='x')", "Replica(id='b2', deployment='EngineReplica', app='x')"]
    for rid in ids:
        m.update_replica(rid, {"kv_blocks_total": 100, "kv_blocks_free": 100, "preemptions": 3, "num_running": 0})
    total = lambda: _value(m.render()[0].decode(), "raylight:kv_cache_total_blocks")  # noqa: E731
    assert total() == 200
    m.retain_replicas({"b2"})  # Serve runs b2 only now
    text = m.render()[0].decode()
    assert total() == 100 and _value(text, "raylight:kv_cache_free_blocks") == 100
    assert _value(text, "raylight:num_preemptions_total") == 6
    m.retain_replicas(None)  # unknown (not under Serve): nothing changes
    assert total() == 100
    m.update_replica(ids[0], {"kv_blocks_total": 100, "kv_blocks_free": 50, "num_running": 1})
    assert total() == 200


def test_a_message_of_several_tokens_shares_its_gap_between_them(monkeypatch):
    """Paced or lagging streams carry several tokens a message: the inter-token latency histogram gets one
    observation per token, each the gap over the tokens, not one observation of the whole gap."""
    import raylight.cluster.metrics as metrics
    from raylight.outputs import CompletionOutput, RequestOutput

    clock = [10.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    m = ServerMetrics()
    timing = metrics.RequestTiming(m)

    def message(n):
        return RequestOutput("r", None, [1], [CompletionOutput(0, "", [], delta_token_ids=[7] * n)], False)

    clock[0] += 0.05
    timing.token(message(1))  # the first token: time to first token
    clock[0] += 0.4
    timing.token(message(4))
    text = m.render()[0].decode()
    assert _value(text, "raylight:inter_token_latency_seconds_count") == 4
    assert abs(_value(text, "raylight:inter_token_latency_seconds_sum") - 0.4) < 1e-9
    assert _value(text, "raylight:time_to_first_token_seconds_count") == 1


def test_engine_step_counters_are_summed_over_replicas():
    m = ServerMetrics()
    m.update_replica("a", dict(num_steps=10, step_seconds_total=0.05, step_rows_total=100, step_tokens_total=400,
                               idle_seconds_total=1.0))
    m.update_replica("b", dict(num_steps=30, step_seconds_total=0.15, step_rows_total=300, step_tokens_total=600,
                               idle_seconds_total=0.5))
    text = m.render()[0].decode()
    assert _value(text, "raylight:engine_steps_total") == 40
    assert _value(text, "raylight:engine_step_seconds_total") == 0.2
    assert _value(text, "raylight:engine_step_rows_total") == 400
    assert _value(text, "raylight:engine_step_tokens_total") == 1000
    assert _value(text, "raylight:engine_idle_seconds_total") == 1.5


def test_sibling_ingress_replicas_request_metrics_are_summed():
    """With several ingress replicas a scrape reaches one: it serves its own request metrics plus what
    the others last shared, histograms bucket by bucket and counters label by label (a label value only a
    sibling has seen included); per-process `_created` samples are not served."""
    a, b, c = ServerMetrics(), ServerMetrics(), ServerMetrics()
    a.ttft.observe(0.003)
    a.requests.labels(finished_reason="stop").inc()
    a.prompt_tokens.inc(7)
    b.ttft.observe(0.3)
    b.requests.labels(finished_reason="stop").inc(2)
    b.requests.labels(finished_reason="length").inc(4)
    b.prompt_tokens.inc(5)
    c.aborted.inc()
    a.set_peers({"b": b.request_samples(), "c": c.request_samples()})
    text = a.render()[0].decode()
    assert _value(text, 'raylight:request_success_total{finished_reason="stop"}') == 3
    assert _value(text, 'raylight:request_success_total{finished_reason="length"}') == 4
    assert _value(text, "raylight:prompt_tokens_total") == 12
    assert _value(text, "raylight:request_aborted_total") == 1
    assert _value(text, "raylight:time_to_first_token_seconds_count") == 2
    assert abs(_value(text, "raylight:time_to_first_token_seconds_sum") - 0.303) < 1e-9
    assert _value(text, 'raylight:time_to_first_token_seconds_bucket{le="0.005"}') == 1
    assert _value(text, 'raylight:time_to_first_token_seconds_bucket{le="0.5"}') == 2
    assert "_created" not in text
    a.set_peers({})  # the siblings left: only a's own again
    assert _value(a.render()[0].decode(), "raylight:prompt_tokens_total") == 7


def test_ingress_peers_actor_answers_the_others_and_forgets_silent_ones(monkeypatch):
    from raylight.cluster import ingress_peers

    hub = ingress_peers.IngressPeers()
    assert hub.post("a", [("x_total", (), 1.0)]) == {}
    assert hub.post("b", [("x_total", (), 2.0)]) == {"a": [("x_total", (), 1.0)]}
    t, s = hub.samples["a"]
    hub.samples["a"] = (t - ingress_peers.STALE_S - 1, s)  # a stopped posting (scaled down, dead)
    assert hub.post("b", [("x_total", (), 3.0)]) == {}
    assert hub.post("a", []) == {"b": [("x_total", (), 3.0)]}
