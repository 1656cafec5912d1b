"""Bookkeeping tests for engine/kv_cache/manager.py: chained block hashes, prefix hits,
allocate_slots all-or-nothing semantics, block tables and freeing order. CPU only."""

from __future__ import annotations

import pytest

from raylight.sampling_params import SamplingParams
from raylight.engine.kv_cache import KVCacheManager, hash_block
from raylight.engine.request import Request

BS = 4


def make_req(rid: str, tokens: list[int], salt: str | None = None, max_tokens: int = 16) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), max_tokens, cache_salt=salt)


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> int:
    """Schedules a fresh request the way Scheduler does: prefix lookup, allocation, then the
    step 'computes' the tokens. Returns the number of prefix-hit tokens."""
    hits, num_cached = kv.get_computed_blocks(req)
    n = req.num_tokens - num_cached if num_new is None else num_new
    assert kv.allocate_slots(req, n, hits)
    req.num_computed_tokens = num_cached + n
    return num_cached


def run_step(kv: KVCacheManager, req: Request, num_new: int) -> None:
    """One step for a request that already holds blocks."""
    assert kv.allocate_slots(req, num_new)
    req.num_computed_tokens += num_new


def check_table(kv: KVCacheManager, req: Request) -> list[int]:
    ids = kv.block_ids(req.request_id)
    assert ids == [b.block_id for b in kv.req_blocks[req.request_id]]
    assert len(set(ids)) == len(ids)
    assert len(ids) == kv.blocks_needed(req.num_computed_tokens)
    return ids


def free_queue_ids(kv: KVCacheManager) -> list[int]:
    out, node = [], kv.pool.free_queue.head.next_free
    while node is not kv.pool.free_queue.tail:
        out.append(node.block_id)
        node = node.next_free
    return out


# --------------------------------------------------------------------------- hash_block


def test_hash_block_deterministic_and_fixed_size():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert isinstance(a, bytes) and len(a) == 32


def test_hash_block_same_tokens_same_parent_same_hash():
    p = hash_block(None, [9, 9, 9, 9])
    assert hash_block(p, [1, 2, 3, 4]) == hash_block(p, [1, 2, 3, 4])


def test_hash_block_different_parent_different_hash():
    p1 = hash_block(None, [9, 9, 9, 9])
    p2 = hash_block(None, [9, 9, 9, 8])
    assert p1 != p2
    assert hash_block(p1, [1, 2, 3, 4]) != hash_block(p2, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(p1, [1, 2, 3, 4])


def test_hash_block_different_tokens_different_hash():
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 4, 3])
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 5])
    # large ids are not truncated to a byte
    assert hash_block(None, [1, 2, 3, 256]) != hash_block(None, [1, 2, 3, 0])
    assert hash_block(None, [100_000]) != hash_block(None, [100_001])


def test_hash_block_salt_changes_hash():
    base = hash_block(None, [1, 2, 3, 4])
    s1 = hash_block(None, [1, 2, 3, 4], "alice")
    s2 = hash_block(None, [1, 2, 3, 4], "bob")
    assert len({base, s1, s2}) == 3
    assert s1 == hash_block(None, [1, 2, 3, 4], "alice")


def test_block_hashes_chain_through_the_request():
    toks = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    req = make_req("r", toks, salt="s")
    kv = KVCacheManager(8, BS)
    kv.update_block_hashes(req)
    assert len(req.block_hashes) == 2  # only full blocks are hashed
    h0 = hash_block(None, toks[0:4], "s")
    h1 = hash_block(h0, toks[4:8])  # the salt only enters the first block, then chains
    assert req.block_hashes == [h0, h1]
    # growing the request extends the chain without recomputing the old links
    for t in (7, 8):
        req.append_output_token(t)
    kv.update_block_hashes(req)
    assert req.block_hashes[:2] == [h0, h1]
    assert req.block_hashes[2] == hash_block(h1, toks[8:11] + [7])
    assert len(req.block_hashes) == 3  # 13 tokens: 3 full blocks


