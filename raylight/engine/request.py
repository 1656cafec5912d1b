"""A request as the scheduler sees it: tokens known so far and how many have KV computed."""

from __future__ import annotations

import enum
import time
from typing import Optional, Sequence

from raylight.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset((RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED))


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        prompt: Optional[str] = None,
        cache_salt: Optional[str] = None,
        arrival_time: Optional[float] = None,
        forks: Sequence[tuple[str, SamplingParams]] = (),
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.cache_salt = cache_salt
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()

        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_tokens = len(self.all_token_ids)  # kept with all_token_ids: read many times per step
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # Launched steps not yet collected: tokens they compute for us, and tokens they sample for us
        # (0 or 1) that the host does not know yet. Async scheduling runs a step ahead on those.
        self.num_in_flight_tokens = 0
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit when first scheduled
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of all_token_ids
        self.status = RequestStatus.WAITING
        self.stop_reason: Optional[int | str] = None
        # n > 1: the request runs as one sequence until its first token, then forks into the
        # other n - 1 sequences (sharing the prompt's KV blocks). Emptied once forked.
        self.fork_ids: list[str] = [fid for fid, _ in forks]
        self.fork_params: list[SamplingParams] = [fp for _, fp in forks]
        # prompt_logprobs: prompt positions whose logprob is known (position 0 has none).
        self.num_prompt_logprobs = 1
        # Disaggregated prefill: where this prompt's KV goes (a KVPushTarget), and how far it was pushed.
        self.kv_push = None
        self.num_pushed_tokens = 0
        # Structured outputs: the compiled grammar (xgrammar) its sequences follow (raylight/structured/).
        self.grammar = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None and self.num_prompt_logprobs < self.num_prompt_tokens

    @property
    def num_seqs(self) -> int:
        """Sequences this request will occupy once running (n before its fork, else 1)."""
        return 1 + len(self.fork_ids)

    @property
    def status(self) -> RequestStatus:
        return self._status

    @status.setter
    def status(self, value: RequestStatus) -> None:
        self._status = value
        self._finished = value.finished  # read for every request on every step

    @property
    def is_finished(self) -> bool:
        return self._finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.num_tokens += 1

    def check_stop(self, max_model_len: int) -> Optional[RequestStatus]:
        """After a token was appended: is the request done, and why."""
        last = self.output_token_ids[-1]
        n_out = len(self.output_token_ids)
        params = self.sampling_params
        if n_out >= params.min_tokens:
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None  # end of sequence: null, as vLLM (stop_token_ids hits keep the id)
                return RequestStatus.FINISHED_STOPPED
        if n_out >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
