"""Who this process is inside a replica: its TP and PP coordinates and the groups it talks over.

There is no global state. A `ParallelGroups` is built once per process and passed
explicitly to the model and its layers; `ParallelGroups.single()` is the trivial
one-process instance (tp=1, pp=1) that needs no torch.distributed at all, so the
single-device engine runs exactly the code it always ran.

Rank layout inside a replica of tp x pp processes: rank = (pp - 1 - pp_rank) * tp + tp_rank.
The TP ranks of a stage are consecutive (one placement bundle, one node), and TP rank t of
stage s talks point-to-point to TP rank t of stages s - 1 and s + 1.

Stages run in descending rank order so that rank 0, the engine's own process (it holds the
scheduler and broadcasts each step), is TP rank 0 of the LAST stage: the one rank that gets
full logits. Sampling, its per-request state (seeded generators, penalty counts) and prompt
logprobs therefore stay in the engine's process, and the last stage's hand-off to rank 0 is
the regular stage-to-stage one: no logits or sampled ids travel back. The first stage (the
embedding) is the highest ranks; the cost is nothing but a different numbering.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from raylight.kernels.config import KernelConfig

if TYPE_CHECKING:
    from raylight.parallel.custom_allreduce import CustomAllReduce


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Layers per PP stage, first stage first; None splits them evenly.
    pipeline_layer_split: Optional[tuple[int, ...]] = None
    # Mixture-of-experts layers: experts sharded over each stage's TP ranks (EP size = tp) instead of
    # every expert's matrices split over them; and the extra expert slots EPLB may fill with replicas.
    enable_expert_parallel: bool = False
    num_redundant_experts: int = 0

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        split = self.pipeline_layer_split
        if split is not None:
            object.__setattr__(self, "pipeline_layer_split", tuple(int(n) for n in split))
            if len(split) != self.pipeline_parallel_size or any(n < 1 for n in split):
                raise ValueError(f"pipeline_layer_split must give each of the {self.pipeline_parallel_size} "
                                 f"stages at least one layer, got {list(split)}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ep_size(self) -> int:
        """Ranks a MoE layer's experts are spread over: the stage's TP ranks under EP, else 1."""
        return self.tensor_parallel_size if self.enable_expert_parallel else 1

    def global_rank(self, tp_rank: int, pp_rank: int) -> int:
        """The rank of (tp_rank, pp_rank): stages in descending rank order, rank 0 in the last one."""
        return (self.pipeline_parallel_size - 1 - pp_rank) * self.tensor_parallel_size + tp_rank

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_rank) of `rank`; the inverse of `global_rank`."""
        tp = self.tensor_parallel_size
        return rank % tp, self.pipeline_parallel_size - 1 - rank // tp

    def layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """[start, end) of each stage's layers: contiguous; balanced unless a split is given.

        Balanced gives the extra layers of an uneven division to the first stages: the last
        stage also runs the final norm, the LM head and sampling.
        """
        pp = self.pipeline_parallel_size
        if self.pipeline_layer_split is not None:
            counts = list(self.pipeline_layer_split)
            if sum(counts) != num_layers:
                raise ValueError(f"pipeline_layer_split {counts} covers {sum(counts)} layers; "
                                 f"the model has {num_layers}")
        else:
            if pp > num_layers:
                raise ValueError(f"pipeline_parallel_size={pp} exceeds the model's {num_layers} layers")
            counts = [num_layers // pp + (i < num_layers % pp) for i in range(pp)]
        starts = [sum(counts[:i]) for i in range(pp)]
        return [(s, s + n) for s, n in zip(starts, counts)]


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device | str,
                     timeout_s: float = 600.0) -> None:
    """Joins this process to the replica's world (one process per TP x PP rank).

    `init_method` is a torch.distributed URL, e.g. `tcp://10.0.0.1:29500`. On CUDA, `device`
    names the GPU this rank owns; it becomes the current device before NCCL starts.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave_distributed() -> None:
    """Leaves the torch.distributed world, once every step is done. NCCL communicators are aborted
    rather than destroyed: once CUDA graphs have captured their collectives, ncclCommDestroy can
    hang for good (pytorch/pytorch#115388; seen on two H200s). Abort waits for no peer."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        torch.cuda.synchronize()
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


@dataclass
class ParallelGroups:
    config: ParallelConfig
    rank: int = 0  # in the replica's world
    tp_rank: int = 0
    pp_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None  # None when tp == 1
    tp_ranks: list[int] = field(default_factory=lambda: [0])  # global ranks of this stage's TP group
    # A gloo group over the whole world, for host-side control data (step inputs as small CPU
    # tensors) even when the device groups are NCCL. None in a single process.
    cpu_group: Optional[dist.ProcessGroup] = None
    # The one-shot IPC all-reduce for small tensors (parallel/custom_allreduce.py); None: NCCL/gloo only.
    custom_ar: Optional["CustomAllReduce"] = None

    @classmethod
    def single(cls, config: Optional[ParallelConfig] = None) -> "ParallelGroups":
        """One process: no torch.distributed. `config` carries the settings that still apply to it (a
        MoE model's expert slots); its world must be 1."""
        config = config or ParallelConfig()
        if config.world_size != 1:
            raise ValueError(f"a single process cannot hold a world of {config.world_size} ranks")
        return cls(config)

    @classmethod
    def from_world(cls, config: ParallelConfig, kernels: Optional[KernelConfig] = None) -> "ParallelGroups":
        """Builds the groups over an initialised world; every rank must call this, in the same order
        relative to other group creations (torch.distributed.new_group is collective). `kernels`: the
        engine's KernelConfig (its `custom_allreduce`; every rank must pass the same); None: from the
        environment."""
        if config.world_size == 1 and not dist.is_initialized():
            return cls.single(config)
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_distributed first")
        if dist.get_world_size() != config.world_size:
            raise ValueError(f"the world has {dist.get_world_size()} ranks but tensor_parallel_size x "
                             f"pipeline_parallel_size = {config.world_size}")
        tp, rank = config.tensor_parallel_size, dist.get_rank()
        tp_group, tp_ranks = None, [rank]
        for first in range(0, config.world_size, tp):
            ranks = list(range(first, first + tp))  # one stage's TP group
            # new_group must be called by all ranks for every group, even those they are not in.
            group = dist.new_group(ranks) if tp > 1 else None
            if rank in ranks:
                tp_group, tp_ranks = group, ranks
        cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        tp_rank, pp_rank = config.coordinates(rank)
        custom_ar = None
        if tp > 1 and dist.get_backend() == "nccl":  # collective: every rank of every stage takes part
            from raylight.parallel.custom_allreduce import CustomAllReduce

            kernels = kernels if kernels is not None else KernelConfig.from_args(None)
            custom_ar = CustomAllReduce.create(tp_group, cpu_group, tp_ranks,
                                               torch.device("cuda", torch.cuda.current_device()),
                                               enabled=kernels.custom_allreduce)
        return cls(config, rank, tp_rank, pp_rank, tp_group, tp_ranks, cpu_group, custom_ar)

    # ---- coordinates ----
    @property
    def tp_size(self) -> int:
        return self.config.tensor_parallel_size

    @property
    def pp_size(self) -> int:
        return self.config.pipeline_parallel_size

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def ep_size(self) -> int:
        return self.config.ep_size

    @property
    def ep_rank(self) -> int:
        """This rank's place among the ranks its stage's experts are spread over (its TP rank under EP)."""
        return self.tp_rank if self.config.enable_expert_parallel else 0

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        """The group expert-parallel tokens and weights move over: the stage's TP group (None: one rank)."""
        return self.tp_group if self.ep_size > 1 else None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> Optional[int]:
        """Global rank this process receives (hidden, residual) from; None on the first stage."""
        return None if self.is_first_stage else self.rank + self.tp_size

    @property
    def next_rank(self) -> Optional[int]:
        """Global rank this process sends (hidden, residual) to; None on the last stage."""
        return None if self.is_last_stage else self.rank - self.tp_size

    @property
    def is_driver(self) -> bool:
        """Rank 0: runs the scheduler and broadcasts each step's inputs."""
        return self.rank == 0

    @property
    def samples(self) -> bool:
        """TP rank 0 of the last stage: the one rank that holds full logits and samples (rank 0)."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def sampler_rank(self) -> int:
        return self.config.global_rank(0, self.pp_size - 1)

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        return self.config.layer_ranges(num_layers)[self.pp_rank]

    # ---- TP collectives (identity when tp == 1, so layers call them unconditionally) ----
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the TP group: in place (NCCL, gloo) or in a new tensor (the one-shot
        kernel); use the result."""
        if self.tp_size > 1:
            if self.custom_ar is not None and self.custom_ar.fits(x):
                return self.custom_ar.all_reduce(x)
            dist.all_reduce(x, group=self.tp_group)
        return x

    def reduce_add_norm(self, partial: torch.Tensor, residual: torch.Tensor, norm):
        """`norm(all_reduce(partial), residual)`: RMSNorm of the TP sum plus the residual, and that
        sum (the next residual). One kernel where the custom all-reduce applies."""
        if self.tp_size > 1:
            car = self.custom_ar
            if car is not None and car.can_fuse(partial, residual, norm.weight):
                return car.all_reduce_add_rms_norm(partial, residual, norm.weight, norm.eps)
            partial = self.all_reduce(partial)
        return norm(partial, residual)

    def broadcast_from_tp0(self, x: torch.Tensor) -> None:
        """In place: TP rank 0's `x` on every rank of the TP group."""
        if self.tp_size > 1:
            dist.broadcast(x, src=self.tp_ranks[0], group=self.tp_group)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates equal-shaped shards from every TP rank along `dim`, on every TP rank."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def gather(self, x: torch.Tensor, dim: int = -1) -> Optional[torch.Tensor]:
        """Concatenates equal-shaped shards along `dim` on TP rank 0 only; other ranks get None."""
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(x, parts, dst=self.tp_ranks[0], group=self.tp_group)
        return torch.cat(parts, dim=dim) if parts is not None else None


def shard_range(size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(start, length) of rank `tp_rank`'s contiguous share of `size`, as even as possible
    (the first `size % tp_size` ranks take one more)."""
    base, extra = divmod(size, tp_size)
    start = tp_rank * base + min(tp_rank, extra)
    return start, base + (tp_rank < extra)

