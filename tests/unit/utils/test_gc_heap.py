"""utils/gc_heap: what is alive at the end of start-up leaves the collector's walks (the permanent
generation); objects made later are collected as before. No collection inside `collector_paused`."""

from __future__ import annotations

import gc

from raylight.utils.gc_heap import collector_paused, freeze_heap


def test_freeze_heap_moves_the_live_objects_out_and_later_garbage_is_still_collected():
    class Node:
        pass

    kept = Node()
    kept.self = kept  # a cycle alive at freeze time
    try:
        freeze_heap("test")
        assert gc.get_freeze_count() > 1000
        assert not any(o is kept for o in gc.get_objects())  # no generation walks it any more
        later = Node()
        later.self = later
        del later
        assert gc.collect() >= 1  # a cycle made after the freeze is still found and freed
    finally:
        gc.unfreeze()


def test_no_collection_runs_inside_collector_paused_and_the_collector_comes_back():
    collected = []

    class Cycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            collected.append(1)

    assert gc.isenabled()
    Cycle()  # garbage from before the block: collected on entry, not inside it
    with collector_paused():
        assert collected == [1] and not gc.isenabled()
        for _ in range(50_000):  # far more allocations than generation 0's threshold
            Cycle()
        assert collected == [1]
    assert gc.isenabled()
    gc.collect()
    assert len(collected) == 50_001


def test_collector_paused_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
