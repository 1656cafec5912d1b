"""Expert-parallel load balancing (EPLB): record per-expert load, re-plan the replica placement
(DeepSeek's algorithm), and move expert weights between EP ranks one layer at a time."""

from raylight.parallel.eplb.algorithm import (balanced_packing, build_log2phy, preserve_slots, rebalance_experts,
                                              replicate_experts)
from raylight.parallel.eplb.metrics import (balancedness, balancedness_sglang, balancedness_vllm,
                                            estimated_physical_load, tokens_per_rank)
from raylight.parallel.eplb.placement import ExpertPlacement, initial_phy2log
from raylight.parallel.eplb.rearrange import LayerPlan, plan_layer, rearrange_layer
from raylight.parallel.eplb.recorder import ExpertLoadRecorder
from raylight.parallel.eplb.state import EplbState

__all__ = [
    "EplbState", "ExpertLoadRecorder", "ExpertPlacement", "LayerPlan", "balanced_packing", "balancedness",
    "balancedness_sglang", "balancedness_vllm", "build_log2phy", "estimated_physical_load", "initial_phy2log",
    "plan_layer", "preserve_slots", "rearrange_layer", "rebalance_experts", "replicate_experts", "tokens_per_rank",
]
