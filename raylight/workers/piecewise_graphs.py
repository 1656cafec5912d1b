"""Piecewise CUDA graphs for the steps a decode graph cannot take: prefill chunks beside decodes.

Why: such a mixed step of a small model launches a few hundred kernels from Python; on an H200 the
host took about 9 ms to launch what the GPU ran in 3-5 ms (ShareGPT-like mix, Llama-3.2-1B shape,
benchmarks/results/throughput-gpu-sharegpt-*-20261205-*), and while the engine loop launches it holds
the GIL the serving threads need. Attention is what keeps these steps out of a whole-step graph: its
work depends on how the step's tokens split into requests. Everything else (embedding, norms,
projections, rotary, MLP, all-reduces) depends only on the token count.

So for each padded token count we capture the model between attention calls: one graph from the
embedding to the first layer's attention inputs, one per layer from its attention output to the next
layer's attention inputs, one to the final norm. A step copies its ids and positions into persistent
buffers and alternates: replay a piece, run that layer's attention eagerly over the real rows (its
backend, with the step's own metadata) into a persistent output buffer the next piece reads. Padding
rows run through the pieces on whatever ids and positions their buffer rows hold, never reach
attention (so never write KV) and are never read.

The capture splits one ordinary forward: the layers' attention backend is swapped for `_Splitter`,
which ends the graph being captured, records the layer's q, k, v and which layer's KV cache it reads,
starts the next graph and hands back the output buffer. All graphs share one memory pool; they only
ever run in the order they were captured, one token count at a time.

Memory: the recorded q, k, v do not keep their memory allocated (`_unowned`). Holding them would keep
every layer's attention inputs of every token count alive in the pool (for an 8B model up to 4,096
tokens, 28 counts x 32 layers: 9.7 GiB by count; an 80 GB H100 ran out of memory at
gpu_memory_utilization 0.85 while capturing them). Unowned, a layer's q, k, v go back to the pool once the next layer's piece starts, and
the next piece (or a smaller count's capture) reuses them. That is safe because a replay writes them
in its piece and the eager attention reads them right after, before any later piece runs: the pool
then holds about one layer's working set at the largest count, as an eager forward does.

The graphs do not depend on the KV cache (attention runs outside them), so they are captured before
the cache is allocated, on stand-in caches, and `bind_kv_caches` hands them the real ones: the
worker then sizes the KV cache from the memory the graphs really took, not from an estimate.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from raylight.utils.gc_heap import collector_paused

logger = logging.getLogger(__name__)


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture: every multiple of 16 up to 128, then four per doubling (160, 192, 224,
    256, 320, ...: at most 25% padding) up to `max_tokens`, which is always included."""
    sizes, s = [], 16
    while s < max_tokens:
        sizes.append(s)
        s += 16 if s < 128 else (1 << (s.bit_length() - 1)) // 4
    sizes.append(max_tokens)
    return sizes


def _unowned(t: torch.Tensor) -> torch.Tensor:
    """A view of `t`'s memory that does not keep it allocated (the caching allocator may hand the
    memory out again once `t` itself is gone). Built from a raw pointer through the CUDA array
    interface, which torch wraps without taking ownership; as bytes, because the interface has no
    bfloat16."""
    storage = t.untyped_storage()

    class _Memory:
        __cuda_array_interface__ = {"version": 3, "shape": (storage.nbytes(),), "typestr": "|u1",
                                    "data": (storage.data_ptr(), False), "strides": None}

    raw = torch.as_tensor(_Memory(), device=t.device)
    if raw.data_ptr() != storage.data_ptr():  # a copy would silently read stale inputs at every replay
        raise RuntimeError("torch copied the memory it was asked to view")
    return raw.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())


@dataclass
class _AttentionCall:
    """One layer's attention inputs as the graph before it leaves them (sliced to a step's rows at replay)."""

    q: torch.Tensor  # unowned views (see the module's docstring)
    k: torch.Tensor
    v: torch.Tensor
    layer: int  # which of the runner's KV caches this attention reads and writes
    scale: float


@dataclass
class _Pieces:
    graphs: list = field(default_factory=list)  # len(calls) + 1 CUDA graphs
    calls: list = field(default_factory=list)
    hidden: Optional[torch.Tensor] = None  # the last graph's output: [tokens, hidden]


class _Splitter:
    """Stands in for the attention backend while a forward is captured (or warmed up)."""

    def __init__(self, out: torch.Tensor, pool, stand_in_caches: list[torch.Tensor]):
        self.out = out
        self.pool = pool
        self.layer_of = {id(c): i for i, c in enumerate(stand_in_caches)}
        self.unowned = True  # False once _unowned failed: the inputs are kept alive instead
        self.pieces: Optional[_Pieces] = None  # None: a warm-up pass, nothing captured

    def forward(self, q, k, v, kv_cache, meta, scale, out=None):
        if self.pieces is not None:
            self.pieces.graphs[-1].capture_end()
            self.pieces.calls.append(_AttentionCall(*self._keep(q, k, v), self.layer_of[id(kv_cache)], scale))
            self.pieces.graphs.append(_begin(self.pool))
        return self.out[: q.shape[0]]

    def _keep(self, *tensors):
        """Unowned views of the attention inputs; the tensors themselves (more memory, same results)
        where this torch cannot make such views."""
        if self.unowned:
            try:
                return [_unowned(t) for t in tensors]
            except Exception as e:  # noqa: BLE001 - any failure: keep the inputs alive instead
                logger.warning("piecewise CUDA graphs keep every layer's attention inputs alive (%s: %s): "
                               "their pool takes more memory", type(e).__name__, e)
                self.unowned = False
        return list(tensors)


