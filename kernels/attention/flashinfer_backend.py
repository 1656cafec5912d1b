"""FlashInfer paged attention: decode and prefill wrappers planned once per step, run by every layer.

Decode rows (one query token each) go through BatchDecodeWithPagedKVCacheWrapper; prefill
chunks, which may sit on a cached prefix, through BatchPrefillWithPagedKVCacheWrapper with
a causal mask aligned to the end of each sequence's KV. Both read our KV layout as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raylight.kernels.attention import AttentionSpec, CommonAttentionMetadata

WORKSPACE_BYTES = 128 * 1024 * 1024


@dataclass
class FlashInferMetadata:
    slot_block: torch.Tensor
    slot_offset: torch.Tensor
    num_decodes: int  # = number of decode tokens
    has_prefill: bool


class FlashInferBackend:
    name = "flashinfer"

    def __init__(self, spec: AttentionSpec):
        import flashinfer

        self.spec = spec
        dev = spec.device
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev), "NHD",
            use_tensor_cores=spec.num_heads // spec.num_kv_heads >= 4)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev), "NHD")
        self.window_left = spec.sliding_window - 1 if spec.sliding_window else -1

    def build(self, common: CommonAttentionMetadata) -> FlashInferMetadata:
        s, bs = self.spec, self.spec.block_size
        nd = common.num_decodes
        seq_lens = common.seq_lens
        num_blocks = -(-seq_lens // bs)
        indptr = np.zeros(len(seq_lens) + 1, dtype=np.int32)
        np.cumsum(num_blocks, out=indptr[1:])
        in_use = np.arange(common.block_tables.shape[1])[None, :] < num_blocks[:, None]
        indices = torch.from_numpy(common.block_tables[in_use].astype(np.int32))  # row-major: per request, in order
        last_page_len = torch.from_numpy((seq_lens - (num_blocks - 1) * bs).astype(np.int32))
        indptr_t = torch.from_numpy(indptr)
        kw = dict(q_data_type=s.dtype, kv_data_type=s.dtype, window_left=self.window_left)
        if nd:
            self._decode.plan(indptr_t[: nd + 1], indices[: indptr[nd]], last_page_len[:nd], s.num_heads,
                              s.num_kv_heads, s.head_dim, bs, **kw)
        has_prefill = common.num_reqs > nd
        if has_prefill:
            qsl = common.query_start_loc
            qo_indptr = torch.from_numpy((qsl[nd:] - qsl[nd]).astype(np.int32))
            self._prefill.plan(qo_indptr, indptr_t[nd:] - indptr[nd], indices[indptr[nd]:], last_page_len[nd:],
                               s.num_heads, s.num_kv_heads, s.head_dim, bs, causal=True, **kw)
        slot = common.slot_mapping
        return FlashInferMetadata(slot // bs, slot % bs, nd, has_prefill)

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: FlashInferMetadata, scale: float):
        kv_cache[meta.slot_block, 0, meta.slot_offset] = k
        kv_cache[meta.slot_block, 1, meta.slot_offset] = v
        nd = meta.num_decodes
        if not meta.has_prefill:
            return self._decode.run(q, kv_cache)
        if not nd:
            return self._prefill.run(q, kv_cache)
        out = torch.empty_like(q)
        out[:nd] = self._decode.run(q[:nd], kv_cache)
        out[nd:] = self._prefill.run(q[nd:], kv_cache)
        return out
