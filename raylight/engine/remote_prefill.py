"""The decode role of disaggregated serving: reserve blocks for a prompt another replica prefills,
admit the request once its KV has landed, fall back to local prefill when it does not.

Decode first: `reserve` runs the real prefix match on this replica's cache. When the uncached
part is short (under the threshold), or the request needs every prompt position's logits
(prompt_logprobs), the request is simply queued here (local prefill). Otherwise its blocks are
allocated, not yet entered in the prefix cache (nothing may read them before the KV is there),
and a `KVReservation` tells the caller where the prefill replica must push positions
[num_cached_tokens, P - 1). Position P - 1 is computed here, in the request's first step, which
also samples its first token: sampling state (seeds, penalties, n-way forks, logprobs) never
leaves this replica, so the output equals the colocated engine's.

`poll`, at the start of every engine step, admits the requests whose KV has landed and turns
failures and expired leases into local prefills (kvtransfer/handoff.py has the state machine).
"""

from __future__ import annotations

import collections
import logging
import time

from raylight.engine.request import Request, RequestStatus
from raylight.kvtransfer.handoff import Handoff, HandoffState
from raylight.messages import KVReservation
from raylight.sampling_params import SamplingParams

logger = logging.getLogger("raylight.engine")


def prefill_params(params: SamplingParams) -> SamplingParams:
    """What the prefill side runs for a request with `params`: the prompt's KV and one throwaway greedy
    token. Nothing of the request's sampling (n, logprobs, stop strings, penalties, seed): the decode
    side samples."""
    return SamplingParams(max_tokens=1, temperature=0.0)


