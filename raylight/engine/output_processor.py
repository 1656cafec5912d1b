"""Sampled tokens -> `RequestOutput`s: n-way groups, incremental detokenization, stop strings,
logprobs and streaming deltas.

The scheduler owns each `Request`'s state; this module only reads it, and asks the scheduler to
end a sequence whose text completed a stop string (`Scheduler.stop_on_string`). It owns the
output-side state of every request: its sequences' text, logprobs and what was already sent.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

from raylight.engine.request import Request, RequestStatus
from raylight.engine.scheduler import Scheduler
from raylight.engine.tokenizer import IncrementalDetokenizer
from raylight.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from raylight.sampling_params import SamplingParams
from raylight.workers.model_runner import PromptLogprob, SampledToken


@dataclass
class _Sequence:
    """Output-side state of one of a request's n sequences."""

    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: Optional[list[PositionLogprobs]] = None
    cumulative_logprob: float = 0.0
    text_end: Optional[int] = None  # text is cut here (a stop string, or a stop token's text)
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    sent_tokens: int = 0  # how much previous outputs already carried (for deltas)
    sent_chars: int = 0
    sent_logprobs: int = 0

    @property
    def text(self) -> str:
        return self.detokenizer.text[: self.text_end]


@dataclass
class _Group:
    """A user request: its n sequences (ids: request_id, then request_id#1, ...)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    seq_ids: list[str]
    seqs: list[_Sequence]
    requests: list[Optional[Request]]
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    num_cached_tokens: int = 0
    final_only: bool = False  # the caller wants one output, at the end (offline batch use)
    next_output_s: float = 0.0  # paced streams: no output before this (time.monotonic), unless it ends

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler, on_sequence_done: Callable[[str], None]):
        """`on_sequence_done(seq_id)`: a sequence finished or was dropped (the runner frees its
        sampling state)."""
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.on_sequence_done = on_sequence_done
        self.groups: dict[str, _Group] = {}
        self._seq_owner: dict[str, tuple[_Group, int]] = {}  # sequence id -> (its request, index)
        self.generation_tokens_total = 0
        # A running request gets no new output until this long after its last one; its next carries every
        # token since (a replica's stream pacing under load, set by AsyncLLMEngine._pace_streams).
        self.min_interval_s = 0.0
        self._jitter = random.Random(0)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.groups

    def add(self, req: Request, final_only: bool = False) -> None:
        params = req.sampling_params
        seq_ids = [req.request_id] + list(req.fork_ids)
        seqs = [_Sequence(i, IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                          [] if params.logprobs is not None else None) for i in range(len(seq_ids))]
        group = _Group(req.request_id, req.prompt, req.prompt_token_ids, params, seq_ids, seqs,
                       [req] + [None] * (len(seq_ids) - 1),
                       [None] if params.prompt_logprobs is not None else None, final_only=final_only)
        self.groups[req.request_id] = group
        for i, sid in enumerate(seq_ids):
            self._seq_owner[sid] = (group, i)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """The final output of an aborted request (None if unknown); forgets it."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = RequestStatus.FINISHED_ABORTED.value
        out = self._group_output(group)
        self._drop(group)
        return out

    def seq_ids(self, request_id: str) -> list[str]:
        group = self.groups.get(request_id)
        return list(group.seq_ids) if group is not None else []

    def add_prompt_logprobs(self, seq_id: str, plps: list[PromptLogprob]) -> None:
        owner = self._seq_owner.get(seq_id)
        if owner is not None:
            owner[0].prompt_logprobs.extend(self._position_logprobs(p.token_id, p.logprob, p.rank, p.top)
                                            for p in plps)

    def process(self, changed: list[tuple[Request, Optional[SampledToken]]]) -> list[RequestOutput]:
        """Outputs for the sequences that got a token or finished (one per touched request)."""
        touched: dict[str, _Group] = {}
        owners = self._seq_owner
        now, interval = time.monotonic(), self.min_interval_s
        for req, tok in changed:
            owner = owners.get(req.request_id)
            if owner is None:
                continue  # aborted after its token was sampled
            group, index = owner
            group.requests[index] = req
            if req.num_cached_tokens > group.num_cached_tokens:
                group.num_cached_tokens = req.num_cached_tokens
            seq = group.seqs[index]
            if tok is not None:
                self.generation_tokens_total += 1
                self._append(group, seq, req, tok)
            if req.is_finished:
                if seq.finish_reason is None:
                    seq.finish_reason, seq.stop_reason = req.status.value, req.stop_reason
                    self.on_sequence_done(req.request_id)
            elif group.final_only:
                continue  # nothing to output for it before it finishes
            elif interval and now < group.next_output_s:
                continue  # paced: its next output carries these tokens too
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            finished = group.finished
            if finished or not group.final_only:
                outputs.append(self._group_output(group, finished))
                # Jittered, so that streams which started together do not all send in the same step.
                group.next_output_s = now + interval * (0.5 + self._jitter.random())
            if finished:
                self._drop(group)
        return outputs

    def _append(self, group: _Group, seq: _Sequence, req: Request, tok: SampledToken) -> None:
        params = group.params
        delta = seq.detokenizer.step(tok.token_id)
        if seq.logprobs is not None and tok.logprob is not None:
            seq.logprobs.append(self._position_logprobs(tok.token_id, tok.logprob, tok.rank, tok.top))
            seq.cumulative_logprob += tok.logprob
        if req.is_finished and req.status == RequestStatus.FINISHED_STOPPED and not params.include_stop_str_in_output:
            # Finished on EOS or a stop token: its text (if any survived decoding) is not output.
            seq.text_end = len(seq.detokenizer.text) - len(delta)
        elif params.stop and len(req.output_token_ids) >= params.min_tokens:
            hit = find_stop_string(seq.detokenizer.text, len(delta), params.stop)
            if hit is not None:
                stop, at = hit
                seq.text_end = at + (len(stop) if params.include_stop_str_in_output else 0)
                self.scheduler.stop_on_string(req, stop)

    def _position_logprobs(self, token_id: int, logprob: float, rank: Optional[int],
                           top: list[tuple[int, float]]) -> PositionLogprobs:
        entries = {token_id: Logprob(logprob, rank, self._decode_token(token_id))}
        for r, (tid, lp) in enumerate(top, start=1):
            if tid not in entries:
                entries[tid] = Logprob(lp, r, self._decode_token(tid))
        return entries

    def _decode_token(self, token_id: int) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _group_output(self, group: _Group, finished: Optional[bool] = None) -> RequestOutput:
        completions = []
        for seq, req in zip(group.seqs, group.requests):
            token_ids = list(req.output_token_ids) if req is not None else []
            text = seq.text
            # While running, hold back what could still turn out to be the start of a stop string.
            hold = 0 if seq.finish_reason is not None or not group.params.stop else \
                max(len(s) for s in group.params.stop) - 1
            visible = max(len(text) - hold, seq.sent_chars)
            c = CompletionOutput(
                seq.index, text, token_ids, seq.finish_reason, seq.stop_reason,
                seq.cumulative_logprob if seq.logprobs is not None else None, seq.logprobs,
                delta_text=text[seq.sent_chars : visible], delta_token_ids=token_ids[seq.sent_tokens :],
                delta_logprobs=seq.logprobs[seq.sent_logprobs :] if seq.logprobs is not None else None,
            )
            seq.sent_chars, seq.sent_tokens = visible, len(token_ids)
            seq.sent_logprobs = len(seq.logprobs) if seq.logprobs is not None else 0
            completions.append(c)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             group.finished if finished is None else finished, group.num_cached_tokens,
                             group.prompt_logprobs)

    def _drop(self, group: _Group) -> None:
        self.groups.pop(group.request_id, None)
        for sid in group.seq_ids:
            self._seq_owner.pop(sid, None)
            self.on_sequence_done(sid)


def find_stop_string(text: str, delta_len: int, stops: list[str]) -> Optional[tuple[str, int]]:
    """The earliest stop string that the newest text (its last `delta_len` characters) completes;
    it may span several tokens."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))
        if at != -1 and (best is None or at < best[1]):
            best = (stop, at)
    return best
