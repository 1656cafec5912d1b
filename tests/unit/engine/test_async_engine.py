"""AsyncLLMEngine (engine/async_engine.py) with a real small LLMEngine on CPU, in one process: request
deadlines, disconnects (queued, mid-prefill, mid-decode), a stalled or crashed loop, and draining at
shutdown. Every case ends with the engine's gauges back to idle (no request, every KV block free).
The step is slowed down (or hung) by wrapping the engine's `step` on the instance."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from raylight.config import EngineArgs
from raylight.engine.async_engine import (AsyncLLMEngine, EngineDeadError, EngineDrainingError, QueueFullError,
                                          RequestTimeoutError)
from raylight.engine.llm_engine import LLMEngine
from raylight.sampling_params import SamplingParams
from raylight.testing.helpers import make_random_hf_model

STEP_S = 0.02  # each step sleeps this long, so a 400-token request takes seconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama-async-engine"))
    make_random_hf_model("llama", path)
    return path


def make_engine(model_dir, step_s=STEP_S, **kw) -> LLMEngine:
    args = dict(model=model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=256,
                max_num_seqs=2, max_num_batched_tokens=16)
    args.update(kw)
    eng = LLMEngine(EngineArgs(**args))
    step = eng.step

    def slow_step(*a, **k):
        time.sleep(step_s)
        return step(*a, **k)

    eng.step = slow_step
    return eng


def long_params(n=400) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def prompt(n=8, start=1) -> list[int]:
    return [(start + i) % 500 + 1 for i in range(n)]


def idle(eng: LLMEngine) -> bool:
    m = eng.get_metrics()
    return (m["num_running"] == 0 and m["num_waiting"] == 0 and m["kv_blocks_free"] == m["kv_blocks_total"]
            and not eng.has_unfinished_requests())


async def wait_idle(eng: LLMEngine, timeout_s: float = 2.0) -> float:
    """Seconds until the engine is idle; fails past timeout_s."""
    t0 = time.monotonic()
    while not idle(eng):
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"engine not idle after {timeout_s}s: {eng.get_metrics()}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def collect(agen, outs: list):
    async for out in agen:
        outs.append(out)


@pytest.fixture
def run():
    def _run(coro, timeout_s=30):
        return asyncio.run(asyncio.wait_for(coro, timeout_s))  # a hang fails the test, never the run
    return _run


def test_deadline_aborts_queued_and_running_requests_and_frees_blocks(model_dir, run):
    eng = make_engine(model_dir, max_num_seqs=1)
    ae = AsyncLLMEngine(eng, request_timeout_s=0.5)

    async def main():
        outs = [[], [], []]
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(collect(ae.generate(prompt(start=i), long_params(), f"r{i}"), outs[i]))
                 for i in range(3)]  # one running (max_num_seqs=1), two queued behind it
        results = await asyncio.gather(*tasks, return_exceptions=True)
        took = time.monotonic() - t0
        assert all(isinstance(r, RequestTimeoutError) for r in results), results
        assert "request_timeout_s=0.5" in str(results[0])
        assert 0.5 <= took < 3.0, took  # at the deadline, not after the 400 tokens (~8 s)
        assert outs[0] and not outs[0][-1].finished  # the running one had streamed, then was cut
        assert not outs[1] and not outs[2]  # the queued ones never started
        await wait_idle(eng)
        # the engine still serves: a short request within the deadline completes
        short = []
        await collect(ae.generate(prompt(), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), "ok"),
                      short)
        assert short[-1].finished and len(short[-1].outputs[0].token_ids) == 3

    try:
        run(main())
    finally:
        ae.shutdown()


def test_queue_bound_counts_only_requests_that_must_wait(model_dir, run):
    """Row 25: capacity is max_num_seqs running + max_queued_requests waiting, also for a burst that
    arrives before the engine admitted any of it; one more gets QueueFullError (429)."""
    eng = make_engine(model_dir, max_num_seqs=2)
    ae = AsyncLLMEngine(eng, max_queued_requests=2)

    async def main():
        gens = [ae.generate(prompt(start=i), long_params(), f"r{i}") for i in range(5)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens[:4]]  # a burst: all in the inbox at once
        await asyncio.sleep(0)
        assert ae.num_waiting() == 4 and ae.num_queued() == 2
        with pytest.raises(QueueFullError, match="max_queued_requests=2"):
            await gens[4].__anext__()
        await asyncio.gather(*tasks[:2])  # the first two run
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens[:4]:
            await g.aclose()
        await wait_idle(eng)

    try:
        run(main())
    finally:
        ae.shutdown()


def test_no_deadline_by_default(model_dir, run):
    eng = make_engine(model_dir, step_s=0.0)
    ae = AsyncLLMEngine(eng)
    assert ae.request_timeout_s is None

    async def main():
        outs = []
        await collect(ae.generate(prompt(), long_params(40), "a"), outs)
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 40

    try:
        run(main())
    finally:
        ae.shutdown()


def test_disconnect_while_queued_mid_prefill_and_mid_decode_frees_everything(model_dir, run):
    """Row 23: the client goes away (the generator is closed/cancelled) in each phase; the engine
    aborts within about one step and its gauges return to idle."""
    eng = make_engine(model_dir, max_num_seqs=2, max_num_batched_tokens=8)
    ae = AsyncLLMEngine(eng)

    async def main():
        decode, prefill, queued = [], [], []
        t_dec = asyncio.ensure_future(collect(ae.generate(prompt(4), long_params(), "decode"), decode))
        while len(decode) < 3:  # "decode" is decoding
            await asyncio.sleep(0.005)
        # a 300-token prompt at 8 tokens a step is ~40 steps of prefill (the decode row takes one)
        t_pre = asyncio.ensure_future(collect(ae.generate(prompt(300, 7), long_params(), "prefill"), prefill))
        t_q = asyncio.ensure_future(collect(ae.generate(prompt(4, 9), long_params(), "queued"), queued))
        await asyncio.sleep(0.2)
        m = eng.get_metrics()
        assert m["num_running"] == 2 and m["num_waiting"] == 1, m
        assert not prefill and not queued  # still prefilling / still queued
        steps = eng.num_steps
        for t in (t_dec, t_pre, t_q):
            t.cancel()  # what Serve does to the replica call when the HTTP client disconnects
        await asyncio.gather(t_dec, t_pre, t_q, return_exceptions=True)
        await wait_idle(eng)
        assert eng.num_steps - steps <= 2  # the step running at the cancel, at most one more
        assert ae.num_pending == 0

    try:
        run(main())
    finally:
        ae.shutdown()


def test_stalled_step_fails_waiting_requests_and_refuses_new_ones(model_dir, run):
    """Row 29: a step that never returns (a wedged loop: NCCL deadlock, a hung kernel). After
    stall_s, healthy() is False (/health 503, Serve's check_health restarts the replica) and the
    requests waiting on the engine fail with EngineDeadError instead of hanging."""
    eng = make_engine(model_dir, step_s=0.0)
    release = threading.Event()
    step = eng.step
    calls = [0]

    def hanging_step(*a, **k):
        calls[0] += 1
        if calls[0] > 3:
            release.wait(30)
        return step(*a, **k)

    eng.step = hanging_step
    ae = AsyncLLMEngine(eng, stall_s=0.5)

    async def main():
        outs, queued = [], []
        t1 = asyncio.ensure_future(collect(ae.generate(prompt(), long_params(), "a"), outs))
        t2 = asyncio.ensure_future(collect(ae.generate(prompt(start=5), long_params(), "b"), queued))
        await asyncio.sleep(0.2)
        assert ae.healthy()  # stuck, but not for stall_s yet
        await asyncio.sleep(0.5)
        assert not ae.healthy()
        results = await asyncio.wait_for(asyncio.gather(t1, t2, return_exceptions=True), 2)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "stalled" in str(results[0])
        with pytest.raises(EngineDeadError):
            async for _ in ae.generate(prompt(), long_params(), "c"):
                pass

    try:
        run(main())
    finally:
        release.set()
        ae.shutdown()


def test_an_idle_engine_is_healthy_with_a_short_stall_threshold(model_dir):
    ae = AsyncLLMEngine(make_engine(model_dir, step_s=0.0), stall_s=0.3)
    try:
        for _ in range(6):
            time.sleep(0.2)
            assert ae.healthy()
    finally:
        ae.shutdown()


def test_crashed_step_fails_waiting_requests(model_dir, run):
    """Row 28 in one process: the step raises (a simulated illegal memory access)."""
    eng = make_engine(model_dir, step_s=0.0)
    step = eng.step
    calls = [0]

    def bad_step(*a, **k):
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step(*a, **k)

    eng.step = bad_step
    ae = AsyncLLMEngine(eng)

    async def main():
        with pytest.raises(EngineDeadError, match="illegal memory access"):
            async for _ in ae.generate(prompt(), long_params(), "a"):
                pass
        assert not ae.healthy()
        with pytest.raises(EngineDeadError):
            async for _ in ae.generate(prompt(), long_params(), "b"):
                pass

    try:
        run(main())
    finally:
        ae.shutdown()


def test_drain_refuses_new_requests_lets_running_finish_then_aborts_the_rest(model_dir, run):
    """Row 33 in one process: what the replica does at shutdown."""
    eng = make_engine(model_dir)
    ae = AsyncLLMEngine(eng)

    async def main():
        short, long_ = [], []
        t_short = asyncio.ensure_future(collect(ae.generate(prompt(), long_params(10), "short"), short))
        t_long = asyncio.ensure_future(collect(ae.generate(prompt(start=3), long_params(), "long"), long_))
        await asyncio.sleep(0.05)
        drain = asyncio.ensure_future(ae.drain(grace_s=1.0))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineDrainingError):  # new work is refused at once
            async for _ in ae.generate(prompt(), long_params(), "late"):
                pass
        await t_short  # running requests finish within the grace period
        assert short[-1].finished and len(short[-1].outputs[0].token_ids) == 10
        assert await drain == 1  # the 400-token one did not (8 s): aborted at the end of the grace
        with pytest.raises(EngineDrainingError):
            await t_long
        assert long_ and not long_[-1].finished
        await wait_idle(eng, 0.5)

    try:
        run(main())
    finally:
        ae.shutdown()


def test_replica_maps_deadline_to_504_and_stall_to_503(model_dir, run):
    """The replica turns the engine's errors into `ReplicaMessage.error_status`, which the ingress
    answers with (an OpenAI-shaped error, or an error event mid-stream)."""
    from raylight.cluster.replica import EngineReplica
    from raylight.messages import GenerateCall

    rep = EngineReplica(dict(model=model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=256,
                             max_num_seqs=1), max_queued_requests=8, cpu_threads=1, request_timeout_s=0.3,
                        health_stall_s=0.5)
    step = rep.engine.step
    hang = threading.Event()

    def slow_step(*a, **k):
        if hang.is_set():
            time.sleep(1.0)
        time.sleep(STEP_S)
        return step(*a, **k)

    rep.engine.step = slow_step

    async def messages(call):
        return [m async for m in rep.generate(call)]

    async def main():
        msgs = await messages(GenerateCall("t", prompt(), long_params()))
        assert msgs[-1].error_status == 504 and "request_timeout_s" in msgs[-1].error_message
        assert msgs[-1].stats is not None
        await wait_idle(rep.engine)
        assert await rep.health()
        rep.check_health()
        rep.async_engine.request_timeout_s = None
        hang.set()  # every step now takes 1 s > health_stall_s
        task = asyncio.ensure_future(messages(GenerateCall("s", prompt(), long_params())))
        await asyncio.sleep(0.8)
        assert not await rep.health()  # the ingress' /health answers 503
        with pytest.raises(RuntimeError, match="unhealthy"):
            rep.check_health()  # Serve replaces the replica
        msgs = await asyncio.wait_for(task, 2)
        assert msgs[-1].error_status == 503
        assert (await messages(GenerateCall("n", prompt(), long_params())))[-1].error_status == 503
        assert await rep.__del__() == 0  # Serve awaits what __del__ returns on its loop

    run(main())
