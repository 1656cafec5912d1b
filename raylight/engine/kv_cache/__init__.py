"""One replica's KV cache bookkeeping: the block pool, per-request block tables with prefix
caching, and the pure block-hash module that a router can import on its own."""

from raylight.engine.kv_cache.block_hash import block_hashes, hash_block
from raylight.engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from raylight.engine.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheBlock", "KVCacheManager", "block_hashes", "hash_block"]
