"""Structured outputs: grammar-constrained generation through xgrammar (imported lazily).

`raylight.utils.structured_params.StructuredOutputsParams` (a leaf: SamplingParams holds one) is what a
request asks for; `compiler.GrammarCompileService`
compiles it off the step loop (time cap, bounded cache); `manager.StructuredOutputManager` keeps
each sequence's matcher and builds each step's token bitmask, which the sampler applies per row
(raylight/workers/token_mask.py)."""

from raylight.utils.structured_params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
