"""What the parallel tests run inside each rank, and the launcher that spawns the ranks.

Spawned children import their target by module name, so this module is imported as
`raylight.testing.parallel_ranks` (pytest's importlib mode gives test modules names
that a fresh process cannot import).
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import queue
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raylight.kernels.activation import silu_and_mul
from raylight.kernels.attention import CommonAttentionMetadata
from raylight.kernels.attention.torch_ref import TorchAttentionBackend
from raylight.parallel.layers import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead,
                                      QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding)
from raylight.parallel.pipeline import StageModel
from raylight.parallel.state import ParallelConfig, ParallelGroups, init_distributed, shard_range
from raylight.utils.ports import free_port
from raylight.workers.cuda_graphs import CudaGraphRunner


# ---------------------------------------------------------------- launcher

def _entry(fn, rank, world_size, init_method, args, results):
    torch.set_num_threads(1)  # several ranks share two cores
    try:
        init_distributed(rank, world_size, init_method, "cpu", timeout_s=120)
        out = fn(rank, world_size, *args)
        dist.barrier()  # nobody tears down the store while a peer still talks
        results.put((rank, True, out))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout_s: float = 120.0) -> list:
    """Runs fn(rank, world_size, *args) on `world_size` fresh gloo processes; returns each rank's result
    (rank order) or raises with the first failing rank's traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_method, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died with exit code {dead[0]} before reporting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish in {timeout_s}s; done: {sorted(out)}")
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]


def groups_for(tp: int, pp: int = 1, split=None) -> ParallelGroups:
    return ParallelGroups.from_world(ParallelConfig(tp, pp, split))


# ---------------------------------------------------------------- layers at tp = world size

def _close(a, b, what, rel=1e-6):
    """Equal up to float32 summation order: max error within `rel` of the largest magnitude."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= rel * scale, f"{what}: max abs error {err} at magnitude {scale}"


def layer_checks(rank: int, world_size: int) -> str:
    g = groups_for(world_size)
    tp, r = g.tp_size, g.tp_rank
    torch.manual_seed(0)  # the same full weights and inputs on every rank
    x = torch.randn(5, 24)

    # Column: this rank's output columns; gathered: all of them.
    ref = torch.nn.Linear(24, 10, bias=True)
    for gather in (False, True):
        col = ColumnParallelLinear(24, 10, True, g, gather_output=gather)
        col.weight.weight_loader(col.weight, ref.weight.detach())
        col.bias.weight_loader(col.bias, ref.bias.detach())
        start, n = shard_range(10, tp, r)
        want = ref(x) if gather else ref(x)[:, start : start + n]
        _close(col(x), want, f"column gather={gather}")

    # Merged gate/up, with an uneven intermediate size (7 over 2 ranks: 4 + 3).
    gate, up = torch.nn.Linear(24, 7, bias=False), torch.nn.Linear(24, 7, bias=False)
    merged = MergedColumnParallelLinear(24, [7, 7], False, g)
    merged.weight.weight_loader(merged.weight, gate.weight.detach(), 0)
    merged.weight.weight_loader(merged.weight, up.weight.detach(), 1)
    down = torch.nn.Linear(7, 24, bias=True)
    row = RowParallelLinear(7, 24, True, g)
    row.weight.weight_loader(row.weight, down.weight.detach())
    row.bias.weight_loader(row.bias, down.bias.detach())
    want = down(F.silu(gate(x)) * up(x))
    _close(row(silu_and_mul(merged(x))), want, "merged gate/up -> row (MLP)")

    # Row alone: a split input, an all-reduced output, the bias added once.
    start, n = shard_range(7, tp, r)
    h = torch.randn(5, 7)
    _close(row(h[:, start : start + n]), down(h), "row")

    # QKV: even split, KV heads replicated (1 KV head, 2 ranks), uneven KV groups (3 KV heads, 2 ranks).
    for heads, kv_heads in ((4, 2), (4, 1), (9, 3), (6, 6)):
        d, hidden = 8, 24
        wq, wk, wv = (torch.randn(n * d, hidden) for n in (heads, kv_heads, kv_heads))
        bq, bk, bv = (torch.randn(n * d) for n in (heads, kv_heads, kv_heads))
        qkv = QKVParallelLinear(hidden, d, heads, kv_heads, True, g)
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            qkv.weight.weight_loader(qkv.weight, w, sid)
            qkv.bias.weight_loader(qkv.bias, b, sid)
        q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        hs = qkv.heads
        full_q = F.linear(x, wq, bq).view(5, heads, d)
        full_k = F.linear(x, wk, bk).view(5, kv_heads, d)
        full_v = F.linear(x, wv, bv).view(5, kv_heads, d)
        _close(q.view(5, -1, d), full_q[:, hs.q_start : hs.q_start + hs.num_heads], f"q {heads}/{kv_heads}")
        _close(k.view(5, -1, d), full_k[:, hs.kv_start : hs.kv_start + hs.num_kv_heads], f"k {heads}/{kv_heads}")
        _close(v.view(5, -1, d), full_v[:, hs.kv_start : hs.kv_start + hs.num_kv_heads], f"v {heads}/{kv_heads}")
        # Every query head's KV head is local: global kv index = q index // group.
        group = heads // kv_heads
        for qh in range(hs.q_start, hs.q_start + hs.num_heads):
            assert hs.kv_start <= qh // group < hs.kv_start + hs.num_kv_heads
        # o_proj columns follow the heads: attention output -> o_proj equals the full one.
        wo = torch.randn(hidden, heads * d)
        o = RowParallelLinear(heads * d, hidden, False, g, input_shard=(hs.q_start * d, qkv.q_size))
        o.weight.weight_loader(o.weight, wo)
        attn_out = torch.randn(5, heads * d)
        local = attn_out[:, hs.q_start * d : (hs.q_start + hs.num_heads) * d]
        _close(o(local), F.linear(attn_out, wo), f"o_proj {heads}/{kv_heads}")

    # Vocab not divisible by tp: 509 rows -> 255 + 254 (+1 padding row on the last rank).
    vocab, dim = 509, 16
    table = torch.randn(vocab, dim)
    emb = VocabParallelEmbedding(vocab, dim, g)
    emb.weight.weight_loader(emb.weight, table)
    assert emb.weight.shape[0] == math.ceil(vocab / tp)
    ids = torch.tensor([0, 1, 254, 255, 256, 507, 508, 3, 508])
    assert torch.equal(emb(ids), F.embedding(ids, table)), "vocab-parallel embedding"
    hidden = torch.randn(4, dim)
    for tied in (False, True):
        head = ParallelLMHead(vocab, dim, g, tie_to=emb if tied else None)
        if not tied:
            head.weight.weight_loader(head.weight, table)
        else:
            assert head.weight is emb.weight
        want = F.linear(hidden, table)
        got = head(hidden)
        if r == 0:
            _close(got, want, f"lm head tied={tied}")
        else:
            assert got is None
        _close(head(hidden, gather_all=True), want, f"lm head gather_all tied={tied}")
    # In the model's dtype (float32=False, what the sampler takes): half precision gathered, the same
    # numbers as the float32 logits before their conversion.
    head16 = ParallelLMHead(vocab, dim, g).to(torch.bfloat16)
    head16.weight.weight_loader(head16.weight, table.to(torch.bfloat16))
    raw, full = head16(hidden.bfloat16(), float32=False), head16(hidden.bfloat16())
    if r == 0:
        assert raw.dtype == torch.bfloat16 and full.dtype == torch.float32, "lm head dtypes"
        assert torch.equal(raw.float(), full), "lm head float32=False"
    else:
        assert raw is None and full is None
    return "ok"


def lazy_load_checks(rank: int, world_size: int, path: str) -> int:
    """Narrowing a lazy checkpoint tensor reads this rank's rows only."""
    from raylight.models.loader import iter_safetensors

    g = groups_for(world_size)
    tensors = dict(iter_safetensors(path, torch.float32))
    w = tensors["w"]
    col = ColumnParallelLinear(w.shape[1], w.shape[0], False, g)
    col.weight.weight_loader(col.weight, w)
    start, n = shard_range(w.shape[0], g.tp_size, g.tp_rank)
    full = torch.arange(w.shape[0] * w.shape[1], dtype=torch.float32).view(w.shape)
    assert torch.equal(col.weight, full[start : start + n])
    return col.weight.numel()