def test_salt_propagates_down_the_chain():
    toks = list(range(12))
    a, b = make_req("a", toks, salt="x"), make_req("b", toks, salt="y")
    kv = KVCacheManager(8, BS)
    kv.update_block_hashes(a)
    kv.update_block_hashes(b)
    assert all(ha != hb for ha, hb in zip(a.block_hashes, b.block_hashes))


# --------------------------------------------------------------------------- get_computed_blocks


def test_no_hits_on_empty_cache():
    kv = KVCacheManager(8, BS)
    req = make_req("r", list(range(10)))
    hits, n = kv.get_computed_blocks(req)
    assert hits == [] and n == 0


def test_longest_cached_prefix():
    kv = KVCacheManager(16, BS)
    a = make_req("a", list(range(13)))  # 3 full blocks + 1
    admit(kv, a)
    # b shares the first 2 blocks, diverges in block 2
    b = make_req("b", list(range(8)) + [99, 99, 99, 99, 99, 99])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    assert hits == kv.req_blocks["a"][:2]
    # c shares all 3 full blocks and has more after
    c = make_req("c", list(range(12)) + [50, 51])
    hits, n = kv.get_computed_blocks(c)
    assert n == 12
    assert hits == kv.req_blocks["a"][:3]


def test_hit_stops_at_first_miss_even_if_later_block_tokens_match():
    kv = KVCacheManager(16, BS)
    a = make_req("a", list(range(13)))
    admit(kv, a)
    # block 1 differs; block 2 has the same tokens as a's block 2 but a different parent
    b = make_req("b", list(range(4)) + [77, 77, 77, 77] + list(range(8, 12)) + [1])
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and len(hits) == 1


def test_first_block_miss_means_no_hits():
    kv = KVCacheManager(16, BS)
    admit(kv, make_req("a", list(range(13))))
    hits, n = kv.get_computed_blocks(make_req("b", [0, 1, 2, 3000] + list(range(4, 13))))
    assert hits == [] and n == 0


@pytest.mark.parametrize("num_full", [1, 2, 3])
def test_exact_multiple_of_block_size_leaves_one_token(num_full):
    kv = KVCacheManager(16, BS)
    toks = list(range(num_full * BS))
    admit(kv, make_req("a", toks + [500]))  # caches all num_full blocks
    assert len(kv.pool.cached) == num_full
    same = make_req("b", toks)  # exactly num_full full blocks
    hits, n = kv.get_computed_blocks(same)
    assert len(hits) == num_full - 1
    assert n == (num_full - 1) * BS
    assert same.num_tokens - n >= 1
    longer = make_req("c", toks + [600])  # one more token: every full block can hit
    hits, n = kv.get_computed_blocks(longer)
    assert len(hits) == num_full and n == num_full * BS
    assert longer.num_tokens - n == 1


def test_identical_prompt_still_computes_at_least_one_token():
    kv = KVCacheManager(16, BS)
    toks = list(range(10))
    admit(kv, make_req("a", toks))
    b = make_req("b", toks)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8  # both full blocks; the partial one and at least one token remain
    assert b.num_tokens - n == 2


def test_single_token_and_short_prompts_never_hit():
    kv = KVCacheManager(16, BS)
    admit(kv, make_req("a", [1, 2, 3, 4, 5]))
    for toks in ([1], [1, 2, 3], [1, 2, 3, 4]):
        hits, n = kv.get_computed_blocks(make_req("x", toks))
        assert hits == [] and n == 0


def test_freed_blocks_still_hit_until_evicted():
    kv = KVCacheManager(4, BS)
    a = make_req("a", list(range(9)))  # blocks: 2 full + 1
    admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    hits, n = kv.get_computed_blocks(make_req("b", list(range(9))))
    assert n == 8 and all(b.ref_cnt == 0 for b in hits)
    # fill the whole pool with unrelated content: the cached blocks get evicted
    c = make_req("c", [1000 + i for i in range(16)])
    admit(kv, c)
    hits, n = kv.get_computed_blocks(make_req("d", list(range(9))))
    assert hits == [] and n == 0


