"""Bookkeeping tests for engine/kv_cache/block_pool.py: the intrusive free list and the block pool
(allocate / free / ref counts / prefix-cache registration / LRU eviction). CPU only."""

from __future__ import annotations

import random
import time

import pytest

from raylight.engine.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def queue_ids(q: FreeBlockQueue) -> list[int]:
    """Walks the queue front to back and checks the backward links agree with the forward ones."""
    ids = []
    prev = q.head
    node = q.head.next_free
    while node is not q.tail:
        assert node.prev_free is prev, f"broken back link at {node}"
        ids.append(node.block_id)
        prev, node = node, node.next_free
    assert q.tail.prev_free is prev
    assert len(ids) == len(q)
    return ids


def h(i: int) -> bytes:
    return f"hash-{i}".encode()


# --------------------------------------------------------------------------- FreeBlockQueue


def test_queue_initial_order_and_len():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5
    assert queue_ids(q) == [0, 1, 2, 3, 4]


def test_queue_empty():
    q = FreeBlockQueue([])
    assert len(q) == 0
    assert queue_ids(q) == []
    with pytest.raises(RuntimeError):
        q.popleft()


def test_queue_popleft_is_fifo():
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    popped = [q.popleft().block_id for _ in range(4)]
    assert popped == [0, 1, 2, 3]
    assert len(q) == 0
    with pytest.raises(RuntimeError, match="no free KV blocks"):
        q.popleft()


def test_queue_popleft_unlinks_block():
    blocks = [KVCacheBlock(i) for i in range(3)]
    q = FreeBlockQueue(blocks)
    b = q.popleft()
    assert b is blocks[0]
    assert b.prev_free is None and b.next_free is None
    assert queue_ids(q) == [1, 2]


def test_queue_remove_from_middle_relinks_neighbours():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    assert blocks[1].next_free is blocks[3]
    assert blocks[3].prev_free is blocks[1]
    assert len(q) == 4
    assert queue_ids(q) == [0, 1, 3, 4]


def test_queue_remove_first_and_last():
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[0])
    q.remove(blocks[3])
    assert queue_ids(q) == [1, 2]
    assert q.popleft() is blocks[1]
    assert q.popleft() is blocks[2]
    assert len(q) == 0


def test_queue_append_goes_to_back_after_remove():
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[1])
    q.append(blocks[1])
    assert queue_ids(q) == [0, 2, 3, 1]
    assert [q.popleft().block_id for _ in range(4)] == [0, 2, 3, 1]


def test_queue_remove_only_element_then_reuse():
    b = KVCacheBlock(7)
    q = FreeBlockQueue([b])
    q.remove(b)
    assert len(q) == 0 and queue_ids(q) == []
    q.append(b)
    assert queue_ids(q) == [7]
    assert q.popleft() is b


