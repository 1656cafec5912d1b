"""Expert-parallel token movement with DeepEP V1's `deep_ep.Buffer` interface, on
`torch.distributed.all_to_all_single` (NCCL on GPU, gloo on CPU).

Method names, argument order and return tuples are DeepEP's, so a MoE layer written against
`EPBuffer` runs unchanged on a real `deep_ep.Buffer` (see `make_ep_buffer`). Experts are owned
contiguously: rank = expert // (E / R). A -1 in topk_idx means "no expert".

Normal mode (prefill): one small count exchange, one host read to size the outputs (DeepEP's
normal mode waits on the host the same way), then the payload exchange with uneven splits. Each
token goes once to each rank that owns one of its experts, with its per-destination local expert
ids (-1 elsewhere) and weights (0 there); received rows are grouped by source rank ascending,
source order inside. `combine` is the unweighted sum over receiving ranks, in fp32, cast once.

`num_worst_tokens > 0` (DeepEP's CUDA-graph-safe normal mode): nothing reads a device value on
the host. Every (source, destination) pair gets a fixed slot range of S rows, S = the buffer's
num_max_dispatch_tokens_per_rank if set, else num_worst_tokens; each rank therefore sends
`R * S * (H * elt + 8 + 12 K)` bytes whatever the routing (data, source index, topk ids and
weights), and the receiver compacts into `num_worst_tokens` rows. Rows past num_worst_tokens
cannot be reported without a host read and are dropped: keep num_worst_tokens >= R * S.

Low-latency mode lives in ep_low_latency.py. Async/event arguments are accepted for API
compatibility; everything runs in order on the current stream, so the events are trivially done.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from raylight.parallel.ep_low_latency import (check_low_latency_args, exchange, ll_combine, ll_dispatch,
                                              ll_dispatch_fp8, low_latency_buffer_bytes, wire_view)


class EventOverlap:
    """DeepEP's event wrapper. Our collectives run on the current stream, so an event here is only
    ever one the caller captured; waiting on it keeps DeepEP call sites working."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors  # DeepEP keeps tensors alive until the event is waited on

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()