def test_caching_disabled_never_hits_and_never_registers():
    kv = KVCacheManager(8, BS, enable_caching=False)
    a = make_req("a", list(range(13)))
    admit(kv, a)
    assert kv.pool.cached == {}
    assert kv.get_computed_blocks(make_req("b", list(range(13)))) == ([], 0)


# --------------------------------------------------------------------------- cache_salt isolation


def test_cache_salt_isolation():
    kv = KVCacheManager(32, BS)
    toks = list(range(13))
    admit(kv, make_req("a", toks, salt="tenant-1"))
    assert kv.get_computed_blocks(make_req("b", toks, salt="tenant-2")) == ([], 0)
    assert kv.get_computed_blocks(make_req("c", toks, salt=None)) == ([], 0)
    hits, n = kv.get_computed_blocks(make_req("d", toks, salt="tenant-1"))
    assert n == 12 and hits == kv.req_blocks["a"][:3]


def test_unsalted_does_not_leak_to_salted():
    kv = KVCacheManager(32, BS)
    toks = list(range(13))
    admit(kv, make_req("a", toks))
    assert kv.get_computed_blocks(make_req("b", toks, salt="s")) == ([], 0)
    hits, n = kv.get_computed_blocks(make_req("c", toks))
    assert n == 12


# --------------------------------------------------------------------------- allocate_slots


def test_allocate_slots_allocates_blocks_needed():
    kv = KVCacheManager(8, BS)
    req = make_req("r", list(range(10)))
    assert kv.allocate_slots(req, 10)
    assert len(kv.block_ids("r")) == 3
    assert kv.num_free_blocks == 5
    assert all(b.ref_cnt == 1 for b in kv.req_blocks["r"])


def test_allocate_slots_short_pool_changes_nothing_fresh_request():
    kv = KVCacheManager(4, BS)
    other = make_req("o", list(range(100, 108)))
    assert kv.allocate_slots(other, 8)  # 2 blocks held
    req = make_req("r", list(range(9)))  # needs 3 blocks, 2 free
    free_before = free_queue_ids(kv)
    refs_before = [b.ref_cnt for b in kv.pool.blocks]
    assert kv.allocate_slots(req, 9) is False
    assert free_queue_ids(kv) == free_before
    assert [b.ref_cnt for b in kv.pool.blocks] == refs_before
    assert "r" not in kv.req_blocks and "r" not in kv.block_table.row_of and "r" not in kv.num_cached_blocks
    assert kv.pool.num_evictions == 0
    # a chunk that fits is fine
    assert kv.allocate_slots(req, 8)
    assert len(kv.block_ids("r")) == 2
    assert kv.num_free_blocks == 0


def test_allocate_slots_short_pool_keeps_running_request_blocks():
    kv = KVCacheManager(3, BS)
    a = make_req("a", list(range(8)))
    admit(kv, a)  # 2 blocks
    b = make_req("b", list(range(100, 104)))
    admit(kv, b)  # 1 block; pool full
    table_before = list(kv.block_ids("a"))
    a.append_output_token(5)
    assert a.num_tokens == 9
    assert kv.allocate_slots(a, 1) is False  # needs a 3rd block
    assert kv.block_ids("a") == table_before
    assert [b.block_id for b in kv.req_blocks["a"]] == table_before
    assert kv.num_free_blocks == 0
    kv.free(b)
    run_step(kv, a, 1)
    assert kv.block_ids("a")[:2] == table_before
    assert len(kv.block_ids("a")) == 3


