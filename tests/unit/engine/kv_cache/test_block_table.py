"""The scheduler's 2-D block table mirrors every request's block-id list through growth, release and row reuse."""

import random

import numpy as np

from raylight.engine.kv_cache.block_table import BlockTable


def test_mirrors_lists_through_growth_release_and_reuse():
    rng = random.Random(0)
    table = BlockTable(num_rows=2, num_cols=2)  # both dimensions must grow
    lists: dict[str, list[int]] = {}
    for step in range(400):
        op = rng.random()
        if op < 0.6 or not lists:
            rid = f"r{rng.randrange(12)}"
            new = [rng.randrange(1, 10_000) for _ in range(rng.randrange(0, 5))]
            table.append(rid, new)
            lists.setdefault(rid, []).extend(new)
        else:
            rid = rng.choice(sorted(lists))
            table.release(rid)
            del lists[rid]
        ids = sorted(lists)
        rng.shuffle(ids)
        got = table.gather(ids)
        width = max((len(lists[r]) for r in ids), default=0)
        assert got.shape == (len(ids), width)
        for r, row in zip(ids, got.tolist()):
            assert row == lists[r] + [0] * (width - len(lists[r])), (step, r)
    assert len(table.row_of) == len(lists)


def test_gather_is_a_snapshot():
    table = BlockTable()
    table.append("a", [3, 4])
    got = table.gather(["a"])
    table.append("a", [5])
    table.release("a")
    table.append("b", [9])  # reuses a's row
    assert got.tolist() == [[3, 4]] and table.gather(["b"]).tolist() == [[9]]
    assert table.gather([]).shape == (0, 0) and got.dtype == np.int64
