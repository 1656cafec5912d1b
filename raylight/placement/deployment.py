"""The planner seen from a Serve deployment: per-rank `ray_actor_options` in, deployment options out.

With tensor_parallel_size x pipeline_parallel_size > 1, a deployment's `ray_actor_options`
describe ONE rank (the replica actor is rank 0): `num_gpus: 1` means one GPU per rank, and the
placement group reserves TP x PP of them. Reading them per replica instead would hand rank 0
every GPU of bundle 0 and leave the other ranks of its stage unschedulable.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from raylight.placement.planner import PlacementPlan, Role, plan_placement
from raylight.placement.topology import ClusterTopology

# Options that reserve resources; the planner owns them once a placement group is used.
_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


def plan_for_replica(ray_actor_options: Mapping[str, Any], tensor_parallel_size: int, pipeline_parallel_size: int,
                     *, device: str = "auto", role: Role = "unified", topology: Optional[ClusterTopology] = None,
                     num_replicas: int = 1, expert_parallel: bool = False) -> PlacementPlan:
    """Plan from a deployment's per-rank actor options.

    `expert_parallel` (the engine's enable_expert_parallel) shards the experts over each stage's
    TP ranks (EP size = tensor_parallel_size): one bundle per stage still, the plan only says so.

    Ranks use GPUs when the options reserve some (`num_gpus` > 0) or the engine is told
    `device: cuda` (then one GPU per rank); otherwise the plan is the CPU-only variant.
    """
    num_gpus = float(ray_actor_options.get("num_gpus") or 0)
    if num_gpus > 1:
        ep = f" (EP size {tensor_parallel_size})" if expert_parallel else ""
        raise ValueError(
            f"ray_actor_options.num_gpus={num_gpus:g}: with tensor_parallel_size={tensor_parallel_size}{ep} x "
            f"pipeline_parallel_size={pipeline_parallel_size}, ray_actor_options describe one rank (one GPU); "
            f"the placement group reserves the replica's {tensor_parallel_size * pipeline_parallel_size} GPUs. "
            f"Set num_gpus: 1")
    use_gpu = num_gpus > 0 or device == "cuda"
    num_cpus = ray_actor_options.get("num_cpus")
    return plan_placement(
        tensor_parallel_size, pipeline_parallel_size, role,
        use_gpu=use_gpu,
        cpus_per_rank=1.0 if num_cpus is None else float(num_cpus),
        gpus_per_rank=num_gpus or 1.0,
        memory_per_rank=ray_actor_options.get("memory"),
        resources_per_rank=ray_actor_options.get("resources"),
        accelerator_type=ray_actor_options.get("accelerator_type"),
        topology=topology, num_replicas=num_replicas, expert_parallel=expert_parallel)


def deployment_options(plan: PlacementPlan, ray_actor_options: Mapping[str, Any]) -> dict[str, Any]:
    """`serve.deployment(...)` options for the replica: the group's bundles and strategy, and
    the replica actor's own options (rank 0's share, which fits bundle 0 by construction;
    other options such as runtime_env are kept)."""
    actor = {k: v for k, v in ray_actor_options.items() if k not in _RESOURCE_KEYS}
    actor.update(plan.rank_actor_options())
    return {"ray_actor_options": actor, "placement_group_bundles": plan.bundle_list(),
            "placement_group_strategy": plan.strategy}
