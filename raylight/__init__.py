"""raylight: a Ray-native LLM serving cluster.

The public names load on first use (PEP 562), so that `import raylight.messages` or the pure
block-hash module (`raylight.engine.kv_cache.block_hash`, which a router imports) does not pull
in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineArgs", "RequestOutput", "CompletionOutput", "__version__"]

_PUBLIC = {
    "LLM": "raylight.llm",
    "SamplingParams": "raylight.sampling_params",
    "EngineArgs": "raylight.config",
    "RequestOutput": "raylight.outputs",
    "CompletionOutput": "raylight.outputs",
}

if TYPE_CHECKING:
    from raylight.config import EngineArgs
    from raylight.llm import LLM
    from raylight.outputs import CompletionOutput, RequestOutput
    from raylight.sampling_params import SamplingParams


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'raylight' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
