"""Expert parallelism in placement: EP size = tensor_parallel_size, so a replica keeps one bundle per
stage holding its EP/TP ranks; the plan, its log line and its errors say EP. The Serve config path
carries the keys from `engine_args` and rejects enable_eplb without enable_expert_parallel before Ray."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from raylight.cluster.app import AppConfig, DisaggAppConfig, build_app
from raylight.placement import PACK, STRICT_PACK, ClusterTopology, plan_for_replica, plan_placement

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"

# (tp, pp, bundles, strategy): EP changes no bundle, only what the plan says about it.
CASES = [
    (2, 1, [{"GPU": 2, "CPU": 2}], STRICT_PACK),
    (4, 1, [{"GPU": 4, "CPU": 4}], STRICT_PACK),
    (2, 2, [{"GPU": 2, "CPU": 2}] * 2, PACK),  # EP per stage: two EP groups of 2
]


@pytest.mark.parametrize("tp,pp,bundles,strategy", CASES)
def test_ep_keeps_one_bundle_per_stage(tp, pp, bundles, strategy):
    plan = plan_placement(tp, pp, expert_parallel=True)
    dense = plan_placement(tp, pp)
    assert plan.bundle_list() == dense.bundle_list() == bundles
    assert plan.strategy == strategy and plan.ranks == dense.ranks
    assert plan.expert_parallel and plan.expert_parallel_size == tp
    assert not dense.expert_parallel and dense.expert_parallel_size == 1
    assert plan.name == f"unified-tp{tp}-pp{pp}-ep{tp}" and dense.name == f"unified-tp{tp}-pp{pp}"
    assert f"EP={tp}" in plan.description and "EP size = tensor_parallel_size" in plan.description
    assert ("one EP group per stage" in plan.description) == (pp > 1)
    assert "EP" not in dense.description


def test_ep_errors_name_the_ep_size():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=8 \(also the expert-parallel size: EP = TP\)"):
        plan_placement(8, 1, expert_parallel=True, topology=ClusterTopology.uniform(2, 4))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=8 needs 8 GPUs"):  # no EP: no EP words
        plan_placement(8, 1, topology=ClusterTopology.uniform(2, 4))
    with pytest.raises(ValueError, match=r"EP size 2"):
        plan_for_replica({"num_gpus": 2}, 2, 1, expert_parallel=True)


def test_plan_for_replica_passes_ep():
    plan = plan_for_replica({"num_cpus": 2, "num_gpus": 1}, 2, 2, expert_parallel=True)
    assert plan.expert_parallel_size == 2 and plan.bundle_list() == [{"GPU": 2, "CPU": 4}] * 2


# --- the Serve config path ---

ray = pytest.importorskip("ray")


def _pool(app):
    pool = app._bound_deployment.init_args[0]
    assert pool._bound_deployment.name == "EngineReplica"
    return pool._bound_deployment


def test_app_ep_replica_plan_and_engine_args():
    cfg = AppConfig(engine_args={"device": "cuda", "tensor_parallel_size": 2, "enable_expert_parallel": True,
                                 "enable_eplb": True, "eplb_config": {"num_redundant_experts": 2}},
                    ray_actor_options={"num_cpus": 4, "num_gpus": 1})
    pool = _pool(build_app(cfg))
    rc = pool._replica_config
    assert rc.placement_group_bundles == [{"GPU": 2, "CPU": 8}] and rc.placement_group_strategy == STRICT_PACK
    engine_args, plan = pool.init_args[0], pool.init_args[3]
    assert engine_args["enable_expert_parallel"] and engine_args["enable_eplb"]
    assert engine_args["eplb_config"]["num_redundant_experts"] == 2
    assert plan.expert_parallel_size == 2


def test_app_ep_with_pipeline_parallelism_is_allowed():
    cfg = AppConfig(engine_args={"device": "cpu", "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
                                 "enable_expert_parallel": True}, ray_actor_options={"num_cpus": 1})
    pool = _pool(build_app(cfg))
    assert pool._replica_config.placement_group_bundles == [{"CPU": 2}, {"CPU": 2}]
    assert pool.init_args[3].name == "unified-tp2-pp2-ep2"


def test_app_logs_the_ep_plan(caplog):
    with caplog.at_level("INFO", logger="raylight.app"):
        build_app(AppConfig(engine_args={"device": "cpu", "tensor_parallel_size": 2, "enable_expert_parallel": True}))
    assert "EP=2" in caplog.text and "EP size = tensor_parallel_size" in caplog.text


@pytest.mark.parametrize("make", [
    lambda: AppConfig(engine_args={"enable_eplb": True}),
    lambda: build_app({"engine_args": {"tensor_parallel_size": 2, "enable_eplb": True}}),
    lambda: DisaggAppConfig(decode={"engine_args": {"enable_eplb": True}}),
], ids=["AppConfig", "build_app", "DisaggAppConfig"])
def test_eplb_without_ep_is_rejected_with_engine_args_message(make):
    with pytest.raises(ValueError, match=r"engine_args: enable_eplb needs enable_expert_parallel=True") as e:
        make()
    assert str(e.value).count("enable_eplb needs") == 1  # once, not again in a nested pydantic dump


def test_bad_engine_args_fail_when_the_config_is_read():
    with pytest.raises(ValueError, match=r"engine_args: eplb_config.window_size: Input should be greater"):
        AppConfig(engine_args={"eplb_config": {"window_size": 0}})
    with pytest.raises(ValueError, match=r"engine_args: set the model once"):
        AppConfig(engine_args={"model": "x"})


def test_moe_config_file_builds():
    args = yaml.safe_load((CONFIGS / "cluster-moe.yaml").read_text())["applications"][0]["args"]
    pool = _pool(build_app(args))
    assert pool._replica_config.placement_group_bundles == [{"GPU": 2, "CPU": 8}]
    engine_args = pool.init_args[0]
    assert engine_args["tensor_parallel_size"] == 2
    assert engine_args["enable_expert_parallel"] and engine_args["enable_eplb"]
    assert pool.init_args[3].expert_parallel_size == 2


def test_moe_config_file_cpu_variant_builds():
    """The CPU try the file's comment describes."""
    args = yaml.safe_load((CONFIGS / "cluster-moe.yaml").read_text())["applications"][0]["args"]
    args["model"] = "qwen3-moe-tiny"
    engine = args["engine_args"]
    engine.update(load_format="dummy", device="cpu")
    for key in ("dtype", "gpu_memory_utilization"):
        engine.pop(key)
    engine["eplb_config"]["num_redundant_experts"] = 0
    args["ray_actor_options"]["num_gpus"] = 0
    pool = _pool(build_app(args))
    assert pool._replica_config.placement_group_bundles == [{"CPU": 8}]
