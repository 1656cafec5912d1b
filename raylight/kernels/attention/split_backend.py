"""Eager steps through one attention backend, CUDA-graph decode steps through another.

Why: on an H200 (W1, batch 256) FlashInfer's prefill is the fastest we have, but its decode wrapper
plans every step on the host, and that plan pushed the step past the GPU's work (5.61 ms per step
against a 4.04 ms graph replay), while our Triton decode only refills its graph buffers in place
(4.50 ms per step against 4.33 ms, same call; benchmarks/results/throughput-gpu-fixed-*-20261122-08*).
Both read and write the one KV layout, so a step may take either.

A third, optional backend takes the eager steps whose prefill rows attend over long contexts
(`long`, from `long_min_context` tokens): the default on CUDA is our Triton kernels everywhere (no
per-step host plan; W1 49.1k against 43.9-45.2k output tok/s with FlashInfer's eager steps, same
H200 call), with FlashInfer's prefill for long contexts, where it is faster (32 x 8,192-token prompts:
40 against 48 ms per 8,192-token step, benchmarks/results/throughput-gpu-fixed-*-20261204-2034*).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylight.kernels.attention.base import CommonAttentionMetadata


@dataclass
class _GraphMeta:
    """Metadata of a captured decode graph: marks the steps the graph backend runs."""

    inner: object


@dataclass
class _LongMeta:
    """Metadata of an eager step with a long-context prefill row: marks the steps the long backend runs."""

    inner: object


# `auto`'s long-context threshold: prefill rows attending over at least this many tokens go to the long
# backend (RAYLIGHT_LONG_PREFILL_MIN_CONTEXT overrides it, for benchmarks that sweep it).
LONG_PREFILL_MIN_CONTEXT = 4096


class SplitAttentionBackend:
    supports_cuda_graphs = True

    def __init__(self, eager, graph, long=None, long_min_context: int = LONG_PREFILL_MIN_CONTEXT):
        if not getattr(graph, "supports_cuda_graphs", False):
            raise ValueError(f"{graph.name} cannot run CUDA graphs")
        self.eager, self.graph, self.long = eager, graph, long
        self.long_min_context = long_min_context
        names = [eager.name] + ([graph.name] if graph is not eager else [])
        self.name = "+".join(names) + (f"+{long.name}-long" if long is not None else "")

    def warmup(self, kv_cache: torch.Tensor) -> None:
        seen = []
        for backend in (self.eager, self.graph, self.long):
            if backend is not None and hasattr(backend, "warmup") and not any(backend is b for b in seen):
                backend.warmup(kv_cache)
                seen.append(backend)

    def uses_long(self, common: CommonAttentionMetadata) -> bool:
        """Whether a prefill row of this step attends over at least `long_min_context` tokens."""
        if self.long is None:
            return False
        nd = common.num_decodes
        return (common.num_reqs > nd
                and int(common.seq_lens[nd:].max()) >= self.long_min_context)

    def build(self, common: CommonAttentionMetadata):
        if self.uses_long(common):
            return _LongMeta(self.long.build(common))
        return self.eager.build(common)

    def make_graph_metadata(self, batch_size: int, max_blocks: int) -> _GraphMeta:
        return _GraphMeta(self.graph.make_graph_metadata(batch_size, max_blocks))

    def fill_graph_metadata(self, meta: _GraphMeta, common: CommonAttentionMetadata) -> None:
        self.graph.fill_graph_metadata(meta.inner, common)

    def _target(self, meta):
        if type(meta) is _GraphMeta:
            return self.graph, meta.inner
        if type(meta) is _LongMeta:
            return self.long, meta.inner
        return self.eager, meta

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta, scale: float, out=None):
        backend, inner = self._target(meta)
        return backend.forward(q, k, v, kv_cache, inner, scale, out=out)

    def forward_rope(self, q, k, v, cos, sin, kv_cache: torch.Tensor, meta, scale: float, out=None):
        """`forward` before the rotary embedding: the backend this step goes to fuses it where it can
        (TritonAttentionBackend.forward_rope); one that cannot gets q and k rotated first."""
        backend, inner = self._target(meta)
        if hasattr(backend, "forward_rope"):
            return backend.forward_rope(q, k, v, cos, sin, kv_cache, inner, scale, out=out)
        from raylight.kernels.rotary import apply_rotary_qk

        q, k = apply_rotary_qk(q, k, cos, sin)
        return backend.forward(q, k, v, kv_cache, inner, scale, out=out)
