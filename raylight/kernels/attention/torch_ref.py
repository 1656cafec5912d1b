"""Reference paged attention in plain torch: correct on CPU and GPU, used by tests as the oracle.

Decode rows are batched into one SDPA call over their gathered, padded context;
prefill chunks (which may sit on a cached prefix) run one SDPA call each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from raylight.kernels.attention.base import CommonAttentionMetadata


@dataclass
class PrefillChunk:
    q_start: int
    q_end: int
    seq_len: int
    block_ids: Optional[torch.Tensor]  # None: no cached context, attend to this chunk's own K/V
    mask: Optional[torch.Tensor]  # [q_len, seq_len] bool; None means plain causal


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # which decode rows (= flat token indices) this group holds
    block_tables: torch.Tensor  # [g, nb]: padded to the group's longest sequence only
    mask: torch.Tensor  # [g, 1, 1, nb * block_size] bool


@dataclass
class TorchAttentionMetadata:
    slot_block: torch.Tensor  # [T]
    slot_offset: torch.Tensor  # [T]
    num_decodes: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]


class TorchAttentionBackend:
    name = "torch"
    DECODE_GROUP = 16  # decode sequences per attention call

    def __init__(self, block_size: int, sliding_window: Optional[int], device: torch.device):
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.device = device

    def build(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        bs, window, dev = self.block_size, self.sliding_window, self.device
        slot = common.slot_mapping
        nd = common.num_decodes
        qsl, seq_lens, tables = common.query_start_loc, common.seq_lens, common.block_tables

        # Decode rows sorted by length and batched in small groups: each group pads only to its own
        # longest sequence, which on mixed lengths gathers and attends over far fewer empty slots.
        groups = []
        order = np.argsort(seq_lens[:nd], kind="stable")
        for start in range(0, nd, self.DECODE_GROUP):
            rows = order[start : start + self.DECODE_GROUP]
            lens = seq_lens[rows]
            nb = -(-int(lens.max()) // bs)
            lens_t = torch.from_numpy(lens).to(dev)[:, None]
            key_pos = torch.arange(nb * bs, device=dev)[None, :]
            mask = key_pos < lens_t
            if window is not None:
                mask &= key_pos > lens_t - 1 - window
            groups.append(DecodeGroup(torch.from_numpy(rows).to(dev),
                                      torch.from_numpy(np.ascontiguousarray(tables[rows, :nb])).to(dev),
                                      mask[:, None, None, :]))

        prefills = []
        for i in range(nd, common.num_reqs):
            q_start, q_end, seq_len = int(qsl[i]), int(qsl[i + 1]), int(seq_lens[i])
            context = seq_len - (q_end - q_start)
            block_ids = None
            if context > 0:
                block_ids = torch.from_numpy(tables[i, : -(-seq_len // bs)]).to(dev)
            mask = None
            if context > 0 or (window is not None and seq_len > window):
                q_pos = torch.arange(context, seq_len, device=dev)[:, None]
                k_pos = torch.arange(seq_len, device=dev)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
            prefills.append(PrefillChunk(q_start, q_end, seq_len, block_ids, mask))
        return TorchAttentionMetadata(
            slot_block=slot // bs, slot_offset=slot % bs, num_decodes=nd,
            decode_groups=groups, prefills=prefills,
        )

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: TorchAttentionMetadata, scale: float, out=None):
        """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [num_blocks, 2, block_size, KVH, D]."""
        # Write every new token first, so a request reading a block written in this same
        # step (a prefix hit on a block being filled now) sees it.
        kv_cache[meta.slot_block, 0, meta.slot_offset] = k
        kv_cache[meta.slot_block, 1, meta.slot_offset] = v
        if out is None:
            out = torch.empty_like(q)
        num_heads = q.shape[1]
        _, kv_heads, head_dim = k.shape
        group = num_heads // kv_heads
        for g in meta.decode_groups:
            n = len(g.rows)
            # Gather K and V blocks straight into contiguous [g, L, KVH, D] buffers (no second copy).
            flat = g.block_tables.flatten()
            keys = kv_cache[:, 0].index_select(0, flat).view(n, -1, kv_heads, head_dim).transpose(1, 2)
            values = kv_cache[:, 1].index_select(0, flat).view(n, -1, kv_heads, head_dim).transpose(1, 2)
            # GQA for one query token: a group's query heads play the role of query positions,
            # so K/V are never repeated per head.
            o = F.scaled_dot_product_attention(
                q[g.rows].view(n, kv_heads, group, head_dim), keys, values, attn_mask=g.mask, scale=scale)
            out[g.rows] = o.reshape(n, num_heads, head_dim)
        for p in meta.prefills:
            if p.block_ids is None:
                keys, values = k[p.q_start : p.q_end], v[p.q_start : p.q_end]
            else:
                keys = kv_cache[:, 0].index_select(0, p.block_ids).view(-1, kv_heads, head_dim)[: p.seq_len]
                values = kv_cache[:, 1].index_select(0, p.block_ids).view(-1, kv_heads, head_dim)[: p.seq_len]
            o = _sdpa(
                q[p.q_start : p.q_end].transpose(0, 1)[None],
                keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None],
                p.mask,
                scale,
            )
            out[p.q_start : p.q_end] = o[0].transpose(0, 1)
        return out


def _sdpa(q, k, v, mask, scale):
    """q: [B, H, Lq, D]; k, v: [B, KVH, Lk, D]; mask None means causal."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
