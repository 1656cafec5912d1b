"""Programmatic dependent launch (PDL) for our Triton kernels, on Hopper and later.

Why: a batch-1 decode step is ~320 small kernels in one CUDA graph (per layer: two add+RMSNorms,
four projections, rotary, the KV write, decode attention and its combine), and each boundary costs
the next kernel's launch and ramp-up while the previous one drains: about 0.4 ms of an 8B step on
an H200 under the profiler, where the 90%-of-floor target needs 0.1 ms. With PDL the next kernel is
launched while the current one still runs; its programs wait (`griddepcontrol.wait`) until the
current kernel has finished and its writes are visible, so results are unchanged.

The rule every kernel launched this way follows: `gdc_wait()` comes before its first memory access
(reads of a previous kernel's output, and writes that may land where a previous kernel still
reads: a CUDA graph's pool reuses memory), then `gdc_launch_dependents()` lets the next kernel
launch. Both come from one constexpr `PDL` and the launch option `launch_pdl`, set together by
`launch_options`, never one without the other (a kernel launched early without the wait would read
stale data). A kernel that follows one not launched this way (cuBLAS, torch) simply starts after it.

Where: steps of at most PDL_MAX_TOKENS tokens (`KernelConfig.pdl`, on by default; env RAYLIGHT_PDL=0/1),
decode at small batch, where our GEMV kernels carry the projections (one row: always on Hopper; 2-64
rows: at the shapes kernels/gemv.py's few-row table lists), so the chain is ours end to end. Measured on an
H100 (8B shape): batch 1 5.64 ms a step against 5.77 without. Larger steps are cuBLAS GEMMs with small
kernels between; there a kernel launched early only holds SM resources while the GEMM runs (batch 8
with cuBLAS projections: 1,209 tok/s with PDL against 1,223 without), so they launch as before.
"""

from __future__ import annotations

import functools

import torch

from raylight.kernels.config import FEW_ROWS_MAX


@functools.lru_cache(maxsize=None)
def gdc_functions():
    """(gdc_wait, gdc_launch_dependents) from Triton, or (None, None) where this Triton has no
    grid dependency control. Kernels reference them as module globals under `if PDL:`, which Triton
    compiles only when PDL is set."""
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:
        return None, None
    return gdc_wait, gdc_launch_dependents


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and gdc_functions()[0] is not None


# The most tokens (rows of the launch's leading tensor) a step may have for its kernels to launch early:
# the few-row GEMV's limit (kernels/gemv.py MAX_ROWS), where our kernels carry the step.
PDL_MAX_TOKENS = FEW_ROWS_MAX


def launch_options(pdl: bool, t: torch.Tensor) -> dict:
    """The PDL constexpr and launch option for a kernel launch on `t`'s device, `t` being the launch's
    per-token tensor (its first dimension the step's tokens): both on where `pdl` is asked for, the
    step has at most PDL_MAX_TOKENS tokens and the device supports it (CUDA, compute capability 9+,
    Triton with gdc), else PDL off (Triton's CPU interpreter included)."""
    if (pdl and t.is_cuda and t.dim() > 0 and t.shape[0] <= PDL_MAX_TOKENS
            and _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
