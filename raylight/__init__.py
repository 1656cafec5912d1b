"""raylight: a Ray-native LLM serving cluster."""

from raylight.config import EngineArgs
from raylight.llm import LLM
from raylight.outputs import CompletionOutput, RequestOutput
from raylight.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineArgs", "RequestOutput", "CompletionOutput", "__version__"]
