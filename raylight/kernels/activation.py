"""SiLU-and-mul over a merged gate/up projection."""

import torch

from raylight.kernels import fused


def silu_and_mul(x: torch.Tensor, fused_kernels: bool = True) -> torch.Tensor:
    """`fused_kernels`: use the fused Triton kernel where it applies (CUDA); KernelConfig.fused_kernels."""
    if fused_kernels and fused.fused_ops_enabled(x.device):  # on CUDA unless switched off
        return fused.silu_and_mul(x)
    return fused.torch_silu_and_mul(x)
