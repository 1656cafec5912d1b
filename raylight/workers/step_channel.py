"""Rank 0 <-> the other ranks of a replica, over the gloo group, as int64 tensors (never pickles).

Out: one step's `StepInputs` as one int64 tensor broadcast from rank 0.
Back: `RankReport`s, small typed results of each rank (per-expert load counts, finished KV
transfers), when rank 0 asks for them (`gather_reports`): a report request travels in the step
stream like a step, and every rank answers in one all-gather. Nothing flows back per step.

A message is a fixed-size header (the step's shapes) followed by the arrays, concatenated.
Receivers must post a buffer of known size, so every message is broadcast in a buffer of a
fixed `capacity`: one collective per step whenever the step fits (every decode step of a few
hundred sequences of moderate context, most prefill steps). A larger step sends the rest in a
second broadcast whose size the header already announced.

Why gloo on the host: every rank needs the step's shapes on the host anyway (attention
metadata is planned there), so broadcasting host memory costs no device round trip.
"""

from __future__ import annotations

import datetime
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from raylight.messages import KVPush, RankReport, StepInputs

_STOP, _STEP, _REPORT = 0, 1, 2
# Header fields, in order.
_OP, _LEN, _T, _B, _DECODES, _WIDTH, _S, _C, _K, _SEQ, _P, _KV = range(12)
HEADER = 16
DEFAULT_CAPACITY = 16384  # int64 elements (128 KiB): a 256-sequence decode step with ~50 blocks each fits
# Ranks other than 0 wait this long for the next step: an idle replica is not a failure. A dead
# rank 0 still ends the wait at once (gloo reports the closed connection).
IDLE_WAIT = datetime.timedelta(days=365)