def test_queue_ops_are_constant_time_at_scale():
    """Removing every block of a large queue from random middle positions must be O(1) each:
    a linear-time remove would make this quadratic (~10^10 steps) and blow the time limit."""
    n = 100_000
    blocks = [KVCacheBlock(i) for i in range(n)]
    q = FreeBlockQueue(blocks)
    order = list(range(n))
    random.Random(0).shuffle(order)
    t0 = time.perf_counter()
    for i in order[: n // 2]:
        q.remove(blocks[i])
    for i in order[: n // 2]:
        q.append(blocks[i])
    elapsed = time.perf_counter() - t0
    assert len(q) == n
    expected = sorted(order[n // 2:]) + order[: n // 2]
    assert [q.popleft().block_id for _ in range(n)] == expected
    assert elapsed < 2.0


# --------------------------------------------------------------------------- BlockPool: allocate / free


def test_pool_rejects_empty():
    with pytest.raises(ValueError):
        BlockPool(0)
    with pytest.raises(ValueError):
        BlockPool(-3)


def test_pool_initial_state():
    pool = BlockPool(6)
    assert pool.num_blocks == 6
    assert pool.num_free_blocks == 6
    assert [b.block_id for b in pool.blocks] == list(range(6))
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)
    assert pool.cached == {}
    assert pool.num_evictions == 0


def test_get_new_blocks_sets_ref_and_takes_from_front():
    pool = BlockPool(6)
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in got)
    assert pool.num_free_blocks == 3
    got2 = pool.get_new_blocks(3)
    assert [b.block_id for b in got2] == [3, 4, 5]
    assert pool.num_free_blocks == 0
    assert len({b.block_id for b in got + got2}) == 6


def test_get_zero_blocks():
    pool = BlockPool(2)
    assert pool.get_new_blocks(0) == []
    assert pool.num_free_blocks == 2


def test_asking_for_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    held = pool.get_new_blocks(2)
    pool.cache_block(held[0], h(0))
    pool.free_blocks([held[0]])  # a cached free block that must not be evicted by the failing call
    assert pool.num_free_blocks == 3
    with pytest.raises(RuntimeError, match="asked for 4"):
        pool.get_new_blocks(4)
    assert pool.num_free_blocks == 3
    assert pool.num_evictions == 0
    assert pool.get_cached_block(h(0)) is held[0]
    assert held[0].block_hash == h(0)
    # asking for exactly what is free works
    assert len(pool.get_new_blocks(3)) == 3
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)


def test_free_returns_blocks_to_back_of_queue():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.free_blocks([b, a])
    assert a.ref_cnt == 0 and b.ref_cnt == 0
    assert pool.num_free_blocks == 4
    assert queue_ids(pool.free_queue) == [2, 3, 1, 0]


def test_ref_counts_only_free_at_zero():
    pool = BlockPool(3)
    (blk,) = pool.get_new_blocks(1)
    pool.cache_block(blk, h(1))
    pool.touch([blk])  # a second user takes a reference (as a prefix hit)
    pool.touch([blk])  # and a third
    assert blk.ref_cnt == 3
    assert pool.num_free_blocks == 2
    pool.free_blocks([blk])
    assert blk.ref_cnt == 2 and pool.num_free_blocks == 2
    pool.free_blocks([blk])
    assert blk.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([blk])
    assert blk.ref_cnt == 0 and pool.num_free_blocks == 3
    assert queue_ids(pool.free_queue)[-1] == blk.block_id


def test_double_free_asserts():
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    pool.free_blocks([blk])
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([blk])
    # the block was not appended a second time
    assert queue_ids(pool.free_queue).count(blk.block_id) == 1


def test_double_free_within_one_call_asserts():
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    with pytest.raises(AssertionError):
        pool.free_blocks([blk, blk])


def test_free_everything_allocated_restores_pool():
    pool = BlockPool(8)
    rng = random.Random(1)
    held: list[KVCacheBlock] = []
    for _ in range(200):
        if held and (rng.random() < 0.5 or pool.num_free_blocks == 0):
            blk = held.pop(rng.randrange(len(held)))
            pool.free_blocks([blk])
        else:
            held.extend(pool.get_new_blocks(rng.randint(1, pool.num_free_blocks)))
        assert pool.num_free_blocks + len(held) == 8
        assert len({b.block_id for b in held}) == len(held)
    pool.free_blocks(held)
    assert pool.num_free_blocks == 8
    assert sorted(queue_ids(pool.free_queue)) == list(range(8))


# --------------------------------------------------------------------------- BlockPool: prefix cache


def test_cached_block_is_findable_while_held_and_after_free():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert pool.get_cached_block(h(0)) is None
    pool.cache_block(a, h(0))
    assert a.block_hash == h(0)
    assert pool.get_cached_block(h(0)) is a
    pool.free_blocks([a, b])
    # freed but not evicted: keeps its hash and stays findable
    assert a.ref_cnt == 0
    assert a.block_hash == h(0)
    assert pool.get_cached_block(h(0)) is a
    assert pool.num_free_blocks == 4


def test_freed_cached_block_reusable_until_evicted():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, h(0))
    pool.free_blocks([a])
    # a is the only free block: the next allocation must evict it
    assert pool.get_cached_block(h(0)) is a
    (again,) = pool.get_new_blocks(1)
    assert again is a
    assert a.block_hash is None
    assert pool.get_cached_block(h(0)) is None
    assert h(0) not in pool.cached
    assert pool.num_evictions == 1


def test_uncached_free_blocks_do_not_count_as_evictions():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(blocks)
    pool.get_new_blocks(3)
    assert pool.num_evictions == 0


