"""The piece plan between two KV layouts covers every destination (layer, head) exactly once, from a
source rank that holds it."""

import itertools

import pytest

from raylight.kvtransfer.layout import KVLayout, plan_pieces, senders_to
from raylight.parallel.state import ParallelConfig


def layout(tp: int, pp: int, layers: int = 6, heads: int = 8, kv_heads: int = 4, **kw) -> KVLayout:
    ranges = tuple(ParallelConfig(tp, pp).layer_ranges(layers))
    return KVLayout(layers, heads, kv_heads, 16, kw.get("block_size", 4), kw.get("dtype", "float32"), tp, ranges)


@pytest.mark.parametrize("src,dst", [((1, 1), (1, 1)), ((1, 1), (2, 1)), ((2, 1), (1, 1)), ((2, 1), (4, 1)),
                                     ((4, 1), (2, 1)), ((1, 2), (2, 1)), ((2, 2), (1, 3)), ((1, 1), (8, 1))])
def test_every_destination_head_of_every_layer_once(src, dst):
    s, d = layout(*src), layout(*dst)
    pieces = plan_pieces(s, d)
    covered = {}
    for p in pieces:
        # the source really holds what it sends
        sl, sh = s.layers_of(p.src_rank)
        hl, hh = s.kv_heads_of(p.src_rank)
        assert sl <= p.layer_lo < p.layer_hi <= sh and hl <= p.head_lo < p.head_hi <= hh
        # and the destination really needs it
        dl, dh = d.layers_of(p.dst_rank)
        gl, gh = d.kv_heads_of(p.dst_rank)
        assert dl <= p.layer_lo < p.layer_hi <= dh and gl <= p.head_lo < p.head_hi <= gh
        for key in itertools.product([p.dst_rank], range(p.layer_lo, p.layer_hi), range(p.head_lo, p.head_hi)):
            assert key not in covered, f"{key} sent twice"
            covered[key] = p.src_rank
    need = {(r, layer, h) for r in range(d.world_size) for layer in range(*d.layers_of(r))
            for h in range(*d.kv_heads_of(r))}
    assert set(covered) == need


def test_same_layout_is_rank_to_rank():
    pieces = plan_pieces(layout(2, 2), layout(2, 2))
    assert all(p.src_rank == p.dst_rank for p in pieces)
    assert senders_to(pieces, 3) == {3}


def test_replicated_heads_come_from_one_source():
    # 2 KV heads over tp 4: each head lives on two source ranks; a tp 1 destination gets each once
    pieces = plan_pieces(layout(4, 1, kv_heads=2), layout(1, 1, kv_heads=2))
    assert sorted((p.head_lo, p.head_hi) for p in pieces) == [(0, 1), (1, 2)]
    assert {p.src_rank for p in pieces} == {0, 2}


@pytest.mark.parametrize("field,value", [("block_size", 8), ("dtype", "bfloat16")])
def test_incompatible_layouts_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        plan_pieces(layout(1, 1), layout(1, 1, **{field: value}))


def test_json_round_trip():
    lay = layout(2, 2)
    assert KVLayout.from_json(lay.to_json()) == lay
