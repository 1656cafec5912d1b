"""Writing a step's new K/V into the paged cache at `slot_mapping` (slot = block * block_size + offset).

On CUDA with Triton available this is one fused kernel for K and V; elsewhere two indexed
stores. Both are capturable in a CUDA graph (no host reads of the slots).
"""

from __future__ import annotations

import functools

import torch


@functools.cache  # a pure function of what is installed
def _triton_write_kv():
    try:
        from raylight.kernels.attention.triton_kernels import write_kv as fused
    except Exception:  # no triton (CPU CI) or an older module without the kernel
        return None
    return fused


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, KVH, D]; kv_cache: [num_blocks, 2, block_size, KVH, D]; slot_mapping: [T]."""
    fused = _triton_write_kv() if kv_cache.is_cuda else None
    if fused is not None:
        fused(k, v, kv_cache, slot_mapping)
        return
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_cache[blocks, 0, offsets] = k
    kv_cache[blocks, 1, offsets] = v
