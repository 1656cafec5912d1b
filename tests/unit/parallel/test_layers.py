"""Parallel layers: at tp=1 identical to the torch layers they replace; at tp=2 (two gloo
processes) equal to the single-process computation."""

from __future__ import annotations

import pytest
import torch

from raylight.parallel.layers import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead,
                                      QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding, head_shard)
from raylight.parallel.state import ParallelConfig, ParallelGroups, shard_range
from raylight.testing import parallel_ranks as workers


def test_single_process_layers_equal_torch_layers():
    g = ParallelGroups.single()
    torch.manual_seed(0)
    x = torch.randn(7, 32)
    for bias in (False, True):
        ref = torch.nn.Linear(32, 48, bias=bias)
        for layer in (ColumnParallelLinear(32, 48, bias, g), RowParallelLinear(32, 48, bias, g)):
            layer.weight.weight_loader(layer.weight, ref.weight.detach())
            if bias:
                layer.bias.weight_loader(layer.bias, ref.bias.detach())
            assert layer.weight.shape == ref.weight.shape
            assert torch.equal(layer(x), ref(x))
    emb_ref = torch.nn.Embedding(50, 32)
    emb = VocabParallelEmbedding(50, 32, g)
    emb.weight.weight_loader(emb.weight, emb_ref.weight.detach())
    ids = torch.tensor([0, 49, 7, 7])
    assert emb.weight.shape == (50, 32) and torch.equal(emb(ids), emb_ref(ids))
    head = ParallelLMHead(50, 32, g, tie_to=emb)
    assert head.weight is emb.weight
    assert torch.equal(head(x), (emb_ref.weight @ x.t()).t().float())
    half = ParallelLMHead(50, 32, g).to(torch.bfloat16)
    half.weight.weight_loader(half.weight, emb_ref.weight.detach().bfloat16())  # not torch.empty's NaNs
    raw = half(x.bfloat16(), float32=False)
    assert raw.dtype == torch.bfloat16 and torch.equal(raw.float(), half(x.bfloat16()))


def test_single_process_merged_layouts_match_concatenation():
    g = ParallelGroups.single()
    wq, wk, wv = torch.randn(32, 16), torch.randn(16, 16), torch.randn(16, 16)
    qkv = QKVParallelLinear(16, 8, 4, 2, False, g)
    for sid, w in zip("qkv", (wq, wk, wv)):
        qkv.weight.weight_loader(qkv.weight, w, sid)
    assert torch.equal(qkv.weight, torch.cat([wq, wk, wv]))
    gate, up = torch.randn(20, 16), torch.randn(20, 16)
    gu = MergedColumnParallelLinear(16, [20, 20], False, g)
    gu.weight.weight_loader(gu.weight, up, 1)
    gu.weight.weight_loader(gu.weight, gate, 0)
    assert torch.equal(gu.weight, torch.cat([gate, up]))
    with pytest.raises(ValueError, match="shape mismatch"):
        gu.weight.weight_loader(gu.weight, torch.randn(21, 16), 0)


@pytest.mark.parametrize("heads,kv,tp,expected", [
    (8, 8, 2, [(0, 4, 0, 4), (4, 4, 4, 4)]),
    (8, 2, 2, [(0, 4, 0, 1), (4, 4, 1, 1)]),
    (8, 1, 2, [(0, 4, 0, 1), (4, 4, 0, 1)]),  # the single KV head on both ranks
    (8, 2, 4, [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]),
    (9, 3, 2, [(0, 6, 0, 2), (6, 3, 2, 1)]),  # SmolLM2: whole KV groups, unevenly
])
def test_head_shard(heads, kv, tp, expected):
    got = [head_shard(heads, kv, tp, r) for r in range(tp)]
    assert [(h.q_start, h.num_heads, h.kv_start, h.num_kv_heads) for h in got] == expected


def test_head_shard_rejects_impossible_splits():
    with pytest.raises(ValueError, match="cannot split"):
        head_shard(6, 2, 4, 0)  # 4 ranks over 2 KV heads of 3 query heads each


def test_shard_range_and_layer_ranges():
    assert [shard_range(7, 3, r) for r in range(3)] == [(0, 3), (3, 2), (5, 2)]
    assert ParallelConfig(pipeline_parallel_size=3).layer_ranges(8) == [(0, 3), (3, 6), (6, 8)]
    assert ParallelConfig(pipeline_parallel_size=2, pipeline_layer_split=(1, 3)).layer_ranges(4) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match="covers 3 layers"):
        ParallelConfig(pipeline_parallel_size=2, pipeline_layer_split=(1, 2)).layer_ranges(4)
    with pytest.raises(ValueError, match="at least one layer"):
        ParallelConfig(pipeline_parallel_size=2, pipeline_layer_split=(4, 0))
    with pytest.raises(ValueError, match="exceeds"):
        ParallelConfig(pipeline_parallel_size=5).layer_ranges(4)


def test_single_groups_need_no_distributed():
    g = ParallelGroups.from_world(ParallelConfig())
    assert (g.tp_size, g.pp_size, g.rank, g.is_first_stage, g.is_last_stage, g.samples) == (1, 1, 0, True, True, True)
    assert g.prev_rank is None and g.next_rank is None
    x = torch.randn(3, 4)
    assert g.all_reduce(x) is x and g.gather(x) is x and g.all_gather(x) is x


def test_layers_at_tp2():
    assert workers.run_ranks(workers.layer_checks, 2) == ["ok", "ok"]


def test_lazy_checkpoint_tensor_is_narrowed_before_reading(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "w.safetensors")
    save_file({"w": torch.arange(10 * 6, dtype=torch.float32).view(10, 6)}, path)
    assert workers.run_ranks(workers.lazy_load_checks, 2, str(tmp_path)) == [5 * 6, 5 * 6]
