"""`build_app` gives the engine pool a placement group when the engine args ask for TP x PP > 1."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")


def _pool(app):
    """The EngineReplica deployment bound as the ingress's first argument."""
    pool = app._bound_deployment.init_args[0]
    assert pool._bound_deployment.name == "EngineReplica"
    return pool._bound_deployment._replica_config


def test_single_rank_replica_has_no_placement_group():
    from raylight.cluster.app import AppConfig, build_app

    rc = _pool(build_app(AppConfig(engine_args={"device": "cpu"}, ray_actor_options={"num_cpus": 2})))
    assert rc.placement_group_bundles is None
    assert rc.ray_actor_options["num_cpus"] == 2


def test_tp2_replica_gets_bundles_and_strategy():
    from raylight.cluster.app import AppConfig, build_app

    cfg = AppConfig(engine_args={"device": "cuda", "tensor_parallel_size": 2},
                    ray_actor_options={"num_cpus": 4, "num_gpus": 1})
    rc = _pool(build_app(cfg))
    assert rc.placement_group_bundles == [{"GPU": 2, "CPU": 8}]
    assert rc.placement_group_strategy == "STRICT_PACK"
    assert rc.ray_actor_options["num_gpus"] == 1 and rc.ray_actor_options["num_cpus"] == 4


def test_tp2_pp2_cpu_replica_gets_one_bundle_per_stage():
    from raylight.cluster.app import AppConfig, build_app

    cfg = AppConfig(engine_args={"device": "cpu", "tensor_parallel_size": 2, "pipeline_parallel_size": 2},
                    ray_actor_options={"num_cpus": 1})
    rc = _pool(build_app(cfg))
    assert rc.placement_group_bundles == [{"CPU": 2}, {"CPU": 2}]
    assert rc.placement_group_strategy == "PACK"


def test_tp2_config_file_builds():
    import os

    import yaml

    from raylight.cluster.app import build_app

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "cluster-tp2.yaml")
    with open(path) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    rc = _pool(build_app(args))
    assert rc.placement_group_bundles == [{"GPU": 2, "CPU": 8}]
    assert rc.placement_group_strategy == "STRICT_PACK"
