"""Tensor-parallel layers: each rank holds a slice of every weight and the layers add the
collectives that make the slices add up to the full computation.

A transformer block needs exactly two all-reduces: column-parallel projections (QKV,
gate/up) produce this rank's heads / intermediate features with no communication, and
the row-parallel projection after them (o_proj, down_proj) sums the partial outputs.

With tp=1 every layer is numerically identical to the nn.Linear / nn.Embedding it
replaces and holds the same full-size parameter under the same name.

Loading: every parameter carries `weight_loader(param, checkpoint_tensor, shard_id=None)`
that narrows the checkpoint tensor to this rank's slice before copying. A checkpoint
tensor is a torch.Tensor or a lazy one (`models.loader.LazyTensor`) with `.shape`,
`.narrow(dim, start, length)` and `.read()`; narrowing a lazy tensor reads only the slice
from disk, so a rank never holds more than its own share of a sharded weight.

Every matmul layer takes the engine's `KernelConfig` (`kernels=`): whether a single row may go
through our GEMV kernel, and whether the SiLU-and-mul before down_proj may be the fused one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raylight.kernels.config import DEFAULT_KERNELS, KernelConfig
from raylight.kernels.gemv import linear
from raylight.parallel.state import ParallelGroups, shard_range


def read_full(w) -> torch.Tensor:
    """The whole checkpoint tensor (for replicated parameters)."""
    return w if isinstance(w, torch.Tensor) else w.read()


@torch.no_grad()
def default_weight_loader(param: nn.Parameter, w, shard_id=None) -> None:
    """Replicated parameter: every rank holds the whole tensor."""
    if tuple(param.shape) != tuple(w.shape):
        raise ValueError(f"shape mismatch: checkpoint {tuple(w.shape)}, model {tuple(param.shape)}")
    param.copy_(read_full(w))


def _check(w, dim: int, expected: int, what: str) -> None:
    if w.shape[dim] != expected:
        raise ValueError(f"shape mismatch: checkpoint {what} has {w.shape[dim]} along dim {dim}, model {expected}")


def _param(*shape: int, loader) -> nn.Parameter:
    # Uninitialised: real weights or the dummy initialiser overwrite every element.
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over TP ranks: each rank computes its slice of y.

    `gather_output` concatenates the slices on every rank (needs out_features % tp == 0).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, groups: ParallelGroups,
                 gather_output: bool = False, kernels: KernelConfig = DEFAULT_KERNELS):
        super().__init__()
        self.groups, self.gather_output, self.kernels = groups, gather_output, kernels
        if gather_output and out_features % groups.tp_size:
            raise ValueError(f"gather_output needs out_features={out_features} divisible by tp={groups.tp_size}")
        self.out_features = out_features
        self.out_start, self.out_local = shard_range(out_features, groups.tp_size, groups.tp_rank)
        self.weight = _param(self.out_local, in_features, loader=self._load_rows)
        self.bias = _param(self.out_local, loader=self._load_rows) if bias else None

    @torch.no_grad()
    def _load_rows(self, param, w, shard_id=None):
        _check(w, 0, self.out_features, "output rows")
        param.copy_(w.narrow(0, self.out_start, self.out_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, kernels=self.kernels)
        return self.groups.all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel projections of the same input in one matmul (gate and up).

    Each rank's weight is [its slice of part 0; its slice of part 1; ...], so the local output
    splits back into the parts with one `chunk`/`split`, exactly as the unsharded layer does.
    Checkpoint parts arrive separately: `weight_loader(param, w, shard_id=part index)`.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool, groups: ParallelGroups,
                 kernels: KernelConfig = DEFAULT_KERNELS):
        super().__init__()
        self.groups, self.kernels = groups, kernels
        self.output_sizes = list(output_sizes)
        self.shards = [shard_range(n, groups.tp_size, groups.tp_rank) for n in output_sizes]
        locals_ = [n for _, n in self.shards]
        self.offsets = [sum(locals_[:i]) for i in range(len(locals_))]
        self.weight = _param(sum(locals_), in_features, loader=self._load_part)
        self.bias = _param(sum(locals_), loader=self._load_part) if bias else None

    @torch.no_grad()
    def _load_part(self, param, w, shard_id: int):
        _check(w, 0, self.output_sizes[shard_id], f"part {shard_id} rows")
        start, n = self.shards[shard_id]
        param[self.offsets[shard_id] : self.offsets[shard_id] + n].copy_(w.narrow(0, start, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, kernels=self.kernels)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank owns: q heads [q_start, q_start + num_heads), KV heads likewise."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def head_shard(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
    """Splits attention heads over TP ranks by whole KV groups, so each rank's query heads only
    ever read the KV heads it holds.

    - num_kv_heads >= tp: the KV heads are split as evenly as possible (uneven when they do not
      divide, e.g. 3 KV heads over 2 ranks -> 2 and 1) and each rank takes the query heads of its
      KV heads.
    - num_kv_heads < tp: each KV head is replicated on tp / num_kv_heads ranks, which split its
      query heads between them (needs tp % num_kv_heads == 0 and num_heads % tp == 0).
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        kv_start, kv_n = shard_range(num_kv_heads, tp_size, tp_rank)
        return HeadShard(kv_start * group, kv_n * group, kv_start, kv_n)
    if tp_size % num_kv_heads or num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} cannot split {num_heads} query heads over "
                         f"{num_kv_heads} KV heads: with fewer KV heads than ranks, tp must be a multiple of "
                         f"num_key_value_heads and divide num_attention_heads")
    q_n = num_heads // tp_size
    q_start = tp_rank * q_n
    return HeadShard(q_start, q_n, q_start // group, 1)


class QKVParallelLinear(nn.Module):
    """q, k and v projections in one column-parallel matmul over this rank's heads.

    Local output layout: [q of my heads | k of my KV heads | v of my KV heads].
    Checkpoint parts arrive separately: `weight_loader(param, w, shard_id in "q", "k", "v")`.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 groups: ParallelGroups, kernels: KernelConfig = DEFAULT_KERNELS):
        super().__init__()
        self.kernels = kernels
        self.head_dim, self.full_heads = head_dim, {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        self.heads = head_shard(num_heads, num_kv_heads, groups.tp_size, groups.tp_rank)
        h = self.heads
        self.q_size, self.kv_size = h.num_heads * head_dim, h.num_kv_heads * head_dim
        out = self.q_size + 2 * self.kv_size
        self.weight = _param(out, hidden_size, loader=self._load_part)
        self.bias = _param(out, loader=self._load_part) if bias else None

    @torch.no_grad()
    def _load_part(self, param, w, shard_id: str):
        h, d = self.heads, self.head_dim
        _check(w, 0, self.full_heads[shard_id] * d, f"{shard_id} rows")
        src_start, n, dst = {
            "q": (h.q_start * d, self.q_size, 0),
            "k": (h.kv_start * d, self.kv_size, self.q_size),
            "v": (h.kv_start * d, self.kv_size, self.q_size + self.kv_size),
        }[shard_id]
        param[dst : dst + n].copy_(w.narrow(0, src_start, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, kernels=self.kernels)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over TP ranks; x arrives already split (the
    output of a column-parallel layer), so each rank computes a partial sum of y and one
    all-reduce completes it. The bias is added once, after the reduction.

    `input_shard` = (start, length) of this rank's input columns, for splits that follow heads
    rather than an even division (see `head_shard`); default: an even split.

    `reduce_results=False` returns each rank's partial sum and leaves the reduction to the caller:
    the decoder layers fold it into the add+RMSNorm that follows (`ParallelGroups.reduce_add_norm`),
    one kernel instead of two. Needs no bias (a bias would be added once per rank).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, groups: ParallelGroups,
                 input_shard: Optional[tuple[int, int]] = None, reduce_results: bool = True,
                 kernels: KernelConfig = DEFAULT_KERNELS):
        super().__init__()
        if bias and not reduce_results:
            raise ValueError("a RowParallelLinear with a bias must reduce its own results")
        self.groups, self.kernels = groups, kernels
        self.reduce_results = reduce_results
        self.in_features = in_features
        self.in_start, self.in_local = input_shard or shard_range(in_features, groups.tp_size, groups.tp_rank)
        self.weight = _param(out_features, self.in_local, loader=self._load_cols)
        self.bias = _param(out_features, loader=default_weight_loader) if bias else None

    @torch.no_grad()
    def _load_cols(self, param, w, shard_id=None):
        _check(w, 1, self.in_features, "input columns")
        param.copy_(w.narrow(1, self.in_start, self.in_local))

    def forward(self, x: torch.Tensor, silu_and_mul: bool = False) -> torch.Tensor:
        """With `silu_and_mul`, x is this rank's [gate | up] and the layer's input is silu(gate) * up
        (one kernel with the product for a single row, see kernels/gemv.py)."""
        if self.groups.tp_size == 1:
            return linear(x, self.weight, self.bias, silu_and_mul, self.kernels)
        if not self.reduce_results:
            return linear(x, self.weight, silu_and_mul=silu_and_mul, kernels=self.kernels)
        y = self.groups.all_reduce(linear(x, self.weight, silu_and_mul=silu_and_mul, kernels=self.kernels))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows. Each rank looks up the ids it owns, writes zeros
    for the others, and an all-reduce assembles the full embeddings.

    Every rank holds ceil(vocab / tp) rows (the last rank's tail is zero padding), so that the
    LM head's per-rank logits have equal widths and gather with one collective.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, groups: ParallelGroups):
        super().__init__()
        self.groups = groups
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // groups.tp_size)
        self.vocab_start = groups.tp_rank * self.rows_per_rank
        self.num_real_rows = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        self.weight = _param(self.rows_per_rank, embedding_dim, loader=self._load_rows)

    @torch.no_grad()
    def _load_rows(self, param, w, shard_id=None):
        if w.shape[0] != self.num_embeddings:
            raise ValueError(f"shape mismatch: checkpoint vocab {w.shape[0]}, model {self.num_embeddings}")
        n = self.num_real_rows
        if n:
            param[:n].copy_(w.narrow(0, self.vocab_start, n))
        param[n:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.groups.tp_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_start + self.num_real_rows)
        local = torch.where(mine, ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight).masked_fill_(~mine[..., None], 0.0)
        return self.groups.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over a vocabulary split like `VocabParallelEmbedding`: each rank computes its slice of
    the vocabulary and the slices are gathered on the rank that samples (TP rank 0), or on all TP
    ranks with `gather_all`. Tied models pass `tie_to=` the embedding.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, groups: ParallelGroups,
                 tie_to: Optional[VocabParallelEmbedding] = None, kernels: KernelConfig = DEFAULT_KERNELS):
        if tie_to is None:
            super().__init__(num_embeddings, embedding_dim, groups)
        else:
            # Tied: share the embedding's weight (split the same way) instead of allocating a second one.
            nn.Module.__init__(self)
            for k in ("groups", "num_embeddings", "rows_per_rank", "vocab_start", "num_real_rows"):
                setattr(self, k, getattr(tie_to, k))
            self.weight = tie_to.weight
        self.kernels = kernels

    def forward(self, hidden: torch.Tensor, gather_all: bool = False, float32: bool = True) -> Optional[torch.Tensor]:
        """Float32 logits, or with float32=False the matmul's own dtype (half the bytes to gather; the
        sampler converts where it needs to)."""
        w = self.weight
        if hidden.device.type == "cpu":
            # [vocab, hidden] @ [hidden, S]: with few rows S, MKL runs this orientation ~1.5x faster
            # than linear()'s (measured on SmolLM2's 49152 x 576 head at S=32).
            logits = (w @ hidden.t()).t()
        else:
            logits = linear(hidden, w, kernels=self.kernels)
        if self.groups.tp_size > 1:
            logits = self.groups.all_gather(logits) if gather_all else self.groups.gather(logits)
            if logits is None:
                return None
            if logits.shape[-1] != self.num_embeddings:
                logits = logits[:, : self.num_embeddings].contiguous()  # drop the last rank's padding rows
        return logits.float() if float32 else logits