class StepChannel:
    def __init__(self, group: dist.ProcessGroup, rank: int, capacity: int = DEFAULT_CAPACITY,
                 report: Optional[Callable[[], RankReport]] = None):
        """`report`: on ranks other than 0, what this rank answers when rank 0 asks for reports."""
        self.group, self.rank, self.capacity = group, rank, max(capacity, HEADER + 64)
        self.report = report
        self._buf = torch.zeros(self.capacity, dtype=torch.int64)
        self._seq = 0  # steps sent / received: a cheap check that no rank skipped one
        # Rank 0's broadcasts still on their way, with the tensors they read. Sending asynchronously
        # matters under PP with micro-batches: rank 0 sends the next step while its last-stage TP
        # peers are still inside the previous one's collectives with it, and only reach this
        # broadcast once rank 0 has joined those.
        self._sending: list[tuple[object, torch.Tensor]] = []

    # ---- rank 0 ----
    def send(self, x: StepInputs) -> None:
        T, B = len(x.input_ids), len(x.seq_lens)
        W = x.block_tables.shape[1] if B else 0
        parts = [x.input_ids, x.positions, x.slot_mapping, x.query_start_loc, x.seq_lens, x.block_tables.reshape(-1),
                 x.logits_rows, np.asarray(x.prompt_logit_spans, dtype=np.int64).reshape(-1),
                 np.asarray(x.kv_copies, dtype=np.int64).reshape(-1), x.placeholder_pos, encode_pushes(x.kv_pushes)]
        length = sum(len(p) for p in parts)
        header = np.zeros(HEADER, dtype=np.int64)
        header[[_OP, _LEN, _T, _B, _DECODES, _WIDTH, _S, _C, _K, _SEQ, _P, _KV]] = (
            _STEP, length, T, B, x.num_decodes, W, len(x.logits_rows), len(x.prompt_logit_spans), len(x.kv_copies),
            self._seq, len(x.placeholder_pos), len(parts[-1]))
        self._seq += 1
        payload = np.concatenate([header] + parts)
        first = payload[: self.capacity]
        self.flush()  # the buffer is about to be rewritten
        buf = self._buf.numpy()
        buf[: len(first)] = first
        self._send_async(self._buf)
        if len(payload) > self.capacity:
            self._send_async(torch.from_numpy(payload[self.capacity :].copy()))

    def send_stop(self) -> None:
        self.flush()
        self._buf.zero_()  # op 0: stop
        self._broadcast(self._buf)

    def gather_reports(self, own: RankReport) -> list[RankReport]:
        """Asks every rank for its report; returns them in rank order (`own` is rank 0's). Call it
        between steps: a rank answers once it has run every step sent before the request."""
        self.flush()
        self._buf.zero_()
        self._buf[_OP] = _REPORT
        self._broadcast(self._buf)
        return _all_gather_reports(self.group, own)

    def flush(self) -> None:
        """Waits until every step sent so far has reached all ranks (raises what the sends raised)."""
        sending, self._sending = self._sending, []
        for work, _ in sending:
            work.wait()

    def _send_async(self, t: torch.Tensor) -> None:
        self._sending.append((dist.broadcast(t, src=0, group=self.group, async_op=True), t))

    # ---- every other rank ----
    def receive(self) -> Optional[StepInputs]:
        """The next step's inputs; None when rank 0 shuts the replica down."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.timeout = 0, IDLE_WAIT
        while True:
            self.group.broadcast([self._buf], opts).wait()
            buf = self._buf.numpy()
            op, length, T, B, decodes, W, S, C, K, seq, P, KV = (int(v) for v in buf[:12])
            if op == _STOP:
                return None
            if op == _STEP:
                break
            # _REPORT: answer, then wait for the next message
            _all_gather_reports(self.group, self.report() if self.report is not None else RankReport(self.rank))
        if seq != self._seq:
            raise RuntimeError(f"step channel out of sync: got step {seq}, expected {self._seq}")
        self._seq += 1
        payload = buf[HEADER : HEADER + length].copy()  # the buffer is reused for the next step
        if HEADER + length > self.capacity:
            rest = torch.empty(HEADER + length - self.capacity, dtype=torch.int64)
            self._broadcast(rest)
            payload = np.concatenate([payload, rest.numpy()])
        arrays = []
        at = 0
        for n in (T, T, T, B + 1, B, B * W, S, 2 * C, 2 * K, P, KV):
            arrays.append(payload[at : at + n])
            at += n
        ids, pos, slots, qsl, seq_lens, tables, rows, spans, copies, placeholders, pushes = arrays
        return StepInputs(input_ids=ids, positions=pos, num_decodes=decodes, query_start_loc=qsl, seq_lens=seq_lens,
                          block_tables=tables.reshape(B, W), slot_mapping=slots, logits_rows=rows,
                          kv_copies=[tuple(c) for c in copies.reshape(K, 2).tolist()],
                          prompt_logit_spans=[tuple(s) for s in spans.reshape(C, 2).tolist()],
                          placeholder_pos=placeholders, kv_pushes=decode_pushes(pushes))

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self.group)


# ---------------------------------------------------------------- KV pushes (disaggregated prefill)

def encode_pushes(pushes: list[KVPush]) -> np.ndarray:
    """Per push: [transfer_id, port, last, num_blocks, len(host), host bytes..., src ids..., dst ids...]."""
    out: list[int] = []
    for p in pushes:
        host = p.host.encode()
        out += [p.transfer_id, p.port, int(p.last), len(p.src_block_ids), len(host), *host,
                *p.src_block_ids, *p.dst_block_ids]
    return np.asarray(out, dtype=np.int64)


def decode_pushes(a: np.ndarray) -> list[KVPush]:
    vals, at, pushes = a.tolist(), 0, []
    while at < len(vals):
        tid, port, last, n, h = vals[at : at + 5]
        at += 5
        host = bytes(vals[at : at + h]).decode()
        at += h
        pushes.append(KVPush(tid, host, port, vals[at : at + n], vals[at + n : at + 2 * n], bool(last)))
        at += 2 * n
    return pushes


# ---------------------------------------------------------------- reports back to rank 0

def encode_report(r: RankReport) -> np.ndarray:
    """[rank, num_steps, E, K, expert_load (E), kv_transfers_done (K)]"""
    load = np.asarray(r.expert_load, dtype=np.int64).reshape(-1)
    done = np.asarray(r.kv_transfers_done, dtype=np.int64).reshape(-1)
    return np.concatenate([np.array([r.rank, r.num_steps, len(load), len(done)], dtype=np.int64), load, done])


def decode_report(a: np.ndarray) -> RankReport:
    rank, steps, E, K = (int(v) for v in a[:4])
    return RankReport(rank, steps, a[4 : 4 + E].copy(), a[4 + E : 4 + E + K].tolist())


def _all_gather_reports(group: dist.ProcessGroup, own: RankReport) -> list[RankReport]:
    """Every rank's report, in rank order, to every rank: the lengths first, then the payloads
    padded to the longest (gloo's all-gather wants equal sizes)."""
    payload = encode_report(own)
    world = dist.get_world_size(group)
    n = torch.tensor([len(payload)], dtype=torch.int64)
    lens = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lens, n, group=group)
    longest = max(int(x) for x in lens)
    mine = torch.zeros(longest, dtype=torch.int64)
    mine[: len(payload)] = torch.from_numpy(payload)
    parts = [torch.zeros(longest, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [decode_report(p.numpy()[: int(L)]) for p, L in zip(parts, lens)]
