"""Per-request block tables over a `BlockPool`, with automatic prefix caching.

Full blocks are identified by a chained hash: hash(parent hash, the block's token ids,
extra keys); the first block's extra key is the request's cache salt, so different
salts never share blocks. A prefix hit is a run of leading block hashes found in the pool.
"""

from __future__ import annotations

from typing import Optional

from raylight.engine.kv_cache.block_hash import block_hashes
from raylight.engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from raylight.engine.kv_cache.block_table import BlockTable
from raylight.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, record_events: bool = False):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching, record_events)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.block_table = BlockTable()  # their ids, one row per request: the runner's tables
        self.num_cached_blocks: dict[str, int] = {}  # how many leading blocks are registered in the cache
        # (src, dst) block copies the runner must do before the next forward: a forked
        # sequence's own copy of its parent's partly filled last block.
        self.pending_copies: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, req: Request) -> None:
        block_hashes(req.all_token_ids, self.block_size, req.cache_salt, parent=req.block_hashes)

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request that has no blocks yet. Leaves at least one token
        to compute, since the last prompt position must run through the model to be sampled."""
        if not self.enable_caching:
            return [], 0
        self.update_block_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in req.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: Optional[list[KVCacheBlock]] = None, cache: bool = True) -> bool:
        """Makes room for `num_new_tokens` more tokens of KV after what `req` has computed
        (and after `computed_blocks`, a prefix hit for a request being scheduled fresh).
        Returns False, changing nothing, when the pool cannot supply the blocks. `cache=False`: the
        new blocks are not entered in the prefix cache yet (a reservation whose KV another replica
        will write: `commit` enters them once it has landed)."""
        if not computed_blocks and cache:
            # The common case, a decode step inside its last block: nothing to allocate, and
            # usually no block newly full to register either.
            blocks = self.req_blocks.get(req.request_id)
            total = req.num_computed_tokens + num_new_tokens
            if blocks and total <= len(blocks) * self.block_size:
                if self.enable_caching and (min(total, req.num_tokens) // self.block_size
                                            > self.num_cached_blocks.get(req.request_id, 0)):
                    self._cache_full_blocks(req, total)
                return True
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(blocks) - len(computed_blocks)
        # Hits that sit in the free queue stop being free once we take them.
        num_hits_in_free_queue = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_hits_in_free_queue > self.pool.num_free_blocks:
            if not blocks:
                self._drop(req.request_id)
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            self.block_table.append(req.request_id, [b.block_id for b in computed_blocks])
            self.num_cached_blocks[req.request_id] = len(computed_blocks)
        if num_new_blocks > 0:
            new = self.pool.get_new_blocks(num_new_blocks)
            blocks.extend(new)
            self.block_table.append(req.request_id, [b.block_id for b in new])
        if cache:
            self._cache_full_blocks(req, total)
        return True

    def commit(self, req: Request, num_tokens: int) -> None:
        """The KV of `req`'s first `num_tokens` tokens is in its blocks now (written by a prefill
        replica): its full blocks join the prefix cache."""
        self._cache_full_blocks(req, num_tokens)

    def detach(self, req: Request) -> list[KVCacheBlock]:
        """Takes `req`'s blocks out of its table without freeing them (they stay referenced): a write
        into them may still land. Give them back with `release` once none can."""
        blocks = self.req_blocks.get(req.request_id, [])
        self._drop(req.request_id)
        return blocks

    def release(self, blocks: list[KVCacheBlock]) -> None:
        self.pool.free_blocks(reversed(blocks))

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Registers the blocks that will be full once this step's tokens are written. Safe within
        the step: every layer writes all new K/V before any attention reads them."""
        if not self.enable_caching:
            return
        num_full = min(num_tokens, req.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(req.request_id, 0)
        if num_full <= start:
            return
        self.update_block_hashes(req)
        blocks = self.req_blocks[req.request_id]
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], req.block_hashes[i])
        if self.pool.events is not None:
            self.pool.stored(req.block_hashes[start:num_full], req.block_hashes[start - 1] if start else None)
        self.num_cached_blocks[req.request_id] = num_full

    def fork(self, parent: Request, child: Request) -> bool:
        """Gives `child` the KV of `parent`'s first `parent.num_computed_tokens` tokens: full blocks
        are shared by reference, a partly filled last block is copied (the two sequences will write
        different tokens into it). Returns False, changing nothing, when no block is free for the copy."""
        bs = self.block_size
        blocks = self.req_blocks[parent.request_id]
        num_full, partial = divmod(parent.num_computed_tokens, bs)
        if partial and self.pool.num_free_blocks < 1:
            return False
        shared = blocks[:num_full]
        self.pool.touch(shared)
        child_blocks = list(shared)
        if partial:
            copy = self.pool.get_new_blocks(1)[0]
            self.pending_copies.append((blocks[num_full].block_id, copy.block_id))
            child_blocks.append(copy)
        self.req_blocks[child.request_id] = child_blocks
        self.block_table.append(child.request_id, [b.block_id for b in child_blocks])
        self.num_cached_blocks[child.request_id] = min(self.num_cached_blocks.get(parent.request_id, 0), num_full)
        child.block_hashes = parent.block_hashes[: min(num_full, parent.num_prompt_tokens // bs)]
        return True

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def take_events(self) -> list:
        """What entered and left the prefix cache since the last call (`BlockStored`, `BlockRemoved`;
        empty unless the manager records events)."""
        return self.pool.take_events()

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.get(req.request_id)
        if blocks:
            # Tail blocks first into the free queue, so they are evicted before the shared prefix.
            self.pool.free_blocks(reversed(blocks))
        self._drop(req.request_id)

    def _drop(self, request_id: str) -> None:
        self.req_blocks.pop(request_id, None)
        self.block_table.release(request_id)
        self.num_cached_blocks.pop(request_id, None)

    def block_ids(self, request_id: str) -> list[int]:  # in order, as plain ints
        return self.block_table.ids(request_id)

    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks
