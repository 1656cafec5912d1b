"""Typed messages: everything that crosses a process or thread boundary, in one module.

* ingress <-> replica (Ray Serve handle calls): `GenerateCall` in, `ReplicaMessage`s out,
  `ReplicaStats` for the router and `/metrics`;
* event loop <-> engine loop (one replica; a thread, or the engine's own process):
  `AddRequest`, `AbortRequest`, `RemotePrefillFailed` in; `RequestOutput` (raylight.outputs) out;
  with an engine process also `EngineProcessStart`/`Ready`/`Failed`, `EngineUpdate`, `StopEngine`;
* scheduler -> model runner (rank 0): `SchedulerOutput`, with its `SampleRow`s and
  `PromptLogprobTask`s: everything the runner needs, so it never reads the KV manager or a
  scheduler-owned `Request`;
* rank 0 <-> the other ranks of a TP/PP replica: `StepInputs` out (workers/step_channel.py packs
  them into one int64 tensor), `RankReport` back (small typed results: per-expert load counts,
  finished KV transfers), also as int64 tensors: nothing here is ever pickled onto a socket;
* KV cache events (`BlockStored`, `BlockRemoved`) for a router that tracks which replica holds
  which prefix.

This is a leaf module (like config.py and outputs.py): engine/, workers/ and cluster/ import it,
it imports none of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from raylight.outputs import RequestOutput
from raylight.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict[str, Any]]


# ---------------------------------------------------------------- ingress <-> replica

@dataclass
class GenerateCall:
    request_id: str
    prompt: Union[str, list[int]]
    params: SamplingParams
    cache_salt: Optional[str] = None
    # False: the caller reads only the final output (a non-streaming HTTP request); the replica then
    # sends the first output (time to first token) and the final one, which carries the deltas between.
    stream: bool = True


@dataclass
class ReplicaMessage:
    output: Optional[RequestOutput] = None
    error_status: Optional[int] = None  # 400 invalid input, 429 queue full, 503 engine dead
    error_message: Optional[str] = None
    stats: Optional[dict[str, Any]] = None  # engine gauges, sent with the last message
    replica_id: str = ""
    # Disaggregated decode replica -> router only (never reaches the ingress): the first message of a
    # request says where its prompt KV must go.
    reservation: Optional["KVReservation"] = None


@dataclass
class ReplicaStats:
    replica_id: str
    metrics: dict[str, Any] = field(default_factory=dict)
    step_time_s: float = 0.0
    healthy: bool = True


# ---------------------------------------------------------------- event loop <-> engine thread

@dataclass
class AddRequest:
    """A request for the engine loop; its outputs go back marked with `ticket` (the client's number for
    this generate call: engine/async_engine.py)."""

    request_id: str
    prompt: PromptType
    params: SamplingParams
    cache_salt: Optional[str]
    ticket: int
    # Disaggregated serving. Decode side: reserve blocks for a remote prefill (the first item the sink
    # gets is a `KVReservation`) unless the uncached part of the prompt is shorter than this many tokens.
    remote_prefill_threshold: Optional[int] = None
    # Prefill side: push the prompt's KV into these decode blocks as it is computed.
    kv_push: Optional["KVPushTarget"] = None
    # Structured outputs: the grammar compiled for params.structured_outputs (by the engine loop, off the
    # step, when it arrives without one; never sent across a process: it is set where the loop runs).
    grammar: Any = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class RemotePrefillFailed:
    """The prefill side of a disaggregated request failed or gave up: prefill it locally."""

    transfer_id: int
    reason: str


@dataclass
class OutputSink:
    """Where the engine thread delivers one request's outputs (or the exception that ends it):
    an asyncio.Queue on the event loop, filled thread-safely."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Union[RequestOutput, BaseException]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    @staticmethod
    def put_each(items: list[tuple["OutputSink", RequestOutput]]) -> None:
        """Delivers many requests' outputs (a step's) with one wake-up per event loop: each
        call_soon_threadsafe writes to the loop's self-pipe, which at 256 outputs a step cost the engine
        thread 0.9 ms per step on our CPU against 0.12 ms batched."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sink, item in items:
            by_loop.setdefault(sink.loop, []).append((sink.queue, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


# ---------------------------------------------------------------- replica <-> engine process
# (engine/engine_process.py: over a socket pair between a replica and the engine process it started;
# the engine commands above travel the same way, without a grammar)

@dataclass
class EngineProcessStart:
    """The first message to a new engine process: what to build."""

    engine_args: dict[str, Any]  # EngineArgs fields
    threads: int  # torch threads
    log_level: str
    max_stream_messages_per_s: Optional[float] = None
    # The replica's import path: what it can import (a Ray runtime env's working_dir or py_modules, a
    # site directory added at run time) the engine process must import too.
    sys_path: list[str] = field(default_factory=list)
    # A replica over several ranks under Serve: its PlacementPlan (with its group's id), and the Ray
    # cluster the engine process joins to start the other ranks as actors in that group.
    placement: Any = None
    ray_address: Optional[str] = None
    ray_namespace: Optional[str] = None
    ray_runtime_env: Optional[dict[str, Any]] = None  # the replica's (the rank actors' code and packages)
    gc_freeze: bool = False  # once ready, move the start-up objects out of the garbage collector's walks


@dataclass
class EngineState:
    """The engine's gauges as the loop last saw them (sent with every update)."""

    num_running: int = 0
    num_waiting: int = 0  # in the scheduler's queue or compiling a grammar
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    kv_cache_usage: float = 0.0
    last_step_time: float = 0.0
    has_unfinished: bool = False


