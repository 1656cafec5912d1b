"""CUDA graphs for decode-only steps.

A decode step of a small model is a few hundred tiny kernels; launched one by one from
Python the GPU idles between them. We capture the model's forward once per padded batch
size (largest first, all graphs sharing one memory pool) and replay it: the step's inputs
are copied into persistent buffers, the attention backend refreshes its own persistent
metadata in place, and one `replay()` runs every layer.

Padding rows decode token 0 at position 0 against a scratch KV block that the block pool
never hands out, so they cannot disturb real sequences.

Under pipeline parallelism (`stage`: this rank's StageModel) each stage captures its own layers: a
later stage's graph reads the previous stage's (hidden, residual) from persistent input buffers,
and an earlier stage's graph leaves its (hidden, residual) in its output buffers. The hand-offs
themselves stay outside the graph (point-to-point sends are not captured): `run` receives into the
input buffers before the replay and sends the outputs after it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from raylight.kernels.attention import CommonAttentionMetadata
from raylight.utils.gc_heap import collector_paused
from raylight.utils.host_copy import copy_to

logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to the cap (vLLM's spacing: at most 7 padded rows)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if not sizes or sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sorted(set(sizes))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    meta: object  # the backend's persistent metadata for this batch size
    # [batch_size, hidden] output written by every replay; (hidden, residual) on a stage before the last
    hidden: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, backend, kv_caches: list[torch.Tensor], max_batch_size: int,
                 max_blocks_per_seq: int, scratch_block: int, block_size: int, device: torch.device,
                 stage=None):
        self.model = model  # the model itself (under PP this stage's layers, not the StageModel)
        self.stage = stage  # StageModel under pipeline parallelism: the hand-offs around each replay
        self.backend = backend
        self.kv_caches = kv_caches
        self.max_batch_size = max_batch_size
        self.max_blocks = max_blocks_per_seq
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.device = device
        self.sizes = capture_sizes(max_batch_size)
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.intermediate = None  # a later PP stage's (hidden, residual) inputs, [max_batch_size, hidden] each
        if stage is not None and not stage.groups.is_first_stage:
            h = torch.zeros(max_batch_size, stage.config.hidden_size, dtype=stage.dtype, device=device)
            self.intermediate = (h, torch.zeros_like(h))
        self.graphs: dict[int, _Graph] = {}
        self.num_replays = 0

    def can_run(self, num_reqs: int, num_blocks_needed: int) -> bool:
        return bool(self.graphs) and num_reqs <= self.max_batch_size and num_blocks_needed <= self.max_blocks

    def release(self) -> None:
        """Frees every graph (steps run eagerly afterwards). Must precede leaving the torch.distributed
        world under TP: a live graph holds the NCCL communicators its all-reduces were captured on,
        and tearing those down under it hangs (pytorch/pytorch#115388)."""
        if not self.graphs:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for g in self.graphs.values():
            g.graph.reset()
        self.graphs.clear()

    @torch.inference_mode()
    def capture(self) -> float:
        """Captures every size, largest first so smaller graphs reuse the largest one's pool."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        before = torch.cuda.mem_get_info(self.device)[0]
        with collector_paused():
            self._capture_all(pool, stream)
        torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        used = before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1fs, %.2f GiB",
                    len(self.sizes), self.sizes[0], self.sizes[-1], elapsed, used / 2**30)
        return elapsed

    def _capture_all(self, pool, stream) -> None:
        for bs in reversed(self.sizes):
            meta = self.backend.make_graph_metadata(bs, self.max_blocks)
            self.backend.fill_graph_metadata(meta, self._padded(np.zeros(0, np.int64), np.zeros((0, 1), np.int64), bs))
            graph, out = self._record(self._forward_of(bs, meta), pool, stream)
            self.graphs[bs] = _Graph(graph, meta, out)

    def _forward_of(self, bs: int, meta):
        """The forward a graph of `bs` rows captures: the persistent inputs in, its outputs out."""
        ids, pos = self.input_ids[:bs], self.positions[:bs]
        if self.intermediate is None:
            return lambda: self.model(ids, pos, self.kv_caches, meta)
        inter = (self.intermediate[0][:bs], self.intermediate[1][:bs])
        return lambda: self.model(ids, pos, self.kv_caches, meta, inter)

    def _record(self, forward, pool, stream):
        """Captures `forward` into a CUDA graph; returns the graph and the outputs its replays overwrite."""
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: lazy inits, autotuning, workspace growth
                forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = forward()
        return graph, out

    def _padded(self, seq_lens: np.ndarray, block_tables: np.ndarray, bs: int,
                slot_mapping: np.ndarray | None = None) -> CommonAttentionMetadata:
        n = len(seq_lens)
        lens = np.ones(bs, dtype=np.int64)
        lens[:n] = seq_lens
        tables = np.zeros((bs, max(block_tables.shape[1], 1)), dtype=np.int64)
        tables[:n, : block_tables.shape[1]] = block_tables
        tables[n:, 0] = self.scratch_block
        slots = np.full(bs, self.scratch_slot, dtype=np.int64)
        if slot_mapping is not None:
            slots[:n] = slot_mapping
        return CommonAttentionMetadata(num_decodes=bs, query_start_loc=np.arange(bs + 1, dtype=np.int64),
                                       seq_lens=lens, block_tables=tables, slot_mapping=torch.from_numpy(slots))

    def run(self, input_ids: np.ndarray, positions: np.ndarray, seq_lens: np.ndarray, block_tables: np.ndarray,
            slot_mapping: np.ndarray, staged: Optional[torch.cuda.Event] = None,
            fill_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """One decode step of len(seq_lens) rows; returns their final hidden states (None on a PP stage
        before the last, which sends its output on instead). `staged` is
        recorded once the step's inputs are queued for the device, before the replay; `fill_ids`
        (positions, device ids) overwrite input ids on the device (positions None: all of them)."""
        n = len(seq_lens)
        bs = next(s for s in self.sizes if s >= n)
        g = self.graphs[bs]
        if self.intermediate is not None:  # padding rows keep whatever an earlier step left there
            hidden, residual = self.stage.receive(n)
            self.intermediate[0][:n].copy_(hidden)
            self.intermediate[1][:n].copy_(residual)
        # Padding rows decode whatever id their buffer row holds (any id is a valid token) at position 0.
        # Built in page-locked memory, so copy_to queues it as it is (no second host copy).
        pos = torch.zeros(bs, dtype=torch.long, pin_memory=self.device.type == "cuda")
        pos[:n] = torch.from_numpy(positions)
        copy_to(self.positions[:bs], pos)
        if fill_ids is not None and fill_ids[0] is None:
            # Every row's token is a placeholder (async scheduling's steady state): the ids are on the device.
            self.input_ids[:n].copy_(fill_ids[1])
        else:
            copy_to(self.input_ids[:n], input_ids)
            if fill_ids is not None:  # placeholder tokens, sampled by the step before, on the device
                self.input_ids[fill_ids[0]] = fill_ids[1]
        self.backend.fill_graph_metadata(g.meta, self._padded(seq_lens, block_tables, bs, slot_mapping))
        if staged is not None:
            staged.record()
        g.graph.replay()
        self.num_replays += 1
        if isinstance(g.hidden, tuple):  # a PP stage before the last: on to the next stage
            self.stage.send(g.hidden[0][:n], g.hidden[1][:n])
            return None
        return g.hidden[:n]
