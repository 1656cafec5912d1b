"""What the cluster's nodes can hold: GPUs (and, when known, CPUs) per node.

The planner only needs per-node totals to answer "can this replica ever be placed?"
before Ray is asked: a placement group that can never fit does not fail in Ray, it waits
forever as PENDING, so an impossible request is better refused with a message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

# Ray resource amounts are fixed-point (1e-4 granularity); floats like 3 * 0.1 must not
# round a count of 3 bundles down to 2.
_EPS = 1e-6


@dataclass(frozen=True)
class ClusterTopology:
    """Per-node GPU totals, and optionally per-node CPU totals (None: CPUs are not checked)."""

    gpus_per_node: tuple[float, ...]
    cpus_per_node: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if not self.gpus_per_node:
            raise ValueError("ClusterTopology needs at least one node")
        if any(g < 0 for g in self.gpus_per_node):
            raise ValueError(f"gpus_per_node must be >= 0, got {list(self.gpus_per_node)}")
        if self.cpus_per_node is not None:
            if len(self.cpus_per_node) != len(self.gpus_per_node):
                raise ValueError(f"cpus_per_node has {len(self.cpus_per_node)} entries but gpus_per_node has "
                                 f"{len(self.gpus_per_node)}: give one per node")
            if any(c < 0 for c in self.cpus_per_node):
                raise ValueError(f"cpus_per_node must be >= 0, got {list(self.cpus_per_node)}")

    @classmethod
    def uniform(cls, num_nodes: int, gpus_per_node: float, cpus_per_node: Optional[float] = None) -> ClusterTopology:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        cpus = None if cpus_per_node is None else (float(cpus_per_node),) * num_nodes
        return cls((float(gpus_per_node),) * num_nodes, cpus)

    @classmethod
    def from_nodes(cls, node_resources: Sequence[Mapping[str, float]]) -> ClusterTopology:
        """From Ray-style per-node resource dicts ({"GPU": 4, "CPU": 16, ...})."""
        return cls(tuple(float(r.get("GPU", 0)) for r in node_resources),
                   tuple(float(r.get("CPU", 0)) for r in node_resources))

    @classmethod
    def from_ray(cls) -> ClusterTopology:
        """The connected Ray cluster's alive nodes (totals, not what is free right now)."""
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not nodes:
            raise RuntimeError("the connected Ray cluster reports no alive nodes")
        return cls.from_nodes(nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.gpus_per_node)

    @property
    def max_gpus_per_node(self) -> float:
        return max(self.gpus_per_node)

    def copies_per_node(self, gpus: float, cpus: float) -> list[float]:
        """How many bundles of (gpus, cpus) each node holds at once (inf where nothing limits it).

        Bundles of one plan are identical, so the cluster-wide count is exactly the sum of
        these: each node is filled independently and no bundle can straddle two nodes.
        """
        out: list[float] = []
        for i, node_gpus in enumerate(self.gpus_per_node):
            n = math.inf
            if gpus > 0:
                n = min(n, math.floor(node_gpus / gpus + _EPS))
            if cpus > 0 and self.cpus_per_node is not None:
                n = min(n, math.floor(self.cpus_per_node[i] / cpus + _EPS))
            out.append(n)
        return out

    def capacity(self, gpus: float, cpus: float) -> float:
        """Bundles of (gpus, cpus) the whole cluster holds at once (inf when unconstrained)."""
        return sum(self.copies_per_node(gpus, cpus))
