"""SiLU-and-mul over a merged gate/up projection."""

import torch

from raylight.kernels import fused


def silu_and_mul(x: torch.Tensor, fused_kernels: bool = True, pdl: bool = False) -> torch.Tensor:
    """`fused_kernels`: use the fused Triton kernel where it applies (CUDA); KernelConfig.fused_kernels.
    `pdl`: launch it early where supported (kernels/pdl.py)."""
    if fused_kernels and fused.fused_ops_enabled(x.device):  # on CUDA unless switched off
        return fused.silu_and_mul(x, pdl)
    return fused.torch_silu_and_mul(x)
