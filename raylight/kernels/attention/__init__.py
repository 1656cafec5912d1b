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
    """`auto` on CUDA in half precision with triton importable: our Triton kernels for every step
    (prefill, mixed, CUDA-graph decode), and FlashInfer (when importable, for the model's head dim)
    for the eager steps whose prefill rows attend over long contexts ("triton+flashinfer-long",
    kernels/attention/split_backend.py). Without triton: FlashInfer when importable; else the torch
    reference.

    Why, by same-call H200 measurements: W1 (256 x 512 -> 256, Llama-3.2-1B shape) 49.1k output tok/s
    with Triton alone against 43.9-45.2k with FlashInfer's eager steps (its per-step host plan, and its
    decode kernel for the decode rows of mixed steps); batch-1 8B on par (228.6 / 230.2); but prompts
    of 8,192 tokens prefill at 40 ms per 8,192-token step with FlashInfer against 48 ms with ours
    (benchmarks/results/throughput-gpu-fixed-*-20261204-2034*).

    `kernels`: the engine's KernelConfig (FlashInfer's decode tensor cores); None: from the environment."""
    if kernels is None:
        kernels = KernelConfig.from_args(None)
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "auto" and _triton_usable(spec, allow_interpreter=False):
        from raylight.kernels.attention.split_backend import LONG_PREFILL_MIN_CONTEXT, SplitAttentionBackend

        triton_backend = get_attention_backend("triton", spec, kernels)
        if not _flashinfer_usable(spec):
            return triton_backend
        threshold = int(os.environ.get("RAYLIGHT_LONG_PREFILL_MIN_CONTEXT", LONG_PREFILL_MIN_CONTEXT))
        backend = SplitAttentionBackend(triton_backend, triton_backend,
                                        long=get_attention_backend("flashinfer", spec, kernels),
                                        long_min_context=threshold)
        logger.info("attention backend: %s (from %d tokens of context)", backend.name, threshold)
        return backend
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

        backend = TritonAttentionBackend(spec, pdl=kernels.pdl)
    else:
        from raylight.kernels.attention.torch_ref import TorchAttentionBackend

        backend = TorchAttentionBackend(spec.block_size, spec.sliding_window, spec.device)
    logger.info("attention backend: %s", backend.name)
    return backend
