"""Expert-parallel dispatch/combine (parallel/ep_buffer.py, ep_low_latency.py) against the DeepEP
contract of moe-parallel.md section 7, one test per contract line, on 1 (no torch.distributed, and
a spawned world of one), 2 and 4 gloo ranks.

Spawning is slow, so each world size is spawned once (a module-scoped fixture) and every rank runs
all checks over three routing scenarios (raylight/testing/ep_ranks.py); the tests below read the
recorded failures of the checks they name.
"""

from __future__ import annotations

import pytest
import torch

from raylight.parallel.ep_buffer import EPBuffer, EventOverlap, make_ep_buffer
from raylight.parallel.ep_low_latency import check_low_latency_args, pair_slots
from raylight.testing import ep_ranks
from raylight.testing.parallel_ranks import run_ranks


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"R{w}")
def ranks(request):
    """-> (world size, per-rank failure dicts). R=1 adds the group=None run in this process."""
    world = request.param
    results = run_ranks(ep_ranks.ep_contract_checks, world, timeout_s=100)
    if world == 1:
        results.append(ep_ranks.ep_contract_checks(0, 1))
    return world, results


def _assert_ok(ranks, checks, scenarios=None):
    world, results = ranks
    scenarios = scenarios or list(ep_ranks.scenarios(world))
    bad = []
    for r, res in enumerate(results):
        for sc in scenarios:
            for check in checks:
                key = f"{sc}/{check}"
                assert key in res, f"check {key} did not run"
                if res[key]:
                    bad.append(f"rank {r} {key}: {res[key][:3]}")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- contract 1: layout, -1, unrouted tokens

def test_layout_matches_python_reference(ranks):
    _assert_ok(ranks, ["layout"])


def test_tokens_without_expert_are_never_sent_and_combine_to_zero(ranks):
    _assert_ok(ranks, ["no_expert_tokens"])


# ---------------------------------------------------------------- contract 2: normal dispatch

def test_each_token_sent_once_per_destination_rank(ranks):
    _assert_ok(ranks, ["once_per_rank"])


def test_rows_grouped_by_source_rank_in_source_order(ranks):
    _assert_ok(ranks, ["source_order"])


def test_recv_topk_idx_local_or_minus_one_and_weights_zero_there(ranks):
    _assert_ok(ranks, ["recv_topk"])


def test_per_expert_counts_match_all_gathered_reference(ranks):
    _assert_ok(ranks, ["expert_counts"])


# ---------------------------------------------------------------- contract 3-5

def test_combine_of_dispatch_is_x_times_receiving_ranks(ranks):
    """fp32 exact, bf16 = (x.float() * n).bfloat16(): accumulated in fp32 and cast once; bias added."""
    _assert_ok(ranks, ["combine_identity"])


def test_num_worst_tokens_fixed_shapes_no_host_sync_prefix_equal(ranks):
    _assert_ok(ranks, ["worst_tokens"])


def test_cached_dispatch_reuses_layout_and_row_order(ranks):
    _assert_ok(ranks, ["cached"])


# ---------------------------------------------------------------- contract 6: low-latency mode

def test_low_latency_recv_count_layout_range_src_info_and_stats(ranks):
    _assert_ok(ranks, ["ll_recv"])


def test_low_latency_combine_is_weighted_sum(ranks):
    _assert_ok(ranks, ["ll_combine"])


def test_low_latency_no_host_sync_and_overflow_raises_early(ranks):
    _assert_ok(ranks, ["ll_no_sync"])


def test_low_latency_fp8_per_128_channel_scales(ranks):
    _assert_ok(ranks, ["ll_fp8"])


# ---------------------------------------------------------------- contract 7: the edge cases

def test_zero_token_ranks(ranks):
    """'uneven': rank 1 has no tokens; 'sparse': ranks 0 and 2 have none (at R=1 the only rank)."""
    _assert_ok(ranks, ep_ranks.CHECKS, ["uneven", "sparse"])


def test_one_expert_per_rank(ranks):
    _assert_ok(ranks, ep_ranks.CHECKS, ["eloc1"])


def test_uneven_splits(ranks):
    _assert_ok(ranks, ep_ranks.CHECKS, ["uneven"])


def test_single_rank_is_local():
    """R = 1 with group None: no torch.distributed at all (the spawned size-1 group runs in `ranks`)."""
    assert not torch.distributed.is_initialized()
    res = ep_ranks.ep_contract_checks(0, 1)
    assert all(not v for v in res.values()), {k: v for k, v in res.items() if v}


def test_all_minus_one_rows_move_nothing():
    buf = EPBuffer(None, 4, 8, 4)
    x = torch.randn(3, 8)
    topk = torch.full((3, 2), -1)
    w = torch.rand(3, 2)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, 4)
    assert per_rank.tolist() == [0] and per_expert.tolist() == [0] * 4 and not in_rank.any()
    rx, ridx, rw, counts, h, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w)
    assert rx.shape == (0, 8) and ridx.shape == (0, 2) and counts == [0] * 4
    assert torch.equal(buf.combine(rx, h)[0], torch.zeros(3, 8))
    lx, cnt, lh, _, _ = buf.low_latency_dispatch(x, topk, 4, 4, use_fp8=False)
    assert cnt.tolist() == [0] * 4 and not lx.any() and (lh.src_info == -1).all()
    assert torch.equal(buf.low_latency_combine(lx, topk, w, lh)[0], torch.zeros(3, 8))