# ---------------------------------------------------------------- a sharded model, driven greedily

class _CountingTensor:
    """Wraps a lazy checkpoint tensor and counts the elements actually read."""

    read_elements = 0

    def __init__(self, t):
        self.t, self.shape = t, t.shape

    def narrow(self, dim, start, length):
        out = self.t.narrow(dim, start, length)
        _CountingTensor.read_elements += out.numel()
        return out

    def read(self):
        out = self.t.read()
        _CountingTensor.read_elements += out.numel()
        return out


def _counting_iter(real_iter, path, dtype):
    for name, t in real_iter(path, dtype):
        yield name, _CountingTensor(t)


class _GraphSlot:
    """A decode graph's persistent attention metadata, as far as the torch reference has one."""
    built = None


class GraphTorchAttentionBackend(TorchAttentionBackend):
    """The torch reference with the CUDA-graph metadata calls (make/fill_graph_metadata), so that
    CudaGraphRunner's host side runs on CPU with `ReplayingGraphRunner`."""
    supports_cuda_graphs = True

    def make_graph_metadata(self, batch_size: int, max_blocks: int) -> _GraphSlot:
        return _GraphSlot()

    def fill_graph_metadata(self, meta: _GraphSlot, common: CommonAttentionMetadata) -> None:
        meta.built = self.build(common)

    def forward(self, q, k, v, kv_cache, meta, scale, out=None):
        return super().forward(q, k, v, kv_cache, meta.built if isinstance(meta, _GraphSlot) else meta, scale, out)


class _Replay:
    """Stands in for a captured CUDA graph on CPU: `replay` runs the captured forward again and writes
    its outputs into the tensors the capture returned, as a real replay overwrites them."""

    def __init__(self, forward, out):
        self.forward, self.out = forward, out

    def replay(self) -> None:
        new = self.forward()
        pairs = zip(self.out, new) if isinstance(self.out, tuple) else [(self.out, new)]
        for dst, src in pairs:
            dst.copy_(src)

    def reset(self) -> None:
        pass


class ReplayingGraphRunner(CudaGraphRunner):
    """CudaGraphRunner whose graphs re-run their forward on replay (`_Replay`): padding, persistent
    inputs and a pipeline stage's hand-offs around each replay, tested without a GPU."""

    def capture(self) -> float:
        self._capture_all(None, None)
        return 0.0

    def _record(self, forward, pool, stream):
        out = forward()
        return _Replay(forward, out), out


def build_rank_model(path: str, groups: ParallelGroups, block_size: int, graphs: bool = False):
    from raylight.models import loader

    resolved = loader.resolve_model(path)
    backend_cls = GraphTorchAttentionBackend if graphs else TorchAttentionBackend
    backend = backend_cls(block_size, resolved.arch.sliding_window, torch.device("cpu"))
    _CountingTensor.read_elements = 0
    real_iter = loader.iter_safetensors
    loader.iter_safetensors = functools.partial(_counting_iter, real_iter)
    try:
        model = loader.build_model(resolved, backend, torch.float32, torch.device("cpu"), 256, groups=groups)
    finally:
        loader.iter_safetensors = real_iter
    return model, backend, _CountingTensor.read_elements


