"""The two engine pools of disaggregated serving, as Serve deployment classes built on `EngineReplica`
(cluster/app.py `build_disagg_app` wraps them; cluster/disagg.py's `DisaggRouter` drives them).

* `DecodeReplica` (engine kv_role "decode"): `generate(call, remote_prefill_threshold)` streams a
  request whose first message carries the engine's `KVReservation` (decode first: blocks reserved for
  the uncached part of the prompt, or `local` and why); `remote_prefill_failed` makes the replica
  prefill a reserved request itself when its prefill side failed.
* `PrefillReplica` (engine kv_role "prefill"): `prefill(call, kv_push)` computes a prompt's KV and
  pushes it into the decode blocks named by `kv_push`; returns one message (the outcome and its stats).

Both add `role` and `snapshot_t` to their stats snapshots: the router forwards snapshots of several
replicas together, and `snapshot_t` lets the metrics keep the newest of each.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any, AsyncIterator, Optional

from raylight.cluster.replica import EngineReplica
from raylight.messages import GenerateCall, KVPushTarget, ReplicaMessage


class _RoleReplica(EngineReplica):
    role = "none"

    def _metrics(self) -> dict[str, Any]:
        m = super()._metrics()
        m["role"] = self.role
        m["snapshot_t"] = time.time()  # per replica: only compared with the same replica's snapshots
        return m


class DecodeReplica(_RoleReplica):
    """Serve deployment class of the decode pool."""

    role = "decode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Local prefills the router asked for (no prefill replica available), by reason; the engine counts
        # its own decisions (short prompt, prompt_logprobs, fallbacks) in its metrics.
        self.router_local: collections.Counter = collections.Counter()

    async def generate(self, call: GenerateCall, remote_prefill_threshold: Optional[int] = None,
                       local_reason: Optional[str] = None) -> AsyncIterator[ReplicaMessage]:
        """With `remote_prefill_threshold`, the first message carries a `reservation`. Without it the
        request prefills here, counted under `local_reason` (the router's reason, e.g. "no_prefill")."""
        kwargs = {}
        if remote_prefill_threshold is not None:
            kwargs["remote_prefill_threshold"] = int(remote_prefill_threshold)
        elif local_reason:
            self.router_local[local_reason] += 1
        async with contextlib.aclosing(self._generate(call, **kwargs)) as msgs:
            async for msg in msgs:
                yield msg

    async def remote_prefill_failed(self, transfer_id: int, reason: str, target_replica: Optional[str] = None) -> bool:
        """The prefill side of transfer `transfer_id` failed: prefill it here. `target_replica`: the
        replica that holds the reservation (the router's request router sends the call there; if it
        was gone and the call landed elsewhere, this replica answers False and does nothing)."""
        if target_replica is not None and target_replica != self.replica_id:
            return False
        self.async_engine.remote_prefill_failed(int(transfer_id), str(reason))  # to the engine loop's inbox
        return True

    def _metrics(self) -> dict[str, Any]:
        m = super()._metrics()
        if self.router_local:
            local = dict(m.get("kv_local_prefills") or {})
            for reason, n in self.router_local.items():
                local[reason] = local.get(reason, 0) + n
            m["kv_local_prefills"] = local
        return m


class PrefillReplica(_RoleReplica):
    """Serve deployment class of the prefill pool."""

    role = "prefill"

    async def prefill(self, call: GenerateCall, kv_push: KVPushTarget) -> ReplicaMessage:
        """Computes `call`'s prompt KV, pushing it into the decode blocks of `kv_push` as it goes; the
        engine samples one token, which nobody reads. Returns the outcome: no output, the replica's
        stats, or the error (status as in `generate`). Cancelling the call aborts the engine request."""
        last: Optional[ReplicaMessage] = None
        async with contextlib.aclosing(self._generate(call, kv_push=kv_push)) as msgs:
            async for msg in msgs:
                last = msg
                if msg.error_status is not None:
                    break
        if last is None:
            return self._error(503, "the prefill ended without an output")
        if last.error_status is None and (last.output is None or not last.output.finished):
            return self._error(503, "the prefill ended before its request finished")
        return ReplicaMessage(error_status=last.error_status, error_message=last.error_message,
                              stats=last.stats if last.stats is not None else self._metrics(),
                              replica_id=self.replica_id)
