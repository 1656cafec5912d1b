"""Scheduling a plan's rank actors into their bundles.

The replica actor itself is rank 0: Serve already put it in bundle 0. Every other rank is a
Ray actor created with the options below, pinned to its stage's bundle by index. Pinning
matters: Serve makes the replica's children default to "any bundle of my group", which
could put a TP rank of stage 0 into stage 1's bundle on another node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from raylight.placement.planner import PlacementPlan

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def rank_scheduling_strategy(plan: PlacementPlan, placement_group: PlacementGroup,
                             rank: int) -> PlacementGroupSchedulingStrategy:
    """The strategy that puts global rank `rank` of `plan` into its bundle of `placement_group`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    _check_group(plan, placement_group)
    return PlacementGroupSchedulingStrategy(placement_group=placement_group,
                                            placement_group_bundle_index=plan.placement(rank).bundle_index)


def rank_actor_options(plan: PlacementPlan, placement_group: PlacementGroup, rank: int) -> dict[str, Any]:
    """Options for `SomeActor.options(**opts).remote(...)`: one rank's resources, in its bundle."""
    return {**plan.rank_actor_options(),
            "scheduling_strategy": rank_scheduling_strategy(plan, placement_group, rank)}


def current_placement_group(group_id: Optional[str] = None) -> PlacementGroup:
    """The placement group the calling actor runs in (inside a Serve replica: the one Serve
    created from the plan's bundles); with `group_id` (hex), that group (the replica's, for its
    engine process)."""
    from ray.util import get_current_placement_group

    if group_id is not None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup

        return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    pg = get_current_placement_group()
    if pg is None:
        raise RuntimeError("not running inside a placement group: a replica with tensor_parallel_size x "
                           "pipeline_parallel_size > 1 must be deployed with the planner's "
                           "placement_group_bundles (raylight.cluster.app.build_app does this)")
    return pg


def current_rank_strategy(plan: PlacementPlan, rank: int) -> PlacementGroupSchedulingStrategy:
    """Inside a running replica: the scheduling strategy for its rank `rank` actor."""
    return rank_scheduling_strategy(plan, current_placement_group(plan.group_id), rank)


def current_rank_actor_options(plan: PlacementPlan, rank: int) -> dict[str, Any]:
    """Inside a running replica: full actor options for its rank `rank` actor."""
    return rank_actor_options(plan, current_placement_group(plan.group_id), rank)


def _check_group(plan: PlacementPlan, placement_group: PlacementGroup) -> None:
    # A group built from another plan would put ranks into bundles of the wrong shape (or
    # out of range, which Ray only reports when the actor is created).
    specs = getattr(placement_group, "bundle_specs", None)
    if specs is not None and len(specs) != len(plan.bundles):
        raise ValueError(f"placement group has {len(specs)} bundles but plan {plan.name} has "
                         f"{len(plan.bundles)}: it was not created from this plan")
