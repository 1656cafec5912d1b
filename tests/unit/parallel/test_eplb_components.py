"""EPLB building blocks on one process: placement maps, logical -> physical routing, the load
recorder's window, per-rank metrics; and the Zipf-router acceptance test (the real routing path)."""

from __future__ import annotations

import pytest
import torch

from raylight.parallel.eplb import (EplbState, ExpertLoadRecorder, ExpertPlacement, balancedness, initial_phy2log,
                                    rebalance_experts, tokens_per_rank)


def test_initial_placement_and_rank_view():
    p = ExpertPlacement(2, 6, 8, 2)
    assert initial_phy2log(6, 8) == [0, 1, 2, 3, 4, 5, 0, 1]
    assert p.phy2log[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert p.width == 3 and p.logcnt[0].tolist() == [2, 2, 1, 1, 1, 1]
    assert p.log2phy[0, 0].tolist() == [0, 6, -1] and p.log2phy[0, 5].tolist() == [5, -1, -1]
    assert p.slots_of_rank(1) == range(4, 8)
    assert p.local_logical(1) == [4, 5, 0, 1]
    with pytest.raises(ValueError, match="split"):
        ExpertPlacement(1, 6, 9, 2)
    with pytest.raises(ValueError, match="without a replica"):
        p.set_layer(0, torch.tensor([0, 0, 1, 2, 3, 4, 0, 1]))


def test_set_layer_updates_in_place():
    p = ExpertPlacement(2, 4, 6, 3)
    ptrs = (p.phy2log.data_ptr(), p.log2phy.data_ptr(), p.logcnt.data_ptr())
    p.set_layer(1, torch.tensor([3, 3, 2, 1, 0, 3]))
    assert ptrs == (p.phy2log.data_ptr(), p.log2phy.data_ptr(), p.logcnt.data_ptr())
    assert p.logcnt[1].tolist() == [1, 1, 1, 3]
    assert p.log2phy[1, 3].tolist() == [0, 1, 5]
    assert p.phy2log[0].tolist() == [0, 1, 2, 3, 0, 1]  # other layers untouched


def test_map_to_physical_round_robin_and_padding():
    p = ExpertPlacement(1, 4, 8, 2)
    p.set_layer(0, torch.tensor([0, 1, 2, 3, 0, 0, 0, 1]))  # expert 0 has 4 replicas: 0, 4, 5, 6
    ids = torch.zeros(8, 2, dtype=torch.long)
    ids[:, 1] = -1
    ids[3, 1] = 1
    out = p.map_to_physical(0, ids)
    assert out[:, 1].tolist() == [-1, -1, -1, 7, -1, -1, -1, -1]  # expert 1: flat position 7 -> replica 1
    col = out[:, 0].tolist()  # flat positions 0, 2, 4, ... -> replicas 0, 2, 0, 2, ...
    assert col == [0, 5, 0, 5, 0, 5, 0, 5]
    # Whole-column spread: every replica gets exactly its share.
    ids = torch.zeros(400, 1, dtype=torch.long)
    assert torch.bincount(p.map_to_physical(0, ids).flatten(), minlength=8).tolist() == [100, 0, 0, 0, 100, 100, 100, 0]
    assert p.map_to_physical(0, torch.empty(0, 2, dtype=torch.long)).shape == (0, 2)
    assert p.map_to_physical(0, ids.int()).dtype == torch.int32


def test_map_to_physical_token_spread_and_no_redundancy():
    p = ExpertPlacement(1, 4, 8, 2, replica_spread="token")
    p.set_layer(0, torch.tensor([0, 1, 2, 3, 0, 0, 0, 1]))
    ids = torch.zeros(8, 2, dtype=torch.long)  # expert 0 at k=0 and k=1 of every token
    out = p.map_to_physical(0, ids)
    assert torch.bincount(out[:, 0], minlength=8).tolist() == [2, 0, 0, 0, 2, 2, 2, 0]
    # P == E: no short-cut, a permutation is applied and stays correct after updates.
    q = ExpertPlacement(1, 4, 4, 2)
    ids = torch.tensor([[0, 1], [2, -1]])
    assert torch.equal(q.map_to_physical(0, ids), ids)
    q.set_layer(0, torch.tensor([2, 3, 0, 1]))
    assert q.map_to_physical(0, ids).tolist() == [[2, 3], [0, -1]]


def test_recorder_counts_and_window_wraparound():
    rec = ExpertLoadRecorder(2, 5, window_size=3)
    ptr = rec.pass_load.data_ptr()
    rec.record(0, torch.tensor([[0, 1], [1, -1], [4, -1]]))
    rec.record(1, torch.tensor([3, 3, 3]))
    assert rec.pass_load.tolist() == [[1, 2, 0, 0, 1], [0, 0, 0, 3, 0]]  # -1 ignored
    rec.end_step()
    assert rec.pass_load.sum() == 0 and rec.pass_load.data_ptr() == ptr
    for step in range(1, 5):  # steps 1..4: one hit on slot 2 each; the window keeps the last 3
        rec.record(0, torch.tensor([2]))
        rec.end_step()
        want_first = step < 3  # the first pass is overwritten at step 3 (slot 3 % 3 == 0)
        load = rec.window_load()
        assert load[0, 2] == min(step, 3) and (load[1, 3] == 3) == want_first
    rec.clear_layer(0)
    assert rec.window_load()[0].sum() == 0
    rec.reset()
    assert rec.window_load().sum() == 0 and rec.steps == 0


def test_recorded_counts_equal_bincount_of_mapped_ids():
    gen = torch.Generator().manual_seed(0)
    p = ExpertPlacement(1, 8, 12, 4)
    rec = ExpertLoadRecorder(1, 12, 2)
    ids = torch.randint(-1, 8, (50, 3), generator=gen)
    phys = p.map_to_physical(0, ids)
    rec.record(0, phys)
    assert torch.equal(rec.pass_load[0], torch.bincount(phys[phys >= 0], minlength=12))
    assert rec.pass_load.sum() == (ids >= 0).sum()
    assert torch.equal(p.logical_load(rec.pass_load)[0], torch.bincount(ids[ids >= 0], minlength=8))


def test_tokens_per_rank():
    load = torch.arange(12).view(1, 12)
    assert tokens_per_rank(load, 3).tolist() == [[6, 22, 38]]


def test_single_rank_state_rebalances_without_a_group():
    p = ExpertPlacement(2, 4, 6, 1)
    rec = ExpertLoadRecorder(2, 6, 2)
    weights = [[torch.arange(6.0).view(6, 1).clone()] for _ in range(2)]
    state = EplbState(p, rec, weights, 0, 1, None, step_interval=3)
    for _ in range(3):
        rec.record(0, p.map_to_physical(0, torch.full((10, 1), 3)))
        rec.record(1, p.map_to_physical(1, torch.full((10, 1), 2)))
        state.step()
    assert state.in_flight
    state.step()
    state.step()
    assert state.num_rebalances == 1 and state.bytes_moved == 0
    assert p.logcnt[0, 3] == 3 and p.logcnt[1, 2] == 3


# ---------------------------------------------------------------- Zipf router acceptance test

NUM_LOGICAL, EP, LAYERS, TOKENS, TOP_K = 64, 8, 4, 4096, 8


def _zipf_router(s: float):
    """Per layer: expert popularity ~ 1/rank^s in a layer-specific random order; each token picks
    TOP_K distinct experts, most popular first more often (like a sorted top-k)."""
    perm_gen = torch.Generator().manual_seed(11)
    pops = [(1.0 / torch.arange(1, NUM_LOGICAL + 1, dtype=torch.float64) ** s)[torch.randperm(NUM_LOGICAL, generator=perm_gen)]
            for _ in range(LAYERS)]

    def route(gen):
        return [torch.multinomial(pop.expand(TOKENS, -1), TOP_K, replacement=False, generator=gen) for pop in pops]
    return route


def _serve(placement: ExpertPlacement, ids_per_layer) -> torch.Tensor:
    rec = ExpertLoadRecorder(LAYERS, placement.num_physical, 1)
    for layer, ids in enumerate(ids_per_layer):
        rec.record(layer, placement.map_to_physical(layer, ids))
    rec.end_step()
    return rec.window_load()


@pytest.mark.parametrize("s", [1.1, 1.2])
def test_zipf_router_balancedness(s):
    route = _zipf_router(s)
    gen = torch.Generator().manual_seed(int(s * 10))
    initial = ExpertPlacement(LAYERS, NUM_LOGICAL, NUM_LOGICAL, EP)
    load = _serve(initial, route(gen))
    before = balancedness(tokens_per_rank(load, EP))
    report = {"s": s, "initial": before}
    assert before["vllm"] < 0.6 and before["sglang"] < 0.6, report
    logical = initial.logical_load(load)
    for redundant in (16, 32):
        phy2log, _, _ = rebalance_experts(logical, NUM_LOGICAL + redundant, 1, 1, EP)
        fresh = route(gen)  # new tokens from the same router, through the real map + record path
        for spread in ("flat", "token"):
            placement = ExpertPlacement(LAYERS, NUM_LOGICAL, NUM_LOGICAL + redundant, EP, replica_spread=spread)
            for layer in range(LAYERS):
                placement.set_layer(layer, phy2log[layer])
            after = balancedness(tokens_per_rank(_serve(placement, fresh), EP))
            report[f"+{redundant} {spread}"] = after
            assert after["vllm"] >= 0.9 and after["sglang"] >= 0.9, report
    print("\nzipf balancedness", {k: ({m: round(x, 3) for m, x in v.items()} if isinstance(v, dict) else v)
                                  for k, v in report.items()})
