"""The chained hash of full KV blocks: a pure function of token ids, shared by the engine's
prefix cache and by a router that wants to predict which replica already holds a prompt.

hash(block i) = blake2b(hash(block i - 1), the block's token ids, extra keys); the first
block's extra key is the request's cache salt, so different salts never share blocks.
Nothing here touches torch, the pool or a request.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Optional


def hash_block(parent: Optional[bytes], token_ids: list[int], extra: Optional[str] = None) -> bytes:
    h = hashlib.blake2b(digest_size=32)  # 256 bits: no feasible collision between tenants' blocks
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra is not None:
        h.update(b"\x00salt:" + extra.encode())
    return h.digest()


def block_hashes(token_ids: list[int], block_size: int, cache_salt: Optional[str] = None,
                 parent: Optional[list[bytes]] = None) -> list[bytes]:
    """Hashes of every full block of `token_ids`; `parent` (hashes already known for a prefix of
    them) is extended in place and returned, so a growing sequence hashes each block once."""
    hashes = parent if parent is not None else []
    while (len(hashes) + 1) * block_size <= len(token_ids):
        i = len(hashes)
        prev = hashes[-1] if hashes else None
        hashes.append(hash_block(prev, token_ids[i * block_size : (i + 1) * block_size],
                                 cache_salt if i == 0 else None))
    return hashes
