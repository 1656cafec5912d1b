"""The disaggregated router (cluster/disagg.py) with fake decode and prefill handles, no Ray: the decode
replica's reservation starts a prefill call (never forwarded to the client) built from the prompt's token
ids; a failed, dead, busy or slow prefill makes the router tell the decode replica holding the reservation
(`remote_prefill_failed`, targeted) and the request still completes; a failed prefill pool is avoided
(local prefill, "no_prefill") until its health probe answers; a client that goes away cancels the decode
stream and the prefill call; a decode replica lost before any output is retried, after one the client gets
a typed 503. Also the replica side (cluster/roles.py) with a fake engine, the request router's targeting,
and the metrics of a router's snapshot bundle (cluster/metrics.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from raylight.cluster.disagg import TARGET_KWARG, DisaggRouter, prefill_params
from raylight.cluster.metrics import ServerMetrics
from raylight.messages import GenerateCall, KVReservation, ReplicaMessage, ReplicaStats
from raylight.outputs import CompletionOutput, RequestOutput
from raylight.sampling_params import SamplingParams

PROMPT = list(range(100, 140))  # 40 tokens
DECODE = "decode-0"
PREFILL = "prefill-0"


def run(coro, timeout_s=10):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))  # a hang fails the test, never the run


class Response:
    """A fake Serve DeploymentResponse: awaits `fn()`; remembers cancel()."""

    def __init__(self, fn):
        self.fn = fn
        self.cancelled = False

    def __await__(self):
        return self.fn().__await__()

    def cancel(self):
        self.cancelled = True


class Stream:
    """A fake streaming response: an async iterator with cancel()."""

    def __init__(self, agen):
        self.agen = agen
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        self.cancelled = True


class Method:
    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[tuple, dict]] = []

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def output(rid, ids, finished, stats=None) -> ReplicaMessage:
    out = RequestOutput(rid, None, list(PROMPT), [CompletionOutput(
        0, "".join(f"<{i}>" for i in ids), list(ids), finish_reason="length" if finished else None,
        delta_text="x", delta_token_ids=list(ids))], finished=finished)
    return ReplicaMessage(output=out, stats=stats, replica_id=DECODE)


class FakeDecode:
    """A decode pool of one replica: reserves (unless `local`), waits until the KV `landed` (the fake
    prefill sets it) or the router reports the prefill failed, then streams two tokens."""

    def __init__(self, local=False, fail_before=0, fail_after_output=False, first_error=None):
        self.local, self.fail_before, self.fail_after_output = local, fail_before, fail_after_output
        self.first_error = first_error
        self.landed = asyncio.Event()
        self.streams: list[Stream] = []
        self.failed: list[tuple[int, str, str]] = []
        self.generate = Method(self._generate)
        self.remote_prefill_failed = Method(self._remote_prefill_failed)
        self.health = Method(lambda: Response(self._true))
        self.stats = Method(lambda: Response(self._stats))

    async def _true(self):
        return True

    async def _stats(self):
        return ReplicaStats(DECODE, {"num_running": 0, "kv_blocks_total": 8, "kv_blocks_free": 8, "snapshot_t": time.time()})

    def options(self, **_):
        return self

    def _generate(self, call, **kwargs):
        async def gen():
            if self.fail_before:
                self.fail_before -= 1
                raise RuntimeError("ActorDiedError")
            if self.first_error is not None:
                yield ReplicaMessage(error_status=self.first_error, error_message="no", replica_id=DECODE)
                return
            if "remote_prefill_threshold" in kwargs:
                yield ReplicaMessage(reservation=KVReservation(
                    call.request_id, 7, self.local, "short" if self.local else "remote", len(PROMPT),
                    num_cached_tokens=16, block_ids=[3, 4, 5], host="h", port=9, lease_s=5.0,
                    prompt_token_ids=list(PROMPT)), replica_id=DECODE)
                if not self.local:
                    await self.landed.wait()
            yield output(call.request_id, [1], False)
            if self.fail_after_output:
                raise RuntimeError("ActorDiedError")
            yield output(call.request_id, [2], True, stats={"num_running": 0, "kv_blocks_total": 8,
                                                            "kv_blocks_free": 8, "snapshot_t": time.time()})

        stream = Stream(gen())
        self.streams.append(stream)
        return stream

    def _remote_prefill_failed(self, transfer_id, reason, **kwargs):
        async def call():
            self.failed.append((transfer_id, reason, kwargs.get(TARGET_KWARG)))
            self.landed.set()  # the replica prefills locally, then streams
            return True
        return Response(call)


class FakePrefill:
    """mode: ok (pushes: sets decode.landed), raise, died (a Ray actor error), busy (429), hang."""

    def __init__(self, decode: FakeDecode, mode="ok", healthy=True):
        self.decode, self.mode, self.healthy = decode, mode, healthy
        self.responses: list[Response] = []
        self.prefill = Method(self._prefill)
        self.health = Method(lambda: Response(self._health))
        self.stats = Method(lambda: Response(self._stats))

    async def _health(self):
        return self.healthy

    async def _stats(self):
        return ReplicaStats(PREFILL, {"num_running": 0, "kv_blocks_total": 4, "kv_blocks_free": 4,
                                      "kv_bytes_sent": 100, "snapshot_t": time.time()})

    def _prefill(self, call, target):
        async def go():
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if self.mode == "raise":
                raise RuntimeError("boom")
            if self.mode == "died":
                from ray.exceptions import RayActorError
                raise RayActorError()
            if self.mode == "busy":
                return ReplicaMessage(error_status=429, error_message="full", replica_id=PREFILL)
            await asyncio.sleep(0.01)
            asyncio.get_running_loop().call_later(0.02, self.decode.landed.set)  # after this answer arrives
            return ReplicaMessage(stats={"num_running": 0, "kv_blocks_sent": 3, "snapshot_t": time.time()},
                                  replica_id=PREFILL)
        resp = Response(go)
        self.responses.append(resp)
        return resp


def router(decode, prefill, **kw) -> DisaggRouter:
    return DisaggRouter(decode, prefill, **{"remote_prefill_threshold": 32, "kv_transfer_timeout_s": 5.0,
                                            "probe_s": 0.05, **kw})


def call(rid="r1", **params) -> GenerateCall:
    return GenerateCall(rid, list(PROMPT), SamplingParams(**{"max_tokens": 8, "n": 2, "logprobs": 3,
                                                             "stop": ["x"], "prompt_logprobs": None, **params}),
                        cache_salt="salt")


async def collect(r: DisaggRouter, c: GenerateCall) -> list[ReplicaMessage]:
    return [m async for m in r.generate(c)]


def test_reservation_starts_the_prefill_and_is_not_forwarded():
    async def main():
        d = FakeDecode()
        p = FakePrefill(d)
        r = router(d, p)
        msgs = await collect(r, call())
        assert [m.output.outputs[0].token_ids for m in msgs] == [[1], [2]]
        assert all(m.reservation is None for m in msgs)
        (args, kwargs), = d.generate.calls
        assert kwargs == {"remote_prefill_threshold": 32}
        (pcall, target), _ = p.prefill.calls[0]
        assert pcall.request_id == "r1-prefill" and pcall.cache_salt == "salt"
        assert pcall.prompt == PROMPT[:39]  # the decode side computes the last prompt position itself
        pp = pcall.params
        assert (pp.max_tokens, pp.n, pp.logprobs, pp.prompt_logprobs, pp.stop) == (1, 1, None, None, [])
        assert (target.transfer_id, target.host, target.port, target.start_token, target.block_ids) == \
            (7, "h", 9, 16, [3, 4, 5])
        assert d.failed == [] and r.prefill_health.up
        bundle = msgs[-1].stats["replicas"]  # the final message carries decode's and prefill's snapshots
        assert set(bundle) == {DECODE, PREFILL} and bundle[PREFILL]["kv_blocks_sent"] == 3
        assert d.streams[0].cancelled  # cancel after the end: a no-op for Serve
    run(main())


def test_local_reservation_calls_no_prefill():
    async def main():
        d = FakeDecode(local=True)
        p = FakePrefill(d)
        msgs = await collect(router(d, p), call())
        assert msgs[-1].output.finished and p.prefill.calls == []
    run(main())


@pytest.mark.parametrize("mode,reason,down", [("raise", "prefill_error", True), ("died", "prefill_died", True),
                                              ("busy", "prefill_busy", False)])
def test_a_failed_prefill_tells_the_decode_replica_holding_the_reservation(mode, reason, down):
    async def main():
        d = FakeDecode()
        p = FakePrefill(d, mode=mode, healthy=False)
        r = router(d, p)
        msgs = await collect(r, call())
        assert msgs[-1].output.finished  # completed through local prefill
        assert d.failed == [(7, reason, DECODE)]  # to the replica that holds transfer 7
        assert r.prefill_health.up is not down
        if not down:
            return
        # While the pool is down, requests prefill on the decode replica; nothing is sent to the prefill pool.
        d.landed = asyncio.Event()
        msgs = await collect(r, call("r2"))
        assert msgs[-1].output.finished and len(p.prefill.calls) == 1
        assert d.generate.calls[-1][1] == {"local_reason": "no_prefill"}
        # The probe brings the pool back as soon as it answers.
        p.healthy, p.mode = True, "ok"
        for _ in range(100):
            if r.prefill_health.up:
                break
            await asyncio.sleep(0.02)
        assert r.prefill_health.up and p.health.calls
        d.landed = asyncio.Event()
        await collect(r, call("r3"))
        assert d.generate.calls[-1][1] == {"remote_prefill_threshold": 32} and len(p.prefill.calls) == 2
    run(main())


def test_a_slow_prefill_times_out_is_cancelled_and_decode_prefills_locally():
    async def main():
        d = FakeDecode()
        p = FakePrefill(d, mode="hang")
        r = router(d, p, kv_transfer_timeout_s=0.2)
        t0 = time.monotonic()
        msgs = await collect(r, call())
        assert msgs[-1].output.finished and time.monotonic() - t0 < 2
        assert d.failed == [(7, "prefill_timeout", DECODE)]
        assert p.responses[0].cancelled
    run(main())


def test_client_disconnect_cancels_the_decode_stream_and_the_prefill():
    async def main():
        d = FakeDecode()
        p = FakePrefill(d, mode="hang")
        r = router(d, p, kv_transfer_timeout_s=60)
        agen = r.generate(call())
        first = asyncio.ensure_future(agen.__anext__())  # waits: the KV never lands
        while not p.prefill.calls:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        first.cancel()  # Serve cancels the router's generator when the ingress cancels its stream
        with pytest.raises(asyncio.CancelledError):
            await first
        await agen.aclose()
        await asyncio.sleep(0.05)
        assert d.streams[0].cancelled and p.responses[0].cancelled
        assert d.failed == []  # a disconnect is no prefill failure: the decode request is aborted
        assert not r.handoffs
    run(main())


def test_decode_lost_before_output_is_retried_then_a_typed_503():
    async def main():
        d = FakeDecode(local=True, fail_before=1)
        msgs = await collect(router(d, FakePrefill(d)), call())
        assert msgs[-1].output.finished and len(d.generate.calls) == 2  # the retry succeeded
        d = FakeDecode(local=True, fail_before=2)
        msgs = await collect(router(d, FakePrefill(d)), call())
        assert len(msgs) == 1 and msgs[0].error_status == 503 and "decode replica failed" in msgs[0].error_message
        d = FakeDecode(local=True, first_error=503)  # a draining or stalled decode replica: retried, then 503
        msgs = await collect(router(d, FakePrefill(d)), call())
        assert [m.error_status for m in msgs] == [503] and len(d.generate.calls) == 2
    run(main())


def test_decode_lost_after_output_is_not_retried():
    async def main():
        d = FakeDecode(local=True, fail_after_output=True)
        msgs = await collect(router(d, FakePrefill(d)), call())
        assert msgs[0].output is not None and msgs[-1].error_status == 503 and len(d.generate.calls) == 1
    run(main())


def test_decode_errors_other_than_503_are_forwarded():
    async def main():
        for status in (400, 429, 504):
            d = FakeDecode(first_error=status)
            msgs = await collect(router(d, FakePrefill(d)), call())
            assert [m.error_status for m in msgs] == [status] and len(d.generate.calls) == 1
    run(main())


def test_stats_and_health_cover_both_pools():
    async def main():
        d = FakeDecode()
        p = FakePrefill(d, healthy=False)
        r = router(d, p)
        s = await r.stats()
        assert set(s.metrics["replicas"]) == {DECODE, PREFILL}
        assert await r.health()  # the decode pool alone can serve
    run(main())


def test_prefill_params_keep_nothing_the_decode_side_samples_with():
    p = prefill_params(SamplingParams(n=3, max_tokens=50, min_tokens=5, logprobs=2, prompt_logprobs=1,
                                      stop=["a"], stop_token_ids=[7], temperature=0.5))
    assert (p.n, p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.stop, p.stop_token_ids) == \
        (1, 1, 0, None, None, [], [])


# ---------------------------------------------------------------- the replica side (cluster/roles.py)

class FakeAsyncEngine:
    def __init__(self):
        self.dead, self.last_progress, self.step_periods, self.num_pending = None, time.monotonic(), [], 0
        self.idle_seconds_total = 0.0
        self.failed = []
        self.kwargs = []

    def healthy(self, stall_s):
        return True

    async def generate(self, prompt, params, request_id, cache_salt=None, remote_prefill_threshold=None,
                       kv_push=None):
        self.kwargs.append((remote_prefill_threshold, kv_push))
        if remote_prefill_threshold is not None:
            yield KVReservation(request_id, 5, False, "remote", len(prompt), prompt_token_ids=list(prompt))
        yield RequestOutput(request_id, None, list(prompt), [CompletionOutput(0, "a", [1], "length")], finished=True)

    def remote_prefill_failed(self, transfer_id, reason):
        self.failed.append((transfer_id, reason))

    def fail(self, request_id, error):
        return False

    def metrics(self):
        return {"num_running": 0, "kv_local_prefills": {"short": 2}}

    def close(self):
        pass


def make_role(cls):
    rep = cls.__new__(cls)
    rep.replica_id, rep.engine, rep.async_engine = "me", None, FakeAsyncEngine()
    rep.request_timeout_s, rep.health_stall_s, rep.stalled, rep.drain_end, rep.drain_expired = None, 60.0, None, None, False
    from raylight.cluster.autoscaling import SLORecorder

    from raylight.cluster.replica import RequestWatch

    rep.slo = SLORecorder()
    rep.watch = RequestWatch(rep._failure, rep.async_engine.fail)
    return rep


def test_decode_replica_turns_the_reservation_into_a_message_and_counts_router_local_prefills():
    import collections

    from raylight.cluster.roles import DecodeReplica

    async def main():
        rep = make_role(DecodeReplica)
        rep.router_local = collections.Counter()
        msgs = [m async for m in rep.generate(GenerateCall("a", [1, 2, 3], SamplingParams()), 16)]
        assert msgs[0].reservation.transfer_id == 5 and msgs[0].replica_id == "me" and msgs[0].output is None
        assert msgs[1].output.finished and msgs[1].stats["role"] == "decode" and "snapshot_t" in msgs[1].stats
        msgs = [m async for m in rep.generate(GenerateCall("b", [1, 2, 3], SamplingParams()),
                                              local_reason="no_prefill")]
        assert len(msgs) == 1 and rep.async_engine.kwargs[-1] == (None, None)
        assert msgs[0].stats["kv_local_prefills"] == {"short": 2, "no_prefill": 1}
        assert await rep.remote_prefill_failed(5, "prefill_died", target_replica="me") is True
        assert await rep.remote_prefill_failed(6, "x", target_replica="someone-else") is False
        assert rep.async_engine.failed == [(5, "prefill_died")]
    run(main())


def test_prefill_replica_returns_one_outcome_without_the_output():
    from raylight.cluster.roles import PrefillReplica
    from raylight.messages import KVPushTarget

    async def main():
        rep = make_role(PrefillReplica)
        target = KVPushTarget(5, "h", 1, 0, [1])
        msg = await rep.prefill(GenerateCall("a-prefill", [1, 2, 3], SamplingParams(max_tokens=1)), target)
        assert msg.error_status is None and msg.output is None and msg.stats["role"] == "prefill"
        assert rep.async_engine.kwargs == [(None, target)]
    run(main())


def test_targeted_request_router_picks_the_named_replica(monkeypatch):
    from types import SimpleNamespace

    from raylight.cluster import disagg

    if disagg.TargetedRequestRouter is None:
        pytest.skip("this Ray has no pluggable request router")

    async def default(self, candidates, pending=None):
        return "default"

    monkeypatch.setattr(disagg._Pow2, "choose_replicas", default)
    rr = disagg.TargetedRequestRouter.__new__(disagg.TargetedRequestRouter)
    reps = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in ("a", "b", "c")]

    def pending(**kw):
        return SimpleNamespace(kwargs=kw, args=[])

    async def main():
        assert await rr.choose_replicas(reps, pending(**{TARGET_KWARG: "b"})) == [[reps[1]]]
        assert await rr.choose_replicas(reps, pending(**{TARGET_KWARG: "gone"})) == "default"
        assert await rr.choose_replicas(reps, pending()) == "default"
        assert await rr.choose_replicas(reps, None) == "default"
    run(main())


# ---------------------------------------------------------------- metrics of a router's bundle

def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_metrics_unpack_a_bundle_keep_the_newest_snapshot_and_label_reasons():
    m = ServerMetrics()
    dec = {"num_running": 0, "kv_blocks_total": 10, "kv_blocks_free": 10, "kv_remote_prefills": 3,
           "kv_local_prefills": {"short": 2, "no_prefill": 1}, "kv_handoff_failures": {"prefill_died": 1},
           "kv_reservations_held": 1, "kv_blocks_received": 6, "kv_bytes_received": 600,
           "kv_transfer_seconds_total": 2.0, "snapshot_t": 100.0}
    pre = {"num_running": 0, "kv_blocks_total": 5, "kv_blocks_free": 5, "kv_blocks_sent": 6, "kv_bytes_sent": 600,
           "kv_push_seconds_total": 0.5, "snapshot_t": 50.0}
    m.update_replica("router", {"replicas": {"d": dec, "p": pre}})
    older = {**dec, "kv_remote_prefills": 1, "snapshot_t": 90.0}  # a stale copy through another router
    m.update_replica("d", older)
    text = m.render()[0].decode()
    assert _value(text, "raylight:kv_cache_total_blocks") == 15
    assert _value(text, "raylight:kv_remote_prefills_total") == 3
    assert _value(text, 'raylight:kv_local_prefills_total{reason="no_prefill"}') == 1
    assert _value(text, 'raylight:kv_local_prefills_total{reason="short"}') == 2
    assert _value(text, 'raylight:kv_handoff_failures_total{reason="prefill_died"}') == 1
    assert _value(text, "raylight:kv_reservations_held") == 1
    assert _value(text, "raylight:kv_blocks_sent_total") == 6 and _value(text, "raylight:kv_bytes_received_total") == 600
    assert _value(text, "raylight:kv_transfer_seconds_total") == 2.0
    assert _value(text, "raylight:kv_push_bandwidth_bytes_per_second") == 1200.0
    # A colocated replica's snapshot has none of these keys: they read 0.
    m2 = ServerMetrics()
    m2.update_replica("r0", {"num_running": 0, "kv_blocks_total": 4, "kv_blocks_free": 4})
    text = m2.render()[0].decode()
    assert _value(text, "raylight:kv_remote_prefills_total") == 0 and _value(text, "raylight:kv_reservations_held") == 0


# ---------------------------------------------------------------- the application builder (cluster/app.py)

def _deployments(app) -> dict:
    """name -> bound deployment, walking the bind arguments from the ingress down."""
    out, todo = {}, [app]
    while todo:
        node = todo.pop()
        d = getattr(node, "_bound_deployment", None)
        if d is None:
            continue
        out[d.name] = d
        todo += [a for a in d.init_args if hasattr(a, "_bound_deployment")]
    return out


def test_build_disagg_app_gives_each_pool_its_own_engine_args_placement_and_router():
    pytest.importorskip("ray.serve")
    from raylight.cluster.app import DisaggAppConfig, build_app, build_disagg_app

    cfg = DisaggAppConfig(engine_args={"device": "cuda", "max_model_len": 1024},
                          prefill={"engine_args": {"max_num_batched_tokens": 4096}, "num_replicas": 3,
                                   "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}},
                          decode={"engine_args": {"tensor_parallel_size": 2, "max_model_len": 2048},
                                  "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
                                  "ray_actor_options": {"num_cpus": 4, "num_gpus": 1}},
                          remote_prefill_threshold=64, kv_transfer_timeout_s=7)
    deps = _deployments(build_disagg_app(cfg))
    assert set(deps) == {"OpenAIIngress", "DisaggRouter", "PrefillReplica", "DecodeReplica"}
    pre, dec, router, ingress = (deps[n] for n in ("PrefillReplica", "DecodeReplica", "DisaggRouter", "OpenAIIngress"))
    assert pre.init_args[0]["kv_role"] == "prefill" and pre.init_args[0]["max_model_len"] == 1024
    assert pre.init_args[0]["max_num_batched_tokens"] == 4096 and pre.num_replicas == 3
    assert pre._replica_config.placement_group_bundles is None  # TP 1
    assert dec.init_args[0]["kv_role"] == "decode" and dec.init_args[0]["tensor_parallel_size"] == 2
    assert dec._replica_config.placement_group_bundles == [{"GPU": 2, "CPU": 8}]  # TP 2: its own placement
    assert dec._deployment_config.autoscaling_config.max_replicas == 4
    assert "TargetedRequestRouter" in str(dec._deployment_config.request_router_config.request_router_class)
    assert router.init_args[2:] == (64, 7.0, 2.0)
    assert ingress.init_args[4] == 2048  # the decode pool's context window: it holds prompt and answer
    for d in deps.values():
        assert d._deployment_config.max_constructor_retry_count == 3, d.name
    # build_app (what tests and `raylight serve` call) builds the same app from the same args.
    assert set(_deployments(build_app(cfg.model_dump()))) == set(deps)


def test_disagg_config_errors_name_the_field():
    from pydantic import ValidationError

    from raylight.cluster.app import DisaggAppConfig

    with pytest.raises(ValidationError, match="block_size"):
        DisaggAppConfig(decode={"engine_args": {"block_size": 32}})
    with pytest.raises(ValidationError, match="top-level `model`"):
        DisaggAppConfig(prefill={"engine_args": {"model": "x"}})
    with pytest.raises(ValidationError, match="num_replica"):
        DisaggAppConfig(prefill={"num_replica": 2})  # a typo: extra fields are refused
    with pytest.raises(ValidationError, match="remote_prefill_threshold"):
        DisaggAppConfig(remote_prefill_threshold=-1)
    with pytest.raises(ValidationError, match="max_model_len"):
        DisaggAppConfig(decode={"engine_args": {"max_model_len": 0}})
