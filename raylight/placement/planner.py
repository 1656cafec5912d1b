"""Turn (TP, PP, EP, role, per-rank resources) into Ray placement-group bundles and a strategy.

How the layout follows from Ray's rules:

* A bundle always lives on exactly one node. So one bundle per pipeline stage, holding all
  of that stage's TP ranks, keeps every TP group on one node (NVLink for the per-layer
  all-reduces) without relying on the strategy.
* With several stages the strategy is PACK: Ray keeps the stages on one node when one node
  has room, and spreads them over nodes when it has not (PP hand-offs are one send per
  micro-batch, cheap enough to cross nodes). With one stage the whole replica is one bundle,
  placed STRICT_PACK.
* Serve schedules the replica actor in bundle 0, and the replica is rank 0 (tp_rank 0 of
  the LAST stage, the one that samples: see raylight.parallel.state); its ray_actor_options
  are one rank's share, so they always fit bundle 0. Every other rank is an actor scheduled
  into its stage's bundle.

Global rank order is TP fastest, stages in descending order:
rank = (pipeline_parallel_size - 1 - pp_rank) * tensor_parallel_size + tp_rank, and bundle
b holds ranks [b * tp, (b + 1) * tp): the ranks of one TP group are consecutive (the order
torch.distributed groups are built in) and share a bundle.

Expert parallelism (a MoE model's `enable_expert_parallel`) adds no ranks: the experts are sharded
over the TP ranks of each stage (EP size = tensor_parallel_size, one EP group per stage under PP), so
the layout is the same. It matters for where the bundle goes all the same: the EP group's all-to-all
token dispatch wants one node even more than TP's all-reduce, and one bundle per stage guarantees it.
The plan records it so its name, log line and errors say what the TP ranks are carrying.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, get_args

from raylight.placement.topology import ClusterTopology

Role = Literal["unified", "prefill", "decode"]
ROLES: tuple[str, ...] = get_args(Role)

STRICT_PACK = "STRICT_PACK"
PACK = "PACK"

# Ray turns `accelerator_type="H100"` into this much of resource "accelerator_type:H100";
# inside a placement group the bundle must hold it too, or the actor never schedules.
_ACCELERATOR_TYPE_AMOUNT = 0.001
_RESERVED_KEYS = ("CPU", "GPU", "memory", "object_store_memory", "bundle")


@dataclass(frozen=True)
class RankResources:
    """What one rank (one process, one device) reserves."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: Optional[int] = None  # bytes of Ray's "memory" resource
    resources: dict[str, float] = field(default_factory=dict)  # custom resources
    accelerator_type: Optional[str] = None

    def bundle_share(self) -> dict[str, float]:
        """This rank's contribution to its bundle, in Ray's resource names (zeros left out:
        Ray rejects bundles whose every amount is zero)."""
        share: dict[str, float] = {"GPU": self.num_gpus, "CPU": self.num_cpus}
        if self.memory:
            share["memory"] = float(self.memory)
        share.update(self.resources)
        if self.accelerator_type:
            share[f"accelerator_type:{self.accelerator_type}"] = _ACCELERATOR_TYPE_AMOUNT
        return {k: v for k, v in share.items() if v > 0}

    def actor_options(self) -> dict[str, Any]:
        """Ray actor options reserving exactly this share (num_cpus is always explicit: an
        actor left at Ray's default would reserve a CPU the bundle may not have)."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus > 0:
            opts["num_gpus"] = self.num_gpus
        if self.memory:
            opts["memory"] = self.memory
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    tp_rank: int
    pp_rank: int
    bundle_index: int


@dataclass(frozen=True)
class PlacementPlan:
    """One replica's placement group: `bundles` under `strategy`, and where each rank goes."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    role: Role
    rank_resources: RankResources
    bundles: tuple[dict[str, float], ...]
    strategy: str
    ranks: tuple[RankPlacement, ...]
    expert_parallel: bool = False  # experts sharded over each stage's TP ranks (EP size = TP)
    # The replica's placement group (its id, hex), when rank 0 runs outside it: the replica's engine
    # process (engine/engine_process.py) is no Ray worker, so Ray cannot tell it its group. None: the
    # calling actor's own.
    group_id: Optional[str] = None

    @property
    def expert_parallel_size(self) -> int:
        """Ranks one expert group is sharded over: the TP size under EP (vLLM's rule), else 1."""
        return self.tensor_parallel_size if self.expert_parallel else 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def use_gpu(self) -> bool:
        return self.rank_resources.num_gpus > 0

    @property
    def name(self) -> str:
        """A short label for logs and actor names, e.g. "decode-tp2-pp1" ("-ep2" added under EP)."""
        ep = f"-ep{self.expert_parallel_size}" if self.expert_parallel else ""
        return f"{self.role}-tp{self.tensor_parallel_size}-pp{self.pipeline_parallel_size}{ep}"

    @property
    def description(self) -> str:
        """One line for logs: ranks, what they shard, the bundles and the strategy."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        ep = (f"; experts sharded over EP={self.expert_parallel_size} ranks (EP size = tensor_parallel_size"
              f"{', one EP group per stage' if pp > 1 else ''})" if self.expert_parallel else "")
        return (f"{self.name}: {self.world_size} ranks (TP={tp} x PP={pp}{ep}), one bundle per stage holding its "
                f"{tp} {'EP/TP' if self.expert_parallel else 'TP'} ranks: {self.bundle_list()}, {self.strategy}")

    def rank_of(self, tp_rank: int, pp_rank: int) -> RankPlacement:
        if not (0 <= tp_rank < self.tensor_parallel_size and 0 <= pp_rank < self.pipeline_parallel_size):
            raise ValueError(f"(tp_rank={tp_rank}, pp_rank={pp_rank}) is outside tensor_parallel_size="
                             f"{self.tensor_parallel_size} x pipeline_parallel_size={self.pipeline_parallel_size}")
        return self.ranks[(self.pipeline_parallel_size - 1 - pp_rank) * self.tensor_parallel_size + tp_rank]

    def placement(self, rank: int) -> RankPlacement:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        return self.ranks[rank]

    def bundle_index(self, tp_rank: int, pp_rank: int) -> int:
        return self.rank_of(tp_rank, pp_rank).bundle_index

    def rank_to_bundle(self) -> dict[tuple[int, int], int]:
        """(tp_rank, pp_rank) -> bundle index, for every rank."""
        return {(r.tp_rank, r.pp_rank): r.bundle_index for r in self.ranks}

    def bundle_list(self) -> list[dict[str, float]]:
        """Fresh copies of the bundles, in the form `placement_group()` and Serve take."""
        return [dict(b) for b in self.bundles]

    def rank_actor_options(self) -> dict[str, Any]:
        """Resource options of any one rank (the same for all; scheduling is added by
        `raylight.placement.scheduling`)."""
        return self.rank_resources.actor_options()

    def total_resources(self, num_replicas: int = 1) -> dict[str, float]:
        total: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v * num_replicas
        return total


def plan_placement(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    role: Role = "unified",
    *,
    use_gpu: bool = True,
    cpus_per_rank: float = 1.0,
    gpus_per_rank: float = 1.0,
    memory_per_rank: Optional[int] = None,
    resources_per_rank: Optional[Mapping[str, float]] = None,
    accelerator_type: Optional[str] = None,
    topology: Optional[ClusterTopology] = None,
    num_replicas: int = 1,
    expert_parallel: bool = False,
) -> PlacementPlan:
    """Plan one replica's placement group.

    use_gpu=False is the CPU-only variant (tests, CPU serving): each rank reserves
    `cpus_per_rank` CPUs and no GPU, with the same bundle layout and strategy.
    gpus_per_rank below 1 lets several ranks share a GPU (small models, tests).
    With `topology`, a layout that the cluster can never hold (`num_replicas` copies of it
    at once) raises ValueError here instead of leaving a placement group pending forever.
    expert_parallel=True (a MoE model's enable_expert_parallel) keeps the layout: EP size =
    tensor_parallel_size, each stage's EP ranks in its bundle; with pipeline_parallel_size > 1
    every stage is its own EP group.
    """
    tp = _positive_int("tensor_parallel_size", tensor_parallel_size)
    pp = _positive_int("pipeline_parallel_size", pipeline_parallel_size)
    _positive_int("num_replicas", num_replicas)
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    per_rank = _rank_resources(use_gpu, cpus_per_rank, gpus_per_rank, memory_per_rank,
                               resources_per_rank, accelerator_type)

    stage_bundle = {k: v * tp for k, v in per_rank.bundle_share().items()}
    bundles = tuple(dict(stage_bundle) for _ in range(pp))
    # The same layout as ParallelConfig.global_rank (not imported: placement stays free of torch).
    ranks = tuple(RankPlacement(rank=b * tp + t, tp_rank=t, pp_rank=pp - 1 - b, bundle_index=b)
                  for b in range(pp) for t in range(tp))
    plan = PlacementPlan(tensor_parallel_size=tp, pipeline_parallel_size=pp, role=role,
                         rank_resources=per_rank, bundles=bundles,
                         strategy=STRICT_PACK if pp == 1 else PACK, ranks=ranks,
                         expert_parallel=bool(expert_parallel))
    if topology is not None:
        check_fits(plan, topology, num_replicas)
    return plan


def check_fits(plan: PlacementPlan, topology: ClusterTopology, num_replicas: int = 1) -> None:
    """Raise ValueError, naming the setting to change, when `num_replicas` copies of the
    plan can never be placed on `topology` at the same time. GPUs are always checked, CPUs
    when the topology knows them; custom resources and memory are left to Ray."""
    stage = plan.bundles[0]
    gpus, cpus = stage.get("GPU", 0.0), stage.get("CPU", 0.0)
    tp = _tp_setting(plan)
    per_node = topology.copies_per_node(gpus, cpus)
    if max(per_node) < 1:
        if gpus > topology.max_gpus_per_node + 1e-6:
            raise ValueError(
                f"{tp} needs {_num(gpus)} GPUs on one node (the {'EP/' if plan.expert_parallel else ''}TP "
                f"ranks of a pipeline stage always share a node), but the largest node has "
                f"{_num(topology.max_gpus_per_node)} GPUs; lower tensor_parallel_size "
                f"(and raise pipeline_parallel_size to spread layers over nodes)")
        raise ValueError(
            f"{tp} x {_num(plan.rank_resources.num_cpus)} CPUs per rank needs "
            f"{_num(cpus)} CPUs{f' and {_num(gpus)} GPUs' if gpus else ''} on one node, but no node has "
            f"them (GPUs per node {_nums(topology.gpus_per_node)}, CPUs per node "
            f"{_nums(topology.cpus_per_node or ())}); lower the CPUs per rank or tensor_parallel_size")
    needed = plan.pipeline_parallel_size * num_replicas
    capacity = sum(per_node)
    if capacity < needed:
        replicas = f" x num_replicas={num_replicas}" if num_replicas > 1 else ""
        raise ValueError(
            f"pipeline_parallel_size={plan.pipeline_parallel_size}{replicas} needs {needed} stage bundles "
            f"of {_bundle_str(stage)}, but the cluster holds at most {_num(capacity)} at once "
            f"({', '.join(_num(n) for n in per_node)} per node)")


def _tp_setting(plan: PlacementPlan) -> str:
    """How errors name the TP size: under EP it is also the EP size, and a user who set
    enable_expert_parallel should see why lowering it shrinks the expert groups too."""
    tp = f"tensor_parallel_size={plan.tensor_parallel_size}"
    return f"{tp} (also the expert-parallel size: EP = TP)" if plan.expert_parallel else tp


def _rank_resources(use_gpu: bool, cpus_per_rank: float, gpus_per_rank: float, memory_per_rank: Optional[int],
                    resources_per_rank: Optional[Mapping[str, float]],
                    accelerator_type: Optional[str]) -> RankResources:
    if cpus_per_rank < 0:
        raise ValueError(f"cpus_per_rank must be >= 0, got {cpus_per_rank}")
    if use_gpu:
        # A rank drives one device; more than one GPU per rank would be reserved and idle.
        if not 0 < gpus_per_rank <= 1:
            raise ValueError(f"gpus_per_rank must be in (0, 1] (each rank drives one GPU; the plan "
                             f"reserves tensor_parallel_size x pipeline_parallel_size of them), got {gpus_per_rank}")
    elif cpus_per_rank <= 0:
        raise ValueError("the CPU-only plan (use_gpu=False) reserves CPUs per rank: cpus_per_rank must be > 0, "
                         f"got {cpus_per_rank}")
    if memory_per_rank is not None and memory_per_rank <= 0:
        raise ValueError(f"memory_per_rank must be > 0 bytes, got {memory_per_rank}")
    custom = dict(resources_per_rank or {})
    for key, value in custom.items():
        if key in _RESERVED_KEYS:
            raise ValueError(f"resources_per_rank must not contain {key!r}: use cpus_per_rank, gpus_per_rank "
                             f"or memory_per_rank")
        if value <= 0:
            raise ValueError(f"resources_per_rank[{key!r}] must be > 0, got {value}")
    return RankResources(num_cpus=float(cpus_per_rank), num_gpus=float(gpus_per_rank) if use_gpu else 0.0,
                         memory=int(memory_per_rank) if memory_per_rank else None, resources=custom,
                         accelerator_type=accelerator_type or None)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _nums(xs: tuple[float, ...]) -> str:
    return "[" + ", ".join(_num(x) for x in xs) + "]"


def _bundle_str(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in bundle.items()) + "}"