def _begin(pool) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool)
    return graph


@contextlib.contextmanager
def _attention_swapped(model: torch.nn.Module, backend, stand_in):
    """Points every module whose `attn` is `backend` at `stand_in` for the duration."""
    swapped = [m for m in model.modules() if getattr(m, "attn", None) is backend]
    for m in swapped:
        m.attn = stand_in
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            m.attn = backend


class PiecewiseGraphRunner:
    def __init__(self, model: torch.nn.Module, backend, num_layers: int, max_tokens: int,
                 num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.backend = backend
        # The capture passes these through the model in place of KV caches (attention is not captured);
        # bind_kv_caches gives the real ones, one per local layer, before any step runs.
        self.stand_in_caches = [torch.empty(0, dtype=dtype, device=device) for _ in range(num_layers)]
        self.kv_caches: Optional[list[torch.Tensor]] = None
        self.sizes = piecewise_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.device = device
        self.input_ids = torch.zeros(self.max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_tokens, dtype=torch.long, device=device)
        # Every layer's attention writes here and the next piece reads it (one buffer: layers run in turn).
        self.attn_out = torch.zeros(self.max_tokens, num_heads, head_dim, dtype=dtype, device=device)
        self.pieces: dict[int, _Pieces] = {}
        self.num_replays = 0
        self.memory_bytes = 0  # what the capture took from the GPU (the pool, as mem_get_info saw it)
        self.inputs_unowned = False  # whether the calls hold unowned views of q, k, v (see _unowned)

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        if len(kv_caches) != len(self.stand_in_caches):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self.stand_in_caches)} layers")
        self.kv_caches = kv_caches

    def can_run(self, num_tokens: int) -> bool:
        return bool(self.pieces) and self.kv_caches is not None and num_tokens <= self.max_tokens

    def release(self) -> None:
        """Frees every graph (see CudaGraphRunner.release: must precede leaving the torch.distributed world)."""
        if not self.pieces:
            return
        torch.cuda.synchronize(self.device)
        for p in self.pieces.values():
            for g in p.graphs:
                g.reset()
        self.pieces.clear()

    @torch.inference_mode()
    def capture(self) -> float:
        """Captures every size, largest first (smaller ones reuse its pool). Every TP rank captures the
        same sizes in the same order: the all-reduces inside the pieces pair up."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        before = torch.cuda.mem_get_info(self.device)[0]
        splitter = _Splitter(self.attn_out, pool, self.stand_in_caches)
        num_graphs = 0
        with collector_paused(), _attention_swapped(self.model, self.backend, splitter) as num_layers:
            if num_layers == 0:
                raise ValueError("the model calls no attention through its backend: nothing to split at")
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for n in reversed(self.sizes):
                    ids, pos = self.input_ids[:n], self.positions[:n]
                    splitter.pieces = None
                    self.model(ids, pos, self.stand_in_caches, None)  # warm-up: lazy inits, GEMM choice
                    pieces = splitter.pieces = _Pieces(graphs=[_begin(pool)])
                    try:
                        pieces.hidden = self.model(ids, pos, self.stand_in_caches, None)
                    except BaseException:  # which size failed: capture_end's own error below would hide it
                        logger.error("capturing the piecewise CUDA graphs of a %d-token step failed", n)
                        raise
                    finally:
                        pieces.graphs[-1].capture_end()
                        splitter.pieces = None
                    self.pieces[n] = pieces
                    num_graphs += len(pieces.graphs)
            torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        used = self.memory_bytes = before - torch.cuda.mem_get_info(self.device)[0]
        self.inputs_unowned = splitter.unowned
        logger.info("captured %d piecewise CUDA graphs (%d token counts %d..%d, %d layers) in %.1fs, %.2f GiB",
                    num_graphs, len(self.sizes), self.sizes[0], self.sizes[-1], num_layers, elapsed, used / 2**30)
        return elapsed

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta) -> torch.Tensor:
        """The model over a step's `len(input_ids)` tokens (device tensors), attention by `attn_meta`
        (the backend's `build()` of this step); returns their final hidden states."""
        n = input_ids.shape[0]
        pieces = self.pieces[next(s for s in self.sizes if s >= n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        out = self.attn_out[:n]
        forward = self.backend.forward
        for graph, call in zip(pieces.graphs, pieces.calls):
            graph.replay()
            forward(call.q[:n], call.k[:n], call.v[:n], self.kv_caches[call.layer], attn_meta, call.scale, out=out)
        pieces.graphs[-1].replay()
        self.num_replays += 1
        return pieces.hidden[:n]
