"""What the EPLB tests run inside each gloo rank (spawned children import their target by module
name, so these live in an importable module; the launcher is parallel_ranks.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from raylight.parallel.eplb import (EplbState, ExpertLoadRecorder, ExpertPlacement, balancedness, rearrange_layer,
                                    tokens_per_rank)

HIDDEN = 6


def expert_values(logicals: list[int], layer: int, weight_idx: int, shape) -> torch.Tensor:
    """[len(logicals), *shape] weights that encode their own identity (logical*1000 + layer*100 +
    weight_idx*10 + arange), so any slot can be checked locally."""
    base = torch.tensor(logicals, dtype=torch.float32) * 1000 + layer * 100 + weight_idx * 10
    n = int(torch.Size(shape).numel())
    return (base[:, None] + torch.arange(n, dtype=torch.float32)).view(len(logicals), *shape)


def _shapes():
    return [(HIDDEN,), (2, 3)]  # two tensors per layer of different shapes (like w13 and w2)


def fill(weights: list[torch.Tensor], row: list[int], rank: int, per: int, layer: int) -> None:
    for t, w in enumerate(weights):
        w.copy_(expert_values(row[rank * per : (rank + 1) * per], layer, t, w.shape[1:]))


def check(weights: list[torch.Tensor], row: list[int], rank: int, per: int, layer: int, what: str) -> None:
    for t, w in enumerate(weights):
        want = expert_values(row[rank * per : (rank + 1) * per], layer, t, w.shape[1:])
        assert torch.equal(w, want), f"{what}: layer {layer} rank {rank} tensor {t}: {w} != {want}"


def random_map(gen: torch.Generator, num_logical: int, num_physical: int) -> list[int]:
    """Every expert at least once, random redundancy, random slot order."""
    extra = torch.randint(0, num_logical, (num_physical - num_logical,), generator=gen)
    row = torch.cat([torch.arange(num_logical), extra])
    return row[torch.randperm(num_physical, generator=gen)].tolist()


def _expected_bytes(old: list[int], new: list[int], rank: int, per: int, nbytes_per_expert: int) -> int:
    """The lower bound the mover must meet exactly: each expert new to this rank, once."""
    had = set(old[rank * per : (rank + 1) * per])
    return len(set(new[rank * per : (rank + 1) * per]) - had) * nbytes_per_expert


def random_remaps(rank: int, world_size: int, cases: list[tuple[int, int, int, int]]) -> dict:
    """cases: (num_layers, slots_per_rank, num_logical, num_remaps). Chains random remaps per layer;
    after each, every slot must hold the expert the new map names, received bytes must equal the
    lower bound, and (every few remaps) all ranks' replicas of an expert must be identical."""
    group = dist.group.WORLD
    total = 0
    for case_id, (layers, per, num_logical, remaps) in enumerate(cases):
        gen = torch.Generator().manual_seed(1234 + case_id)  # same maps on every rank
        num_physical = per * world_size
        weights = [[torch.empty(per, *s) for s in _shapes()] for _ in range(layers)]
        nbytes = sum(torch.Size(s).numel() * 4 for s in _shapes())
        rows = []
        for layer in range(layers):
            rows.append(random_map(gen, num_logical, num_physical))
            fill(weights[layer], rows[layer], rank, per, layer)
        for i in range(remaps):
            layer = i % layers
            if i % 10 == 0:  # no change at all
                new = list(rows[layer])
            elif i % 5 == 1:  # two slots swap their experts (often across ranks); the rest stay
                new = list(rows[layer])
                a, b = torch.randint(0, num_physical, (2,), generator=gen).tolist()
                new[a], new[b] = new[b], new[a]
            else:
                new = random_map(gen, num_logical, num_physical)
            got = rearrange_layer(torch.tensor(rows[layer]), torch.tensor(new), weights[layer], rank, world_size, group)
            assert got == _expected_bytes(rows[layer], new, rank, per, nbytes), (case_id, i, got)
            if new == rows[layer]:
                assert got == 0
            check(weights[layer], new, rank, per, layer, f"case {case_id} remap {i}")
            rows[layer] = new
            total += 1
            if i % 50 == 0:
                _check_replicas_identical(weights[layer], new, world_size, per)
    return {"remaps": total, "no_change_bytes": no_change(rank, world_size)}


