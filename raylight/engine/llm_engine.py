"""One engine replica: model, KV cache, scheduler and the `schedule -> execute -> update` step."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from raylight.config import EngineArgs
from raylight.models.loader import resolve_model
from raylight.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from raylight.sampling_params import SamplingParams
from raylight.workers.executor import Executor
from raylight.engine.kv_cache.manager import KVCacheManager
from raylight.workers.model_runner import ModelRunner, SampledToken, StepHandle
from raylight.engine.request import Request, RequestStatus
from raylight.engine.scheduler import Scheduler, SchedulerOutput
from raylight.engine.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger("raylight.engine")

PromptType = Union[str, list[int], dict[str, Any]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class LLMEngine:
    def __init__(self, args: EngineArgs, placement=None):
        """`placement`: under Serve with tensor/pipeline parallelism, the replica's PlacementPlan (its
        other ranks become Ray actors in its placement group); otherwise they are child processes."""
        t0 = time.monotonic()
        self.device = _resolve_device(args.device)
        if args.max_num_batched_tokens is None:
            budget = 8192 if self.device.type == "cuda" else 2048
            args = args.model_copy(update=dict(max_num_batched_tokens=budget))
        self.args = args
        resolved = resolve_model(args.model, args.load_format, args.revision)
        self.model_name = resolved.name
        self.model_path = resolved.path
        arch = self.arch = resolved.arch
        self.dtype = _resolve_dtype(args.dtype, arch.torch_dtype, self.device)
        self.max_model_len = args.max_model_len or arch.max_position_embeddings
        if self.max_model_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={arch.max_position_embeddings}")
        self.tokenizer = load_tokenizer(args.tokenizer or resolved.path)
        self.eos_token_ids = frozenset(arch.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer is not None and self.tokenizer.eos_token_id is not None
            else set())

        self.block_size = args.block_size
        # This process is rank 0 of tensor_parallel_size x pipeline_parallel_size ranks (just itself by
        # default). The executor starts the others and builds this rank's model, KV cache and CUDA graphs.
        self.executor = Executor(args, resolved, self.device, self.dtype, self.max_model_len, placement)
        rank = self.executor.rank
        self.model, self.attn_backend, self.kv_caches = rank.model, rank.attn_backend, rank.kv_caches
        self.num_blocks = rank.num_blocks
        self.kv = KVCacheManager(self.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, args.max_num_batched_tokens, args.max_num_seqs, self.max_model_len)
        self.graph_capture_s = rank.graph_capture_s
        graphs = rank.graphs
        self.runner = ModelRunner(rank.stage_model, self.attn_backend, self.kv_caches, self.kv, self.device,
                                  args.seed, graphs=graphs,
                                  dispatch=self.executor.dispatch if self.executor.world_size > 1 else None,
                                  share_ids=rank.groups.broadcast_from_tp0 if args.tensor_parallel_size > 1 else None)
        # Build outputs while the GPU runs the next step (CUDA); on CPU nothing runs concurrently.
        self.overlap = args.overlap_host_work if args.overlap_host_work is not None else self.device.type == "cuda"
        self._pending: list[tuple[Request, Optional[SampledToken]]] = []  # sampled, not yet turned into outputs
        # Micro-batches: up to this many steps in flight, each over requests the others do not hold.
        self.num_microbatches = args.num_microbatches or args.pipeline_parallel_size
        # Under PP we are the last stage: computing a step waits on the previous stage, so our share
        # runs when the step is collected, after the next micro-batch was sent down the pipeline.
        self._defer_compute = args.pipeline_parallel_size > 1
        # Async scheduling: step N+1 is scheduled and launched before step N's tokens are read back.
        # Under PP the first stage would need the ids that the last one samples: not (yet) supported.
        possible = args.pipeline_parallel_size == 1 and self.num_microbatches == 1
        if args.async_scheduling and not possible:
            raise ValueError("async_scheduling needs pipeline_parallel_size = num_microbatches = 1")
        self.async_scheduling = possible and (args.async_scheduling if args.async_scheduling is not None
                                              else self.device.type == "cuda")
        self._sync_next = False  # the last step ran ahead short of KV blocks: the next one may preempt
        self._last_finish = 0.0
        self._in_flight: collections.deque[tuple[SchedulerOutput, StepHandle, float]] = collections.deque()
        self._groups: dict[str, _Group] = {}
        self._seq_owner: dict[str, tuple[_Group, int]] = {}  # sequence id -> (its request, index)
        self._ids = itertools.count()
        self.num_steps = 0
        self.step_times: collections.deque[float] = collections.deque(maxlen=1024)  # recent step times
        # (requests, tokens, decode requests, seconds) of recent steps, for benchmarks' per-phase timings
        self.step_log: collections.deque[tuple[int, int, int, float]] = collections.deque(maxlen=65536)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.ready_s = time.monotonic() - t0
        logger.info(
            "engine ready in %.1fs: model=%s dtype=%s device=%s tp=%d pp=%d attention=%s cuda_graphs=%s KV cache: "
            "%d blocks x %d tokens = %d tokens, %.2f GiB; max_model_len=%d",
            self.ready_s, self.model_name, str(self.dtype).replace("torch.", ""), self.device,
            args.tensor_parallel_size, args.pipeline_parallel_size,
            self.attn_backend.name, graphs is not None, self.num_blocks, args.block_size,
            self.num_blocks * args.block_size, self.kv_cache_bytes / 2**30, self.max_model_len)

    # ---- sizing ----
    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block on this rank (its layers and KV heads)."""
        return self.executor.rank.bytes_per_block

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def shutdown(self) -> None:
        """Stops the replica's other ranks (tensor/pipeline parallel); a no-op for a single rank."""
        try:  # finish the micro-batches still in flight: the other stages are waiting to hand them over
            while getattr(self, "_in_flight", None):
                sched, handle, t0 = self._in_flight.popleft()
                self._process(self._finish_step(sched, handle, t0))
        except Exception:
            logger.exception("could not finish the steps in flight at shutdown")
        self.executor.shutdown()

    # ---- requests ----
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def make_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                     request_id: Optional[str] = None, cache_salt: Optional[str] = None) -> Request:
        """Validates and tokenizes; raises ValueError naming the problem. Queues nothing."""
        params = params or SamplingParams()
        params.verify(self.arch.vocab_size, self.args.max_n)
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("prompt is empty (it has no tokens)")
        vocab = self.arch.vocab_size
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {ids[bad]} at position {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, longer than the context window "
                             f"(max_model_len={self.max_model_len})")
        needed = self.kv.blocks_needed(len(ids))
        if needed > self.num_blocks:
            raise ValueError(f"prompt needs {needed} KV blocks ({len(ids)} tokens) but the whole KV cache holds "
                             f"{self.num_blocks} blocks; raise kv_cache_memory or shorten the prompt")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, max(room, 1))
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._groups:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = Request(rid, ids, params, max_tokens, self.eos_token_ids, text, cache_salt)
        for i in range(1, params.n):
            # Each of the n sequences samples on its own; seeded ones from seed + index.
            child_seed = None if params.seed is None else (params.seed + i) % 2**64
            req.fork_ids.append(f"{rid}#{i}")
            req.fork_params.append(dataclasses.replace(params, n=1, seed=child_seed))
        return req

    def enqueue(self, req: Request, final_only: bool = False) -> None:
        """Queues a request from make_request. `final_only`: no per-step outputs, only the finished one
        (saves building a RequestOutput per request per step in offline batches)."""
        params = req.sampling_params
        seq_ids = [req.request_id] + list(req.fork_ids)
        seqs = [_Sequence(i, IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                          [] if params.logprobs is not None else None) for i in range(len(seq_ids))]
        group = _Group(req.request_id, req.prompt, req.prompt_token_ids, params, seq_ids, seqs,
                       [req] + [None] * (len(seq_ids) - 1),
                       [None] if params.prompt_logprobs is not None else None, final_only=final_only)
        self._groups[req.request_id] = group
        for i, sid in enumerate(seq_ids):
            self._seq_owner[sid] = (group, i)
        self.scheduler.add_request(req)
        self.prompt_tokens_total += req.num_prompt_tokens

    def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, cache_salt: Optional[str] = None) -> str:
        req = self.make_request(prompt, params, request_id, cache_salt)
        self.enqueue(req)
        return req.request_id

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        """Aborts whole requests (all n sequences); their blocks are free when this returns."""
        outputs = []
        for rid in request_ids:
            group = self._groups.get(rid)
            if group is None:
                continue
            self.scheduler.abort(group.seq_ids)
            for seq in group.seqs:
                if seq.finish_reason is None:
                    seq.finish_reason = RequestStatus.FINISHED_ABORTED.value
            outputs.append(self._group_output(group))
            self._drop_group(group)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or bool(self._in_flight)

    # ---- the step ----
    def step(self, emit: Optional[Callable[[list[RequestOutput]], None]] = None) -> list[RequestOutput]:
        """One engine step. With overlap on, the outputs of the previous step's tokens (detokenizing,
        stop strings, RequestOutputs) are built while the GPU runs this step; `emit`, when given,
        receives them as soon as they are ready instead of when the step returns."""
        if self.num_microbatches > 1:
            return self._step_pipelined()
        if self.async_scheduling:
            return self._step_async(emit)
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.requests:
            outputs = self._process(self._take_pending())
            return outputs + self._end_unschedulable()
        handle = self.runner.launch(sched)
        outputs = self._process(self._take_pending())
        if emit is not None and outputs:
            emit(outputs)
            outputs = []
        # A request that a stop string ended above was already in this step: update() skips it.
        self._pending = self._finish_step(sched, handle, t0)
        if not self.overlap:
            outputs += self._process(self._take_pending())
        return outputs

    def _finish_step(self, sched: SchedulerOutput, handle: StepHandle, t0: float):
        """Waits for a launched step's tokens and advances the scheduler; returns the new tokens."""
        result = self.runner.collect(handle)
        self.num_steps += 1
        for rid, plps in result.prompt_logprobs.items():
            owner = self._seq_owner.get(rid)
            if owner is not None:
                owner[0].prompt_logprobs.extend(self._position_logprobs(p.token_id, p.logprob, p.rank, p.top)
                                                for p in plps)
        changed = self.scheduler.update(sched, result)
        # The whole step as a streaming client paces it: from its scheduling, or from the previous
        # step's end when steps overlap (async scheduling, micro-batches).
        now = time.perf_counter()
        elapsed = now - max(t0, self._last_finish)
        self._last_finish = now
        self.step_times.append(elapsed)
        n = sched.num_scheduled_tokens
        self.step_log.append((len(n), sum(n), sum(1 for t in n if t == 1), elapsed))
        return changed

    def _step_async(self, emit: Optional[Callable[[list[RequestOutput]], None]]) -> list[RequestOutput]:
        """Async scheduling: schedule and launch step N+1 while step N runs, then wait for N's tokens
        and turn them into outputs while N+1 runs. Requests N samples for run on in N+1 on a
        placeholder token the device fills in. A request that N ends (EOS, stop) wastes its N+1 row,
        whose token is dropped; one that N ends by length is not run ahead."""
        t0 = time.perf_counter()
        outputs: list[RequestOutput] = []
        prev = self._in_flight[0] if self._in_flight else None
        sched = None
        if prev is not None and not self._sync_next:
            sched = self.scheduler.schedule(ahead=True)
        if prev is not None and not (sched and sched.requests):
            # Nothing can run ahead (or blocks ran short and preemption may be needed): finish N first.
            self._in_flight.popleft()
            outputs = self._process(self._finish_step(*prev))
            prev = sched = None
        if sched is None:
            sched = self.scheduler.schedule()
            if not sched.requests:
                return outputs + self._end_unschedulable()
        self._sync_next = sched.out_of_blocks
        handle = self.runner.launch(sched, ahead_of=prev[1] if prev is not None else None)
        self._in_flight.append((sched, handle, t0))
        if prev is not None:
            self._in_flight.popleft()
            outputs += self._process(self._finish_step(*prev))
        if emit is not None and outputs:
            emit(outputs)
            outputs = []
        return outputs

    def _step_pipelined(self) -> list[RequestOutput]:
        """Micro-batch pipelining: launch a step over the requests no step in flight holds, then
        finish the oldest step in flight once `num_microbatches` are out (or nothing new could go).
        On one GPU the device runs one micro-batch while the host finishes the other; under PP every
        stage holds a different micro-batch."""
        t0 = time.perf_counter()
        busy = frozenset(r.request_id for s, _, _ in self._in_flight for r in s.requests)
        sched = self.scheduler.schedule(in_flight=busy)
        if sched.requests:
            self._in_flight.append((sched, self.runner.launch(sched, defer_compute=self._defer_compute), t0))
        if self._in_flight and (len(self._in_flight) >= self.num_microbatches or not sched.requests):
            done, handle, started = self._in_flight.popleft()
            return self._process(self._finish_step(done, handle, started))
        if self._in_flight:
            return []
        return self._end_unschedulable()

    def _end_unschedulable(self) -> list[RequestOutput]:
        """Nothing fits even alone (and nothing is in flight): the sequence outgrew the whole pool.
        End it with 'length' rather than spin."""
        changed = []
        for req in self.scheduler.unschedulable():
            logger.warning("request %s needs more KV blocks than the cache has; ending it", req.request_id)
            self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
            changed.append((req, None))
        return self._process(changed)

    def _take_pending(self) -> list[tuple[Request, Optional[SampledToken]]]:
        pending, self._pending = self._pending, []
        return pending

    def _process(self, changed: list[tuple[Request, Optional[SampledToken]]]) -> list[RequestOutput]:
        touched: dict[str, _Group] = {}
        owners = self._seq_owner
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
                    self.runner.release(req.request_id)
            elif group.final_only:
                continue  # nothing to output for it before it finishes
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            finished = group.finished
            if finished or not group.final_only:
                outputs.append(self._group_output(group, finished))
            if finished:
                self._drop_group(group)
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
            hit = self._find_stop_string(seq.detokenizer.text, len(delta), params)
            if hit is not None:
                stop, at = hit
                seq.text_end = at + (len(stop) if params.include_stop_str_in_output else 0)
                if not req.is_finished:
                    self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop

    @staticmethod
    def _find_stop_string(text: str, delta_len: int, params: SamplingParams) -> Optional[tuple[str, int]]:
        """The earliest stop string that the newest text completes (it may span several tokens)."""
        best = None
        for stop in params.stop:
            at = text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))
            if at != -1 and (best is None or at < best[1]):
                best = (stop, at)
        return best

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

    def _drop_group(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for sid in group.seq_ids:
            self._seq_owner.pop(sid, None)
            self.runner.release(sid)

    def get_metrics(self) -> dict[str, Any]:
        s = self.scheduler.stats
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": self.kv.usage(),
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
            "prefix_cache_hit_rate": s.prefix_cache_hit_tokens / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            "preemptions": s.preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_steps": self.num_steps,
            "step_time_p50_s": float(np.median(self.step_times)) if self.step_times else 0.0,
        }


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def _resolve_dtype(name: str, model_dtype: Optional[str], device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and inexact
    # GPUs serve in half precision: the checkpoint's float16, else bfloat16 (float32 checkpoints included).
    return torch.float16 if model_dtype == "float16" else torch.bfloat16
