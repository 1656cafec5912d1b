"""The planner's placement groups on a real (simulated) two-node Ray cluster.

Both nodes advertise 4 GPUs; no GPU is needed because Ray only counts resources. Checks
that each TP group lands on one node, PP stages pack onto one node when it has room and
spread when it has not, rank actors land on their stage's node with distinct GPUs, and an
impossible request is refused by the planner before Ray ever sees it.
"""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from raylight.placement import (ClusterTopology, current_placement_group, current_rank_actor_options,
                                plan_placement)

GPUS_PER_NODE = 4
CPUS_PER_NODE = 4
READY_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("another Ray session is connected in this process")
    with pytest.MonkeyPatch.context() as mp:
        # Cluster records its address in /tmp/ray/ray_current_cluster, where a bare `ray.init()`
        # or `serve run` in any other process would find and join this fake-GPU cluster (and
        # shutdown deletes the file even if it belongs to someone else): keep it private.
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE, include_dashboard=False))
        try:
            cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _bundle_nodes(plan):
    """Create the plan's group, wait for it, and return (group, node id of each bundle)."""
    from ray.util import placement_group, placement_group_table

    pg = placement_group(plan.bundle_list(), strategy=plan.strategy)
    ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
    table = placement_group_table(pg)
    assert table["state"] == "CREATED" and table["strategy"] == plan.strategy
    return pg, [table["bundles_to_node_id"][i] for i in range(len(plan.bundles))]


def _remove(pg) -> None:
    from ray.util import placement_group_table, remove_placement_group

    remove_placement_group(pg)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while placement_group_table(pg)["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.1)


def test_topology_from_ray(two_nodes):
    topo = ClusterTopology.from_ray()
    assert topo.gpus_per_node == (GPUS_PER_NODE,) * 2
    assert topo.cpus_per_node == (CPUS_PER_NODE,) * 2


@pytest.mark.parametrize("tp,pp,use_gpu,stage_nodes", [
    (4, 1, True, 1),   # a full node for one TP group, STRICT_PACK
    (2, 2, True, 1),   # PACK keeps both stages on one node while one has room
    (4, 2, True, 2),   # one 4-GPU stage per node: PP spans nodes, TP never does
    (2, 2, False, 1),  # CPU-only variant
])
def test_groups_land_where_they_should(two_nodes, tp, pp, use_gpu, stage_nodes):
    plan = plan_placement(tp, pp, use_gpu=use_gpu, topology=ClusterTopology.from_ray())
    pg, nodes = _bundle_nodes(plan)
    try:
        # One bundle per stage, and a bundle is on one node: each TP group shares a node.
        assert len(nodes) == pp
        assert len(set(nodes)) == stage_nodes
    finally:
        _remove(pg)


def test_replicas_fill_the_cluster_then_the_planner_refuses(two_nodes):
    topo = ClusterTopology.from_ray()
    plan = plan_placement(4, 1, topology=topo, num_replicas=2)
    groups = [_bundle_nodes(plan) for _ in range(2)]
    try:
        assert groups[0][1] != groups[1][1]  # each 4-GPU replica took a node of its own
    finally:
        for pg, _ in groups:
            _remove(pg)
    with pytest.raises(ValueError, match="num_replicas=3"):
        plan_placement(4, 1, topology=topo, num_replicas=3)


def test_impossible_request_never_reaches_ray(two_nodes):
    from ray.util import placement_group_table

    before = len(placement_group_table())
    with pytest.raises(ValueError, match="tensor_parallel_size=8 needs 8 GPUs on one node"):
        plan_placement(8, 1, topology=ClusterTopology.from_ray())
    with pytest.raises(ValueError, match="pipeline_parallel_size=3"):
        plan_placement(4, 3, topology=ClusterTopology.from_ray())
    assert len(placement_group_table()) == before


@ray.remote(num_cpus=0)
class Rank:
    """Stands in for one engine rank: reports where Ray put it."""

    def where(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]


@ray.remote
class Replica:
    """Stands in for the Serve replica (rank 0, in bundle 0): starts the other ranks the way an
    engine replica does, from inside its own placement group."""

    def __init__(self, plan):
        self.plan = plan
        self.ranks = [Rank.options(**current_rank_actor_options(plan, r.rank)).remote()
                      for r in plan.ranks if r.rank != 0]

    def group_id(self) -> str:
        return current_placement_group().id.hex()

    def where(self) -> list[tuple[str, list[int]]]:
        me = (ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()])
        return [me] + ray.get([a.where.remote() for a in self.ranks], timeout=READY_TIMEOUT_S)


def test_rank_actors_land_in_their_stage_bundles(two_nodes):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    plan = plan_placement(4, 2, cpus_per_rank=0.5, topology=ClusterTopology.from_ray())
    pg, bundle_nodes = _bundle_nodes(plan)
    try:
        # Like Serve: the replica in bundle 0 with rank 0's share, children captured by the group.
        replica = Replica.options(**plan.rank_actor_options(), scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(plan)
        assert ray.get(replica.group_id.remote(), timeout=READY_TIMEOUT_S) == pg.id.hex()
        where = ray.get(replica.where.remote(), timeout=READY_TIMEOUT_S)
        for r in plan.ranks:
            assert where[r.rank][0] == bundle_nodes[r.bundle_index], f"rank {r} on the wrong node"
        for stage in range(plan.pipeline_parallel_size):
            gpus = [g for r in plan.ranks if r.pp_rank == stage for g in where[r.rank][1]]
            assert len(gpus) == len(set(gpus)) == plan.tensor_parallel_size  # one GPU each, none shared
        assert bundle_nodes[0] != bundle_nodes[1]
        ray.kill(replica)
    finally:
        _remove(pg)
