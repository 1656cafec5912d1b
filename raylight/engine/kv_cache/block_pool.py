"""A fixed pool of KV blocks: O(1) allocate and free, with an LRU of freed-but-cached blocks.

A freed block that holds a full, hashed block of tokens keeps its hash and stays
findable by the prefix cache until the pool needs it back; blocks are reused from the
front of the free queue (least recently freed first).
"""

from __future__ import annotations

from typing import Iterable, Optional

from raylight.messages import BlockRemoved, BlockStored, KVEvent


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[bytes] = None
        self.prev_free: Optional[KVCacheBlock] = None
        self.next_free: Optional[KVCacheBlock] = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list threaded through the blocks themselves: O(1) pop, append and remove-from-middle."""

    def __init__(self, blocks: list[KVCacheBlock]):
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.head.next_free, self.tail.prev_free = self.tail, self.head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.num_free

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self.tail.prev_free = self.tail, block
        self.num_free += 1

    def remove(self, block: KVCacheBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> KVCacheBlock:
        block = self.head.next_free
        if block is self.tail:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, record_events: bool = False):
        """`record_events`: keep a log of what enters and leaves the prefix cache (`take_events`), for
        a router that tracks which replica holds which prefix."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.events: Optional[list[KVEvent]] = [] if record_events and enable_caching else None
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVCacheBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:  # evict its cached content
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                    if self.events is not None:
                        self.events.append(BlockRemoved((block.block_hash,)))
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: bytes) -> Optional[KVCacheBlock]:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference on prefix-cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:  # same content computed twice: keep the first copy findable
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def stored(self, block_hashes: list[bytes], parent_hash: Optional[bytes]) -> None:
        """Logs full blocks that entered the cache, in chain order (see `record_events`)."""
        if self.events is not None and block_hashes:
            self.events.append(BlockStored(tuple(block_hashes), parent_hash))

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, ([] if self.events is not None else None)
        return events or []

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference each; blocks reaching zero go to the back of the free queue."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"double free of {block}"
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        if self.num_free_blocks != self.num_blocks:
            return False
        if self.events is not None and self.cached:
            self.events.append(BlockRemoved(tuple(self.cached)))
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
