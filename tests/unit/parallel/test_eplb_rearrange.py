"""Live expert weight moves across gloo ranks (2 and 4 processes): after thousands of random
remaps every slot holds exactly the expert its map names, replicas agree, and bytes received equal
the lower bound; then EplbState end to end, switching one layer per step."""

from __future__ import annotations

import time

import torch

from raylight.parallel.eplb import plan_layer, rearrange_layer
from raylight.testing import eplb_ranks
from raylight.testing.parallel_ranks import run_ranks


def test_single_rank_is_local_and_no_change_is_free():
    w = [torch.tensor([[0.0], [1.0], [2.0]])]  # slot j holds expert j
    assert rearrange_layer(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), w, 0, 1, None) == 0
    assert rearrange_layer(torch.tensor([0, 1, 2]), torch.tensor([2, 2, 1]), w, 0, 1, None) == 0
    assert w[0].flatten().tolist() == [2.0, 2.0, 1.0]


def test_plans_pair_up_and_split_receivers_over_holders():
    # 4 ranks x 2 slots; expert 0 held by ranks 0 and 1, needed new by ranks 2 and 3.
    old = [0, 1, 0, 2, 3, 4, 5, 6]
    new = [0, 1, 0, 2, 0, 3, 0, 4]
    plans = [plan_layer(old, new, r, 4) for r in range(4)]
    sends = sorted((r, peer, e) for r, p in enumerate(plans) for e, peer, _ in p.sends)
    recvs = sorted((peer, r, e) for r, p in enumerate(plans) for e, peer, _ in p.recvs)
    assert sends == recvs  # every send has its receive
    assert {peer for e, peer, _ in plans[2].recvs + plans[3].recvs if e == 0} == {0, 1}  # one each
    assert plans[2].local_copies == [(1, 0)]  # expert 3 was on rank 2: local copy, no transfer


def test_random_remaps_two_ranks():
    t0 = time.monotonic()
    # (layers, slots per rank, logical experts, remaps)
    cases = [(1, 2, 3, 300), (2, 3, 4, 400), (4, 8, 16, 400), (3, 5, 6, 400)]
    out = run_ranks(eplb_ranks.random_remaps, 2, cases)
    assert out[0]["remaps"] == 1500
    assert [o["no_change_bytes"] for o in out] == [0, 0]
    print(f"\n2 ranks: 1500 remaps in {time.monotonic() - t0:.1f}s")


def test_random_remaps_four_ranks():
    t0 = time.monotonic()
    cases = [(1, 2, 6, 200), (2, 2, 5, 200), (8, 8, 16, 200), (2, 4, 9, 200)]
    out = run_ranks(eplb_ranks.random_remaps, 4, cases)
    assert out[0]["remaps"] == 800
    assert [o["no_change_bytes"] for o in out] == [0] * 4
    print(f"\n4 ranks: 800 remaps in {time.monotonic() - t0:.1f}s")


def test_eplb_state_end_to_end_two_ranks():
    out = run_ranks(eplb_ranks.eplb_state_end_to_end, 2)
    r0, r1 = out
    assert r0["switched"] == [5, 6, 7]  # rebalance planned at step 4, one layer per later step
    assert r0["rebalances"] >= 1 and r0["bytes"] + r1["bytes"] > 0
    assert r0["before"] == r1["before"] and r0["after"] == r1["after"]
    for metric in ("vllm", "sglang"):
        assert r0["after"][metric] > r0["before"][metric] + 0.1, out
    print(f"\nEplbState 2 ranks: balancedness {r0['before']} -> {r0['after']} (planned {r0['predicted']}), "
          f"{r0['bytes'] + r1['bytes']} bytes moved, {r0['seconds'] * 1e3:.1f} ms")
