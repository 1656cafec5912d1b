"""engine/kv_cache/block_hash: the chained hash of full blocks, a pure module a router imports on
its own (no torch), agreeing with what the engine's prefix cache registers."""

from __future__ import annotations

import subprocess
import sys

from raylight.engine.kv_cache import KVCacheManager
from raylight.engine.kv_cache.block_hash import block_hashes, hash_block
from raylight.engine.request import Request
from raylight.sampling_params import SamplingParams


def test_hashes_chain_and_cover_full_blocks_only():
    tokens = list(range(37))
    h = block_hashes(tokens, 16)
    assert len(h) == 2  # 37 tokens: two full blocks of 16
    assert h[0] == hash_block(None, tokens[:16]) and h[1] == hash_block(h[0], tokens[16:32])
    # Same second block after a different first one: a different hash (the chain carries the prefix).
    other = block_hashes([9] * 16 + tokens[16:32], 16)
    assert other[1] != h[1]
    # Extending a known prefix hashes only the new blocks, in place.
    grown = block_hashes(tokens + list(range(11)), 16, parent=list(h))
    assert grown[:2] == h and len(grown) == 3


def test_salt_separates_tenants_from_the_first_block():
    tokens = list(range(32))
    a, b, none = (block_hashes(tokens, 16, salt) for salt in ("tenant-a", "tenant-b", None))
    assert a[0] != b[0] != none[0] and a[1] != b[1]


def test_router_side_hashes_match_the_engine_cache():
    tokens = list(range(50))
    kv = KVCacheManager(16, 16)
    req = Request("r", tokens, SamplingParams(), 8, cache_salt="s")
    assert kv.allocate_slots(req, len(tokens))
    assert req.block_hashes == block_hashes(tokens, 16, "s")
    assert all(kv.pool.get_cached_block(h) is not None for h in req.block_hashes)


def test_importing_it_pulls_in_no_torch():
    code = ("import sys, raylight.engine.kv_cache.block_hash, raylight.messages; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
