"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

from typing import Optional

import torch

from raylight.kernels import fused


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without residual: returns norm(x). With residual: returns (norm(x + residual), x + residual)."""
        if fused.fused_ops_enabled(x.device):  # on CUDA unless env RAYLIGHT_FUSED_KERNELS=0
            return fused.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return fused.torch_add_rms_norm(x, residual, self.weight, self.eps)