@dataclass
class EngineProcessReady:
    max_num_seqs: int
    kv_events_enabled: bool
    state: EngineState
    metrics: dict[str, Any]


@dataclass
class EngineUpdate:
    """The engine process's news since its last update: outputs by ticket (a `RequestOutput`, a
    `KVReservation`, or the ValueError refusing a request), the last ticket its loop took, its gauges,
    new KV events, and its metrics when they are due (a request finished, or every METRICS_EVERY_S)."""

    outputs: list[tuple[int, Any]]
    taken: int
    state: EngineState
    kv_events: list[Any] = field(default_factory=list)
    metrics: Optional[dict[str, Any]] = None


@dataclass
class EngineProcessFailed:
    """The engine process could not start, or its loop crashed: the traceback, then it exits."""

    error: str


@dataclass
class StopEngine:
    """Finish the steps in flight, stop the engine (and its other ranks), exit."""


# ---------------------------------------------------------------- disaggregated prefill/decode

@dataclass
class KVReservation:
    """A decode replica's answer to a disaggregated request (decode first): where the prompt's KV must
    go. `local`: the decode replica prefills it itself (`reason` says why: "short", "prompt_logprobs",
    "disabled"); otherwise a prefill replica computes prompt positions [num_cached_tokens,
    num_prompt_tokens - 1) and pushes them into `block_ids` (the decode side computes the last prompt
    position itself and samples, so sampling state never leaves the decode replica)."""

    request_id: str
    transfer_id: int
    local: bool
    reason: str
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # the decode side's own prefix-cache hit (whole blocks)
    block_ids: list[int] = field(default_factory=list)  # decode block table for positions [0, P - 1)
    host: str = ""  # the decode replica's KV endpoint (its rank 0's store)
    port: int = 0
    lease_s: float = 0.0  # the decode side falls back to local prefill if the KV has not landed by then
    replica_id: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)  # the tokenized prompt (the prefill side's input)

    def push_target(self) -> "KVPushTarget":
        return KVPushTarget(self.transfer_id, self.host, self.port, self.num_cached_tokens, list(self.block_ids))


@dataclass
class KVPushTarget:
    """What a prefill engine needs to push one request's KV: the decode endpoint, the first position
    to ship (the decode side's cached prefix, a block boundary) and the decode block table."""

    transfer_id: int
    host: str
    port: int
    start_token: int
    block_ids: list[int]


@dataclass(slots=True)
class KVPush:
    """One step's share of a push, per request (scheduler -> runner -> every rank): decode blocks
    `dst_block_ids` receive the KV of prefill blocks `src_block_ids`; `last`: the request's final chunk."""

    transfer_id: int
    host: str
    port: int
    src_block_ids: list[int]
    dst_block_ids: list[int]
    last: bool


# ---------------------------------------------------------------- scheduler -> model runner

