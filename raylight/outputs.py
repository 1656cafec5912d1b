"""What the engine returns for each request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None  # 1 = the most likely token
    decoded_token: Optional[str] = None


# One position: {token id: Logprob} holding the chosen token and the top alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop", "length", "abort"; None while running
    stop_reason: Optional[int | str] = None  # the stop token id or stop string that ended it
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[PositionLogprobs]] = None
    # What is new since the previous RequestOutput for this request (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: Optional[list[PositionLogprobs]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output for two consecutive outputs of a request (a stream whose reader fell behind sends
    what piled up as one message): `newer`, whose deltas now begin with `older`'s. Takes both."""
    before = {c.index: c for c in older.outputs}
    for c in newer.outputs:
        prev = before.get(c.index)
        if prev is None:
            continue
        c.delta_text = prev.delta_text + c.delta_text
        c.delta_token_ids = prev.delta_token_ids + c.delta_token_ids
        if prev.delta_logprobs is not None or c.delta_logprobs is not None:
            c.delta_logprobs = (prev.delta_logprobs or []) + (c.delta_logprobs or [])
    return newer
