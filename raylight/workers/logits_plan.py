"""The step's logits calls, in the one order every last-stage rank makes them.

Under tensor parallelism each `compute_logits` gathers the vocabulary slices of every TP rank,
so rank 0 and its last-stage peers must make the same calls in the same order, or the replica
deadlocks. The order is the plan carried by `StepInputs`: first one call per prompt-logprob
chunk (`prompt_logit_spans`), then one over the rows that sample (`logits_rows`). Rank 0 and
the other ranks both run this function; only rank 0 keeps what the calls return.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from raylight.messages import StepInputs
from raylight.utils.host_copy import gather_rows

# RAYLIGHT_SAMPLE_IN_MODEL_DTYPE=0: the sampled rows' logits in float32 as before (A/B runs: gpu_run's SMD0/)
SAMPLE_IN_MODEL_DTYPE = os.environ.get("RAYLIGHT_SAMPLE_IN_MODEL_DTYPE", "1") != "0"


def run_logits_plan(model, hidden: torch.Tensor, inputs: StepInputs,
                    on_prompt_chunk: Optional[Callable[[int, torch.Tensor], None]] = None) -> Optional[torch.Tensor]:
    """Makes the step's logits calls; `on_prompt_chunk(i, logits)` receives the i-th prompt-logprob
    chunk's logits (one chunk at a time: [rows, vocab] of all of them could be large). Returns the
    logits of the rows that sample, or None when no row samples."""
    for i, (lo, hi) in enumerate(inputs.prompt_logit_spans):
        logits = model.compute_logits(hidden[lo:hi])
        if on_prompt_chunk is not None:
            on_prompt_chunk(i, logits)
    if not len(inputs.logits_rows):
        return None
    # In the model's dtype: the sampler converts to float32 where it needs to, and a greedy-only step's
    # argmax needs no conversion (bf16 -> float32 is exact, so the argmax and its ties are the same).
    # At W1's batch 256 on an H100 the conversion and the float32 argmax took 0.16 ms of a 3.3 ms step.
    return model.compute_logits(gather_rows(hidden, inputs.logits_rows), float32=not SAMPLE_IN_MODEL_DTYPE)
