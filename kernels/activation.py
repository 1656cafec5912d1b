"""SiLU-and-mul over a merged gate/up projection."""

import torch

from raylight.kernels import fused


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if fused.fused_ops_enabled(x.device):  # opt-in: env RAYLIGHT_FUSED_KERNELS=1 on CUDA
        return fused.silu_and_mul(x)
    return fused.torch_silu_and_mul(x)
