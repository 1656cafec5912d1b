"""SLO autoscaling (raylight/cluster/autoscaling.py): the decision rule as a pure function, the pool's
signals from Serve-shaped raw metrics (a fake AutoscalingContext), the replica-side recorder, and the
config's translation into Serve's autoscaling_config (validation with field names), and the policy's trip
through Serve's pickling into a fresh process."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from raylight.cluster.autoscaling import (ITL_KEYS, KV_KEY, LATENCY_BUCKETS_S, POLICY_PATH, RUNNING_KEY, TTFT_KEYS,
                                          WAITING_KEY, SLOPolicy, SLORecorder, SLOTargets, decide, new_tokens,
                                          pool_signals, quantile, serve_autoscaling_config)

T = SLOTargets(ttft_p90_s=1.0, itl_p90_s=0.1, max_waiting_per_replica=4, max_kv_usage=0.8)


def sig(ttft=None, itl=None, waiting=0.0, kv=None):
    return {"ttft_p90_s": ttft, "itl_p90_s": itl, "waiting_per_replica": waiting, "kv_usage": kv}


# ------------------------------------------------------------------------------------ the decision rule

def test_any_violated_target_scales_up_in_proportion_capped():
    assert decide(sig(ttft=1.5), T, running=2, target=2)[0] == 3            # 2 * 1.5
    assert decide(sig(waiting=4.4), T, running=2, target=2)[0] == 3          # 1.1x: at least one more
    assert decide(sig(waiting=40), T, running=2, target=2)[0] == 4           # 10x, capped at 2x per step
    assert decide(sig(itl=0.3, ttft=0.1), T, running=1, target=1)[0] == 2    # the worst signal decides
    want, why = decide(sig(kv=0.9), T, running=3, target=3)
    assert want == 4 and why.startswith("up: kv_usage")


def test_scale_up_is_bounded_and_never_undoes_one_in_flight():
    assert decide(sig(waiting=40), T, running=3, target=3, lo=1, hi=4)[0] == 4
    assert decide(sig(waiting=40), T, running=4, target=4, lo=1, hi=4)[0] == 4
    # two replicas still starting (target 5, running 3): the want is not below the target
    assert decide(sig(waiting=5), T, running=3, target=5)[0] == 5


def test_hold_in_the_hysteresis_band():
    # 0.5 of target with 2 replicas: with one fewer it would be 1.0 > scale_down_below (0.6): hold
    want, why = decide(sig(waiting=2.0), T, running=2, target=2)
    assert want == 2 and why.startswith("hold")
    assert decide(sig(ttft=0.9, itl=0.05), T, running=3, target=3)[0] == 3   # under target, not well under


def test_scale_down_one_at_a_time_when_well_under_target():
    # 0.25 of target over 3 replicas is 0.375 over 2: below 0.6, down by one
    want, why = decide(sig(ttft=0.25, itl=0.02, waiting=0.5, kv=0.1), T, running=3, target=3)
    assert want == 2 and why.startswith("down")
    assert decide(sig(), T, running=4, target=4)[0] == 3                     # idle: no latency samples
    assert decide(sig(), T, running=1, target=1, lo=1)[0] == 1               # never below min
    assert decide(sig(), T, running=1, target=1, lo=0)[0] == 0               # min 0: idle scales to zero
    # not while a scaling is in flight (a replica starting or stopping)
    assert decide(sig(), T, running=3, target=4)[0] == 4
    assert decide(sig(), T, running=3, target=2)[0] == 2


def test_only_configured_targets_count_and_no_reports_hold():
    only_queue = SLOTargets(max_waiting_per_replica=2)
    assert decide(sig(ttft=100, itl=100, kv=1.0), only_queue, running=2, target=2)[0] == 1
    want, why = decide(None, T, running=2, target=2)
    assert want == 2 and "no replica" in why


def test_targets_validation():
    with pytest.raises(ValueError, match="at least one"):
        SLOTargets()
    with pytest.raises(ValueError):
        SLOTargets(max_kv_usage=1.5)
    with pytest.raises(ValueError):
        SLOTargets(ttft_p90_s=1, scale_down_below=1.0)
    with pytest.raises(ValueError):
        SLOTargets(ttft_p90_s=1, ttft_p99_s=1)


# ------------------------------------------------------------------ signals from Serve's raw metrics

def point(v):
    return SimpleNamespace(value=float(v), timestamp=0.0)


def hist(samples: list[float]) -> list[int]:
    rec = SLORecorder()
    for s in samples:
        clock = rec.request()
        clock.start -= s  # as if it had arrived s seconds ago
        clock.tokens(1)
    return rec.ttft


def raw_for(replicas: dict[str, dict]) -> dict:
    """{replica: {"ttft": [bucket counts per point...], "waiting": [..], "kv": [..]}} -> Serve's raw_metrics."""
    raw: dict = {}
    for rid, m in replicas.items():
        for key, points in (("waiting", WAITING_KEY), ("kv", KV_KEY), ("running", RUNNING_KEY)):
            raw.setdefault(points, {})[rid] = [point(v) for v in m.get(key, [0.0])]
        for name, keys in (("ttft", TTFT_KEYS), ("itl", ITL_KEYS)):
            per_point = m.get(name, [[0] * len(keys)])
            for i, k in enumerate(keys):
                raw.setdefault(k, {})[rid] = [point(counts[i]) for counts in per_point]
    return raw


