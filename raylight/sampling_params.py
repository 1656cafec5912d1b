"""Per-request sampling parameters (OpenAI and vLLM names), validated when constructed.

Checks that need the model (token ids inside the vocabulary, `n` under the engine's cap)
run in `SamplingParams.verify`, called by the engine before anything is queued. Every
error is a ValueError that names the field and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from raylight.utils.structured_params import StructuredOutputsParams

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None  # sample only among these tokens (vLLM's extension)
    stop: Union[None, str, list[str]] = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16  # None: up to the context window
    min_tokens: int = 0
    logprobs: Optional[int] = None  # the chosen token's logprob plus this many alternatives
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    # Output constrained to a JSON schema, regex, choice or grammar (raylight/structured/); a dict is
    # vLLM's `structured_outputs` object.
    structured_outputs: Optional[StructuredOutputsParams] = None

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not self.temperature >= 0:  # also rejects NaN
            raise bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (disabled), or an integer >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", "an integer in [-2**63, 2**64)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"an integer in [0, {MAX_LOGPROBS}]")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                if not -100.0 <= float(bias) <= 100.0:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {tok}")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            if (not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.allowed_token_ids)):
                raise bad("allowed_token_ids", "a non-empty list of token ids")
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)

    def verify(self, vocab_size: int, max_n: int) -> None:
        """Model-dependent checks, run by the engine before a request is queued."""
        if self.n > max_n:
            raise ValueError(f"n must be in [1, {max_n}] (the engine's max_n), got {self.n}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})")
        for t in self.logit_bias or {}:
            if not 0 <= t < vocab_size:
                raise ValueError(f"logit_bias: token id {t} is outside the vocabulary [0, {vocab_size})")
        for t in self.allowed_token_ids or ():
            if not 0 <= t < vocab_size:
                raise ValueError(f"allowed_token_ids: token id {t} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits and nothing else: the sampler's fast path."""
        return (self.greedy and not self.uses_penalties and not self.logit_bias and self.min_tokens == 0
                and self.logprobs is None and self.allowed_token_ids is None)
