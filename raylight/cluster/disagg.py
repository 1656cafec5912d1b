"""The router of disaggregated serving: one Serve deployment between the OpenAI ingress and the two
engine pools (cluster/roles.py). To the ingress it is an engine replica: the same streaming
`generate(call)`, `stats()` and `health()`, so the ingress does not change.

Decode first, per request:
1. Stream the request from a decode replica (Serve's handle routing picks it), asking it to reserve
   blocks for a remote prefill when the uncached part of the prompt reaches `remote_prefill_threshold`
   tokens; when no prefill replica is available, ask for a local prefill instead (reason "no_prefill").
2. The decode replica's first message is its `KVReservation` (not forwarded). Unless it says `local`,
   a prefill replica is asked, concurrently, to compute prompt positions [cached, P - 1) and push them
   into the reserved blocks (`PrefillReplica.prefill`, one token, which is dropped). The decode replica
   notices by itself when the KV has landed, computes the last prompt position and samples.
3. When the prefill call fails (an error, its replica died, `kv_transfer_timeout_s` or the reservation's
   lease passed), the decode replica holding the reservation is told (`remote_prefill_failed`, sent to
   that very replica by `TargetedRequestRouter`) and prefills locally; were that message lost, its
   lease ends the wait anyway. A failed prefill pool is avoided until a health probe answers again.
4. When the client goes away, Serve closes this generator: the decode stream and the prefill call are
   cancelled, which aborts both engine requests.
A decode replica lost before anything reached the client is retried once on another; later, the client
gets a typed 503 (`ReplicaMessage.error_status`).

Metrics: the replicas' snapshots (decode messages, prefill outcomes, `stats()` polls) travel to the
ingress together, as `{"replicas": {replica_id: snapshot}}` (cluster/metrics.py unpacks them), with the
stats of this process's KV-aware request routers (`"kv_router"`) when a pool has `routing.policy: kv_aware`:
then Serve's handle to that pool routes by cached prefix (cluster/kv_router.py), so the decode replica is
the one that holds most of the prompt for its load, and targeted calls still reach their replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from raylight.cluster.kv_index import live_routers, router_stats
from raylight.cluster.replica import _replica_id
from raylight.engine.remote_prefill import prefill_params
from raylight.messages import GenerateCall, KVReservation, ReplicaMessage, ReplicaStats

logger = logging.getLogger("raylight.disagg")

TARGET_KWARG = "target_replica"  # a call with this keyword goes to that replica (TargetedRequestRouter)
_PREFILL_ERRORS = {400: "prefill_rejected", 429: "prefill_busy", 504: "prefill_timeout"}
_SNAPSHOT_TTL_S = 3600.0  # a replica not heard of for this long is forgotten


class DecodeLost(RuntimeError):
    """The decode replica failed (died, or answered 503) before the request finished."""


async def _result(response, timeout_s: Optional[float] = None):
    """Awaits a Serve DeploymentResponse; cancels the call when the wait ends early (timeout, cancel)."""
    async def wait():
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except BaseException:
        with contextlib.suppress(Exception):
            response.cancel()
        raise


def _actor_died(e: BaseException) -> bool:
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (RayActorError, ActorUnavailableError))


class PoolHealth:
    """Whether a pool is worth calling. Up until a call fails; then down, and a probe (`probe()`, every
    `probe_s`) brings it up again once it answers True: no failure is remembered for longer."""

    def __init__(self, name: str, probe: Callable[[], Awaitable[bool]], probe_s: float = 2.0,
                 timeout_s: float = 5.0):
        self.name, self.probe, self.probe_s, self.timeout_s = name, probe, probe_s, timeout_s
        self.up = True
        self.why = ""
        self._task: Optional[asyncio.Task] = None

    def mark_down(self, why: str) -> None:
        if self.up:
            logger.warning("%s pool unavailable (%s): prefilling on the decode replicas until it answers", self.name,
                           why)
        self.up, self.why = False, why
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._recover())

    async def _recover(self) -> None:
        while not self.up:
            await asyncio.sleep(self.probe_s)
            try:
                ok = bool(await asyncio.wait_for(self.probe(), self.timeout_s))
            except Exception:
                ok = False
            if ok:
                self.up, self.why = True, ""
                logger.info("%s pool answers again", self.name)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class DisaggRouter:
    """Serve deployment class (wrapped by `serve.deployment` in cluster/app.py `build_disagg_app`)."""

    def __init__(self, decode, prefill, remote_prefill_threshold: int = 512, kv_transfer_timeout_s: float = 30.0,
                 probe_s: float = 2.0, decode_retries: int = 1):
        """`decode`, `prefill`: handles of the DecodeReplica and PrefillReplica deployments."""
        from raylight.cluster.serve_mode import replica_handle

        self.decode, self.prefill = replica_handle(decode), replica_handle(prefill)
        self.threshold = int(remote_prefill_threshold)
        self.kv_transfer_timeout_s = float(kv_transfer_timeout_s)
        self.decode_retries = int(decode_retries)
        self.replica_id = _replica_id()
        self.prefill_health = PoolHealth("prefill", self._probe_prefill, probe_s)
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.handoffs: set[asyncio.Task] = set()

    # ---- the ingress's interface ----
    async def generate(self, call: GenerateCall) -> AsyncIterator[ReplicaMessage]:
        tries = 0
        while True:
            sent = [False]
            try:
                async with contextlib.aclosing(self._attempt(call, tries, sent)) as msgs:
                    async for msg in msgs:
                        yield msg
                return
            except DecodeLost as e:
                if sent[0] or tries >= self.decode_retries:
                    yield ReplicaMessage(error_status=503, error_message=f"the decode replica failed: {e}",
                                         stats=self._bundle(), replica_id=self.replica_id)
                    return
                tries += 1
                logger.warning("request %s: decode replica failed before any output (%s); retrying", call.request_id, e)

    async def stats(self) -> ReplicaStats:
        async def pull(handle):
            try:
                s = await _result(handle.stats.remote(), 1.5)
                self._keep(s.replica_id, s.metrics)
            except Exception:
                pass  # a pool with no replica (yet): what we heard last stays

        await asyncio.gather(pull(self.decode), pull(self.prefill))
        return ReplicaStats(self.replica_id, self._bundle(), healthy=True)

    async def health(self) -> bool:
        """Ready when the decode pool is: without a prefill pool, decode replicas prefill locally."""
        try:
            return bool(await _result(self.decode.health.remote(), 5.0))
        except Exception:
            return False

    # ---- one attempt on one decode replica ----
    async def _attempt(self, call: GenerateCall, tries: int, sent: list) -> AsyncIterator[ReplicaMessage]:
        if self.prefill_health.up:
            kwargs: dict[str, Any] = {"remote_prefill_threshold": self.threshold}
        else:
            kwargs = {"local_reason": "no_prefill"}
        stream = self.decode.options(stream=True).generate.remote(call, **kwargs)
        it = stream.__aiter__()
        handoff: Optional[asyncio.Task] = None
        try:
            while True:
                try:
                    msg = await it.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as e:  # the decode replica died (cancellation is not an Exception)
                    raise DecodeLost(type(e).__name__) from e
                if msg.reservation is not None:
                    if not msg.reservation.local and handoff is None:
                        handoff = asyncio.ensure_future(self._handoff(call, msg.reservation, msg.replica_id, tries))
                        self.handoffs.add(handoff)
                        handoff.add_done_callback(self.handoffs.discard)
                    continue
                if msg.stats is not None:
                    self._keep(msg.replica_id, msg.stats)
                    msg.stats = self._bundle()
                if msg.error_status == 503 and not sent[0]:
                    raise DecodeLost(msg.error_message or "503")
                sent[0] = sent[0] or msg.output is not None
                yield msg
        finally:
            stream.cancel()  # no-op after the end; aborts the decode request when the client went away
            if handoff is not None and not handoff.done():
                handoff.cancel()  # its finally cancels the prefill call: the prefill request aborts

    async def _handoff(self, call: GenerateCall, res: KVReservation, decode_replica: str, tries: int) -> None:
        """Has a prefill replica push the prompt's KV into `res`; on failure, tells the decode replica."""
        n = res.num_prompt_tokens - 1
        ids = res.prompt_token_ids or (call.prompt if isinstance(call.prompt, list) else [])
        if n <= 0 or len(ids) < n:
            return await self._failed(res, decode_replica, "no_prompt_ids")
        rid = f"{call.request_id}-prefill" + (f"-{tries}" if tries else "")
        pcall = GenerateCall(rid, list(ids[:n]), prefill_params(call.params), call.cache_salt)
        timeout = min(self.kv_transfer_timeout_s, res.lease_s) if res.lease_s > 0 else self.kv_transfer_timeout_s
        t0 = time.monotonic()
        try:
            out = await _result(self.prefill.prefill.remote(pcall, res.push_target()), timeout)
        except asyncio.TimeoutError:
            reason = "prefill_timeout"
            self.prefill_health.mark_down(f"a prefill took over {timeout:g}s")
        except Exception as e:
            reason = "prefill_died" if _actor_died(e) else "prefill_error"
            self.prefill_health.mark_down(f"{type(e).__name__}")
        else:
            if out.stats is not None:
                self._keep(out.replica_id, out.stats)
            if out.error_status is None:
                logger.debug("request %s: prefill pushed in %.3fs", call.request_id, time.monotonic() - t0)
                return
            reason = _PREFILL_ERRORS.get(out.error_status, "prefill_error")
            if out.error_status == 503:
                self.prefill_health.mark_down(out.error_message or "503")
        await self._failed(res, decode_replica, reason)

    async def _failed(self, res: KVReservation, decode_replica: str, reason: str) -> None:
        logger.info("transfer %d (%s): %s; the decode replica prefills locally", res.transfer_id, res.request_id,
                    reason)
        target = decode_replica or res.replica_id
        try:
            await _result(self.decode.remote_prefill_failed.remote(res.transfer_id, reason, **{TARGET_KWARG: target}),
                          10.0)
        except Exception as e:  # the replica's lease ends the wait instead
            logger.warning("could not tell decode replica %s of transfer %d's failure (%s)", target,
                           res.transfer_id, type(e).__name__)

    async def _probe_prefill(self) -> bool:
        return bool(await _result(self.prefill.health.remote(), 5.0))

    # ---- metrics ----
    def _keep(self, replica_id: str, snapshot: dict[str, Any]) -> None:
        if not replica_id or not isinstance(snapshot, dict):
            return
        if "replicas" in snapshot:  # already a bundle
            for rid, s in snapshot["replicas"].items():
                self._keep(rid, s)
            return
        old = self.snapshots.get(replica_id)
        if old is not None and old.get("snapshot_t", float("-inf")) > snapshot.get("snapshot_t", float("inf")):
            return
        self.snapshots[replica_id] = snapshot

    def _bundle(self) -> dict[str, Any]:
        now = time.time()
        for rid in [rid for rid, s in self.snapshots.items() if now - s.get("snapshot_t", now) > _SNAPSHOT_TTL_S]:
            del self.snapshots[rid]
        out: dict[str, Any] = {"replicas": dict(self.snapshots)}
        if live_routers():  # the pools' KV-aware request routers live in this process
            out["kv_router"] = {"id": self.replica_id, **router_stats()}
        return out

    def __del__(self):
        health = getattr(self, "prefill_health", None)
        if health is not None:
            health.close()


# ---------------------------------------------------------------- Serve's request router, targeted

try:
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter as _Pow2
except ImportError:  # pragma: no cover (another Ray version): the decode replicas' leases do the work
    _Pow2 = None

if _Pow2 is not None:
    class TargetedRequestRouter(_Pow2):
        """Serve's power-of-two-choices request router, except that a call with a `target_replica`
        keyword goes to that replica while it runs (the router's `remote_prefill_failed`, which only
        the replica holding the reservation can act on). Configured on the decode deployment."""

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            target = (pending_request.kwargs or {}).get(TARGET_KWARG) if pending_request is not None else None
            if target:
                hit = [r for r in candidate_replicas if getattr(r.replica_id, "unique_id", str(r.replica_id)) == target]
                if hit:
                    return [hit]
            return await super().choose_replicas(candidate_replicas, pending_request)
else:  # pragma: no cover
    TargetedRequestRouter = None