def test_quantile_interpolates_inside_a_bucket():
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    assert quantile(counts, 0.9) is None
    counts[LATENCY_BUCKETS_S.index(1.0)] = 10  # ten samples in (0.75, 1.0]
    assert quantile(counts, 0.9) == pytest.approx(0.75 + 0.25 * 0.9)
    counts[-1] = 100  # above the last bound
    assert quantile(counts, 0.9) == LATENCY_BUCKETS_S[-1]


def test_pool_signals_pool_latencies_and_average_gauges():
    fast, slow = hist([0.04] * 9), hist([2.9] * 3)
    raw = raw_for({"a": {"ttft": [fast, hist([0.04] * 9)], "waiting": [2, 4], "kv": [0.2, 0.4]},
                   "b": {"ttft": [slow], "waiting": [6], "kv": [0.6]}})
    s = pool_signals(raw, ["a", "b"], queued_at_handles=1.0, min_samples=5)
    # 21 samples pooled: 18 fast, 3 slow -> the 90th percentile is in the slow bucket
    assert 2.0 < s["ttft_p90_s"] <= 3.0
    assert s["itl_p90_s"] is None                                  # no ITL samples
    assert s["waiting_per_replica"] == pytest.approx((3 + 6 + 1) / 2)
    assert s["kv_usage"] == pytest.approx((0.3 + 0.6) / 2)
    few = pool_signals(raw_for({"a": {"ttft": [hist([9.0] * 2)]}}), ["a"], min_samples=5)
    assert few["ttft_p90_s"] is None                               # 2 samples: no evidence either way
    # a replica that has not reported yet counts in the divisor; no report at all is no signal
    assert pool_signals(raw_for({"a": {"waiting": [4]}}), ["a", "new"])["waiting_per_replica"] == 2
    assert pool_signals({}, ["a"]) is None
    assert pool_signals(raw_for({"gone": {"waiting": [4]}}), ["a"]) is None


def ctx(raw, running, target, queued=0.0, lo=1, hi=8, state=None):
    return SimpleNamespace(raw_metrics=raw, running_replicas=list(running), current_num_replicas=len(running),
                           target_num_replicas=target, total_queued_requests=queued,
                           capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
                           policy_state=state or {}, deployment_name="EngineReplica")


def test_policy_over_a_fake_context():
    policy = SLOPolicy(**SLOTargets(max_waiting_per_replica=2, ttft_p90_s=1.0).model_dump(exclude_none=True))
    busy = raw_for({"a": {"waiting": [6, 8]}, "b": {"waiting": [7]}})
    want, state = policy(ctx(busy, ["a", "b"], 2, state={"other": 1}))
    assert want == 4 and state["other"] == 1 and state["raylight_slo"]["reason"].startswith("up")
    assert policy(ctx(busy, ["a", "b"], 2, hi=3))[0] == 3
    idle = raw_for({"a": {"waiting": [0]}, "b": {"waiting": [0]}, "c": {"waiting": [0]}})
    assert policy(ctx(idle, ["a", "b", "c"], 3))[0] == 2
    # queued at the handles counts as waiting
    assert policy(ctx(idle, ["a", "b", "c"], 3, queued=9.0))[0] == 5


# --------------------------------------------------------------------------------- the replica side

def test_recorder_counts_since_last_take_then_resets():
    rec = SLORecorder()
    clock = rec.request()
    clock.tokens(0)                      # a reservation, not a token
    clock.tokens(1)                      # first token: TTFT
    clock.last -= 0.38
    clock.tokens(4)                      # 4 tokens over 0.38 s: ITL about 0.095 each
    stats = rec.take(waiting=3, running=2, kv_usage=0.5)
    assert all(isinstance(v, float) for v in stats.values())  # what Serve accepts
    assert sum(stats[k] for k in TTFT_KEYS) == 1 and sum(stats[k] for k in ITL_KEYS) == 4
    assert stats[ITL_KEYS[LATENCY_BUCKETS_S.index(0.1)]] == 4
    assert (stats[WAITING_KEY], stats[RUNNING_KEY], stats[KV_KEY]) == (3.0, 2.0, 0.5)
    again = rec.take(0, 0, 0.0)
    assert sum(again[k] for k in TTFT_KEYS + ITL_KEYS) == 0


