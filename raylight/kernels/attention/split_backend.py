"""Eager steps through one attention backend, CUDA-graph decode steps through another.

Why: on an H200 (W1, batch 256) FlashInfer's prefill is the fastest we have, but its decode wrapper
plans every step on the host, and that plan pushed the step past the GPU's work (5.61 ms per step
against a 4.04 ms graph replay), while our Triton decode only refills its graph buffers in place
(4.50 ms per step against 4.33 ms, same call; benchmarks/results/throughput-gpu-fixed-*-20261122-08*).
Both read and write the one KV layout, so a step may take either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylight.kernels.attention.base import CommonAttentionMetadata


@dataclass
class _GraphMeta:
    """Metadata of a captured decode graph: marks the steps the graph backend runs."""

    inner: object


class SplitAttentionBackend:
    supports_cuda_graphs = True

    def __init__(self, eager, graph):
        if not getattr(graph, "supports_cuda_graphs", False):
            raise ValueError(f"{graph.name} cannot run CUDA graphs")
        self.eager, self.graph = eager, graph
        self.name = f"{eager.name}+{graph.name}"

    def warmup(self, kv_cache: torch.Tensor) -> None:
        for backend in (self.eager, self.graph):
            if hasattr(backend, "warmup"):
                backend.warmup(kv_cache)

    def build(self, common: CommonAttentionMetadata):
        return self.eager.build(common)

    def make_graph_metadata(self, batch_size: int, max_blocks: int) -> _GraphMeta:
        return _GraphMeta(self.graph.make_graph_metadata(batch_size, max_blocks))

    def fill_graph_metadata(self, meta: _GraphMeta, common: CommonAttentionMetadata) -> None:
        self.graph.fill_graph_metadata(meta.inner, common)

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta, scale: float):
        if type(meta) is _GraphMeta:
            return self.graph.forward(q, k, v, kv_cache, meta.inner, scale)
        return self.eager.forward(q, k, v, kv_cache, meta, scale)
