"""FlashInfer paged attention: decode and prefill wrappers planned once per step, run by every layer.

Decode rows (one query token each) go through BatchDecodeWithPagedKVCacheWrapper; prefill
chunks, which may sit on a cached prefix, through BatchPrefillWithPagedKVCacheWrapper with
a causal mask aligned to the end of each sequence's KV. Both read our KV layout as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from raylight.kernels.attention.base import AttentionSpec, CommonAttentionMetadata
from raylight.kernels.attention.kv_write import write_kv
from raylight.utils.host_copy import copy_to, pinned, to_device

WORKSPACE_BYTES = 128 * 1024 * 1024


@dataclass
class FlashInferMetadata:
    slot_mapping: torch.Tensor  # [T] device
    num_decodes: int  # = number of decode tokens
    has_prefill: bool
    decode: object  # the decode wrapper planned for this step (a per-batch-size one under CUDA graphs)


class FlashInferBackend:
    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, spec: AttentionSpec, decode_tensor_cores: Optional[bool] = None):
        import flashinfer

        self.spec = spec
        dev = spec.device
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        # Decode through FlashInfer's tensor-core (prefill) kernels pays once several query heads
        # share a KV head; vLLM's threshold is a group above 4. `decode_tensor_cores` (KernelConfig's
        # flashinfer_decode_tensor_cores) overrides when not None.
        self._use_tensor_cores = (bool(decode_tensor_cores) if decode_tensor_cores is not None
                                  else spec.num_heads // spec.num_kv_heads > 4)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=self._use_tensor_cores)
        self._graph_indices = None  # shared page-index buffer of all CUDA-graph decode wrappers
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev), "NHD")
        self.window_left = spec.sliding_window - 1 if spec.sliding_window else -1

    def _pages(self, common: CommonAttentionMetadata):
        """FlashInfer's CSR page layout: indptr [B+1], indices (every request's pages, in order), last_page_len."""
        bs = self.spec.block_size
        seq_lens = common.seq_lens
        num_blocks = -(-seq_lens // bs)
        indptr = np.zeros(len(seq_lens) + 1, dtype=np.int32)
        np.cumsum(num_blocks, out=indptr[1:])
        in_use = np.arange(common.block_tables.shape[1])[None, :] < num_blocks[:, None]
        # Row-major: per request, in order. Page-locked, so FlashInfer's own copy of them is async too.
        indices = pinned(common.block_tables[in_use].astype(np.int32), self.spec.device)
        last_page_len = torch.from_numpy((seq_lens - (num_blocks - 1) * bs).astype(np.int32))
        return indptr, torch.from_numpy(indptr), indices, last_page_len

    def _plan_kwargs(self) -> dict:
        return dict(q_data_type=self.spec.dtype, kv_data_type=self.spec.dtype, window_left=self.window_left)

    def build(self, common: CommonAttentionMetadata) -> FlashInferMetadata:
        s, bs = self.spec, self.spec.block_size
        nd = common.num_decodes
        indptr, indptr_t, indices, last_page_len = self._pages(common)
        kw = self._plan_kwargs()
        if nd:
            self._decode.plan(indptr_t[: nd + 1], indices[: indptr[nd]], last_page_len[:nd], s.num_heads,
                              s.num_kv_heads, s.head_dim, bs, **kw)
        has_prefill = common.num_reqs > nd
        if has_prefill:
            qsl = common.query_start_loc
            qo_indptr = torch.from_numpy((qsl[nd:] - qsl[nd]).astype(np.int32))
            self._prefill.plan(qo_indptr, indptr_t[nd:] - indptr[nd], indices[indptr[nd]:], last_page_len[nd:],
                               s.num_heads, s.num_kv_heads, s.head_dim, bs, causal=True, **kw)
        return FlashInferMetadata(common.slot_mapping, nd, has_prefill, self._decode)

    def warmup(self, kv_cache: torch.Tensor) -> None:
        """JIT-compiles (or loads from FlashInfer's disk cache) the decode and prefill modules a step
        can use, now rather than inside a user's first request (12 s on a fresh H200). The modules
        depend on dtypes, head dims and masks, not on sizes, so one tiny step covers them. Reads
        block 0; writes nothing."""
        s, dev = self.spec, kv_cache.device
        common = CommonAttentionMetadata(
            num_decodes=1, query_start_loc=np.array([0, 1, 3]), seq_lens=np.array([1, 2]),
            block_tables=np.zeros((2, 1), dtype=np.int32), slot_mapping=torch.zeros(3, dtype=torch.long, device=dev))
        meta = self.build(common)
        q = torch.zeros(3, s.num_heads, s.head_dim, dtype=s.dtype, device=dev)
        meta.decode.run(q[:1], kv_cache)
        self._prefill.run(q[1:], kv_cache)

    # ---- CUDA graphs: one decode wrapper per captured batch size, over persistent buffers ----
    def make_graph_metadata(self, batch_size: int, max_blocks: int) -> FlashInferMetadata:
        import flashinfer

        dev = self.spec.device
        need = batch_size * max_blocks
        if self._graph_indices is None or len(self._graph_indices) < need:
            # Sized by the largest batch (captured first); replays run one at a time, so all share it.
            self._graph_indices = torch.zeros(need, dtype=torch.int32, device=dev)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self._use_tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=self._graph_indices,
            paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=dev))
        slots = torch.zeros(batch_size, dtype=torch.long, device=dev)
        return FlashInferMetadata(slots, batch_size, False, wrapper)

    def fill_graph_metadata(self, meta: FlashInferMetadata, common: CommonAttentionMetadata) -> None:
        s = self.spec
        _, indptr_t, indices, last_page_len = self._pages(common)
        # The page indices go to the device here, without a stream sync: FlashInfer copies host indices
        # into its graph buffer with a blocking copy, which would make the host wait for the step in
        # flight every step (measured on an H200: 2-4 ms per batch-1 step) and undo async scheduling.
        indices = to_device(indices, self.spec.device)
        meta.decode.plan(indptr_t, indices, last_page_len, s.num_heads, s.num_kv_heads, s.head_dim,
                         s.block_size, non_blocking=True, **self._plan_kwargs())
        copy_to(meta.slot_mapping, common.slot_mapping)

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: FlashInferMetadata, scale: float, out=None):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        nd = meta.num_decodes
        if not meta.has_prefill:
            return meta.decode.run(q, kv_cache, out=out)
        if not nd:
            return self._prefill.run(q, kv_cache, out=out)
        if out is None:
            out = torch.empty_like(q)
        meta.decode.run(q[:nd], kv_cache, out=out[:nd])
        self._prefill.run(q[nd:], kv_cache, out=out[nd:])
        return out