def test_new_tokens_of_an_output():
    out = SimpleNamespace(outputs=[SimpleNamespace(delta_token_ids=[1, 2]), SimpleNamespace(delta_token_ids=[3])])
    assert new_tokens(out) == 2
    assert new_tokens(SimpleNamespace(block_ids=[1])) == 0


# ------------------------------------------------------------------------------------------ the config

def test_slo_section_becomes_serve_policy():
    cfg = serve_autoscaling_config({"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 5,
                                    "slo": {"ttft_p90_s": 2, "max_kv_usage": 0.9}})
    assert cfg["policy"]["policy_function"] == POLICY_PATH
    assert cfg["policy"]["policy_kwargs"]["ttft_p90_s"] == 2.0 and "itl_p90_s" not in cfg["policy"]["policy_kwargs"]
    assert cfg["upscale_delay_s"] == 5 and "slo" not in cfg
    plain = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}
    assert serve_autoscaling_config(plain) == plain                   # Serve's default policy
    assert serve_autoscaling_config(None) is None


def test_bad_autoscaling_config_names_the_field():
    from raylight.cluster.app import AppConfig, DisaggAppConfig

    with pytest.raises(ValueError, match="slo.*max_kv_usage"):
        serve_autoscaling_config({"slo": {"max_kv_usage": 2}})
    with pytest.raises(ValueError, match="slo.*extra|slo.*ttft_p99"):
        AppConfig(autoscaling_config={"slo": {"ttft_p99": 1}})
    with pytest.raises(ValueError, match="not both"):
        serve_autoscaling_config({"slo": {"ttft_p90_s": 1}, "policy": {"policy_function": "x:y"}})
    pytest.importorskip("ray.serve")
    with pytest.raises(ValueError, match="max_replicas"):
        DisaggAppConfig(decode={"autoscaling_config": {"min_replicas": 3, "max_replicas": 2,
                                                       "slo": {"itl_p90_s": 0.1}}})


def test_pools_deploy_with_the_policy():
    pytest.importorskip("ray.serve")
    from raylight.cluster.app import build_disagg_app

    app = build_disagg_app({"engine_args": {"device": "cpu", "load_format": "dummy"},
                            "prefill": {"autoscaling_config": {"max_replicas": 2, "slo": {"ttft_p90_s": 1}}},
                            "decode": {"autoscaling_config": {"max_replicas": 3, "slo": {"itl_p90_s": 0.05}}}})
    router = app._bound_deployment.init_args[0]._bound_deployment
    decode, prefill = (a._bound_deployment for a in router.init_args[:2])
    for dep, key, value in ((prefill, "ttft_p90_s", 1.0), (decode, "itl_p90_s", 0.05)):
        asc = dep._deployment_config.autoscaling_config
        assert asc.policy.policy_function == POLICY_PATH and asc.policy.policy_kwargs[key] == value


def test_policy_survives_serves_pickling_into_a_fresh_process(tmp_path):
    """Serve cloudpickles the policy class by value and its controller unpickles and builds it with
    policy_kwargs: the same in a fresh interpreter, which must not import raylight's engine to do it."""
    pytest.importorskip("ray.serve")
    import subprocess
    import sys

    from ray.serve.config import AutoscalingConfig

    cfg = AutoscalingConfig(**serve_autoscaling_config({"max_replicas": 4, "slo": {"max_waiting_per_replica": 2}}))
    blob = tmp_path / "policy.bin"
    blob.write_bytes(cfg.policy.get_serialized_policy_def())
    code = f"""
import json, sys
from types import SimpleNamespace
from ray import cloudpickle
cls = cloudpickle.loads(open({str(blob)!r}, "rb").read())
policy = cls(**json.loads({json.dumps(cfg.policy.policy_kwargs)!r}))
raw = {{{WAITING_KEY!r}: {{"a": [SimpleNamespace(value=9.0)]}}}}
ctx = SimpleNamespace(raw_metrics=raw, running_replicas=["a"], current_num_replicas=1, target_num_replicas=1,
                      total_queued_requests=0.0, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
                      policy_state={{}}, deployment_name="EngineReplica")
print(policy(ctx)[0], any(m.startswith("raylight.engine") for m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "False"]
