"""One engine replica's host core: requests in, the `schedule -> launch -> collect -> update`
step loop, outputs out. The model and its ranks are the executor's (workers/); the KV blocks and
request state the scheduler's; the output text and deltas the output processor's."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from raylight.config import EngineArgs
from raylight.engine.kv_cache.manager import KVCacheManager
from raylight.engine.output_processor import OutputProcessor
from raylight.engine.overlap import OverlapPolicy
from raylight.engine.request import Request, RequestStatus
from raylight.engine.scheduler import Scheduler, SchedulerStats
from raylight.engine.tokenizer import load_tokenizer
from raylight.messages import KVEvent, KVPushTarget, KVReservation, PromptType, RankReport, SchedulerOutput
from raylight.models.loader import resolve_model
from raylight.outputs import RequestOutput
from raylight.sampling_params import SamplingParams
from raylight.structured.compiler import GrammarCompileService
from raylight.structured.manager import StructuredOutputManager
from raylight.workers.executor import Executor
from raylight.workers.model_runner import ModelRunner, SampledToken, StepHandle

logger = logging.getLogger("raylight.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Changed = list[tuple[Request, Optional[SampledToken]]]  # sequences that got a token or finished


@dataclasses.dataclass
class StepTotals:
    """Sums over all steps (their count is `num_steps`), exported as counters: two scrapes give a window's
    mean step time and rows."""
    seconds: float = 0.0
    rows: int = 0
    tokens: int = 0
    decode_rows: int = 0

    def add(self, rows: int, tokens: int, decode_rows: int, seconds: float) -> None:
        self.rows, self.tokens, self.decode_rows = self.rows + rows, self.tokens + tokens, self.decode_rows + decode_rows
        self.seconds += seconds

    def as_metrics(self) -> dict[str, float]:
        return {"step_seconds_total": self.seconds, "step_rows_total": self.rows,
                "step_tokens_total": self.tokens, "step_decode_rows_total": self.decode_rows}


LARGE_GPU_BYTES = 70 * 2**30  # from here up, the large-GPU scheduler defaults (as vLLM draws its line)


def scheduler_defaults(args: EngineArgs, device, gpu_bytes: int = 0) -> dict:
    """The scheduler limits `args` leaves unset, for `device` (of `gpu_bytes` memory on CUDA). On a
    GPU of 70 GiB or more, vLLM's offline defaults there: 1024 sequences, 16,384 tokens a step (a
    step's weights are read once whatever its rows, so more rows per step is more tokens per read);
    a smaller GPU keeps 256 / 8,192, since the KV budget pays for the larger step's activations and
    its sampling (about 4 GB at 1,024 rows of a 128k vocabulary). On CPU 256 / 2,048: a step's compute
    grows with its rows, and a smaller step keeps latency down."""
    if device.type != "cuda":
        defaults = dict(max_num_batched_tokens=2048, max_num_seqs=256)
    elif gpu_bytes >= LARGE_GPU_BYTES:
        defaults = dict(max_num_batched_tokens=16384, max_num_seqs=1024)
    else:
        defaults = dict(max_num_batched_tokens=8192, max_num_seqs=256)
    return {k: v for k, v in defaults.items() if getattr(args, k) is None}


class LLMEngine:
    def __init__(self, args: EngineArgs, placement=None):
        """`placement`: under Serve with tensor/pipeline parallelism, the replica's PlacementPlan (its
        other ranks become Ray actors in its placement group); otherwise they are child processes."""
        t0 = time.monotonic()
        self.device = resolve_device(args.device)
        gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0
        args = args.model_copy(update=scheduler_defaults(args, self.device, gpu_bytes))
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
        self.kv = KVCacheManager(self.num_blocks, args.block_size, args.enable_prefix_caching, args.enable_kv_events)
        self.scheduler = Scheduler(self.kv, args.max_num_batched_tokens, args.max_num_seqs, self.max_model_len)
        self.graph_capture_s = rank.graph_capture_s
        graphs = rank.graphs
        self.runner = ModelRunner(rank.stage_model, self.attn_backend, self.kv_caches, args.block_size, self.device,
                                  args.seed, graphs=graphs, piecewise=rank.piecewise,
                                  dispatch=self.executor.dispatch if self.executor.world_size > 1 else None,
                                  share_ids=rank.groups.broadcast_from_tp0 if args.tensor_parallel_size > 1 else None,
                                  kv_sender=rank.kv_sender, after_forward=rank.eplb.step if rank.eplb else None)
        self.kv_sender = rank.kv_sender  # kv_role prefill: pushes prompt KV to decode replicas
        self.remote = None  # kv_role decode: the requests whose prompt KV another replica computes
        if rank.kv_endpoint is not None:
            from raylight.engine.remote_prefill import RemotePrefills
            from raylight.workers.worker import kv_layout

            elem = torch.empty((), dtype=self.dtype).element_size()
            self.remote = RemotePrefills(self.kv, self.scheduler, rank.kv_endpoint, args.kv_lease_s,
                                         kv_layout(args, arch, rank.groups, self.dtype).block_bytes(elem))
        # Structured outputs (raylight/structured/): grammars compile off the step loop; the runner asks the
        # manager for each step's allowed-token masks (an O(1) answer while no request is constrained).
        self.grammars = GrammarCompileService(self.tokenizer, arch.vocab_size, self.eos_token_ids,
                                              args.grammar_compile_timeout_s, args.grammar_cache_bytes)
        self.structured = StructuredOutputManager(self.grammars, arch.vocab_size)
        self.runner.constrain = self.structured.bitmask
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler, self._sequence_done)
        self.policy = OverlapPolicy.from_args(args, self.device)
        self.async_scheduling = self.policy.run_ahead
        self._in_flight: collections.deque[tuple[SchedulerOutput, StepHandle, float]] = collections.deque()
        self._pending: Changed = []  # collected, not yet turned into outputs (policy.defer_outputs)
        self._sync_next = False  # the last step ran ahead short of KV blocks: the next one may preempt
        self._last_finish = 0.0
        self._ids = itertools.count()
        self.num_steps = 0
        self.step_times: collections.deque[float] = collections.deque(maxlen=1024)  # recent step times
        # (requests, tokens, decode requests, seconds) of recent steps, for benchmarks' per-phase timings
        self.step_log: collections.deque[tuple[int, int, int, float]] = collections.deque(maxlen=65536)
        self.step_totals = StepTotals()
        self.prompt_tokens_total = 0
        self.warmup_s = 0.0
        if args.warmup if args.warmup is not None else self.device.type == "cuda":
            from raylight.engine.warmup import warm_up

            self.warmup_s = warm_up(self)
        self.ready_s = time.monotonic() - t0
        if self.device.type == "cuda" and args.num_kv_blocks is None:
            self._check_memory_cap()
        logger.info(
            "engine ready in %.1fs: model=%s dtype=%s device=%s tp=%d pp=%d%s attention=%s cuda_graphs=%s KV cache: "
            "%d blocks x %d tokens = %d tokens, %.2f GiB; max_model_len=%d; steps: %s; warm-up %.1fs",
            self.ready_s, self.model_name, str(self.dtype).replace("torch.", ""), self.device,
            args.tensor_parallel_size, args.pipeline_parallel_size,
            f" ep={args.tensor_parallel_size}{' eplb' if rank.eplb else ''}" if args.enable_expert_parallel else "",
            self.attn_backend.name, ("decode+piecewise" if rank.piecewise else "decode") if graphs else "none",
            self.num_blocks, args.block_size, self.num_blocks * args.block_size, self.kv_cache_bytes / 2**30,
            self.max_model_len, self.policy.name, self.warmup_s)

    def _check_memory_cap(self) -> None:
        """Warns when the device's use at ready is already past gpu_memory_utilization's cap (the budget
        could not foresee something start-up made outside PyTorch's allocator): steps allocate more."""
        free, total = torch.cuda.mem_get_info(self.device)
        cap = self.args.gpu_memory_utilization * total
        if total - free > cap:
            logger.warning("GPU memory at ready: %.2f GiB used, past the %.2f GiB cap (gpu_memory_utilization "
                           "%.2f) by %.2f GiB, of which PyTorch's allocator holds %.2f GiB", (total - free) / 2**30,
                           cap / 2**30, self.args.gpu_memory_utilization, (total - free - cap) / 2**30,
                           torch.cuda.memory_reserved(self.device) / 2**30)

    # ---- sizing ----
    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block on this rank (its layers and KV heads)."""
        return self.executor.rank.bytes_per_block

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def _sequence_done(self, seq_id: str) -> None:
        self.runner.release(seq_id)
        self.structured.release(seq_id)

    def shutdown(self) -> None:
        """Stops the replica's other ranks (tensor/pipeline parallel); a no-op for a single rank."""
        try:  # finish the micro-batches still in flight: the other stages are waiting to hand them over
            while getattr(self, "_in_flight", None):
                self.outputs.process(self._collect(*self._in_flight.popleft()))
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
                     request_id: Optional[str] = None, cache_salt: Optional[str] = None,
                     grammar=None) -> Request:
        """Validates and tokenizes; raises ValueError naming the problem. Queues nothing. A request with
        `structured_outputs` takes its compiled `grammar` (compiled off the step loop: engine/engine_loop.py), or it is
        compiled here (blocking, within the compile time cap)."""
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
        if rid in self.outputs:
            raise ValueError(f"request_id {rid!r} is already in use")
        # Each of the n sequences samples on its own; seeded ones from seed + index.
        forks = [(f"{rid}#{i}", dataclasses.replace(params, n=1, seed=None if params.seed is None
                                                    else (params.seed + i) % 2**64)) for i in range(1, params.n)]
        req = Request(rid, ids, params, max_tokens, self.eos_token_ids, text, cache_salt, forks=forks)
        if params.structured_outputs is not None:
            req.grammar = grammar if grammar is not None else self.grammars.compile(params.structured_outputs)
        return req

    def reserve_remote(self, prompt: PromptType, params: Optional[SamplingParams], request_id: Optional[str],
                       cache_salt: Optional[str], threshold: int, grammar=None) -> KVReservation:
        """Decode role (decode first): validates the request and either queues it for local prefill or
        reserves its blocks for a prefill replica's push (see engine/remote_prefill.py). Its outputs
        then come out of `step()` like any request's."""
        req = self.make_request(prompt, params, request_id, cache_salt, grammar)
        if self.remote is None:
            self.enqueue(req)
            return KVReservation(req.request_id, 0, True, "disabled", req.num_prompt_tokens,
                                 prompt_token_ids=list(req.prompt_token_ids))
        res, local = self.remote.reserve(req, threshold)
        self._constrain(req)
        self.outputs.add(req, False)
        self.prompt_tokens_total += req.num_prompt_tokens
        if local:
            self.scheduler.add_request(req)
        return res

    def remote_prefill_failed(self, transfer_id: int, reason: str) -> None:
        if self.remote is not None:
            self.remote.failed(transfer_id, reason)

    def enqueue(self, req: Request, final_only: bool = False) -> None:
        """Queues a request from make_request. `final_only`: no per-step outputs, only the finished one
        (saves building a RequestOutput per request per step in offline batches)."""
        self._constrain(req)
        self.outputs.add(req, final_only)
        self.scheduler.add_request(req)
        self.prompt_tokens_total += req.num_prompt_tokens

    def _constrain(self, req: Request) -> None:
        if req.grammar is not None:  # each of its sequences follows the grammar
            self.structured.register([req.request_id, *req.fork_ids], req.grammar)

    def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, cache_salt: Optional[str] = None,
                    kv_push: Optional[KVPushTarget] = None, grammar=None) -> str:
        """`kv_push` (prefill role): push the prompt's KV into a decode replica's blocks as it is computed."""
        req = self.make_request(prompt, params, request_id, cache_salt, grammar)
        if kv_push is not None:
            if self.kv_sender is None:
                raise ValueError("this engine does not push KV (kv_role is not 'prefill' or 'both')")
            if (len(kv_push.block_ids) < self.kv.blocks_needed(req.num_prompt_tokens)
                    or kv_push.start_token % self.block_size or not 0 <= kv_push.start_token < req.num_prompt_tokens):
                raise ValueError(f"kv_push: {len(kv_push.block_ids)} destination blocks from position "
                                 f"{kv_push.start_token} do not fit a {req.num_prompt_tokens}-token prompt in "
                                 f"{self.block_size}-token blocks")
            req.kv_push = kv_push
            req.num_pushed_tokens = kv_push.start_token
        self.enqueue(req)
        return req.request_id

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        """Aborts whole requests (all n sequences); their blocks are free when this returns."""
        outputs = []
        for rid in request_ids:
            if self.remote is not None:
                self.remote.abort(rid)
            self.scheduler.abort(self.outputs.seq_ids(rid))
            out = self.outputs.abort(rid)
            if out is not None:
                outputs.append(out)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._pending) or bool(self._in_flight)
                or (self.remote is not None and self.remote.num_held > 0))

    # ---- the step loop ----
    def step(self, emit: Optional[Callable[[list[RequestOutput]], None]] = None,
             scheduled: Optional[Callable[[], None]] = None) -> list[RequestOutput]:
        """One engine step: schedule, launch, and collect the steps the overlap policy lets finish.
        Outputs of tokens collected earlier are built while the device runs the launched step;
        `emit`, when given, receives those as soon as they are ready instead of at return; `scheduled` is
        called once the step is scheduled, before it runs (the gauges then count its requests as running)."""
        t0 = time.perf_counter()
        outputs: list[RequestOutput] = []
        if self.remote is not None and self.remote.num_held:
            self.remote.poll()  # admits requests whose KV landed; failed handoffs go back to the queue
        sched = self._schedule()
        if not sched.requests and self._in_flight:
            # Nothing new can run beside the steps in flight: finish the oldest, then try again.
            outputs += self.outputs.process(self._collect(*self._in_flight.popleft()))
            sched = self._schedule()
        if sched.requests:
            if scheduled is not None:
                scheduled()
            self._launch(sched, t0)
        outputs += self.outputs.process(self._take_pending())
        if not sched.requests and not self._in_flight:
            if self.remote is not None and self.remote.num_held and not self.scheduler.has_unfinished():
                time.sleep(0.001)  # only waiting for KV to land: poll again soon, without spinning
            return outputs + self._end_unschedulable()
        if emit is not None and outputs:
            emit(outputs)
            outputs = []
        keep = self.policy.max_in_flight if sched.requests else 0
        while len(self._in_flight) > keep:
            changed = self._collect(*self._in_flight.popleft())
            if self.policy.defer_outputs:
                self._pending += changed
            else:
                outputs += self.outputs.process(changed)
        if len(self._in_flight) == 1 and self._in_flight[0][1].sample_deferred:
            # A constrained row waited for the token collected above: its mask can be made now.
            self.runner.finish_sampling(self._in_flight[0][1])
        return outputs

    def _schedule(self) -> SchedulerOutput:
        if not self._in_flight:
            return self.scheduler.schedule()
        if self.policy.run_ahead and not self._sync_next:
            return self.scheduler.schedule(ahead=True)
        if self.policy.disjoint:
            return self.scheduler.schedule(in_flight=frozenset(
                rid for s, _, _ in self._in_flight for rid in s.request_ids))
        return SchedulerOutput()  # blocks ran short while running ahead: finish the step in flight first

    def _launch(self, sched: SchedulerOutput, t0: float) -> None:
        ahead_of = self._in_flight[-1][1] if self.policy.run_ahead and self._in_flight else None
        handle = self.runner.launch(sched, defer_compute=self.policy.defer_compute, ahead_of=ahead_of)
        self._sync_next = sched.out_of_blocks
        self._in_flight.append((sched, handle, t0))

    def _collect(self, sched: SchedulerOutput, handle: StepHandle, t0: float) -> Changed:
        """Waits for a launched step's tokens and advances the scheduler; returns the new tokens."""
        result = self.runner.collect(handle)
        self.num_steps += 1
        for rid, plps in result.prompt_logprobs.items():
            self.outputs.add_prompt_logprobs(rid, plps)
        # A request that a stop string ended after this step was launched: update() skips it.
        changed = self.scheduler.update(sched, result)
        if self.structured.active:  # constrained sequences' matchers take their new tokens
            for seq in self.structured.advance(changed):
                self.scheduler.finish(seq, RequestStatus.FINISHED_STOPPED)
        # The whole step as a streaming client paces it: from its scheduling, or from the previous
        # step's end when steps overlap (async scheduling, micro-batches).
        now = time.perf_counter()
        elapsed = now - max(t0, self._last_finish)
        self._last_finish = now
        self.step_times.append(elapsed)
        n = sched.num_scheduled_tokens
        entry = (len(n), sum(n), sum(1 for t in n if t == 1), elapsed)
        self.step_log.append(entry)
        self.step_totals.add(*entry)
        return changed

    def _end_unschedulable(self) -> list[RequestOutput]:
        """Nothing fits even alone (and nothing is in flight): the sequence outgrew the whole pool.
        End it with 'length' rather than spin."""
        changed: Changed = []
        for req in self.scheduler.unschedulable():
            logger.warning("request %s needs more KV blocks than the cache has; ending it", req.request_id)
            self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
            changed.append((req, None))
        return self.outputs.process(changed)

    def _take_pending(self) -> Changed:
        pending, self._pending = self._pending, []
        return pending

    def forget_history(self) -> None:
        """Leaves no trace of the requests run so far (the start-up warm-up's): the prefix cache is
        reset, KV events dropped, counters and step timings zeroed. Call with no request in the engine."""
        if self.has_unfinished_requests():
            raise RuntimeError("forget_history with requests still in the engine")
        self.kv.pool.reset_prefix_cache()
        self.kv.take_events()
        self.scheduler.stats = SchedulerStats()
        self.outputs.generation_tokens_total = 0
        self.prompt_tokens_total = 0
        self.num_steps = 0
        self.step_times.clear()
        self.step_log.clear()
        self.step_totals = StepTotals()
        self._last_finish = 0.0

    def take_kv_events(self) -> list[KVEvent]:
        """Prefix-cache changes since the last call (needs `enable_kv_events`): `BlockStored` with the
        chained hashes of full blocks (engine/kv_cache/block_hash.py), `BlockRemoved` on eviction."""
        return self.kv.take_events()

    def collect_rank_reports(self) -> list[RankReport]:
        """Every rank's report (rank order): what the other ranks send back on request, such as
        per-expert load counts. Under pipeline parallelism the steps in flight finish first (their
        tokens become outputs at the next `step()`): a peer answers only after them."""
        if self.policy.defer_compute:
            while self._in_flight:
                self._pending += self._collect(*self._in_flight.popleft())
        return self.executor.collect_reports(self.num_steps)

    @property
    def generation_tokens_total(self) -> int:
        return self.outputs.generation_tokens_total

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
            "cuda_graph_replays": getattr(self.runner.graphs, "num_replays", 0),
            "piecewise_graph_replays": getattr(self.runner.piecewise, "num_replays", 0),
            **self.step_totals.as_metrics(),
            **(self.remote.metrics() if self.remote is not None else {}),
            **(self._sender_metrics() if self.kv_sender is not None else {}), **self.executor.rank.metrics(),
        }

    def _sender_metrics(self) -> dict[str, Any]:
        s = self.kv_sender.stats  # rank 0's share; under TP/PP the other ranks send theirs too
        return {"kv_blocks_sent": s.blocks_sent, "kv_bytes_sent": s.bytes_sent, "kv_push_seconds_total": s.send_seconds,
                "kv_pushes_failed": s.transfers_failed}


def resolve_device(name: str) -> torch.device:
    """The device an engine with this `device` setting runs on (no CUDA context is made)."""
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
