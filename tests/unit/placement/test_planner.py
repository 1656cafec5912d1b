"""The placement planner: bundles, strategy and rank -> bundle map for a table of layouts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylight.placement import (PACK, STRICT_PACK, ClusterTopology, check_fits, deployment_options, plan_for_replica,
                                plan_placement, rank_actor_options)

# (tp, pp, nodes, gpus per node, bundles, strategy, error naming this setting or None)
CASES = [
    (1, 1, 1, 1, [{"GPU": 1, "CPU": 1}], STRICT_PACK, None),
    (2, 1, 1, 8, [{"GPU": 2, "CPU": 2}], STRICT_PACK, None),
    (8, 1, 1, 8, [{"GPU": 8, "CPU": 8}], STRICT_PACK, None),
    (3, 1, 2, 4, [{"GPU": 3, "CPU": 3}], STRICT_PACK, None),  # placement does not care about head counts
    (2, 2, 1, 4, [{"GPU": 2, "CPU": 2}] * 2, PACK, None),      # both stages fit one node
    (4, 2, 2, 4, [{"GPU": 4, "CPU": 4}] * 2, PACK, None),      # one stage per node
    (2, 4, 2, 4, [{"GPU": 2, "CPU": 2}] * 4, PACK, None),      # two stages per node
    (1, 4, 4, 1, [{"GPU": 1, "CPU": 1}] * 4, PACK, None),      # pure PP over four 1-GPU nodes
    (8, 1, 2, 4, None, None, "tensor_parallel_size"),           # a TP group never spans nodes
    (4, 3, 2, 4, None, None, "pipeline_parallel_size"),         # three 4-GPU stages, two 4-GPU nodes
    (2, 1, 4, 0, None, None, "tensor_parallel_size"),           # CPU-only nodes
]


@pytest.mark.parametrize("tp,pp,nodes,gpus,bundles,strategy,error", CASES)
def test_plan_table(tp, pp, nodes, gpus, bundles, strategy, error):
    topology = ClusterTopology.uniform(nodes, gpus)
    if error:
        with pytest.raises(ValueError, match=error):
            plan_placement(tp, pp, topology=topology)
        return
    plan = plan_placement(tp, pp, topology=topology)
    assert plan.bundle_list() == bundles
    assert plan.strategy == strategy
    assert plan.world_size == tp * pp == len(plan.ranks)
    # Every rank of stage p is in one bundle, global ranks are TP-fastest and dense, stages in
    # descending rank order (rank 0, the replica, is in the last stage), the same layout as
    # the torch.distributed groups.
    from raylight.parallel.state import ParallelConfig

    config = ParallelConfig(tp, pp)
    assert plan.rank_to_bundle() == {(t, p): pp - 1 - p for p in range(pp) for t in range(tp)}
    assert [r.rank for r in plan.ranks] == list(range(tp * pp))
    for r in plan.ranks:
        assert r.rank == config.global_rank(r.tp_rank, r.pp_rank) and r.bundle_index == r.rank // tp
        assert config.coordinates(r.rank) == (r.tp_rank, r.pp_rank)
        assert plan.rank_of(r.tp_rank, r.pp_rank) == r == plan.placement(r.rank)
    # The ranks of each bundle exactly use it up: nothing idle, nothing oversubscribed.
    share = plan.rank_actor_options()
    for i, bundle in enumerate(plan.bundles):
        members = [r for r in plan.ranks if r.bundle_index == i]
        assert bundle["GPU"] == len(members) * share["num_gpus"]
        assert bundle["CPU"] == len(members) * share["num_cpus"]
    # rank 0 (the Serve replica actor) is in bundle 0.
    assert plan.placement(0).bundle_index == 0


def test_heterogeneous_nodes():
    topology = ClusterTopology((8.0, 2.0))
    plan = plan_placement(4, 2, topology=topology)  # both stages on the 8-GPU node
    assert plan.strategy == PACK
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 needs 3 stage bundles"):
        plan_placement(4, 3, topology=topology)
    plan_placement(2, 5, topology=topology)  # 4 stages on the big node, 1 on the small one
    with pytest.raises(ValueError, match="largest node has 8 GPUs"):
        plan_placement(16, 1, topology=topology)


def test_replica_count_is_checked_against_the_cluster():
    topology = ClusterTopology.uniform(2, 4)
    plan = plan_placement(4, 1, topology=topology, num_replicas=2)
    check_fits(plan, topology, num_replicas=2)
    with pytest.raises(ValueError, match="num_replicas=3"):
        plan_placement(4, 1, topology=topology, num_replicas=3)
    with pytest.raises(ValueError, match="num_replicas=2"):
        plan_placement(2, 3, topology=topology, num_replicas=2)  # 6 stages of 2 GPUs on 2x4 GPUs


def test_cpu_only_variant():
    plan = plan_placement(2, 2, use_gpu=False, cpus_per_rank=2)
    assert plan.bundle_list() == [{"CPU": 4}, {"CPU": 4}]
    assert plan.strategy == PACK and not plan.use_gpu
    assert plan.rank_actor_options() == {"num_cpus": 2.0}
    assert plan_placement(2, 1, use_gpu=False).strategy == STRICT_PACK
    # GPU counts are irrelevant to it; CPUs per node are checked when known.
    plan_placement(2, 2, use_gpu=False, topology=ClusterTopology.uniform(1, 0, cpus_per_node=4))
    with pytest.raises(ValueError, match="tensor_parallel_size=4 x 2 CPUs per rank needs 8 CPUs"):
        plan_placement(4, 1, use_gpu=False, cpus_per_rank=2, topology=ClusterTopology.uniform(2, 0, 4))


def test_cpus_limit_gpu_plans_when_known():
    topology = ClusterTopology.uniform(2, 8, cpus_per_node=8)
    plan_placement(4, 2, cpus_per_rank=2, topology=topology)  # a stage takes 8 CPUs: one stage per node
    with pytest.raises(ValueError, match="pipeline_parallel_size=3"):
        plan_placement(4, 3, cpus_per_rank=2, topology=topology)  # GPUs would allow 4 stages, CPUs only 2
    # GPU-only topology: CPUs are not checked.
    plan_placement(4, 4, cpus_per_rank=64, topology=ClusterTopology.uniform(2, 8))


def test_fractional_gpus_and_extra_resources():
    plan = plan_placement(2, 1, gpus_per_rank=0.5, cpus_per_rank=0, memory_per_rank=2**30,
                          resources_per_rank={"nvlink": 1}, accelerator_type="H100")
    assert plan.bundle_list() == [{"GPU": 1.0, "memory": 2.0 * 2**30, "nvlink": 2, "accelerator_type:H100": 0.002}]
    assert plan.rank_actor_options() == {"num_cpus": 0.0, "num_gpus": 0.5, "memory": 2**30,
                                         "resources": {"nvlink": 1}, "accelerator_type": "H100"}
    plan_placement(2, 1, gpus_per_rank=0.5, topology=ClusterTopology((1.0,)))  # two ranks share one GPU


@pytest.mark.parametrize("kwargs,match", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1"),
    (dict(tensor_parallel_size=1.5), "tensor_parallel_size must be an integer >= 1"),
    (dict(tensor_parallel_size=True), "tensor_parallel_size must be an integer >= 1"),
    (dict(pipeline_parallel_size=-1), "pipeline_parallel_size must be an integer >= 1"),
    (dict(num_replicas=0), "num_replicas must be an integer >= 1"),
    (dict(role="encode"), "role must be one of"),
    (dict(gpus_per_rank=2), r"gpus_per_rank must be in \(0, 1\]"),
    (dict(gpus_per_rank=0), r"gpus_per_rank must be in \(0, 1\]"),
    (dict(cpus_per_rank=-1), "cpus_per_rank must be >= 0"),
    (dict(use_gpu=False, cpus_per_rank=0), "cpus_per_rank must be > 0"),
    (dict(memory_per_rank=0), "memory_per_rank must be > 0"),
    (dict(resources_per_rank={"GPU": 1}), "must not contain 'GPU'"),
    (dict(resources_per_rank={"foo": 0}), r"resources_per_rank\['foo'\] must be > 0"),
])
def test_invalid_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(**kwargs)


def test_roles_and_names():
    for role in ("unified", "prefill", "decode"):
        plan = plan_placement(2, 1, role)
        assert plan.role == role and plan.name == f"{role}-tp2-pp1"
    plan = plan_placement(2, 2)
    with pytest.raises(ValueError, match="outside"):
        plan.rank_of(2, 0)
    with pytest.raises(ValueError, match="outside world size 4"):
        plan.placement(4)
    assert plan.total_resources(num_replicas=3) == {"GPU": 12.0, "CPU": 12.0}


def test_rank_actor_options_pin_the_bundle():
    plan = plan_placement(2, 3)
    group = SimpleNamespace(bundle_specs=plan.bundle_list())  # stands in for a ray PlacementGroup
    for r in plan.ranks:
        opts = rank_actor_options(plan, group, r.rank)
        strategy = opts.pop("scheduling_strategy")
        assert strategy.placement_group is group
        assert strategy.placement_group_bundle_index == r.bundle_index == plan.pipeline_parallel_size - 1 - r.pp_rank
        assert opts == {"num_cpus": 1.0, "num_gpus": 1.0}
    with pytest.raises(ValueError, match="not created from this plan"):
        rank_actor_options(plan, SimpleNamespace(bundle_specs=[{"GPU": 2}]), 1)


# --- Serve deployment options -------------------------------------------------------------------

def test_plan_for_replica_reads_per_rank_options():
    plan = plan_for_replica({"num_cpus": 4, "num_gpus": 1}, 2, 1)
    assert plan.bundle_list() == [{"GPU": 2, "CPU": 8}] and plan.strategy == STRICT_PACK
    # device: cuda without num_gpus still reserves one GPU per rank.
    assert plan_for_replica({"num_cpus": 1}, 2, 2, device="cuda").bundle_list() == [{"GPU": 2, "CPU": 2}] * 2
    # No GPUs asked for: the CPU-only variant.
    assert plan_for_replica({"num_cpus": 2}, 2, 1, device="cpu").bundle_list() == [{"CPU": 4}]
    assert plan_for_replica({}, 2, 1).bundle_list() == [{"CPU": 2}]
    with pytest.raises(ValueError, match="describe one rank"):
        plan_for_replica({"num_gpus": 2}, 2, 1)


def test_deployment_options_fit_serve_validation():
    """Serve's own check: the replica actor's options must fit in bundle 0."""
    from ray import serve

    class Dummy:
        pass

    for tp, pp, actor in [(2, 1, {"num_cpus": 2, "num_gpus": 1}), (4, 2, {"num_cpus": 1, "num_gpus": 1}),
                          (2, 2, {"num_cpus": 1}), (2, 1, {"num_gpus": 0.5, "memory": 2**30,
                                                           "resources": {"nvlink": 1}})]:
        actor = {**actor, "runtime_env": {"env_vars": {"X": "1"}}}
        opts = deployment_options(plan_for_replica(actor, tp, pp), actor)
        assert opts["ray_actor_options"]["runtime_env"] == actor["runtime_env"]  # non-resource options kept
        app = serve.deployment(Dummy, name="Dummy", **opts).bind()
        rc = app._bound_deployment._replica_config
        assert rc.placement_group_bundles == opts["placement_group_bundles"]
        assert rc.placement_group_strategy == opts["placement_group_strategy"]


def test_app_placement_options_follow_engine_parallel_sizes():
    from raylight.cluster.app import AppConfig, placement_options, replica_plan
    from raylight.config import EngineArgs

    cfg = AppConfig(ray_actor_options={"num_cpus": 2, "num_gpus": 1})
    assert placement_options(cfg, EngineArgs(device="cuda")) == {}
    assert replica_plan(cfg, EngineArgs(device="cuda")) is None
    engine = EngineArgs(device="cuda", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert replica_plan(cfg, engine).world_size == 4  # the plan the replica places its ranks with
    opts = placement_options(cfg, engine)
    assert opts == {"ray_actor_options": {"num_cpus": 2.0, "num_gpus": 1.0},
                    "placement_group_bundles": [{"GPU": 2, "CPU": 4}] * 2, "placement_group_strategy": PACK}
