"""Paged attention backends.

Every backend reads and writes the same KV layout, one tensor per layer:
`[num_blocks, 2, block_size, num_kv_heads, head_dim]` (FlashInfer's NHD paged layout).
The model runner describes a step once in `CommonAttentionMetadata`; each backend
turns that into its own metadata with `build()`, shared by all layers of the step.

The shared types live in `base.py` (the backends import them from there); this module re-exports
them and picks a backend (`get_attention_backend`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from raylight.kernels.attention.base import (ALIGN_INT32, AttentionBackend, AttentionSpec, CommonAttentionMetadata,
                                             int32_device_views)
from raylight.kernels.config import KernelConfig

__all__ = ["ALIGN_INT32", "AttentionBackend", "AttentionSpec", "BACKENDS", "CommonAttentionMetadata",
           "get_attention_backend", "int32_device_views"]

logger = logging.getLogger("raylight.attention")


FLASHINFER_HEAD_DIMS = (64, 128, 256)  # what its prebuilt and JIT kernels instantiate


def _flashinfer_usable(spec: AttentionSpec) -> bool:
    if spec.device.type != "cuda" or spec.dtype not in (torch.float16, torch.bfloat16):
        return False
    if spec.head_dim not in FLASHINFER_HEAD_DIMS:
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def _triton_usable(spec: AttentionSpec, allow_interpreter: bool) -> bool:
    # The interpreter runs the kernels on CPU tensors: far too slow to serve, fine for tests.
    on_device = spec.device.type == "cuda" or (allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1")
    if not on_device:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ("auto", "torch", "triton", "flashinfer", "flashinfer+triton")


def get_attention_backend(name: str, spec: AttentionSpec, kernels: Optional[KernelConfig] = None):
    """`auto`: FlashInfer on CUDA in half precision when importable, with CUDA-graph decode steps
    through our Triton decode when triton is importable too ("flashinfer+triton"); else our Triton
    kernels on CUDA when triton is importable; else the torch reference.

    Why the split by default: same-call H200 figures (benchmarks/results/*-20261122-110*): W1 at
    batch 256 40.0k output tok/s split vs 37.6k FlashInfer alone (decode replay 3.02 vs 3.49 ms, and
    FlashInfer's per-step decode plan on the host on top); batch-1 8B decode 4.38 vs 4.74 ms
    replay (Triton decode). FlashInfer still runs every prefill and mixed step.

    `kernels`: the engine's KernelConfig (FlashInfer's decode tensor cores); None: from the environment."""
    if kernels is None:
        kernels = KernelConfig.from_args(None)
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "auto" and _flashinfer_usable(spec) and _triton_usable(spec, allow_interpreter=False):
        name = "flashinfer+triton"
    if "+" in name:  # eager steps + CUDA-graph decode steps (kernels/attention/split_backend.py)
        from raylight.kernels.attention.split_backend import SplitAttentionBackend

        eager, graph = name.split("+")
        backend = SplitAttentionBackend(get_attention_backend(eager, spec, kernels),
                                        get_attention_backend(graph, spec, kernels))
        logger.info("attention backend: %s", backend.name)
        return backend
    if name == "flashinfer" or (name == "auto" and _flashinfer_usable(spec)):
        if not _flashinfer_usable(spec):
            raise ValueError("attention_backend='flashinfer' needs a CUDA device, float16/bfloat16, a head_dim in "
                             f"{FLASHINFER_HEAD_DIMS} and the flashinfer package (pip install 'raylight[flashinfer]')")
        from raylight.kernels.attention.flashinfer_backend import FlashInferBackend

        backend = FlashInferBackend(spec, kernels.flashinfer_decode_tensor_cores)
    elif name == "triton" or (name == "auto" and _triton_usable(spec, allow_interpreter=False)):
        if not _triton_usable(spec, allow_interpreter=True):
            raise ValueError("attention_backend='triton' needs a CUDA device and the triton package "
                             f"(got device {spec.device}; TRITON_INTERPRET=1 allows CPU, for tests only)")
        from raylight.kernels.attention.triton_backend import TritonAttentionBackend

        backend = TritonAttentionBackend(spec)
    else:
        from raylight.kernels.attention.torch_ref import TorchAttentionBackend

        backend = TorchAttentionBackend(spec.block_size, spec.sliding_window, spec.device)
    logger.info("attention backend: %s", backend.name)
    return backend