class RemotePrefills:
    def __init__(self, kv, scheduler, endpoint, lease_s: float, block_bytes: int, replica_id: str = ""):
        """`endpoint`: this replica's KVEndpoint (rank 0's); `block_bytes`: one block over every rank."""
        self.kv, self.scheduler, self.endpoint = kv, scheduler, endpoint
        self.lease_s, self.block_bytes, self.replica_id = lease_s, block_bytes, replica_id
        self.pending: dict[int, Handoff] = {}  # RESERVED
        self.by_request: dict[str, int] = {}
        self.quarantine: list[Handoff] = []
        self._next_id = 1
        self.remote = 0
        self.local: collections.Counter = collections.Counter()  # reason -> local prefills
        self.failures: collections.Counter = collections.Counter()  # reason -> handoffs that fell back
        self.blocks_received = 0
        self.transfer_seconds = 0.0

    # ---- requests ----
    def reserve(self, req: Request, threshold: int) -> tuple[KVReservation, bool]:
        """Returns the reservation and whether the request was queued for local prefill."""
        P = req.num_prompt_tokens
        res = KVReservation(req.request_id, 0, True, "", P, replica_id=self.replica_id,
                            prompt_token_ids=list(req.prompt_token_ids))
        if req.needs_prompt_logprobs:
            return self._local(res, "prompt_logprobs"), True
        hits, cached = self.kv.get_computed_blocks(req)
        uncached = (P - 1) - cached
        if uncached <= 0 or uncached < threshold:
            return self._local(res, "short"), True
        if not self.kv.allocate_slots(req, P - 1 - cached, hits, cache=False):
            return self._local(res, "no_free_blocks"), True
        stats = self.scheduler.stats
        stats.prefix_cache_queries += P
        stats.prefix_cache_hit_tokens += cached
        req.num_cached_tokens = cached
        tid = self._next_id
        self._next_id += 1
        block_ids = self.kv.block_ids(req.request_id)
        self.pending[tid] = Handoff(tid, req, P - 1, len(block_ids) - cached // self.kv.block_size, self.lease_s)
        self.by_request[req.request_id] = tid
        self.remote += 1
        res.transfer_id, res.local, res.reason = tid, False, "remote"
        res.num_cached_tokens, res.block_ids = cached, block_ids
        res.host, res.port, res.lease_s = self.endpoint.host, self.endpoint.port, self.lease_s
        return res, False

    def _local(self, res: KVReservation, reason: str) -> KVReservation:
        self.local[reason] += 1
        res.reason = reason
        return res

    def failed(self, transfer_id: int, reason: str) -> None:
        """The caller gave up on the prefill side (it failed, or its replica died): prefill locally."""
        h = self.pending.get(transfer_id)
        if h is not None:
            self._fall_back(h, reason)

    def abort(self, request_id: str) -> None:
        tid = self.by_request.get(request_id)
        if tid is not None and tid in self.pending:
            self._quarantine(self.pending.pop(tid), "aborted")
            del self.by_request[request_id]

    # ---- every engine step ----
    def poll(self) -> None:
        now = time.monotonic()
        try:
            look = self.endpoint.anything_landed()  # one store read per step while nothing changes
        except Exception:
            look = True  # the per-transfer read below fails too, and says so
        for tid, h in list(self.pending.items()):
            if h.request.is_finished:  # ended while waiting (aborted through the scheduler's view)
                self._quarantine(self.pending.pop(tid), "aborted")
                self.by_request.pop(h.request.request_id, None)
                continue
            try:
                landed = self.endpoint.landed(tid) if look else False
            except Exception as e:  # our own store: should not fail; treat like a failed prefill
                logger.warning("KV endpoint store read failed for transfer %d: %s", tid, e)
                landed = None
            if landed:
                self._admit(h, now)
            elif landed is None:
                self._fall_back(h, "prefill_failed")
            elif h.expired(now):
                self._fall_back(h, "lease_expired")
        for h in [h for h in self.quarantine if now >= h.release_at]:
            self.quarantine.remove(h)
            self.kv.release(h.blocks)
            h.blocks = []
            h.to(HandoffState.RELEASED)
            self.endpoint.forget(h.transfer_id)

    @property
    def num_reserved(self) -> int:
        return len(self.pending)

    @property
    def num_held(self) -> int:
        return len(self.pending) + len(self.quarantine)

    def _admit(self, h: Handoff, now: float) -> None:
        del self.pending[h.transfer_id]
        self.by_request.pop(h.request.request_id, None)
        h.to(HandoffState.READY)
        self.kv.commit(h.request, h.num_tokens)  # its full blocks may be shared from now on
        self.scheduler.admit(h.request, h.num_tokens)
        h.to(HandoffState.RUNNING)
        h.to(HandoffState.RELEASED)  # the scheduler owns the blocks now; they free with the request
        self.endpoint.forget(h.transfer_id)
        self.blocks_received += h.num_shipped_blocks
        self.transfer_seconds += now - h.reserved_at

    def _fall_back(self, h: Handoff, reason: str) -> None:
        """Prefill locally: the request starts over with new blocks, the reserved ones quarantined."""
        del self.pending[h.transfer_id]
        self.by_request.pop(h.request.request_id, None)
        self.failures[reason] += 1
        logger.info("transfer %d (%s): %s; prefilling locally", h.transfer_id, h.request.request_id, reason)
        self._quarantine(h, reason)
        req = h.request
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.local[reason] += 1
        self.scheduler.add_request(req)

    def _quarantine(self, h: Handoff, reason: str) -> None:
        h.to(HandoffState.QUARANTINED, reason)
        h.blocks = self.kv.detach(h.request)
        # A failed or aborted prefill may still be writing (one rank's sender failing says nothing of
        # the others'): hold its blocks for another lease.
        h.release_at = time.monotonic() + self.lease_s
        self.quarantine.append(h)

    def metrics(self) -> dict:
        return {
            "kv_remote_prefills": self.remote,
            "kv_local_prefills": dict(self.local),
            "kv_handoff_failures": dict(self.failures),
            "kv_reservations_held": self.num_held,
            "kv_blocks_quarantined": sum(len(h.blocks) for h in self.quarantine),
            "kv_blocks_received": self.blocks_received,
            "kv_bytes_received": self.blocks_received * self.block_bytes,
            "kv_transfer_seconds_total": self.transfer_seconds,
        }
