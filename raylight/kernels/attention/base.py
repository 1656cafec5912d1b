"""The types every attention backend shares: what a step looks like (`CommonAttentionMetadata`),
what a layer's attention is (`AttentionSpec`), the interface a backend offers (`AttentionBackend`),
and the host-to-device helper their `build()`s use. Backends import from here, never from the
package's `__init__` (which picks a backend and so imports them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from raylight.utils.host_copy import to_device


@dataclass
class CommonAttentionMetadata:
    """One engine step, flattened. Requests with a single query token (decodes) come first."""

    num_decodes: int
    query_start_loc: np.ndarray  # [B + 1] host
    seq_lens: np.ndarray  # [B] host: cached context + this step's tokens
    block_tables: np.ndarray  # [B, max_blocks] host
    slot_mapping: torch.Tensor  # [T] device: where each new token's K/V goes

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class AttentionSpec:
    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    sliding_window: Optional[int] = None


ALIGN_INT32 = 4  # 16 bytes


def int32_device_views(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays as int32 views of one device buffer, copied in one transfer. Each view starts on a
    16-byte boundary: Triton specialises a kernel on whether each pointer is 16-byte aligned, so views
    at arbitrary offsets would compile a new variant whenever a step's sizes shift them (the likely
    cause of a 1.4 s Triton prefill step inside a timed H200 run)."""
    padded = [-(-len(p) // ALIGN_INT32) * ALIGN_INT32 for p in parts]
    host = np.zeros(sum(padded), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(int)
    for p, o in zip(parts, offsets):
        host[o : o + len(p)] = p
    dev = to_device(host, device)  # no stream sync
    return [dev[o : o + len(p)] for p, o in zip(parts, offsets)]


@runtime_checkable
class AttentionBackend(Protocol):
    """What the model and the model runner call. Every backend reads and writes the KV layout
    `[num_blocks, 2, block_size, num_kv_heads, head_dim]`. Backends that can run decode steps in a
    CUDA graph set `supports_cuda_graphs` and add `make_graph_metadata(batch_size, max_blocks)` and
    `fill_graph_metadata(meta, common)`; those with kernels to compile ahead add `warmup(kv_cache)`."""

    name: str

    def build(self, common: CommonAttentionMetadata) -> Any:
        """This backend's metadata for one step, shared by every layer."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: Any,
                scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] (written into kv_cache first) -> [T, H, D], written into `out`
        (contiguous) when it is given (the piecewise CUDA graphs' persistent buffer)."""
        ...