@torch.inference_mode()
def greedy_generate(model, backend, groups: ParallelGroups, prompts: list[list[int]], max_new: int,
                    block_size: int, graph_batch: int = 0) -> list[list[int]]:
    """Prefills every prompt in two chunks (the second one attends to cached context), then decodes
    `max_new - 1` steps, every request in every step; the sampling rank's tokens are broadcast to all.
    `graph_batch` > 0: the decode steps run through a ReplayingGraphRunner of that largest batch (the
    backend must be a GraphTorchAttentionBackend), under PP its stage hand-offs included."""
    max_len = max(len(p) for p in prompts) + max_new
    blocks_per_req = -(-max_len // block_size)
    num_blocks = blocks_per_req * len(prompts)
    kv_caches = [torch.zeros(model.kv_cache_shape(num_blocks + 1, block_size))  # + the graphs' scratch block
                 for _ in range(model.num_local_layers)]
    tables = np.arange(num_blocks, dtype=np.int64).reshape(len(prompts), blocks_per_req)
    stage = StageModel(model, groups) if groups.pp_size > 1 else None  # the hand-offs between stages
    graphs = None
    if graph_batch:
        graphs = ReplayingGraphRunner(model, backend, kv_caches, graph_batch, blocks_per_req, scratch_block=num_blocks,
                                      block_size=block_size, device=torch.device("cpu"), stage=stage)
        graphs.capture()
    tokens = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]

    def step(num_new: list[int], sample: bool):
        n = np.array(num_new, dtype=np.int64)
        done = np.array(computed, dtype=np.int64)
        qsl = np.zeros(len(n) + 1, dtype=np.int64)
        np.cumsum(n, out=qsl[1:])
        req = np.repeat(np.arange(len(n)), n)
        pos = done[req] + (np.arange(qsl[-1]) - qsl[req])
        ids = [t for i in range(len(n)) for t in tokens[i][computed[i] : computed[i] + num_new[i]]]
        slots = tables[req, pos // block_size] * block_size + pos % block_size
        common = CommonAttentionMetadata(num_decodes=int((n == 1).sum()) if (n == 1).all() else 0,
                                         query_start_loc=qsl, seq_lens=done + n, block_tables=tables,
                                         slot_mapping=torch.from_numpy(slots))
        if graphs is not None and (n == 1).all():
            hidden = graphs.run(np.array(ids, dtype=np.int64), pos, done + n, tables, slots)
            if groups.is_last_stage:
                assert hidden is not None and hidden.shape[0] == len(n)
            else:
                assert hidden is None  # sent on by the runner
        else:
            hidden = (stage or model)(torch.tensor(ids), torch.from_numpy(pos), kv_caches, backend.build(common))
        for i in range(len(n)):
            computed[i] += num_new[i]
        if not sample:
            return
        next_ids = torch.empty(len(n), dtype=torch.long)
        if groups.is_last_stage:
            logits = model.compute_logits(hidden[torch.from_numpy(qsl[1:] - 1)])
            if groups.samples:
                next_ids = logits.argmax(dim=-1)
        if groups.world_size > 1:
            dist.broadcast(next_ids, src=groups.sampler_rank)
        for i, t in enumerate(next_ids.tolist()):
            tokens[i].append(t)
            out[i].append(t)

    first = [max(1, len(p) // 2) for p in prompts]
    step(first, sample=False)
    step([len(p) - f for p, f in zip(prompts, first)], sample=True)
    for _ in range(max_new - 1):
        step([1] * len(prompts), sample=True)
    if graphs is not None:
        assert graphs.num_replays == max_new - 1
    if stage is not None:
        stage.wait()  # its last send
    return out


def sharded_greedy(rank: int, world_size: int, tp: int, pp: int, split, models: list[tuple[str, list[list[int]]]],
                   max_new: int, block_size: int, graph_batch: int = 0) -> list[dict]:
    groups = groups_for(tp, pp, split)
    results = []
    for path, prompts in models:
        model, backend, read = build_rank_model(path, groups, block_size, graphs=graph_batch > 0)
        results.append(dict(
            tokens=greedy_generate(model, backend, groups, prompts, max_new, block_size, graph_batch),
            numel={k: p.numel() for k, p in model.named_parameters()},
            read_elements=read, layers=model.layer_range,
        ))
    return results