def test_allocate_slots_counts_free_queue_prefix_hits():
    """Hits that sit in the free queue stop being free when taken: they must be counted
    against the free blocks, or get_new_blocks would run dry halfway through."""
    kv = KVCacheManager(4, BS)
    a = make_req("a", list(range(9)))
    admit(kv, a)
    kv.free(a)  # blocks 0,1 cached and free
    blocker = make_req("x", list(range(500, 504)))
    admit(kv, blocker)  # takes block 3, the never-used one at the front of the free queue
    assert kv.block_ids("x") == [3]
    assert kv.num_free_blocks == 3
    b = make_req("b", list(range(8)) + [70, 71, 72, 73, 74])  # 13 tokens: 4 blocks
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and len(hits) == 2 and all(blk.ref_cnt == 0 for blk in hits)
    # 2 new blocks + 2 hits that stop being free = 4 > 3 free
    free_before = free_queue_ids(kv)
    refs_before = [blk.ref_cnt for blk in kv.pool.blocks]
    cached_before = dict(kv.pool.cached)
    assert kv.allocate_slots(b, b.num_tokens - n, hits) is False
    assert free_queue_ids(kv) == free_before
    assert [blk.ref_cnt for blk in kv.pool.blocks] == refs_before
    assert kv.pool.cached == cached_before
    assert "b" not in kv.req_blocks and "b" not in kv.num_cached_blocks
    # once the blocker leaves, it fits exactly
    kv.free(blocker)
    hits, n = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, b.num_tokens - n, hits)
    assert kv.num_free_blocks == 0
    assert kv.req_blocks["b"][:2] == hits


def test_allocate_with_hits_shares_blocks_and_bumps_refs():
    kv = KVCacheManager(16, BS)
    a = make_req("a", list(range(13)))
    admit(kv, a)
    b = make_req("b", list(range(12)) + [42, 43, 44])
    n_hit = admit(kv, b)
    assert n_hit == 12
    assert kv.block_ids("b")[:3] == kv.block_ids("a")[:3]
    assert kv.block_ids("b")[3] not in kv.block_ids("a")
    for blk in kv.req_blocks["b"][:3]:
        assert blk.ref_cnt == 2
    assert kv.num_cached_blocks["b"] == 3
    assert kv.num_free_blocks == 16 - 4 - 1


def test_full_blocks_are_registered_only_when_full():
    kv = KVCacheManager(16, BS)
    req = make_req("r", list(range(10)))
    # chunk of 3: nothing full
    assert kv.allocate_slots(req, 3)
    req.num_computed_tokens = 3
    assert kv.pool.cached == {}
    # up to 6 tokens: block 0 full
    run_step(kv, req, 3)
    assert kv.req_blocks["r"][0].block_hash is not None
    assert kv.req_blocks["r"][1].block_hash is None
    assert kv.num_cached_blocks["r"] == 1
    # up to 10 tokens: blocks 0,1 full, block 2 partial
    run_step(kv, req, 4)
    assert [b.block_hash is not None for b in kv.req_blocks["r"]] == [True, True, False]
    kv.update_block_hashes(req)
    assert [b.block_hash for b in kv.req_blocks["r"][:2]] == req.block_hashes[:2]
    assert len(kv.pool.cached) == 2


def test_block_table_grows_as_tokens_are_added():
    kv = KVCacheManager(16, BS)
    req = make_req("r", list(range(5)))
    admit(kv, req)
    table = check_table(kv, req)
    assert len(table) == 2
    history = [list(table)]
    for t in range(12):  # decode: one token per step
        req.append_output_token(1000 + t)
        run_step(kv, req, 1)
        table = check_table(kv, req)
        assert table[: len(history[-1])] == history[-1], "existing entries never move"
        history.append(list(table))
    assert req.num_computed_tokens == 17
    assert len(kv.block_ids("r")) == 5
    # the table grew exactly at block boundaries: tokens 9, 13, 17
    lens = [len(x) for x in history]
    assert lens == [2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]
    assert kv.num_free_blocks == 11
    # every full block of the sequence is registered and findable
    kv.update_block_hashes(req)
    for i, hh in enumerate(req.block_hashes[:4]):
        assert kv.pool.get_cached_block(hh) is kv.req_blocks["r"][i]


def test_chunked_prefill_table_growth():
    kv = KVCacheManager(16, BS)
    req = make_req("r", list(range(23)))
    sizes = []
    for chunk in (7, 7, 7, 2):
        assert kv.allocate_slots(req, chunk)
        req.num_computed_tokens += chunk
        sizes.append(len(check_table(kv, req)))
    assert sizes == [2, 4, 6, 6]
    assert kv.num_cached_blocks["r"] == 5


