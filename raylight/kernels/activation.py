"""SiLU-and-mul over a merged gate/up projection."""

import torch

from raylight.kernels import fused


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if fused.fused_ops_enabled(x.device):  # on CUDA unless env RAYLIGHT_FUSED_KERNELS=0
        return fused.silu_and_mul(x)
    return fused.torch_silu_and_mul(x)
