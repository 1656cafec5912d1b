"""Paged attention backends.

Every backend reads and writes the same KV layout, one tensor per layer:
`[num_blocks, 2, block_size, num_kv_heads, head_dim]` (FlashInfer's NHD paged layout).
The model runner describes a step once in `CommonAttentionMetadata`; each backend
turns that into its own metadata with `build()`, shared by all layers of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def get_attention_backend(name: str, device: torch.device):
    if name not in ("auto", "torch"):
        raise ValueError(f"attention_backend {name!r} is not available; supported: auto, torch")
    from raylight.kernels.attention.torch_ref import TorchAttentionBackend

    return TorchAttentionBackend