class DispatchHandle(NamedTuple):
    """What cached dispatch and combine need. DeepEP's handle is opaque but starts with its
    rank_prefix_matrix; ours starts with this rank's column of it (rows from sources <= s)."""
    recv_prefix: torch.Tensor       # [R] int32: inclusive prefix of rows received per source rank
    is_token_in_rank: torch.Tensor  # [T, R] bool
    send_tok: torch.Tensor          # [rows sent] int64: token of each sent row (T = padding)
    send_splits: list               # host ints: rows sent to each rank
    recv_splits: list               # host ints: rows received from each rank
    recv_src_idx: torch.Tensor      # [N_recv] int64: source token index of each received row (-1 = padding)
    wire_to_row: Optional[torch.Tensor]  # num_worst_tokens mode: received wire row -> output row (N = dropped)
    num_recv: int                   # rows of recv_x (N_recv, or num_worst_tokens)


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, world: int):
    """-> (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R]).
    -1 entries go to an extra column / bucket that is cut off, so no masking with host reads."""
    t = topk_idx.shape[0]
    dev = topk_idx.device
    valid = topk_idx >= 0
    rank_of = torch.where(valid, topk_idx // (num_experts // world), world)
    in_rank = torch.zeros(t, world + 1, dtype=torch.bool, device=dev).scatter_(1, rank_of, True)
    in_rank = in_rank[:, :world].contiguous()
    per_rank = in_rank.sum(0, dtype=torch.int32)
    experts = torch.where(valid, topk_idx, num_experts).flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    per_expert.scatter_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    return per_rank, per_expert[:num_experts], in_rank


def _send_rows(in_rank: torch.Tensor, offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """Token of each send row: token t goes to row offsets[r] + (its rank among r's tokens) for
    every r it visits; unused rows hold T (the caller's zero row). Scatter duplicates land only on
    the cut-off last element."""
    t, world = in_rank.shape
    slot = in_rank.long().cumsum(0) - 1 + offsets
    pos = torch.where(in_rank, slot, rows).flatten()
    tok = torch.full((rows + 1,), t, dtype=torch.long, device=in_rank.device)
    tok.scatter_(0, pos, torch.arange(t, device=in_rank.device).repeat_interleave(world))
    return tok[:rows]


def _rows(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """x[tok] with tok == len(x) giving a zero row."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, tok)


def _pack(cols: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise metadata of mixed dtypes as one byte matrix, so it crosses in one collective."""
    return torch.cat([c.contiguous().view(torch.uint8) for c in cols], 1)


def _unpack(packed: torch.Tensor, like: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    out, at = [], 0
    for dtype, width in like:
        nbytes = width * torch.tensor([], dtype=dtype).element_size()
        # A fresh copy: a slice can count as contiguous (one row) yet keep a stride dtype views reject.
        col = packed.new_empty(packed.shape[0], nbytes).copy_(packed[:, at : at + nbytes])
        out.append(col.view(dtype))
        at += nbytes
    return out


class EPBuffer:
    """DeepEP `Buffer` look-alike over all_to_all_single. `group` None or of size 1: one rank,
    purely local, no collectives. Holds no device memory between calls (buffers are per call)."""

    def __init__(self, group, num_experts: int, hidden: int, num_max_dispatch_tokens_per_rank: int = 0, *,
                 deterministic: bool = True):
        self.group = group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} is not divisible by {self.world} ranks")
        self.num_experts, self.hidden = num_experts, hidden
        self.num_local_experts = num_experts // self.world
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        # True: per-rank reduction order fixed (bit-reproducible). False: one index_add_ over all
        # rows, whose atomics on CUDA make the fp32 sum order vary run to run.
        self.deterministic = deterministic

    # ------------------------------------------------------------------ DeepEP's static helpers

    @staticmethod
    def capture() -> EventOverlap:
        event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event()
            event.record()
        return EventOverlap(event)

    @staticmethod
    def get_dispatch_config(num_ranks: int):
        return None  # no tuning knobs: NCCL picks its own channels

    @staticmethod
    def get_combine_config(num_ranks: int):
        return None

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        return low_latency_buffer_bytes(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int):
        pass  # buffers are per call, nothing to clean

    # ------------------------------------------------------------------ layout

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """-> (num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool, EventOverlap). Local, no communication, no host read."""
        self._check_experts(num_experts)
        _wait(previous_event)
        per_rank, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, self.world)
        return per_rank, None, per_expert, in_rank, EventOverlap()

    # ------------------------------------------------------------------ normal dispatch / combine

    def dispatch(self, x, handle: Optional[DispatchHandle] = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config=None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event).
        x: [T, H], or (x_fp8 [T, H], scales [T, H/128]) which travel together. With a handle
        (cached mode) only x moves, in the handle's row order: (recv_x, None, None, None, None, event)."""
        _wait(previous_event)
        xs = list(x) if isinstance(x, tuple) else [x]
        if handle is not None:
            recv = [self._move(t, handle) for t in xs]
            return _one_or_tuple(recv), None, None, None, None, EventOverlap()

        if is_token_in_rank is None or num_tokens_per_rank is None or (
                num_tokens_per_expert is None and topk_idx is not None):
            if topk_idx is None:
                raise ValueError("dispatch needs topk_idx or (num_tokens_per_rank, is_token_in_rank)")
            num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = self.get_dispatch_layout(
                topk_idx, self.num_experts)
        t = xs[0].shape[0]
        if is_token_in_rank.shape != (t, self.world):
            raise ValueError(f"is_token_in_rank must be [{t}, {self.world}], got {tuple(is_token_in_rank.shape)}")
        dev, world = xs[0].device, self.world

        if num_worst_tokens > 0:
            # Fixed slots per peer: every count is a constant, nothing is read on the host.
            s = self.num_max_dispatch_tokens_per_rank or num_worst_tokens
            if t > s:  # shapes only: raise before any collective
                raise ValueError(f"{t} tokens exceed the per-peer slot of {s} rows")
            send_splits = recv_splits = [s] * world
            offsets = torch.arange(world, device=dev) * s
            counts = None
        else:
            send_splits, recv_splits, counts = self._exchange_counts(num_tokens_per_rank, num_tokens_per_expert)
            offsets = torch.tensor([0] + send_splits[:-1], device=dev).cumsum(0)
        n_send, n_wire = sum(send_splits), sum(recv_splits)
        send_tok = _send_rows(is_token_in_rank, offsets, n_send)

        # Per-row metadata: source token index (padding -1), then local topk ids and weights.
        if counts is None:  # no host list -> device copy here: graph capture forbids pageable copies
            dest = torch.arange(n_send, device=dev) // s
        else:
            dest = torch.arange(world, device=dev).repeat_interleave(torch.tensor(send_splits, device=dev),
                                                                      output_size=n_send)
        real = send_tok < t
        cols = [torch.where(real, send_tok, -1).view(-1, 1)]
        like = [(torch.long, 1)]
        if topk_idx is not None:
            k = topk_idx.shape[1]
            idx = _rows(topk_idx.long(), send_tok) - (dest * self.num_local_experts).view(-1, 1)
            local = (idx >= 0) & (idx < self.num_local_experts) & real.view(-1, 1)
            cols.append(torch.where(local, idx, -1))
            like.append((torch.long, k))
            if topk_weights is not None:
                cols.append(torch.where(local, _rows(topk_weights.float(), send_tok), 0.0))
                like.append((torch.float32, k))
        meta = _pack(cols)
        recv_meta = meta.new_empty(n_wire, meta.shape[1])
        exchange(recv_meta, meta, self.group, world, recv_splits, send_splits)
        parts = _unpack(recv_meta, like)

        wire_to_row = None
        n_recv = n_wire
        if num_worst_tokens > 0:
            n_recv = num_worst_tokens
            wire_to_row, recv_prefix = self._compaction(parts[0].view(-1), s, n_recv)
            fills = (-1, -1, 0.0)
            parts = [_compact(p, wire_to_row, n_recv, fill) for p, fill in zip(parts, fills)]
        else:
            recv_prefix = torch.tensor(recv_splits, dtype=torch.int32, device=dev).cumsum(0, dtype=torch.int32)
        handle = DispatchHandle(recv_prefix, is_token_in_rank, send_tok, send_splits, recv_splits,
                                parts[0].view(-1), wire_to_row, n_recv)
        recv_x = _one_or_tuple([self._move(x_, handle) for x_ in xs])
        recv_topk_idx = parts[1] if topk_idx is not None else None
        recv_topk_weights = parts[2] if topk_weights is not None and topk_idx is not None else None
        if counts is None:
            per_expert_list = []  # DeepEP: empty in num_worst_tokens mode (knowing it needs a host read)
        else:
            a = max(1, expert_alignment)
            per_expert_list = [-(-c // a) * a for c in counts]
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, EventOverlap()

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights=None, bias=None, config=None,
                previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """-> (combined_x [T, H], combined_topk_weights [T, K] | None, event): out[t] = sum over the
        ranks that received t of their row for t, UNWEIGHTED (callers weight and sum over their local
        experts first), fp32 accumulation, one cast; bias ([T, H] or a pair) added before the cast."""
        _wait(previous_event)
        if x.shape[0] != handle.num_recv:
            raise ValueError(f"combine expects {handle.num_recv} rows (the dispatch's), got {x.shape[0]}")
        acc = self._reduce(x, handle)
        for b in (bias if isinstance(bias, (tuple, list)) else [bias]):
            if b is not None:
                acc += b.float()
        combined_w = None
        if topk_weights is not None:
            combined_w = self._reduce(topk_weights, handle).to(topk_weights.dtype)
        return acc.to(x.dtype), combined_w, EventOverlap()

    # ------------------------------------------------------------------ low-latency mode

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False, return_recv_hook: bool = False):
        """-> (recv_x [E_loc, R*Tmax, H], recv_count [E_loc] int32, handle, event, hook). Fixed
        shapes, no host read: CUDA-graph capturable. Only the first recv_count[e] rows of expert e
        are valid. use_fp8 (DeepEP's default): recv_x = (e4m3 [E_loc, R*Tmax, H], float32 scales
        [E_loc, R*Tmax, H/128]), quantised per 128 channels before sending. The exchange has
        completed on return, so the hook (if asked for) does nothing."""
        if use_ue8m0:
            raise NotImplementedError("UE8M0 packed scales are not implemented in EPBuffer")
        check_low_latency_args(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, self.num_experts,
                               self.world, self.hidden)
        if use_fp8 and x.shape[1] % 128:  # a shape fact, so it raises before any collective
            raise ValueError(f"use_fp8 needs hidden % 128 == 0, got {x.shape[1]}; pass use_fp8=False")
        move = ll_dispatch_fp8 if use_fp8 else ll_dispatch
        extra = dict(round_scale=round_scale) if use_fp8 else {}
        recv_x, recv_count, handle = move(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                          self.group, self.world, cumulative_local_expert_recv_stats, **extra)
        return recv_x, recv_count, handle, EventOverlap(), (_done if return_recv_hook else None)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None, combine_wait_recv_cost_stats=None):
        """-> (combined_x [T, H], event, hook): out[t] = sum_k w[t, k] * expert output of (t, k),
        WEIGHTED, -1 skipped, fp32 accumulation. No host read."""
        if use_logfmt:
            raise NotImplementedError("LogFMT combine compression is not implemented in EPBuffer")
        combined = ll_combine(x, topk_idx, topk_weights, handle, self.group, self.world, out)
        return combined, EventOverlap(), (_done if return_recv_hook else None)

    # ------------------------------------------------------------------ internals

    def _check_experts(self, num_experts: int) -> None:
        if num_experts != self.num_experts:
            raise ValueError(f"num_experts={num_experts}, but this buffer was built for {self.num_experts}")

    def _exchange_counts(self, per_rank: torch.Tensor, per_expert: Optional[torch.Tensor]):
        """One small equal-split exchange of [tokens, pairs per local expert] for every peer, then the
        one host read of normal mode: -> (send_splits, recv_splits, pairs per local expert)."""
        world, e_loc = self.world, self.num_local_experts
        if per_expert is None:
            per_expert = torch.zeros(self.num_experts, dtype=torch.int32, device=per_rank.device)
        send = torch.cat([per_rank.view(world, 1).int(), per_expert.view(world, e_loc).int()], 1)
        recv = torch.empty_like(send)
        exchange(recv, send, self.group, world)
        host = torch.cat([send[:, 0].long(), recv.sum(0)[1:].long(), recv[:, 0].long()]).tolist()  # the host sync
        return host[:world], host[world + e_loc:], host[world : world + e_loc]

    def _compaction(self, src_idx: torch.Tensor, s: int, n_out: int):
        """num_worst_tokens mode: wire row (j, i) of source j's S-row slot range -> output row
        prefix[j] + i; empty slots (src_idx -1, always a suffix) and overflow -> n_out (dropped)."""
        filled = (src_idx >= 0).view(self.world, s)
        counts = filled.sum(1)
        prefix = counts.cumsum(0)
        row = (prefix - counts).view(-1, 1) + torch.arange(s, device=src_idx.device)
        row = torch.where(filled & (row < n_out), row, n_out)
        return row.flatten(), prefix.int()

    def _move(self, x: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Rows of x to their ranks in the handle's order (the payload exchange)."""
        xv = wire_view(x)  # float8 rows move (and are gathered) as bytes
        send = _rows(xv, handle.send_tok)
        wire = xv.new_empty(sum(handle.recv_splits), *x.shape[1:])
        exchange(wire, send, self.group, self.world, handle.recv_splits, handle.send_splits)
        if handle.wire_to_row is not None:
            wire = _compact(wire, handle.wire_to_row, handle.num_recv, 0)
        return wire.view(x.dtype)

    def _reduce(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Sends each received row back to its source; sums per token in fp32 -> [T, ...]."""
        if handle.wire_to_row is not None:  # back from num_worst_tokens rows into the fixed slots
            y = _rows(y, handle.wire_to_row)
        back = y.new_empty(sum(handle.send_splits), *y.shape[1:])
        exchange(back, y, self.group, self.world, handle.send_splits, handle.recv_splits)
        t = handle.is_token_in_rank.shape[0]
        acc = torch.zeros(t + 1, *y.shape[1:], dtype=torch.float32, device=y.device)  # row t: padding sink
        if not self.deterministic:
            return acc.index_add_(0, handle.send_tok, back.float())[:t]
        # A token appears at most once per destination, so within one rank's rows the indices are
        # unique: each call adds every element once, and ranks are summed in ascending order.
        at = 0
        for n in handle.send_splits:
            acc.index_add_(0, handle.send_tok[at : at + n], back[at : at + n].float())
            at += n
        return acc[:t]


def _compact(wire: torch.Tensor, wire_to_row: torch.Tensor, n_out: int, fill) -> torch.Tensor:
    """Wire rows into n_out output rows (index n_out is a sink that is cut off); others = fill."""
    out = torch.full((n_out + 1, *wire.shape[1:]), fill, dtype=wire.dtype, device=wire.device)
    return out.index_copy_(0, wire_to_row, wire)[:n_out]


def _one_or_tuple(ts: list):
    return ts[0] if len(ts) == 1 else tuple(ts)


def _wait(event) -> None:
    if event is not None:
        event.current_stream_wait()


def _done() -> None:
    """The receive hook: our exchange is complete when dispatch/combine returns."""


def make_ep_buffer(group, num_experts: int, hidden: int, num_max_dispatch_tokens_per_rank: int = 0,
                   prefer_deep_ep: bool = True):
    """A `deep_ep.Buffer` when DeepEP is importable and the group is NCCL on CUDA (the same calls then
    go to DeepEP's kernels), else an `EPBuffer`. UNTESTED HERE: deep_ep is not installed on our
    machines; the sizing follows DeepEP's own tests (size hints for bf16 hidden states)."""
    if prefer_deep_ep and group is not None and torch.cuda.is_available() and dist.get_backend(group) == "nccl":
        try:
            import deep_ep
        except ImportError:
            deep_ep = None
        if deep_ep is not None:
            world = dist.get_world_size(group)
            hidden_bytes = hidden * 2
            nvl = max(deep_ep.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(hidden_bytes, world),
                      deep_ep.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(hidden_bytes, world))
            rdma, ll = 0, num_max_dispatch_tokens_per_rank > 0
            if ll:
                rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden,
                                                                     world, num_experts)
            return deep_ep.Buffer(group, nvl, rdma, low_latency_mode=ll,
                                  num_qps_per_rank=max(1, num_experts // world) if ll else 24)
    return EPBuffer(group, num_experts, hidden, num_max_dispatch_tokens_per_rank)
