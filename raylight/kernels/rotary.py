"""Rotary position embeddings (neox / rotate-half style), with llama3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from raylight.kernels import fused


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    # Computed exactly as transformers does, so float32 outputs match bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")


class RotaryEmbedding(torch.nn.Module):
    """Precomputes cos/sin for every position up to `max_positions` once."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict[str, Any]]):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused_kernels: bool = True) -> torch.Tensor:
    """`fused_kernels`: use the fused Triton kernel where it applies (CUDA); KernelConfig.fused_kernels."""
    if fused_kernels and x.dim() == 3 and fused.fused_ops_enabled(x.device):  # on CUDA unless switched off
        return fused.rotary_qk(x, None, cos, sin)[0]
    return fused.torch_rotary(x, cos, sin)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    fused_kernels: bool = True, pdl: bool = False):
    """apply_rotary on q [T, H, D] and k [T, KVH, D]; one fused launch when the fused kernels are on
    (`pdl`: launched early where supported, kernels/pdl.py)."""
    if fused_kernels and fused.fused_ops_enabled(q.device):
        return fused.rotary_qk(q, k, cos, sin, pdl)
    return apply_rotary(q, cos, sin, fused_kernels), apply_rotary(k, cos, sin, fused_kernels)
