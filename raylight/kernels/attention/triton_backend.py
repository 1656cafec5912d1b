"""Our own Triton paged-attention backend: decode rows through a split-KV kernel, prefill chunks
(fresh or on a cached prefix) through a query-block kernel, K/V written by one fused kernel.

`build()` turns a step into a handful of int32 device tensors (one host-to-device copy) and
the few launch sizes the kernels need. For CUDA graphs, `make_graph_metadata` allocates
persistent buffers for a decode-only batch and `fill_graph_metadata` refreshes them in place;
`forward` then launches with grids fixed by (batch_size, max_blocks) alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from raylight.kernels.attention.base import AttentionSpec, CommonAttentionMetadata, int32_device_views
from raylight.kernels import fused
from raylight.kernels.attention import triton_kernels as tk
from raylight.kernels.pdl import PDL_MAX_TOKENS
from raylight.kernels.rotary import apply_rotary_qk
from raylight.utils.host_copy import copy_to


@dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes (< 0: skipped)
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int
    num_splits: int  # decode split-KV factor (power of two)
    partials: Optional[tuple]  # decode split buffers when num_splits > 1
    work_seq: Optional[torch.Tensor]  # [P] int32: prefill work items (sequence, query block)
    work_qblock: Optional[torch.Tensor]  # [P] int32
    filled_width: int = 0  # graph metadata: columns of block_tables the last fill wrote


class TritonAttentionBackend:
    name = "triton"
    supports_cuda_graphs = True
    MIN_SPLIT_TOKENS = 128  # a decode split below this is more launch than work
    MAX_SPLITS = 64
    PROGRAMS_PER_SM = 4  # split until about this many programs are in flight (a few per SM) ...
    FULL_BATCH_PROGRAMS_PER_SM = 16  # ... or this many once the batch alone fills the GPU (see num_splits)

    def __init__(self, spec: AttentionSpec, pdl: bool = False):
        self.spec = spec
        self.pdl = pdl  # KV write, decode and combine launched early where supported (kernels/pdl.py)
        tk.group_rows(spec.num_heads, spec.num_kv_heads)  # rejects a head count that is not a GQA multiple
        self.block_q = tk.prefill_block_q(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dtype)
        sms = torch.cuda.get_device_properties(spec.device).multi_processor_count if spec.device.type == "cuda" else 16
        self.target_programs = self.PROGRAMS_PER_SM * sms
        # env RAYLIGHT_DECODE_PROGRAMS_PER_SM: the full-batch target (4 gives the one-target rule of before)
        full = int(os.environ.get("RAYLIGHT_DECODE_PROGRAMS_PER_SM", self.FULL_BATCH_PROGRAMS_PER_SM))
        self.full_batch_target_programs = max(full * sms, self.target_programs)
        self.min_split_tokens = self.MIN_SPLIT_TOKENS

    def warmup(self, kv_cache: torch.Tensor) -> None:
        """Compiles every kernel variant a step can ask for (one per split count, with and without PDL,
        and prefill) now, rather than stalling a live step on Triton's compiler. Reads block 0; writes
        nothing to it."""
        s = self.spec
        dev = kv_cache.device
        # PDL is decided per launch from the query's rows (kernels/pdl.py): a step of many decodes runs
        # the variant without it, one of a few the variant with it. Both are built here: on an H100 the
        # split variants without PDL were missing and W1's first mixed steps compiled them (1.2 s).
        rows = (1, PDL_MAX_TOKENS + 1) if self.pdl else (1,)
        tables = torch.zeros(1, 1, dtype=torch.int32, device=dev)
        seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
        for n in rows:
            q = torch.zeros(n, s.num_heads, s.head_dim, dtype=s.dtype, device=dev)
            out = torch.empty_like(q)
            splits = 1
            while splits <= self.MAX_SPLITS:  # one sequence decodes; the other rows are never read
                tk.decode_attention(out, q, kv_cache, tables, seq_lens, 1, 1.0, s.sliding_window, splits,
                                    self._partials(1, splits), pdl=self.pdl)
                splits *= 2
        qsl = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        zero = torch.zeros(1, dtype=torch.int32, device=dev)
        tk.prefill_attention(out, q, kv_cache, tables, seq_lens, qsl, zero, zero, self.block_q, 1.0, s.sliding_window)

    def num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        """Power-of-two split-KV factor for a decode batch. A small batch splits until about
        `target_programs` programs run. A batch large enough that this would not split it at all splits
        against the larger `full_batch_target_programs` instead: a CUDA graph fixes the split count
        per batch size (its `max_seq_len` is the model's), so in a batch of mixed lengths a few long
        sequences' programs would trail everyone else's. Measured on an H100: the ShareGPT-like mix
        31.0-31.2k out tok/s with 16 programs per SM for every batch against 29.2-29.4k with 4, while
        8B batch 8 / 32 (short contexts) lost 1-2% with 16; this rule keeps theirs at 4."""
        programs = max(1, num_seqs * self.spec.num_kv_heads)
        target = self.target_programs if self.target_programs // programs >= 2 else self.full_batch_target_programs
        want = min(target // programs, max_seq_len // self.min_split_tokens, self.MAX_SPLITS)
        return 1 if want <= 1 else 1 << (int(want).bit_length() - 1)

    def _partials(self, num_seqs: int, num_splits: int):
        if num_splits == 1:
            return None
        s = self.spec
        return tk.alloc_partials(num_seqs, s.num_heads, s.head_dim, num_splits, s.device)

    # ---- eager steps ----
    def build(self, common: CommonAttentionMetadata) -> TritonMetadata:
        nd, num_reqs = common.num_decodes, common.num_reqs
        qsl = np.asarray(common.query_start_loc, dtype=np.int64)
        seq_lens = np.asarray(common.seq_lens, dtype=np.int64)
        tables = np.asarray(common.block_tables)
        work_seq, work_qblock = self._prefill_work(qsl, seq_lens, nd)
        # One int32 host buffer, one copy: per-step latency is dominated by transfers, not bytes.
        parts = [seq_lens, qsl, tables.reshape(-1), work_seq, work_qblock]
        seq_lens_t, qsl_t, tables_t, work_seq_t, work_qblock_t = int32_device_views(parts, self.spec.device)
        splits = self.num_splits(nd, int(seq_lens[:nd].max())) if nd else 1
        return TritonMetadata(
            slot_mapping=common.slot_mapping, seq_lens=seq_lens_t, query_start_loc=qsl_t,
            block_tables=tables_t.view(num_reqs, tables.shape[1]), num_decodes=nd, num_splits=splits,
            partials=self._partials(nd, splits),
            work_seq=work_seq_t if len(work_seq) else None, work_qblock=work_qblock_t if len(work_seq) else None)

    def _prefill_work(self, qsl: np.ndarray, seq_lens: np.ndarray, nd: int):
        """(sequence, query block) per prefill program, the ones with the most keys first so the
        long programs start early and do not trail the launch."""
        bq = self.block_q
        seqs = np.arange(nd, len(seq_lens))
        q_lens = qsl[nd + 1:] - qsl[nd:-1]
        nblocks = -(-q_lens // bq)
        work_seq = np.repeat(seqs, nblocks)
        starts = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
        work_qblock = np.arange(len(work_seq)) - starts
        context = np.repeat(seq_lens[nd:] - q_lens, nblocks)
        keys = context + np.minimum((work_qblock + 1) * bq, np.repeat(q_lens, nblocks))
        order = np.argsort(-keys, kind="stable")
        return work_seq[order], work_qblock[order]

    # ---- CUDA graphs: decode-only batches of a fixed size ----
    def make_graph_metadata(self, batch_size: int, max_blocks: int) -> TritonMetadata:
        dev = self.spec.device
        splits = self.num_splits(batch_size, max_blocks * self.spec.block_size)
        return TritonMetadata(
            slot_mapping=torch.zeros(batch_size, dtype=torch.int64, device=dev),
            seq_lens=torch.ones(batch_size, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(batch_size + 1, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(batch_size, max_blocks, dtype=torch.int32, device=dev),
            num_decodes=batch_size, num_splits=splits, partials=self._partials(batch_size, splits),
            work_seq=None, work_qblock=None)

    def fill_graph_metadata(self, meta: TritonMetadata, common: CommonAttentionMetadata) -> None:
        batch_size, max_blocks = meta.block_tables.shape
        if common.num_reqs != batch_size or common.num_decodes != batch_size:
            raise ValueError(f"graph metadata is for {batch_size} decodes; got {common.num_decodes} decodes "
                             f"of {common.num_reqs} requests")
        width = common.block_tables.shape[1]
        if width > max_blocks:
            raise ValueError(f"block tables are {width} wide; the graph was captured for {max_blocks}")
        copy_to(meta.block_tables[:, :width], np.asarray(common.block_tables).astype(np.int32, copy=False))
        if width < meta.filled_width:  # columns past this step's tables still hold an earlier step's ids
            meta.block_tables[:, width:meta.filled_width].zero_()
        meta.filled_width = width
        copy_to(meta.seq_lens, np.asarray(common.seq_lens).astype(np.int32, copy=False))
        copy_to(meta.slot_mapping, common.slot_mapping)

    # ---- every layer ----
    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: TritonMetadata, scale: float, out=None):
        """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [num_blocks, 2, block_size, KVH, D] -> [T, H, D]
        (into `out`, contiguous, when given)."""
        # Write first: a chunk reads its own K/V (and a block filled in this same step) from the cache.
        tk.write_kv(k, v, kv_cache, meta.slot_mapping, self.pdl)
        return self._attend(q, kv_cache, meta, scale, out)

    def forward_rope(self, q, k, v, cos, sin, kv_cache: torch.Tensor, meta: TritonMetadata, scale: float, out=None):
        """`forward` on q and k before their rotary embedding (cos / sin [T, 1, D]): the rotation and the KV
        write in one kernel (kernels/fused.py `rope_write_kv`), then attention. Same values as rotating,
        then `forward`."""
        if not fused.rope_write_kv_applies(q, k, v, cos, sin, kv_cache):
            q, k = apply_rotary_qk(q, k, cos, sin, pdl=self.pdl)
            return self.forward(q, k, v, kv_cache, meta, scale, out)
        q = fused.rope_write_kv(q, k, v, cos, sin, kv_cache, meta.slot_mapping, self.pdl)
        return self._attend(q, kv_cache, meta, scale, out)

    def _attend(self, q, kv_cache: torch.Tensor, meta: TritonMetadata, scale: float, out=None):
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        window = self.spec.sliding_window
        tk.decode_attention(out, q, kv_cache, meta.block_tables, meta.seq_lens, meta.num_decodes, scale, window,
                            meta.num_splits, meta.partials, pdl=self.pdl)
        if meta.work_seq is not None:
            tk.prefill_attention(out, q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                 meta.work_seq, meta.work_qblock, self.block_q, scale, window)
        return out
