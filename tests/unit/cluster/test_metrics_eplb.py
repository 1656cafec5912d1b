"""cluster/metrics for MoE replicas with EPLB: raylight:expert_balancedness{definition="vllm"|"sglang"} is
the worst (lowest) live replica's, replicas without the key are skipped and with none reporting no sample is
emitted; the rebalance and bytes-moved counters are summed over replicas and keep a dead replica's share."""

from __future__ import annotations

from raylight.cluster.metrics import ServerMetrics


def _samples(m: ServerMetrics, name: str) -> dict[str, float]:
    """label-set text ("" without labels) -> value, for the samples of `name`."""
    out = {}
    for line in m.render()[0].decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key[len(name):]] = float(value)
    return out


def _moe(vllm: float, sglang: float, rebalances: int, moved: int, **extra) -> dict:
    return dict(expert_balancedness_vllm=vllm, expert_balancedness_sglang=sglang, eplb_rebalances=rebalances,
                eplb_bytes_moved=moved, eplb_last_rebalance_s=0.1, **extra)


def test_balancedness_is_the_worst_replica_per_definition():
    m = ServerMetrics()
    m.update_replica("a", _moe(0.9, 0.6, 2, 1000))
    m.update_replica("b", _moe(0.7, 0.8, 3, 500))
    m.update_replica("dense", dict(num_running=0, num_waiting=0))  # no key: skipped, not read as 0 or 1
    assert _samples(m, "raylight:expert_balancedness") == {'{definition="vllm"}': 0.7, '{definition="sglang"}': 0.6}
    assert _samples(m, "raylight:eplb_rebalances_total") == {"": 5}
    assert _samples(m, "raylight:eplb_bytes_moved_total") == {"": 1500}


def test_no_replica_reporting_emits_no_balancedness():
    m = ServerMetrics()
    assert _samples(m, "raylight:expert_balancedness") == {}
    m.update_replica("dense", dict(num_running=1, num_waiting=0, kv_blocks_total=10, kv_blocks_free=5))
    text = m.render()[0].decode()
    assert "raylight:expert_balancedness" not in text
    assert _samples(m, "raylight:eplb_rebalances_total") == {"": 0}  # counters read 0, as the KV ones do


def test_a_dead_busy_replica_leaves_the_gauge_but_not_the_counters():
    m = ServerMetrics()
    m.update_replica("dead", _moe(0.2, 0.1, 4, 800, num_running=3))
    m.update_replica("alive", _moe(0.95, 0.9, 1, 100))
    assert _samples(m, "raylight:expert_balancedness")['{definition="vllm"}'] == 0.2
    m._replicas.seen["dead"] -= m._replicas.stale_s + 1  # died mid-work: its snapshot is stale
    assert _samples(m, "raylight:expert_balancedness") == {'{definition="vllm"}': 0.95,
                                                          '{definition="sglang"}': 0.9}
    assert _samples(m, "raylight:eplb_rebalances_total") == {"": 5}
    assert _samples(m, "raylight:eplb_bytes_moved_total") == {"": 900}


def test_a_disaggregated_bundle_and_bad_values():
    m = ServerMetrics()
    m.update_replica("router", {"replicas": {"p": _moe(0.5, 0.4, 1, 10, snapshot_t=1.0),
                                             "d": _moe(0.8, 0.3, 1, 20, snapshot_t=1.0)}})
    m.update_replica("odd", dict(expert_balancedness_vllm=None, expert_balancedness_sglang=True))  # not numbers
    assert _samples(m, "raylight:expert_balancedness") == {'{definition="vllm"}': 0.5, '{definition="sglang"}': 0.3}
