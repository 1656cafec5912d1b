"""KV cache events: what enters the prefix cache (BlockStored, chained hashes in order with the
parent before them) and what leaves it (BlockRemoved on eviction and on a reset)."""

from __future__ import annotations

from raylight.engine.kv_cache import KVCacheManager
from raylight.engine.kv_cache.block_hash import block_hashes
from raylight.engine.request import Request
from raylight.messages import BlockRemoved, BlockStored
from raylight.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), 8)


def test_stored_then_evicted():
    kv = KVCacheManager(4, 4, record_events=True)
    a = _req("a", list(range(10)))  # two full blocks of 4, one partial
    assert kv.allocate_slots(a, 10)
    h = block_hashes(a.all_token_ids, 4)
    assert kv.take_events() == [BlockStored(tuple(h), None)]
    assert kv.take_events() == []  # taken
    # The request grows into a third full block: stored with its parent.
    a.num_computed_tokens = 10  # as the scheduler's update leaves it
    for t in (10, 11):
        a.append_output_token(t)
    assert kv.allocate_slots(a, 2)
    h3 = block_hashes(a.all_token_ids, 4)
    assert kv.take_events() == [BlockStored((h3[2],), h3[1])]
    kv.free(a)  # the blocks stay cached (free, findable) until the pool needs them back
    assert kv.take_events() == []
    b = _req("b", list(range(100, 116)))  # four blocks: evicts every cached one, oldest first
    assert kv.allocate_slots(b, 16)
    events = kv.take_events()
    removed = [hh for e in events if isinstance(e, BlockRemoved) for hh in e.block_hashes]
    assert sorted(removed) == sorted(h3) and isinstance(events[-1], BlockStored)


def test_reset_removes_everything_and_no_log_when_off():
    kv = KVCacheManager(8, 4, record_events=True)
    a = _req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    kv.free(a)
    kv.take_events()
    assert kv.pool.reset_prefix_cache()
    assert kv.take_events() == [BlockRemoved(tuple(block_hashes(list(range(8)), 4)))]
    quiet = KVCacheManager(8, 4)
    assert quiet.allocate_slots(_req("a", list(range(8))), 8) and quiet.take_events() == []
