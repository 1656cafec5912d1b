"""Ray placement for one replica's TP x PP ranks: bundles, strategy, and where each rank goes."""

from raylight.placement.deployment import deployment_options, plan_for_replica
from raylight.placement.planner import (PACK, ROLES, STRICT_PACK, PlacementPlan, RankPlacement, RankResources, Role,
                                        check_fits, plan_placement)
from raylight.placement.scheduling import (current_placement_group, current_rank_actor_options, current_rank_strategy,
                                           rank_actor_options, rank_scheduling_strategy)
from raylight.placement.topology import ClusterTopology

__all__ = [
    "PACK", "ROLES", "STRICT_PACK", "ClusterTopology", "PlacementPlan", "RankPlacement", "RankResources", "Role",
    "check_fits", "current_placement_group", "current_rank_actor_options", "current_rank_strategy",
    "deployment_options", "plan_for_replica", "plan_placement", "rank_actor_options", "rank_scheduling_strategy",
]
