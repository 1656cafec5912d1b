"""Balancedness of expert load over EP ranks: mean rank load / max rank load (1.0 = perfect).

vLLM and SGLang define it differently, and the two disagree when layers differ in skew, so both are
provided and callers report both. These read results back to the host: call them at rebalance or
logging time, never on the per-step path.
"""

from __future__ import annotations

from torch import Tensor

_EPS = 1e-5  # SGLang's smoothing: an idle layer counts as balanced instead of 0/0


def tokens_per_rank(load_physical: Tensor, ep_size: int) -> Tensor:
    """[L, P] load per physical slot -> [L, ep_size] load per EP rank (slots are rank-major)."""
    layers, num_physical = load_physical.shape
    if num_physical % ep_size:
        raise ValueError(f"{num_physical} slots do not split over {ep_size} ranks")
    return load_physical.reshape(layers, ep_size, num_physical // ep_size).sum(-1)


def balancedness_vllm(tpr: Tensor) -> float:
    """vLLM: sum over layers of the mean rank load / sum over layers of the max rank load
    (a ratio of sums, so heavily loaded layers weigh more)."""
    t = tpr.double()
    peak = float(t.max(-1).values.sum()) if t.numel() else 0.0
    if peak <= 0.0:
        return 1.0
    return float(t.mean(-1).sum()) / peak


def balancedness_sglang(tpr: Tensor) -> float:
    """SGLang: mean over layers of (mean rank load + eps) / (max rank load + eps)."""
    t = tpr.double()
    if t.numel() == 0:
        return 1.0
    return float(((t.mean(-1) + _EPS) / (t.max(-1).values + _EPS)).mean())


def balancedness(tpr: Tensor) -> dict[str, float]:
    return {"vllm": balancedness_vllm(tpr), "sglang": balancedness_sglang(tpr)}


def estimated_physical_load(logical_load: Tensor, phy2log: Tensor, logcnt: Tensor) -> Tensor:
    """[L, P] expected slot load if each expert's load splits evenly over its replicas (what the
    algorithm optimizes; round-robin dispatch realizes it on average)."""
    per_replica = logical_load.double() / logcnt.double()
    return per_replica.gather(-1, phy2log.to(per_replica.device))
