"""Data-parallel replicas under the SLO autoscaler (raylight/cluster/autoscaling.py) on a real Ray Serve app
over HTTP on 127.0.0.1 (SmolLM2 on CPU, 3 replicas sharing 2 cores):

* graceful drain: the pool comes up with 3 replicas (initial_replicas) under a steady stream of requests
  (started before the app is up) well under its targets; the policy scales it 3 -> 2 -> 1 while the stream
  runs, and every request completes with all its tokens (a removed replica stops taking requests and
  finishes its running ones first);
* scale up and back: a burst the single replica cannot serve (its waiting queue above
  max_waiting_per_replica) makes the policy add replicas; when the load ends it removes them again.

Serve's delays and windows are short (look_back_period_s 2, upscale_delay_s 1, downscale_delay_s 4) so
each direction takes seconds. About 1.5 minutes on 2 cores."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray")

from raylight.testing.helpers import read_metrics
from raylight.testing.load import Load, replica_states, serve_app_under_load, wait_replica_states

APP = "autoscale"
MAX_NUM_SEQS = 4
MAX_WAITING = 2  # slo.max_waiting_per_replica


@pytest.fixture(scope="module")
def server(smollm2_dir):
    """The app, and a stream of 3 clients that runs from before the app is up (so the 3 replicas never
    idle) until the first test stops it."""
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(
        engine_args={"device": "cpu", "max_model_len": 512, "max_num_seqs": MAX_NUM_SEQS,
                     "kv_cache_memory": 128 * 1024 * 1024},
        ray_actor_options={"num_cpus": 0.5}, default_max_tokens=16, graceful_shutdown_timeout_s=60,
        autoscaling_config={"min_replicas": 1, "max_replicas": 3, "initial_replicas": 3,
                            "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
                            "upscale_delay_s": 1.0, "downscale_delay_s": 4.0,
                            "slo": {"max_waiting_per_replica": MAX_WAITING, "ttft_p90_s": 10.0, "min_samples": 2}})
    with serve_app_under_load(cfg, APP, clients=3, max_tokens=24) as (base, load):
        yield base, load


def wait_states(want: dict[str, int], timeout_s: float) -> float:
    return wait_replica_states(APP, {"EngineReplica": want}, timeout_s)


def test_scale_down_3_to_1_under_a_steady_stream_drops_no_request(server):
    base, load = server
    up = time.monotonic() - load.ready_t  # the stream ran before the pool was up: every removal is under load
    took = wait_states({"RUNNING": 1}, 90)  # 3 -> 2 -> 1, each after downscale_delay_s, each drained
    during = len(load.results)
    time.sleep(2.0)  # and the one left keeps serving
    load.finish()
    load.check_all_complete()
    assert during >= 6, load.results
    # /metrics counts the one replica left: the removed ones' KV blocks are gone from the gauges.
    from ray import serve

    one = serve.get_deployment_handle("EngineReplica", APP).stats.remote().result(timeout_s=30).metrics
    assert read_metrics(base)["raylight:kv_cache_total_blocks"] == one["kv_blocks_total"]
    print(f"3 -> 1 replicas {up + took:.1f}s into a steady stream; {len(load.results)} requests, all complete")


def test_a_queue_the_pool_cannot_serve_scales_it_up_then_down(server):
    base, first = server
    first.finish()
    wait_states({"RUNNING": 1}, 90)
    seen = 1
    t0 = time.monotonic()
    # 4x the single replica's capacity: about 12 requests waiting, far above max_waiting_per_replica
    with Load(base, clients=4 * MAX_NUM_SEQS, max_tokens=32) as load:
        while seen < 2:
            states = replica_states(APP, "EngineReplica")["EngineReplica"]
            assert time.monotonic() - t0 < 90, f"no scale-up under a queue: {states}"
            seen = max(seen, states.get("RUNNING", 0))
            time.sleep(0.2)
        up_s = time.monotonic() - t0
    load.check_all_complete()
    down_s = wait_states({"RUNNING": 1}, 90)  # idle now: back to min_replicas, one at a time
    print(f"scaled up to {seen} replicas {up_s:.1f}s into the burst ({len(load.results)} requests, all "
          f"complete); back to 1 replica {down_s:.1f}s after it")
