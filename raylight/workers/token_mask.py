"""Per-row allowed-token masks in the batched sampler (structured outputs).

A mask is (rows, bitmask): `rows` a long tensor of the rows it constrains, `bitmask` an int32
tensor [len(rows), ceil(V / 32)] on the logits' device, bit `t % 32` of word `t // 32` set when
token t is allowed. Other rows are left as they are, so constrained and free rows share one step.
xgrammar's kernel applies it where xgrammar is importable (Triton on CUDA, its C++ loop on CPU);
otherwise, or if that kernel fails, the bits are unpacked with torch ops. A log line says which ran.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

logger = logging.getLogger("raylight.sampler")

# A mask source's answer when a constrained row's previous token is still in flight (async
# scheduling): the step's logits are computed now, its sampling waits (ModelRunner.finish_sampling).
DEFER = "defer"

_backend: Optional[str] = None  # "xgrammar" or "torch", chosen on first use
_BITS = {}


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> None:
    """In place: logits[rows[i], t] = -inf where bitmask[i] does not allow t (t < vocab_size); columns
    past vocab_size (padding of the LM head) are never allowed on a constrained row."""
    global _backend
    S, V = logits.shape
    whole = len(rows) == S and logits.is_contiguous()  # every row constrained (in order): no gather/scatter
    target = logits if whole else logits[rows].contiguous()  # the kernels index a dense [R, V] tensor
    if _backend != "torch":
        try:
            import xgrammar as xgr

            xgr.apply_token_bitmask_inplace(target, bitmask, vocab_size=min(vocab_size, V))
            if _backend is None:
                _backend = "xgrammar"
                logger.info("structured outputs: token bitmasks applied by xgrammar's %s kernel",
                            "triton" if logits.device.type == "cuda" else logits.device.type)
        except Exception as e:
            if _backend == "xgrammar":
                raise
            _backend = "torch"
            logger.info("structured outputs: token bitmasks applied with torch ops (xgrammar's kernel "
                        "unavailable: %s)", type(e).__name__)
    if _backend == "torch":
        unpack_apply(target, bitmask, vocab_size)
    if V > vocab_size:
        target[:, vocab_size:] = float("-inf")
    if not whole:
        logits[rows] = target


def unpack_apply(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> None:
    """The torch fallback: bits -> bool [R, V], then masked_fill."""
    V = min(vocab_size, logits.shape[1])
    key = (bitmask.device, bitmask.shape[1])
    shifts = _BITS.get(key)
    if shifts is None:
        shifts = _BITS[key] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :V]
    logits[:, :V].masked_fill_(allowed == 0, float("-inf"))
