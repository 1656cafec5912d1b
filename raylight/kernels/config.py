"""Which of our kernels an engine may use: one frozen `KernelConfig`, built once when the engine
is built (`KernelConfig.from_args(engine_args)`) and passed down explicitly to the attention
backend (`get_attention_backend`), the model and its layers (`build_model`) and the parallel
groups' setup (`ParallelGroups.from_world`). Nothing reads these switches on a hot path.

The environment variables below still override the engine arguments when set to "0" or "1"
(e.g. `RAYLIGHT_FUSED_KERNELS=0` for a whole benchmark run); `from_args` is the one place that
reads them. Any other value (or none) leaves the argument in charge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

# field -> the environment variable that overrides it
ENV_VARS = {
    "fused_kernels": "RAYLIGHT_FUSED_KERNELS",
    "gemv": "RAYLIGHT_GEMV",
    "custom_allreduce": "RAYLIGHT_CUSTOM_ALLREDUCE",
    "flashinfer_decode_tensor_cores": "RAYLIGHT_FI_DECODE_TENSOR_CORES",
    "pdl": "RAYLIGHT_PDL",
    "rope_kv": "RAYLIGHT_ROPE_KV",
}
ROWS_ENV_VAR = "RAYLIGHT_GEMV_MAX_ROWS"  # an integer, unlike the switches above
# The few-row kernel's most rows (kernels/gemv.py MAX_ROWS), and so the largest step PDL launches early
# (kernels/pdl.py PDL_MAX_TOKENS: there our kernels carry the step). One constant for both, here, since
# gemv imports pdl.
FEW_ROWS_MAX = 64
PREFETCH_ENV_VAR = "RAYLIGHT_GEMV_PREFETCH"  # an integer too
# integer field -> (its environment variable, the least value that variable may set)
INT_ENV_VARS = {"gemv_max_rows": (ROWS_ENV_VAR, 1), "gemv_prefetch": (PREFETCH_ENV_VAR, 0)}


@dataclass(frozen=True)
class KernelConfig:
    # The fused Triton elementwise kernels (add+RMSNorm, SiLU-and-mul, rotary; kernels/fused.py)
    # where they apply: a CUDA device with triton importable. False: the torch ops.
    fused_kernels: bool = True
    # The single-row GEMV kernel (kernels/gemv.py) where it applies: one bf16/fp16 row on Hopper.
    gemv: bool = True
    # The one-shot IPC all-reduce under TP (parallel/custom_allreduce.py) where it applies.
    custom_allreduce: bool = True
    # FlashInfer decode through its tensor-core kernels; None: when a KV head serves more than 4 query heads.
    flashinfer_decode_tensor_cores: Optional[bool] = None
    # The most rows a projection may have to go through our Triton kernels instead of cuBLAS: 1 is
    # the single-row GEMV only; 2..64 adds kernels/gemv.py's few-row kernel (decode at small batch) at
    # the shapes its table measured faster than cuBLAS (others stay on cuBLAS). H100, 8B shape, with
    # PDL: batch 8 1,259.7 against 1,208.1 out tok/s at 1, batch 32 4,537.6 against 4,456.3.
    # Env RAYLIGHT_GEMV_MAX_ROWS=<n> overrides.
    gemv_max_rows: int = FEW_ROWS_MAX
    # Programmatic dependent launch for our Triton kernels on Hopper+ (kernels/pdl.py): each kernel
    # launched while the previous one drains, in steps of at most 64 tokens (pdl.PDL_MAX_TOKENS: larger
    # steps launch as before). H100, 8B batch 1: a 5.64 ms step against 5.77 ms without.
    pdl: bool = True
    # With PDL, weight columns per row our GEMV kernels pull toward L2 before waiting for their input
    # (kernels/gemv.py `_prefetch_weight`): the weight stream starts while the previous kernel ends.
    # 0: none. Measured no gain (H100, 8B batch 1: 174.5 out tok/s with 1,024 against 177.0 without;
    # the sweep's kernels 0.5-1 us slower), hence off. Env RAYLIGHT_GEMV_PREFETCH=<n> overrides.
    gemv_prefetch: int = 0
    # Rotary and the KV write in one kernel where the attention backend offers it (the Triton backend's
    # forward_rope): one launch fewer per layer. Measured within noise (H100, 8B batch 1, with PDL and
    # prefetch: 175.3 against 174.5 out tok/s), hence off.
    rope_kv: bool = False

    @classmethod
    def from_args(cls, args=None, environ: Optional[Mapping[str, str]] = None) -> "KernelConfig":
        """From an `EngineArgs` (or anything with these field names; None: the defaults), each
        switch overridden by its environment variable when that is "0" or "1", `gemv_max_rows`
        by RAYLIGHT_GEMV_MAX_ROWS when that is a positive integer and `gemv_prefetch` by
        RAYLIGHT_GEMV_PREFETCH when that is an integer."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, var in ENV_VARS.items():
            value = getattr(args, name, None) if args is not None else None
            forced = environ.get(var)
            if forced in ("0", "1"):
                value = forced == "1"
            if value is not None:
                values[name] = bool(value)
        for name, (var, least) in INT_ENV_VARS.items():
            forced = environ.get(var, "")
            if forced.isdigit() and int(forced) >= least:
                values[name] = int(forced)
            elif getattr(args, name, None) is not None:
                values[name] = int(getattr(args, name))
        return cls(**values)


DEFAULT_KERNELS = KernelConfig()