def test_never_used_blocks_are_handed_out_before_cached_ones():
    pool = BlockPool(6)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, h(0))
    pool.cache_block(b, h(1))
    pool.free_blocks([a, b])
    assert queue_ids(pool.free_queue) == [2, 3, 4, 5, 0, 1]
    fresh = pool.get_new_blocks(4)
    assert [x.block_id for x in fresh] == [2, 3, 4, 5]
    assert pool.get_cached_block(h(0)) is a
    assert pool.get_cached_block(h(1)) is b
    assert pool.num_evictions == 0


def test_eviction_is_lru_least_recently_freed_first():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    for i, blk in enumerate(blocks):
        pool.cache_block(blk, h(i))
    free_order = [2, 0, 3, 1]
    for i in free_order:
        pool.free_blocks([blocks[i]])
    assert queue_ids(pool.free_queue) == free_order
    for n, i in enumerate(free_order):
        (got,) = pool.get_new_blocks(1)
        assert got is blocks[i], f"eviction #{n} should take block {i} (freed {n}th)"
        assert pool.get_cached_block(h(i)) is None
        # every block freed later is still cached
        for j in free_order[n + 1:]:
            assert pool.get_cached_block(h(j)) is blocks[j]
        assert pool.num_evictions == n + 1


def test_touch_pulls_free_cached_block_out_of_free_queue():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, h(0))
    pool.free_blocks([a, b])
    assert pool.num_free_blocks == 4
    hit = pool.get_cached_block(h(0))
    assert hit is a
    pool.touch([hit])
    assert a.ref_cnt == 1
    assert pool.num_free_blocks == 3
    assert a.block_id not in queue_ids(pool.free_queue)
    # allocating everything else must never hand out the touched block
    rest = pool.get_new_blocks(3)
    assert a not in rest
    assert pool.get_cached_block(h(0)) is a  # still cached, not evicted
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)


def test_touch_then_free_moves_block_to_back_of_lru():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    for i, blk in enumerate((a, b, c)):
        pool.cache_block(blk, h(i))
    pool.free_blocks([a, b, c])
    assert queue_ids(pool.free_queue) == [0, 1, 2]
    pool.touch([a])  # used again as a prefix hit...
    pool.free_blocks([a])  # ...and freed: now the most recently freed
    assert queue_ids(pool.free_queue) == [1, 2, 0]
    assert pool.get_new_blocks(1)[0] is b
    assert pool.get_cached_block(h(0)) is a


def test_touch_on_held_block_only_increments_ref():
    pool = BlockPool(3)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, h(0))
    before = queue_ids(pool.free_queue)
    pool.touch([a])
    assert a.ref_cnt == 2
    assert queue_ids(pool.free_queue) == before
    assert pool.num_free_blocks == 2


def test_cache_block_keeps_first_copy_of_duplicate_content():
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, h(0))
    pool.cache_block(b, h(0))
    assert pool.get_cached_block(h(0)) is a
    assert b.block_hash is None
    # freeing and evicting the duplicate must not drop the first copy's entry
    pool.free_blocks([b])
    pool.get_new_blocks(2)  # block 2 then b
    assert pool.get_cached_block(h(0)) is a


def test_cache_block_does_not_rehash_a_hashed_block():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, h(0))
    pool.cache_block(a, h(1))
    assert a.block_hash == h(0)
    assert pool.get_cached_block(h(1)) is None
    assert pool.get_cached_block(h(0)) is a


def test_caching_disabled():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, h(0))
    assert a.block_hash is None
    assert pool.cached == {}
    assert pool.get_cached_block(h(0)) is None
    pool.free_blocks([a])
    assert pool.num_free_blocks == 2


def test_reset_prefix_cache():
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, h(0))
    pool.cache_block(b, h(1))
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is False  # b still in use
    assert pool.get_cached_block(h(0)) is a
    pool.free_blocks([b])
    assert pool.reset_prefix_cache() is True
    assert pool.cached == {}
    assert all(blk.block_hash is None for blk in pool.blocks)
    assert pool.get_cached_block(h(0)) is None
    assert pool.num_free_blocks == 3
