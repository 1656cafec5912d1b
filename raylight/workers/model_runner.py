"""Turns a `SchedulerOutput` into flat tensors, runs the model once, and samples."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from raylight.kernels.attention import CommonAttentionMetadata
from raylight.messages import PromptLogprobTask, SampleRow, SchedulerOutput, StepInputs
from raylight.utils.host_copy import gather_rows, to_device
from raylight.workers.logits_plan import run_logits_plan
from raylight.workers.sampler import Sampler
from raylight.workers.sampling_state import SamplingState
from raylight.workers.token_mask import DEFER


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: Optional[float] = None  # raw logprob of the token (when the request asked for logprobs)
    rank: Optional[int] = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class PromptLogprob:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class ModelRunnerOutput:
    # request id -> its sampled token; n tokens (the request's own, then its forks') on a fork step
    sampled: dict[str, list[SampledToken]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PromptLogprob]] = field(default_factory=dict)

logger = logging.getLogger(__name__)


@dataclass
class StepHandle:
    """A launched step: its device work is queued; `collect` waits for the sampled ids."""

    rows: list[SampleRow]
    prompt_logprobs: dict[str, list[PromptLogprob]]
    inputs: Optional[StepInputs] = None  # set until the step's compute has run on this rank
    # Per prompt-logprob logits call of the plan (inputs.prompt_logit_spans): whose, and its targets.
    prompt_chunks: list[tuple[str, PromptLogprobTask, int, int]] = field(default_factory=list)
    meta: Optional[object] = None  # SamplingMetadata
    sampled: Optional[object] = None  # SamplerOutput
    fill_values: Optional[torch.Tensor] = None  # device ids of the step's placeholder tokens
    host_ids: Optional[torch.Tensor] = None  # pinned copy of the sampled ids, valid after `ready`
    ready: Optional[torch.cuda.Event] = None
    # Structured outputs under async scheduling: a constrained row's mask waits for the token in flight
    # before it; the logits are kept until `finish_sampling` (workers/token_mask.py DEFER).
    sample_deferred: bool = False
    logits: Optional[torch.Tensor] = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attn_backend, kv_caches: list[torch.Tensor],
                 block_size: int, device: torch.device, seed: int = 0, graphs=None, piecewise=None,
                 dispatch: Optional[Callable[[StepInputs], None]] = None,
                 share_ids: Optional[Callable[[torch.Tensor], None]] = None, kv_sender=None,
                 after_forward: Optional[Callable[[], None]] = None):
        self.model = model
        self.graphs = graphs  # a CudaGraphRunner for decode-only steps, or None (eager)
        self.piecewise = piecewise  # a PiecewiseGraphRunner for the other steps up to its size, or None
        self._staged: Optional[torch.cuda.Event] = None  # the last step's inputs were queued for the device
        self.attn_backend = attn_backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        # TP/PP: sends each step's inputs to the other ranks before this rank runs it (workers/executor.py).
        self.dispatch = dispatch
        # TP with async scheduling: broadcasts placeholder ids from rank 0 to its peers, in place.
        self.share_ids = share_ids
        # Disaggregated prefill: pushes each layer's KV of the step's `kv_pushes` as the layer finishes.
        self.kv_sender = kv_sender
        # Runs after every forward on every rank, in lock-step (EPLB's record/rebalance step).
        self.after_forward = after_forward
        self.device = device
        self.sampler = Sampler(device, seed)
        self.sampling = SamplingState(model.config.vocab_size, device)
        # Allowed-token masks of a step's rows (structured outputs): rows -> None | DEFER | (row indices,
        # int32 bitmask on the host). Set by the engine (raylight/structured/manager.py).
        self.constrain: Optional[Callable[[list[SampleRow]], object]] = None

    def release(self, seq_id: str) -> None:
        self.sampling.release(seq_id)

    def prepare(self, sched: SchedulerOutput, ahead_of: Optional[StepHandle] = None
                ) -> tuple[StepHandle, Optional[np.ndarray]]:
        """The step's flat inputs on the host and the rows that sample (in a StepHandle), and for the
        placeholder tokens (`inputs.placeholder_pos`, async scheduling) the rows of `ahead_of`'s
        sampled ids they are. Reads nothing but `sched`."""
        # Decodes (one query token) first: attention batches them in one call.
        scheduled = sched.num_scheduled_tokens
        order = range(len(scheduled))
        if max(scheduled) != 1:
            order = sorted(order, key=lambda i: scheduled[i] != 1)

        def in_order(values: list) -> list:
            return values if type(order) is range else [values[i] for i in order]

        num_new = np.array(in_order(scheduled), dtype=np.int64)
        num_computed = np.array(in_order(sched.num_computed_before), dtype=np.int64)
        pending = in_order(sched.uses_pending_token)
        num_decodes = int((num_new == 1).sum())
        B = len(num_new)

        token_ids: list[int] = []
        placeholder_pos: list[int] = []
        if all(pending):  # async scheduling's steady state: every row is a placeholder the device fills in
            token_ids, placeholder_pos = [0] * B, list(range(B))
        else:
            for i, p in zip(order, pending):
                if p:  # the token a step in flight samples for it: the device fills it in
                    placeholder_pos.append(len(token_ids))
                    token_ids.append(0)
                else:
                    token_ids.extend(sched.new_token_ids[i])
        query_start_loc = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])
        seq_lens = num_computed + num_new
        total = int(query_start_loc[-1])
        if num_decodes == B:
            positions = num_computed
            req_idx = np.arange(B)
        else:
            req_idx = np.repeat(np.arange(B), num_new)
            positions = num_computed[req_idx] + (np.arange(total) - query_start_loc[req_idx])

        block_tables = sched.block_tables if type(order) is range else sched.block_tables[order]
        bs = self.block_size
        slot_mapping = block_tables[req_idx, positions // bs] * bs + positions % bs

        # The logits plan: prompt-logprob chunks first, then the rows that sample (a forking
        # request's last row once per sequence), the same order on every last-stage rank.
        spans: list[tuple[int, int]] = []
        prompt_chunks: list[tuple[str, PromptLogprobTask, int, int]] = []
        if sched.prompt_logprobs.count(None) != B:
            for k, i in enumerate(order):
                task = sched.prompt_logprobs[i]
                if task is not None:
                    q, computed = int(query_start_loc[k]), int(num_computed[k])
                    for lo, hi in task.chunks():
                        spans.append((q + lo - computed, q + hi - computed))
                        prompt_chunks.append((sched.request_ids[i], task, lo, hi))
        # Each request's rows sample from its last token's logits (several rows on a fork step).
        per_request = in_order(sched.sample_rows)
        rows = list(itertools.chain.from_iterable(per_request))
        logits_rows = np.repeat(query_start_loc[1:] - 1, [len(m) for m in per_request])
        src = None
        if placeholder_pos:
            if ahead_of is None:
                raise ValueError("a step uses tokens still in flight but names no step in flight")
            prev_row = {row.seq_id: j for j, row in enumerate(ahead_of.rows)}
            src = np.array([prev_row[sched.request_ids[i]] for i, p in zip(order, pending) if p], dtype=np.int64)
        inputs = StepInputs(np.array(token_ids, dtype=np.int64), positions, num_decodes, query_start_loc,
                            seq_lens, block_tables, slot_mapping, logits_rows.astype(np.int64, copy=False),
                            list(sched.block_copies), prompt_logit_spans=spans,
                            placeholder_pos=np.array(placeholder_pos, dtype=np.int64), kv_pushes=sched.kv_pushes)
        handle = StepHandle(rows, {}, inputs, prompt_chunks=prompt_chunks)
        return handle, src

    def forward(self, inputs: StepInputs, fill_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self._forward(inputs, fill_values)
        if self.after_forward is not None:
            self.after_forward()
        return out

    def _forward(self, inputs: StepInputs, fill_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model over the step's tokens (a CUDA graph replay for decode-only steps that fit one).
        `fill_values`: on rank 0, the device ids of the placeholder tokens (`inputs.placeholder_pos`);
        a TP peer receives them from rank 0 here."""
        dev = self.device
        fill_ids = None
        num_fill = len(inputs.placeholder_pos)
        if num_fill:
            if fill_values is None:  # a TP peer: rank 0 has the ids, on its device
                fill_values = torch.empty(num_fill, dtype=torch.long, device=dev)
            if self.share_ids is not None:
                self.share_ids(fill_values)
            # Async scheduling's steady state: every token is a placeholder (positions None: all of them),
            # so the ids are the device's own and no host ids or positions need copying.
            all_rows = num_fill == len(inputs.input_ids)
            fill_ids = (None if all_rows else to_device(inputs.placeholder_pos, dev), fill_values)
        if inputs.kv_copies:  # forked sequences' private copies of a shared, partly filled block
            src = to_device(torch.tensor([c[0] for c in inputs.kv_copies]), dev)
            dst = to_device(torch.tensor([c[1] for c in inputs.kv_copies]), dev)
            for cache in self.kv_caches:
                cache[dst] = cache[src]
        if self._staged is not None:
            # The previous step's inputs may not have reached the device yet (a micro-batch still in
            # flight; a TP peer running ahead of its GPU), and attention planning (FlashInfer) refills
            # the page-locked staging buffers they are copied from.
            self._staged.synchronize()
        staged = torch.cuda.Event() if dev.type == "cuda" else None
        self._staged = staged
        pushes = inputs.kv_pushes if self.kv_sender is not None else None
        if (self.graphs is not None and inputs.is_decode_only and not pushes
                and self.graphs.can_run(len(inputs.seq_lens), inputs.block_tables.shape[1])):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.seq_lens, inputs.block_tables,
                                   inputs.slot_mapping, staged, fill_ids)
        common = CommonAttentionMetadata(
            num_decodes=inputs.num_decodes, query_start_loc=inputs.query_start_loc, seq_lens=inputs.seq_lens,
            block_tables=inputs.block_tables, slot_mapping=to_device(inputs.slot_mapping, dev),
        )
        attn_meta = self.attn_backend.build(common)
        positions = to_device(inputs.positions, dev)
        if fill_ids is not None and fill_ids[0] is None:
            ids = fill_ids[1]
        else:
            ids = to_device(inputs.input_ids, dev)
            if fill_ids is not None:
                ids[fill_ids[0]] = fill_ids[1]
        if staged is not None:
            staged.record()
        if not pushes:
            if self.piecewise is not None and self.piecewise.can_run(len(inputs.input_ids)):
                return self.piecewise.run(ids, positions, attn_meta)
            return self.model(ids, positions, self.kv_caches, attn_meta)
        self.kv_sender.begin_step(pushes)  # the layers' forward hooks push as each layer finishes
        try:
            return self.model(ids, positions, self.kv_caches, attn_meta)
        finally:
            self.kv_sender.end_step()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, defer_compute: bool = False,
               ahead_of: Optional[StepHandle] = None) -> StepHandle:
        """Sends the step to the other ranks and queues its device work, without waiting for it.
        Every host-to-device copy is issued before the forward (a structured-output mask, made while the
        forward runs, right after it), so nothing here waits for the GPU (the prompt-logprob path, which
        reads values back, excepted). `defer_compute`: this rank's
        share runs in `collect` instead (pipeline parallelism: the last stage, us, would block on the
        previous stage here, while the next micro-batch could already be on its way to it).
        `ahead_of`: the step still in flight whose sampled ids this one's placeholder tokens are."""
        handle, src = self.prepare(sched, ahead_of)
        if self.dispatch is not None:  # a TP/PP replica: every rank runs this step with us
            self.dispatch(handle.inputs)
        if handle.rows:
            handle.meta = self.sampling.metadata(handle.rows)
        if src is not None:
            # Queued after the step in flight's sampling on the same stream: no host wait. In the steady
            # state the rows keep their order from step to step, and the ids are a view.
            handle.fill_values = gather_rows(ahead_of.sampled.token_ids, src)
        if not defer_compute:
            self._compute(handle)
        return handle

    def _compute(self, handle: StepHandle) -> None:
        inputs, rows = handle.inputs, handle.rows
        handle.inputs = None
        hidden = self.forward(inputs, handle.fill_values)

        def prompt_logprobs(i: int, logits: torch.Tensor) -> None:
            rid, task, lo, hi = handle.prompt_chunks[i]
            handle.prompt_logprobs.setdefault(rid, []).extend(
                self._prompt_logprobs(logits, task.targets[lo - task.first : hi - task.first], task.num_top))

        logits = run_logits_plan(self.model, hidden, inputs, prompt_logprobs)
        if not rows:
            return
        if self.constrain is not None:
            # Structured outputs: the host fills the allowed-token masks here, after the forward is
            # queued, so the fill (8.9 ms for 64 rows on the H200's host) overlaps the device's work.
            self._constrain(handle)
        if handle.sample_deferred:
            handle.logits = logits  # sampled by finish_sampling, once the tokens before are known
            return
        self._sample(handle, logits)

    def _constrain(self, handle: StepHandle, final: bool = False) -> None:
        got = self.constrain(handle.rows)
        if got is DEFER:
            if final:
                raise RuntimeError("a deferred step's mask still waits for a token: the step before it was not collected")
            handle.sample_deferred = True
        elif got is not None:
            rows, bitmask = got
            handle.meta.token_mask = (to_device(np.asarray(rows, dtype=np.int64), self.device),
                                      to_device(bitmask, self.device))

    @torch.inference_mode()
    def finish_sampling(self, handle: StepHandle) -> None:
        """Samples a step whose sampling waited for its constrained rows' masks (`sample_deferred`); the
        engine calls it once every step before this one was collected."""
        if not handle.sample_deferred or handle.logits is None:
            return
        handle.sample_deferred = False
        self._constrain(handle, final=True)
        logits, handle.logits = handle.logits, None
        self._sample(handle, logits)

    def _sample(self, handle: StepHandle, logits: torch.Tensor) -> None:
        rows = handle.rows
        handle.sampled = self.sampler(logits, handle.meta)
        if handle.meta.output_counts is not None:  # some row uses penalties
            self.sampling.record(rows, handle.sampled.token_ids)
        if self.device.type == "cuda":
            handle.host_ids = torch.empty(len(rows), dtype=torch.long, pin_memory=True)
            handle.host_ids.copy_(handle.sampled.token_ids, non_blocking=True)
            handle.ready = torch.cuda.Event()
            handle.ready.record()

    @torch.inference_mode()
    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """Waits for the launched step's sampled ids (the step's one host sync) and returns them."""
        if handle.inputs is not None:
            self._compute(handle)
        if handle.sample_deferred:
            self.finish_sampling(handle)
        out = ModelRunnerOutput(prompt_logprobs=handle.prompt_logprobs)
        rows, sampled = handle.rows, handle.sampled
        if not rows:
            return out
        if handle.ready is not None:
            handle.ready.synchronize()
            token_ids = handle.host_ids.tolist()
        else:
            token_ids = sampled.token_ids.tolist()
        lps = ranks = top_ids = top_lps = None
        if sampled.logprobs is not None:
            lps, ranks = sampled.logprobs.tolist(), sampled.ranks.tolist()
            if sampled.top_ids is not None:
                top_ids, top_lps = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
        by_request = out.sampled
        for j, (row, tok) in enumerate(zip(rows, token_ids)):
            s = SampledToken(tok)
            if lps is not None and row.params.logprobs is not None:
                k = row.params.logprobs
                s.logprob, s.rank = lps[j], ranks[j]
                s.top = list(zip(top_ids[j][:k], top_lps[j][:k])) if top_ids is not None else []
            rid = row.request_id
            mine = by_request.get(rid)
            if mine is None:
                by_request[rid] = [s]
            else:  # a forking request's n tokens
                mine.append(s)
        return out

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[int], k: int) -> list[PromptLogprob]:
        """Logprob, rank and top-k of each target prompt token, from the logits of the positions before them."""
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=self.device)[:, None])
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        top = logprobs.topk(k, dim=-1) if k > 0 else None
        top_ids = top.indices.tolist() if top is not None else [[]] * len(targets)
        top_lps = top.values.tolist() if top is not None else [[]] * len(targets)
        return [PromptLogprob(t, lp, rk, list(zip(ti, tl)))
                for t, lp, rk, ti, tl in zip(targets, chosen[:, 0].tolist(), ranks, top_ids, top_lps)]