def test_blocks_needed():
    kv = KVCacheManager(4, BS)
    assert [kv.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# --------------------------------------------------------------------------- free


def test_free_returns_every_block():
    kv = KVCacheManager(10, BS)
    reqs = [make_req(f"r{i}", [i * 100 + j for j in range(3 + 4 * i)]) for i in range(3)]
    for r in reqs:
        admit(kv, r)
    assert kv.num_free_blocks == 10 - (1 + 2 + 3)
    assert kv.usage() == pytest.approx(0.6)
    for r in reqs:
        kv.free(r)
    assert kv.num_free_blocks == kv.num_blocks == 10
    assert kv.usage() == 0.0
    assert kv.req_blocks == {} and kv.block_table.row_of == {} and kv.num_cached_blocks == {}
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_free_with_shared_prefix_needs_both_frees():
    kv = KVCacheManager(10, BS)
    a = make_req("a", list(range(9)))
    b = make_req("b", list(range(8)) + [50, 51])
    admit(kv, a)
    admit(kv, b)
    assert kv.num_free_blocks == 10 - 3 - 1
    kv.free(a)
    assert kv.num_free_blocks == 10 - 3  # the 2 shared blocks are still held by b
    assert all(blk.ref_cnt == 1 for blk in kv.req_blocks["b"])
    kv.free(b)
    assert kv.num_free_blocks == 10
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)


def test_free_unknown_or_twice_is_harmless():
    kv = KVCacheManager(4, BS)
    r = make_req("r", list(range(5)))
    kv.free(r)  # never allocated
    admit(kv, r)
    kv.free(r)
    kv.free(r)  # second free is a no-op: the table is gone
    assert kv.num_free_blocks == 4
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_free_puts_tail_blocks_first_in_the_free_queue():
    kv = KVCacheManager(4, BS)
    r = make_req("r", list(range(15)))  # 4 blocks, the whole pool
    admit(kv, r)
    table = list(kv.block_ids("r"))
    assert kv.num_free_blocks == 0
    kv.free(r)
    assert free_queue_ids(kv) == table[::-1]


def test_shared_prefix_survives_eviction_longest():
    kv = KVCacheManager(4, BS)
    r = make_req("r", list(range(16)) + [99])  # would need 5 blocks; compute 16 (4 blocks)
    assert kv.allocate_slots(r, 16)
    r.num_computed_tokens = 16
    kv.update_block_hashes(r)
    hashes = list(r.block_hashes[:4])
    blocks = list(kv.req_blocks["r"])
    kv.free(r)
    # evict one block at a time: the tail goes first, the first block last
    for k in range(1, 4):
        other = make_req(f"o{k}", [5000 + k] * 3)
        admit(kv, other)
        still = [kv.pool.get_cached_block(hh) for hh in hashes]
        assert still[: 4 - k] == blocks[: 4 - k]
        assert all(s is None for s in still[4 - k:])
        # the prefix is still a usable hit of 4 - k blocks
        hits, n = kv.get_computed_blocks(make_req(f"p{k}", list(range(16)) + [99]))
        assert n == (4 - k) * BS


def test_preempt_like_free_and_readmit_hits_own_blocks():
    """A preempted request (blocks freed, num_computed_tokens reset) finds its own blocks again."""
    kv = KVCacheManager(8, BS)
    r = make_req("r", list(range(10)))
    admit(kv, r)
    for t in range(3):
        r.append_output_token(200 + t)
        run_step(kv, r, 1)
    old = list(kv.block_ids("r"))
    kv.free(r)
    r.num_computed_tokens = 0
    hits, n = kv.get_computed_blocks(r)
    assert n == 12  # 13 tokens: 3 full blocks, one to compute
    assert [b.block_id for b in hits] == old[:3]
    assert kv.allocate_slots(r, r.num_tokens - n, hits)
    assert kv.block_ids("r")[:3] == old[:3]
