"""utils/gc_heap: what is alive at the end of start-up leaves the collector's walks (the permanent
generation); objects made later are collected as before."""

from __future__ import annotations

import gc

from raylight.utils.gc_heap import freeze_heap


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
