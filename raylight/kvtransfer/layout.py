"""Where each layer and KV head of a replica's KV cache lives, and which pieces one replica's ranks
send to another's when their TP/PP layouts differ (heterogeneous prefill/decode parallelism).

Pure host logic: no torch.distributed, no threads. The sender and the receiver derive the same
plan from the two layouts, so nothing about the split travels per transfer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from raylight.parallel.layers import head_shard
from raylight.parallel.state import ParallelConfig


@dataclass(frozen=True)
class KVLayout:
    """One replica's KV cache, as a peer needs to know it. `layer_ranges[s]`: [lo, hi) of pipeline
    stage s (first stage first). Ranks follow `ParallelConfig.global_rank`."""

    num_layers: int
    num_heads: int  # query heads: with num_kv_heads they decide the TP head split
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "float32", "bfloat16", ...
    tp_size: int
    layer_ranges: tuple[tuple[int, int], ...]

    @property
    def pp_size(self) -> int:
        return len(self.layer_ranges)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def _config(self) -> ParallelConfig:
        return ParallelConfig(self.tp_size, self.pp_size)

    def layers_of(self, rank: int) -> tuple[int, int]:
        _, pp = self._config().coordinates(rank)
        return self.layer_ranges[pp]

    def kv_heads_of(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of the global KV heads `rank` holds (a replicated head: tp > num_kv_heads)."""
        tp, _ = self._config().coordinates(rank)
        h = head_shard(self.num_heads, self.num_kv_heads, self.tp_size, tp)
        return h.kv_start, h.kv_start + h.num_kv_heads

    def block_bytes(self, elem_size: int) -> int:
        """Bytes of one block over all layers and KV heads (K and V)."""
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem_size

    def compatibility_error(self, other: "KVLayout") -> Optional[str]:
        """Why KV of this layout cannot be written into `other`'s cache (None: it can)."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} differs: {getattr(self, name)} here, {getattr(other, name)} on the peer"
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "KVLayout":
        d = json.loads(text)
        return cls(**{**d, "layer_ranges": tuple(tuple(r) for r in d["layer_ranges"])})


@dataclass(frozen=True)
class Piece:
    """Layers [layer_lo, layer_hi) and global KV heads [head_lo, head_hi) that `src_rank` sends to
    `dst_rank`, for every block of a transfer."""

    src_rank: int
    dst_rank: int
    layer_lo: int
    layer_hi: int
    head_lo: int
    head_hi: int


def plan_pieces(src: KVLayout, dst: KVLayout) -> list[Piece]:
    """Every (layer range, head range) each destination rank needs, and the source rank it comes
    from. Each destination head of each layer is covered exactly once; a head replicated on several
    source ranks is taken from the first of them. Sorted by (src_rank, dst_rank, layer_lo, head_lo)."""
    err = src.compatibility_error(dst)
    if err is not None:
        raise ValueError(f"KV layouts are incompatible: {err}")
    src_cfg = src._config()
    # The first source TP rank holding each KV head.
    head_owner: dict[int, int] = {}
    for tp in range(src.tp_size):
        lo, hi = src.kv_heads_of(src_cfg.global_rank(tp, 0))
        for h in range(lo, hi):
            head_owner.setdefault(h, tp)
    pieces = []
    for d in range(dst.world_size):
        dl, dh = dst.layers_of(d)
        hl, hh = dst.kv_heads_of(d)
        for s_pp, (sl, sh) in enumerate(src.layer_ranges):
            lo, hi = max(dl, sl), min(dh, sh)
            if lo >= hi:
                continue
            h = hl
            while h < hh:  # runs of consecutive heads with the same source TP rank
                tp = head_owner[h]
                end = h + 1
                while end < hh and head_owner[end] == tp:
                    end += 1
                pieces.append(Piece(src_cfg.global_rank(tp, s_pp), d, lo, hi, h, end))
                h = end
    pieces.sort(key=lambda p: (p.src_rank, p.dst_rank, p.layer_lo, p.head_lo))
    return pieces


def senders_to(pieces: list[Piece], dst_rank: int) -> set[int]:
    return {p.src_rank for p in pieces if p.dst_rank == dst_rank}