@dataclass(slots=True)
class SampleRow:
    """One row of the step's logits to sample from: a request, or one of the n sequences a
    request forks into on its first token (they share the request's logits row)."""

    request_id: str  # whose logits row this is
    seq_id: str  # the sequence that receives the token: request_id, or one of its forks
    params: SamplingParams
    num_output_tokens: int  # tokens the sequence has before this one (placeholders included)
    # Read when the sequence's penalty state is first built (after a preemption or a fork the
    # sequence already has outputs), and by min_tokens: the request's own lists, not copies.
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(slots=True)
class PromptLogprobTask:
    """This step's share of a request's prompt logprobs: logits calls over prompt positions
    [lo, hi) (position p predicts prompt token p + 1), `chunk` positions per call."""

    num_top: int  # top logprobs per position (the request's prompt_logprobs)
    first: int  # first prompt position of this step's share
    last: int  # one past its last
    targets: list[int]  # prompt_token_ids[first + 1 : last + 1]
    chunk: int = 256  # rows of [rows, vocab] logits materialised at once

    def chunks(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.chunk, self.last)) for lo in range(self.first, self.last, self.chunk)]


@dataclass
class SchedulerOutput:
    """One step: which requests run, how many tokens each, and what the runner needs to run them.

    Per-request fields are parallel lists in run order. The runner reads everything but
    `requests`, `preempted` and `out_of_blocks`, which are the scheduler's own (for `update`)."""

    requests: list[Any] = field(default_factory=list)  # the scheduler's Request objects
    request_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    # Tokens computed or in flight before this step (the request's first position in it).
    num_computed_before: list[int] = field(default_factory=list)
    # The token ids the step computes; a placeholder (see uses_pending_token) is not among them.
    new_token_ids: list[list[int]] = field(default_factory=list)
    # [requests, the longest table]: row i holds request i's block ids, padded with 0.
    block_tables: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    # Whether this step reaches the end of the request's tokens and so samples one.
    samples: list[bool] = field(default_factory=list)
    # Its one token is the one a step still in flight samples (async scheduling): the device fills it in.
    uses_pending_token: list[bool] = field(default_factory=list)
    sample_rows: list[list[SampleRow]] = field(default_factory=list)  # per request; n rows on a fork step
    prompt_logprobs: list[Optional[PromptLogprobTask]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks to copy first
    kv_pushes: list[KVPush] = field(default_factory=list)  # disaggregated prefill: KV to ship this step
    preempted: list[Any] = field(default_factory=list)
    out_of_blocks: bool = False  # a running request did not get its blocks (and nothing was preempted)

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


# ---------------------------------------------------------------- rank 0 <-> other ranks

@dataclass
class StepInputs:
    """Everything a rank needs to run one step's forward, as host arrays: what rank 0 sends to the
    other ranks of a TP/PP replica. Rows are ordered decodes first."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    num_decodes: int
    query_start_loc: np.ndarray  # [B + 1]
    seq_lens: np.ndarray  # [B]
    block_tables: np.ndarray  # [B, max_blocks]
    slot_mapping: np.ndarray  # [T]
    logits_rows: np.ndarray  # [S] flat rows whose logits are sampled (a forking request's row repeats)
    kv_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks to copy first
    # [start, end) flat rows of each prompt-logprob logits call, in order. With `logits_rows` this is
    # the step's logits plan: every last-stage rank makes the same compute_logits calls in the same
    # order (each gathers the vocabulary slices of every TP rank), see workers/logits_plan.py.
    prompt_logit_spans: list[tuple[int, int]] = field(default_factory=list)
    # Flat rows whose input id is a placeholder (async scheduling): the token the step before samples,
    # filled in on the device; under TP rank 0 broadcasts those ids to its peers first.
    placeholder_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    kv_pushes: list[KVPush] = field(default_factory=list)  # pushed layer by layer as the forward runs

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == len(self.seq_lens)


@dataclass
class RankReport:
    """What a rank other than 0 sends back when rank 0 asks (`Executor.collect_reports`): small typed
    results gathered since the last report. Travels as int64 arrays (workers/step_channel.py)."""

    rank: int
    num_steps: int = 0  # steps this rank has run in all
    # Tokens routed to each of this rank's experts since the last report (EPLB); empty without MoE.
    expert_load: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Ids of KV transfers (disaggregated prefill) this rank finished writing since the last report.
    kv_transfers_done: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- KV cache events

@dataclass(frozen=True)
class BlockStored:
    """Full blocks entered the prefix cache (hashes chained in order, `parent` before the first)."""

    block_hashes: tuple[bytes, ...]
    parent_hash: Optional[bytes]


@dataclass(frozen=True)
class BlockRemoved:
    """Cached blocks were evicted: a prefix that starts with them is no longer found here."""

    block_hashes: tuple[bytes, ...]


KVEvent = Union[BlockStored, BlockRemoved]