# ---------------------------------------------------------------- contract 8 and end to end

def test_deterministic_bit_identical_fp32_and_bf16(ranks):
    _assert_ok(ranks, ["determinism"])


def test_moe_layer_normal_mode_equals_single_process_moe(ranks):
    _assert_ok(ranks, ["moe_normal"])


def test_moe_layer_low_latency_mode_equals_single_process_moe(ranks):
    _assert_ok(ranks, ["moe_ll"])


# ---------------------------------------------------------------- local API details

def test_pair_slots_rank_pairs_per_expert_in_token_order():
    topk = torch.tensor([[2, 0], [0, -1], [2, 1], [0, 2]])
    pos = pair_slots(topk, 3, 5)  # slot = e * Tmax + rank among this expert's pairs
    assert pos.tolist() == [[10, 0], [1, 15], [11, 5], [2, 12]]


def test_argument_errors_raise_before_any_collective():
    with pytest.raises(ValueError, match="divisible"):  # 3 experts over 2 ranks
        check_low_latency_args(torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long), 2, 3, 3, 2, 8)
    buf = EPBuffer(None, 4, 8, 2)
    with pytest.raises(ValueError, match="exceed"):
        buf.low_latency_dispatch(torch.zeros(3, 8), torch.zeros(3, 1, dtype=torch.long), 2, 4, use_fp8=False)
    with pytest.raises(ValueError, match="exceed"):
        buf.dispatch(torch.zeros(3, 8), topk_idx=torch.zeros(3, 1, dtype=torch.long), num_worst_tokens=8)
    with pytest.raises(ValueError, match="built for"):
        buf.get_dispatch_layout(torch.zeros(1, 1, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="use_fp8=False"):  # hidden 8 is no multiple of 128
        buf.low_latency_dispatch(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.long), 2, 4)
    with pytest.raises(NotImplementedError, match="UE8M0"):
        buf.low_latency_dispatch(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.long), 2, 4, use_ue8m0=True)


def test_normal_dispatch_moves_fp8_with_scales():
    """x given as (e4m3 [T, H], scales [T, H/128]) travels as bytes and comes back as the same pair."""
    from raylight.parallel.ep_low_latency import quantize_fp8_per_128

    buf = EPBuffer(None, 4, 256)
    x = torch.randn(5, 256)
    q, sc = quantize_fp8_per_128(x)
    topk = torch.tensor([[0, 1], [-1, -1], [3, -1], [2, 0], [1, 1]])
    (rq, rsc), *_ , h, _ = buf.dispatch((q, sc), topk_idx=topk, topk_weights=torch.rand(5, 2))
    keep = torch.tensor([0, 2, 3, 4])
    assert rq.dtype == torch.float8_e4m3fn and torch.equal(rq.view(torch.uint8), q[keep].view(torch.uint8))
    assert torch.equal(rsc, sc[keep])
    (cq, csc), *_ = buf.dispatch((q, sc), handle=h)
    assert torch.equal(cq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(csc, rsc)


def test_non_deterministic_combine_gives_the_same_sums():
    """deterministic=False reduces all ranks' rows in one index_add_ (atomics on CUDA): same values."""
    x, topk = torch.randn(6, 8), torch.tensor([[0, 3], [1, -1], [-1, -1], [2, 3], [0, 1], [3, 2]])
    outs = []
    for det in (True, False):
        buf = EPBuffer(None, 4, 8, deterministic=det)
        rx, _, _, _, h, _ = buf.dispatch(x, topk_idx=topk, topk_weights=torch.ones(6, 2))
        outs.append(buf.combine(rx * 2, h)[0])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0][2], torch.zeros(8))


def test_make_ep_buffer_falls_back_to_ours_and_events_are_harmless():
    buf = make_ep_buffer(None, 8, 16, 4)
    assert isinstance(buf, EPBuffer) and buf.world == 1 and buf.num_local_experts == 8
    assert EPBuffer.get_dispatch_config(2) is None and EPBuffer.get_combine_config(2) is None
    ev = EPBuffer.capture()
    assert isinstance(ev, EventOverlap)
    ev.current_stream_wait()
    with ev:
        pass
    x = torch.randn(2, 16)
    topk = torch.tensor([[1, 5], [7, -1]])
    out = buf.dispatch(x, topk_idx=topk, topk_weights=torch.rand(2, 2), previous_event=ev, async_finish=True)
    assert len(out) == 6 and isinstance(out[-1], EventOverlap)
    lx, cnt, h, event, hook = buf.low_latency_dispatch(x, topk, 4, 8, use_fp8=False, return_recv_hook=True)
    hook()
    assert len(buf.low_latency_combine(lx, topk, torch.ones(2, 2), h, return_recv_hook=True)) == 3


def test_forbid_host_sync_catches_host_reads():
    """The no-sync checks are only as good as this guard."""
    t = torch.arange(4)
    for read in (lambda: t.item(), lambda: t.tolist(), lambda: t.nonzero(), lambda: t[t > 1], lambda: bool(t[0])):
        with ep_ranks.forbid_host_sync(), pytest.raises(AssertionError, match="host sync"):
            read()
    assert t.tolist() == [0, 1, 2, 3]  # restored
