"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

from typing import Optional

import torch

from raylight.kernels import fused


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, fused_kernels: bool = True, pdl: bool = False):
        """`fused_kernels`: use the fused Triton kernel where it applies (CUDA); KernelConfig.fused_kernels.
        `pdl`: launch it early where supported (kernels/pdl.py); KernelConfig.pdl."""
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused_kernels = fused_kernels
        self.pdl = pdl

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without residual: returns norm(x). With residual: returns (norm(x + residual), x + residual)."""
        if self.fused_kernels and fused.fused_ops_enabled(x.device):  # on CUDA unless switched off
            return fused.fused_add_rms_norm(x, residual, self.weight, self.eps, self.pdl)
        return fused.torch_add_rms_norm(x, residual, self.weight, self.eps)
