"""Reference paged attention in plain torch: correct on CPU and GPU, used by tests as the oracle.

Decode rows are batched into one SDPA call over their gathered, padded context;
prefill chunks (which may sit on a cached prefix) run one SDPA call each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from raylight.kernels.attention import CommonAttentionMetadata


@dataclass
class PrefillChunk:
    q_start: int
    q_end: int
    seq_len: int
    block_ids: Optional[torch.Tensor]  # None: no cached context, attend to this chunk's own K/V
    mask: Optional[torch.Tensor]  # [q_len, seq_len] bool; None means plain causal


@dataclass
class TorchAttentionMetadata:
    slot_block: torch.Tensor  # [T]
    slot_offset: torch.Tensor  # [T]
    num_decodes: int
    decode_block_tables: Optional[torch.Tensor]  # [Bd, nb]
    decode_mask: Optional[torch.Tensor]  # [Bd, 1, 1, nb * block_size]
    prefills: list[PrefillChunk]


class TorchAttentionBackend:
    name = "torch"

    def __init__(self, block_size: int, sliding_window: Optional[int], device: torch.device):
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.device = device

    def build(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        bs, window, dev = self.block_size, self.sliding_window, self.device
        slot = common.slot_mapping
        nd = common.num_decodes
        qsl, seq_lens, tables = common.query_start_loc, common.seq_lens, common.block_tables

        decode_tables = decode_mask = None
        if nd:
            nb = -(-int(seq_lens[:nd].max()) // bs)
            decode_tables = torch.from_numpy(tables[:nd, :nb]).to(dev)
            lens = torch.from_numpy(seq_lens[:nd]).to(dev)[:, None]
            key_pos = torch.arange(nb * bs, device=dev)[None, :]
            decode_mask = key_pos < lens
            if window is not None:
                decode_mask &= key_pos > lens - 1 - window
            decode_mask = decode_mask[:, None, None, :]

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
            decode_block_tables=decode_tables, decode_mask=decode_mask, prefills=prefills,
        )

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: TorchAttentionMetadata, scale: float):
        """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [num_blocks, 2, block_size, KVH, D]."""
        # Write every new token first, so a request reading a block written in this same
        # step (a prefix hit on a block being filled now) sees it.
        kv_cache[meta.slot_block, 0, meta.slot_offset] = k
        kv_cache[meta.slot_block, 1, meta.slot_offset] = v
        out = torch.empty_like(q)
        num_heads = q.shape[1]
        _, kv_heads, head_dim = k.shape
        group = num_heads // kv_heads
        nd = meta.num_decodes
        if nd:
            # Gather K and V blocks straight into contiguous [Bd, L, KVH, D] buffers (no second copy).
            flat = meta.decode_block_tables.flatten()
            keys = kv_cache[:, 0].index_select(0, flat).view(nd, -1, kv_heads, head_dim).transpose(1, 2)
            values = kv_cache[:, 1].index_select(0, flat).view(nd, -1, kv_heads, head_dim).transpose(1, 2)
            # GQA for one query token: a group's query heads play the role of query positions,
            # so K/V are never repeated per head.
            o = F.scaled_dot_product_attention(
                q[:nd].view(nd, kv_heads, group, head_dim), keys, values, attn_mask=meta.decode_mask, scale=scale)
            out[:nd] = o.reshape(nd, num_heads, head_dim)
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
