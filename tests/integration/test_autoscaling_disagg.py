"""SLO autoscaling of the disaggregated app's two pools, each on its own targets (prefill on TTFT and its
queue, decode on ITL and KV usage), on a real Ray Serve app over HTTP on 127.0.0.1 (SmolLM2 on CPU,
gloo): both pools come up with 2 replicas under a steady stream (started before the app is up) of prompts
long enough to be prefilled remotely, well under their targets; each policy removes one replica while the
stream runs (a prefill replica drained while it may be pushing KV, a decode replica while it streams), and
every request completes with all its tokens. About a minute on 2 cores."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray")

from raylight.testing.helpers import read_metrics
from raylight.testing.load import serve_app_under_load, wait_replica_states

APP = "autoscale-disagg"
THRESHOLD = 16
DOWNSCALE_DELAY_S = 6.0  # the pools come up a few seconds apart: the stream must run before either shrinks


def pool_config(slo: dict) -> dict:
    return {"engine_args": {"max_num_seqs": 4}, "ray_actor_options": {"num_cpus": 0.5},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 2,
                                   "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
                                   "upscale_delay_s": 1.0, "downscale_delay_s": DOWNSCALE_DELAY_S, "slo": slo}}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    from raylight.cluster.app import DisaggAppConfig

    cfg = DisaggAppConfig(
        engine_args={"device": "cpu", "max_model_len": 512, "kv_cache_memory": 64 * 2**20},
        prefill=pool_config({"ttft_p90_s": 10.0, "max_waiting_per_replica": 4, "min_samples": 2}),
        decode=pool_config({"itl_p90_s": 2.0, "max_kv_usage": 0.9, "min_samples": 2}),
        remote_prefill_threshold=THRESHOLD, default_max_tokens=16, graceful_shutdown_timeout_s=60)
    with serve_app_under_load(cfg, APP, timeout_s=300, clients=3, max_tokens=16, prompt_words=30) as served:
        yield served


def test_prefill_and_decode_pools_scale_down_on_their_own_under_load(server):
    base, load = server
    up = time.monotonic() - load.ready_t
    took = wait_replica_states(APP, {"PrefillReplica": {"RUNNING": 1}, "DecodeReplica": {"RUNNING": 1}}, 120)
    time.sleep(2.0)
    load.finish()
    load.check_all_complete()
    remote = read_metrics(base).get("raylight:kv_remote_prefills_total", 0.0)
    assert remote > 0, "no prompt went through the prefill pool"
    print(f"prefill 2 -> 1 and decode 2 -> 1 within {up + took:.1f}s of a steady stream; {len(load.results)} "
          f"requests ({remote:.0f} prefilled remotely), all complete")