def _check_replicas_identical(weights: list[torch.Tensor], row: list[int], world_size: int, per: int) -> None:
    for w in weights:
        parts = [torch.empty_like(w) for _ in range(world_size)]
        dist.all_gather(parts, w.contiguous())
        full = torch.cat(parts)
        for e in set(row):
            slots = [s for s, x in enumerate(row) if x == e]
            for s in slots[1:]:
                assert torch.equal(full[s], full[slots[0]]), f"replicas of expert {e} differ"


def no_change(rank: int, world_size: int) -> int:
    per, num_logical = 3, 4
    num_physical = per * world_size
    row = random_map(torch.Generator().manual_seed(7), num_logical, num_physical)
    weights = [torch.empty(per, *s) for s in _shapes()]
    fill(weights, row, rank, per, 0)
    got = rearrange_layer(torch.tensor(row), torch.tensor(row), weights, rank, world_size, dist.group.WORLD)
    check(weights, row, rank, per, 0, "no change")
    return got


# ---------------------------------------------------------------- EplbState end to end

def _skewed_ids(gen: torch.Generator, num_tokens: int, num_logical: int, top_k: int, layer: int) -> torch.Tensor:
    """Zipf-like popularity, a different hot expert per layer."""
    pop = 1.0 / torch.arange(1, num_logical + 1, dtype=torch.float64) ** 1.2
    pop = pop.roll(layer * 3)
    return torch.multinomial(pop.expand(num_tokens, num_logical), top_k, replacement=False, generator=gen)


def eplb_state_end_to_end(rank: int, world_size: int) -> dict:
    layers, num_logical, redundant = 3, 8, 4
    num_physical = num_logical + redundant
    per = num_physical // world_size
    placement = ExpertPlacement(layers, num_logical, num_physical, world_size)
    recorder = ExpertLoadRecorder(layers, num_physical, window_size=4)
    weights = [[torch.empty(per, *s) for s in _shapes()] for _ in range(layers)]
    for layer in range(layers):
        fill(weights[layer], placement.phy2log[layer].tolist(), rank, per, layer)
    interval = 5
    state = EplbState(placement, recorder, weights, rank, world_size, dist.group.WORLD, step_interval=interval,
                      log_balancedness=True, log_balancedness_interval=2, first_rebalance_after=4)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank routes its own tokens

    def forward():
        for layer in range(layers):
            ids = _skewed_ids(gen, 64, num_logical, 2, layer)
            recorder.record(layer, placement.map_to_physical(layer, ids))

    def measured():
        # Fresh tokens through the current maps; all-reduced so both ranks see the global number.
        probe = ExpertLoadRecorder(layers, num_physical, 1)
        for layer in range(layers):
            probe.record(layer, placement.map_to_physical(layer, _skewed_ids(gen, 512, num_logical, 2, layer)))
        load = probe.pass_load.clone()
        dist.all_reduce(load)
        return balancedness(tokens_per_rank(load, world_size))

    before = measured()
    maps_before = placement.phy2log.clone()
    for _ in range(4):
        forward()
        state.step()
    assert state.in_flight, "rebalance should have started at step 4"
    assert state.last_balancedness and state.predicted_balancedness
    plan = state.target_map.clone()
    switched = []
    for layer in range(layers):
        forward()
        state.step()
        # Exactly layers 0..layer switched; the rest keep the old map; weights follow the maps.
        for m in range(layers):
            want = plan[m] if m <= layer else maps_before[m]
            assert torch.equal(placement.phy2log[m], want), (layer, m)
            check(weights[m], placement.phy2log[m].tolist(), rank, per, m, f"after step {state.steps}")
        switched.append(state.steps)
    assert not state.in_flight and state.num_rebalances == 1
    after = measured()
    # Keep serving through the next interval (another shuffle may start and run): weights still
    # follow the maps after every step.
    for _ in range(interval + layers):
        forward()
        state.step()
        for layer in range(layers):
            check(weights[layer], placement.phy2log[layer].tolist(), rank, per, layer, "later")
    return {"before": before, "after": after, "switched": switched, "bytes": state.bytes_moved,
            "predicted": state.predicted_balancedness, "rebalances": state.num_rebalances,
            "seconds": state.last_rebalance_s}
