"""One token budget per step: no prefill or decode phases.

Every request has tokens whose KV is known (`num_computed_tokens`) and tokens that are
not yet (`num_tokens - num_computed_tokens`): a fresh prompt has many, a decoding request
one. Each step hands out the budget to running requests first, then to waiting ones,
which gives continuous batching, chunked prefill and prefix caching from one rule.
When the pool runs dry the newest running request is preempted and later recomputed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from raylight.engine.kv_cache.manager import KVCacheManager
from raylight.engine.request import Request, RequestStatus
from raylight.messages import KVPush, PromptLogprobTask, SampleRow, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()

    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, in_flight: frozenset[str] = frozenset(), ahead: bool = False) -> SchedulerOutput:
        """The next step's requests. `in_flight`: requests of micro-batches still running (their next
        token is unknown); they are skipped and never preempted: when blocks run out while some are
        in flight, this step simply takes fewer requests.

        `ahead` (async scheduling): a step is in flight and this one is built before its tokens are
        known. A request it samples for runs on with that token as a placeholder, which the device
        fills in; the host learns it later. Nothing is preempted (in-flight requests hold their blocks)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        may_preempt = not in_flight and not ahead

        # 1. Running requests, oldest first; preempt the newest when blocks run out.
        # This loop runs for every running request on every step (256 of them at W1's batch), so the
        # run-ahead test below is inline rather than a method call.
        i = 0
        running = self.running
        max_model_len = self.max_model_len
        while i < len(running) and budget > 0:
            req = running[i]
            i += 1
            pending = req.num_pending_tokens
            if in_flight and req.request_id in in_flight:
                continue
            num_tokens = req.num_tokens
            # A request whose sampled token is still in flight runs ahead on it, unless that token surely
            # ends it (length) or the host must act on it first (the fork of an n > 1 request). (Penalties
            # count sampled tokens on the device: workers/sampling_state.py.)
            if pending and (len(req.output_token_ids) + pending >= req.max_tokens
                            or num_tokens + pending >= max_model_len or req.fork_ids):
                continue
            num_new = min(num_tokens + pending - req.num_computed_tokens - req.num_in_flight_tokens, budget)
            if num_new <= 0:
                continue
            if not self._allocate_or_preempt(req, num_new, out, may_preempt):
                out.out_of_blocks = not out.preempted
                break  # req itself was preempted (or must wait): nothing after it can be scheduled either
            self._add(out, req, num_new)
            budget -= num_new

        # 2. Waiting requests, in arrival order (preempted ones at the front), unless we just preempted.
        while self.waiting and budget > 0 and not out.preempted:
            req = self.waiting[0]
            if len(self.running) + req.num_seqs > self.max_num_seqs and self.running:
                break
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            hits, num_cached = ([], 0) if req.needs_prompt_logprobs else self.kv.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:  # first admission, not a resumption
                req.num_cached_tokens = num_cached
                self.stats.prefix_cache_queries += req.num_tokens
                self.stats.prefix_cache_hit_tokens += num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add(out, req, num_new)
            budget -= num_new
        if out.requests:
            # Once every request has its blocks (a request's table changes only through its own allocation).
            out.block_tables = self.kv.block_table.gather(out.request_ids)
            out.block_copies = self.kv.take_pending_copies()  # a forked sequence's copy of its parent's last block
        return out

    def _add(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        """Puts req in the step with num_new tokens, and everything the runner needs to run them."""
        rid = req.request_id
        in_flight = req.num_in_flight_tokens
        before = req.num_computed_tokens + in_flight
        pending = req.num_pending_tokens
        samples = before + num_new == req.num_tokens + pending
        out.requests.append(req)
        out.request_ids.append(rid)
        out.num_scheduled_tokens.append(num_new)
        out.num_computed_before.append(before)
        out.samples.append(samples)
        out.uses_pending_token.append(pending > 0)
        # With a pending token the one token is that placeholder: the device fills it in.
        out.new_token_ids.append([] if pending else req.all_token_ids[before : before + num_new])
        params = req.sampling_params
        if samples:
            n_out = len(req.output_token_ids) + pending
            rows = [SampleRow(rid, rid, params, n_out, req.prompt_token_ids, req.output_token_ids,
                              req.eos_token_ids)]
            if req.fork_ids:  # a request about to fork samples its n first tokens from the same logits row
                rows += [SampleRow(rid, fid, fp, n_out, req.prompt_token_ids, req.output_token_ids,
                                   req.eos_token_ids) for fid, fp in zip(req.fork_ids, req.fork_params)]
        else:
            rows = []
        out.sample_rows.append(rows)
        out.prompt_logprobs.append(self._prompt_logprob_task(req, before, num_new)
                                   if params.prompt_logprobs is not None and req.needs_prompt_logprobs else None)
        if req.kv_push is not None:
            self._push(out, req, before + num_new)
        req.num_in_flight_tokens = in_flight + num_new
        if samples:
            req.num_pending_tokens = pending + 1

    def _push(self, out: SchedulerOutput, req: Request, end: int) -> None:
        """Disaggregated prefill: ship the blocks holding prompt positions [pushed so far, end) (whole
        blocks; a partly filled one is sent again with the next chunk). Positions the decode side
        holds already (`start_token`), and positions this replica had cached, go with the first chunk."""
        target, bs = req.kv_push, self.kv.block_size
        lo, hi = max(req.num_pushed_tokens, target.start_token), min(end, req.num_prompt_tokens)
        if hi <= lo:
            return
        b0, b1 = lo // bs, -(-hi // bs)
        out.kv_pushes.append(KVPush(target.transfer_id, target.host, target.port,
                                    self.kv.block_ids(req.request_id)[b0:b1], target.block_ids[b0:b1],
                                    last=hi >= req.num_prompt_tokens))
        req.num_pushed_tokens = hi

    def admit(self, req: Request, num_computed: int) -> None:
        """A request whose first `num_computed` tokens' KV another replica wrote into its (already
        allocated) blocks: it runs from here like any other."""
        req.num_computed_tokens = num_computed
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        self.running.append(req)

    @staticmethod
    def _prompt_logprob_task(req: Request, before: int, num_new: int) -> PromptLogprobTask:
        """The prompt positions whose logprobs this step's tokens yield (position p predicts token
        p + 1); each position is computed once, even when a preemption recomputes the prompt."""
        first = max(before, req.num_prompt_logprobs - 1)
        last = min(before + num_new, req.num_prompt_tokens - 1)
        req.num_prompt_logprobs = max(req.num_prompt_logprobs, last + 1)
        return PromptLogprobTask(req.sampling_params.prompt_logprobs, first, max(first, last),
                                 req.prompt_token_ids[first + 1 : last + 1])

    def _allocate_or_preempt(self, req: Request, num_new: int, out: SchedulerOutput, may_preempt: bool) -> bool:
        """Room for req's next tokens, preempting the newest running requests if allowed and needed.
        False when req could not be given room (it may itself have been preempted)."""
        # Blocks are counted from num_computed_tokens: tokens in flight already hold theirs.
        num_new += req.num_in_flight_tokens
        while not self.kv.allocate_slots(req, num_new):
            if not may_preempt:
                return False
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.stats.preemptions += 1
        logger.debug("preempted %s (%d tokens to recompute)", req.request_id, req.num_tokens)

    def update(self, out: SchedulerOutput, result) -> list[tuple[Request, object]]:
        """Advances each scheduled request past the tokens it computed and appends the sampled
        token of those that reached the end of what they knew (forking n-way requests on their
        first token). Returns (sequence, its SampledToken) for every sequence that got a token."""
        changed = []
        sampled, max_model_len = result.sampled, self.max_model_len
        for req, n, samples in zip(out.requests, out.num_scheduled_tokens, out.samples):
            req.num_in_flight_tokens -= n
            if samples:
                req.num_pending_tokens -= 1
            if req.is_finished:  # aborted, or ended by the step before it (async scheduling), while it ran
                continue
            req.num_computed_tokens += n
            tokens = sampled.get(req.request_id)
            if not tokens:
                continue  # a chunk of a prompt; no token yet
            if req.fork_ids:
                for seq, tok in zip([req, *self._fork(req)], tokens):
                    self._append(seq, tok, max_model_len)
                    changed.append((seq, tok))
            else:  # the common case, inline: this loop runs for every running request on every step
                tok = tokens[0]
                req.append_output_token(tok.token_id)
                status = req.check_stop(max_model_len)
                if status is not None:
                    self.finish(req, status)
                changed.append((req, tok))
        return changed

    def _append(self, seq: Request, tok, max_model_len: int) -> None:
        seq.append_output_token(tok.token_id)
        status = seq.check_stop(max_model_len)
        if status is not None:
            self.finish(seq, status)

    def _fork(self, req: Request) -> list[Request]:
        children = []
        for fid, params in zip(req.fork_ids, req.fork_params):
            child = Request(fid, req.prompt_token_ids, params, req.max_tokens, req.eos_token_ids,
                            req.prompt, req.cache_salt, req.arrival_time)
            child.num_cached_tokens = req.num_cached_tokens
            self.requests[fid] = child
            if self.kv.fork(req, child):
                child.num_computed_tokens = req.num_computed_tokens
                child.status = RequestStatus.RUNNING
                self.running.append(child)
            else:  # no block for its copy of the last prompt block: it recomputes later instead
                self.waiting.appendleft(child)
            children.append(child)
        req.fork_ids, req.fork_params = [], []
        return children

    def stop_on_string(self, req: Request, stop: str) -> None:
        """The output text completed a stop string (the engine's output processing found it):
        the sequence ends with 'stop', even if this step's token also ended it by length."""
        if not req.is_finished:
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self.requests.pop(req.request_id, None)

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                self.finish(req, RequestStatus.FINISHED_ABORTED)
                aborted.append(req)
        return aborted

    def unschedulable(self) -> list[Request]:
        """Requests that can never run: alone in the engine and still no room for their next
        tokens (the pool is smaller than the sequence grew). They end with 'length'."""
        stuck = []
        if not self.running and self.waiting:
            req = self.waiting[0]
            if self.kv.blocks_needed(req.num_tokens) > self.kv.num_blocks:
                stuck.append(req)
        return stuck
