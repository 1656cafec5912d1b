"""AsyncLLMEngine (engine/async_engine.py) and the engine replica's request guard (cluster/replica.py,
constructed in-process without Ray) with a real small LLMEngine on CPU: the queue bound, disconnects
(queued, mid-prefill, mid-decode), request deadlines, a stalled or crashed loop, and draining at
shutdown. Every case ends with the engine's gauges back to idle (no request, every KV block free).
The step is slowed down (or hung) by wrapping the engine's `step` on the instance."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from raylight.config import EngineArgs
from raylight.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from raylight.engine.llm_engine import LLMEngine
from raylight.sampling_params import SamplingParams

STEP_S = 0.02  # each step sleeps this long, so a 400-token request takes seconds


ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=256, max_num_seqs=2, max_num_batched_tokens=16)


def make_engine(model_dir, step_s=STEP_S, **kw) -> LLMEngine:
    return slow_down(LLMEngine(EngineArgs(**{**ENGINE, "model": model_dir, **kw})), step_s)


def make_replica(model_dir, step_s=STEP_S, request_timeout_s=None, health_stall_s=60.0, gil_switch_interval_s=None,
                 **kw):
    from raylight.cluster.replica import EngineReplica

    rep = EngineReplica({**ENGINE, "model": model_dir, **kw}, max_queued_requests=8, cpu_threads=1,
                        request_timeout_s=request_timeout_s, health_stall_s=health_stall_s,
                        gil_switch_interval_s=gil_switch_interval_s)
    slow_down(rep.engine, step_s)
    return rep


async def messages(rep, rid, params, start=1):
    from raylight.messages import GenerateCall

    return [m async for m in rep.generate(GenerateCall(rid, prompt(start=start), params))]


def slow_down(eng: LLMEngine, step_s: float) -> LLMEngine:
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
    """Row 27: request_timeout_s covers the whole request (queued or running); past it the replica
    answers 504 and the engine request is aborted, its blocks freed."""
    rep = make_replica(model_dir, request_timeout_s=0.5, max_num_seqs=1)

    async def main():
        t0 = time.monotonic()
        results = await asyncio.gather(*(messages(rep, f"r{i}", long_params(), start=i) for i in range(3)))
        took = time.monotonic() - t0  # one running (max_num_seqs=1), two queued behind it
        assert 0.5 <= took < 3.0, took  # at the deadline, not after the 400 tokens (~8 s)
        for msgs in results:
            assert msgs[-1].error_status == 504 and "request_timeout_s=0.5" in msgs[-1].error_message
            assert msgs[-1].stats is not None
        assert len(results[0]) > 1 and results[0][-2].output is not None  # it had streamed, then was cut
        assert len(results[1]) == len(results[2]) == 1  # the queued ones never started
        await wait_idle(rep.engine)
        rep.request_timeout_s = None  # no deadline (the default): a long request runs to its end
        msgs = await messages(rep, "ok", long_params(30))
        assert msgs[-1].output.finished and len(msgs[-1].output.outputs[0].token_ids) == 30
        assert await rep.health()

    try:
        run(main())
    finally:
        rep._stop()


def test_queue_bound_counts_only_requests_that_must_wait(model_dir, run):
    """Row 25: capacity is max_num_seqs running + max_queued_requests waiting, also for a burst that
    arrives before the engine admitted any of it; one more gets QueueFullError (429)."""
    eng = make_engine(model_dir, max_num_seqs=2)
    ae = AsyncLLMEngine(eng, max_queued_requests=2)

    async def main():
        gens = [ae.generate(prompt(start=i), long_params(), f"r{i}") for i in range(5)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens[:4]]  # a burst: all in the inbox at once
        await asyncio.sleep(0)
        assert ae.num_waiting() == 4  # two fit in max_num_seqs, two are queued
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
    health_stall_s the replica is unhealthy for good (/health 503, Serve's check_health raises and
    replaces it), the requests waiting on the engine get 503 instead of hanging, and so do new ones."""
    rep = make_replica(model_dir, step_s=0.0, health_stall_s=1.0)
    release = threading.Event()
    step = rep.engine.step
    calls = [0]

    def hanging_step(*a, **k):
        calls[0] += 1
        if calls[0] > 3:
            release.wait(30)
        return step(*a, **k)

    rep.engine.step = hanging_step

    async def main():
        t1 = asyncio.ensure_future(messages(rep, "a", long_params()))
        t2 = asyncio.ensure_future(messages(rep, "b", long_params(), start=5))
        await asyncio.sleep(0.3)
        assert await rep.health()  # stuck, but not for health_stall_s yet
        a, b = await asyncio.wait_for(asyncio.gather(t1, t2), 3)
        for msgs in (a, b):
            assert msgs[-1].error_status == 503 and "stalled" in msgs[-1].error_message, msgs[-1]
        assert not await rep.health()
        with pytest.raises(RuntimeError, match="unhealthy"):
            rep.check_health()
        assert (await messages(rep, "c", long_params()))[-1].error_status == 503
        release.set()
        await asyncio.sleep(0.2)
        assert not await rep.health()  # sticky: the replica is replaced, not trusted again
        await wait_idle(rep.engine)  # the waiters' requests were aborted once the step returned

    try:
        run(main())
    finally:
        release.set()
        rep._stop()


def test_an_idle_replica_stays_healthy(model_dir):
    before = sys.getswitchinterval()
    rep = make_replica(model_dir, step_s=0.0, health_stall_s=2.0, gil_switch_interval_s=0.0005)
    try:
        # The replica's process hands the GIL over sooner (PoolConfig.gil_switch_interval_s).
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        time.sleep(2.5)
        assert rep.engine_ok()
        rep.check_health()
    finally:
        rep._stop()
        sys.setswitchinterval(before)


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
    """Row 33 in one process: what the replica does at shutdown (Serve awaits what __del__ returns)."""
    rep = make_replica(model_dir)

    async def main():
        t_short = asyncio.ensure_future(messages(rep, "short", long_params(10)))
        t_long = asyncio.ensure_future(messages(rep, "long", long_params(), start=3))
        t0 = time.monotonic()
        while rep.async_engine.num_pending < 2:  # both accepted before the drain starts (a loaded CI machine
            assert time.monotonic() - t0 < 10  # may take longer than any fixed sleep)
            await asyncio.sleep(0.01)
        drain = asyncio.ensure_future(rep.drain_and_stop(grace_s=1.0))
        await asyncio.sleep(0.01)
        assert not await rep.health()
        late = await messages(rep, "late", long_params())  # new work is refused at once
        assert late[-1].error_status == 503 and "shutting down" in late[-1].error_message
        short = await t_short  # running requests finish within the grace period
        assert short[-1].output.finished and len(short[-1].output.outputs[0].token_ids) == 10
        assert await drain == 1  # the 400-token one (8 s) was aborted at the end of the grace period
        long_ = await t_long
        assert long_[-1].error_status == 503 and len(long_) > 1
        assert idle(rep.engine), (rep.engine.get_metrics(), rep.engine.has_unfinished_requests(), rep.async_engine.num_pending)

    run(main())
    rep2 = make_replica(model_dir)
    async def via_del():
        return await rep2.__del__()
    assert run(via_del()) == 0


def test_a_reader_that_falls_behind_gets_what_piled_up_as_one_output(model_dir, run):
    """Outputs queued while the reader was busy are merged (outputs.merge_outputs): fewer messages,
    whose deltas (tokens, logprobs) joined are exactly the request's output, as for a reader that keeps up."""
    ae = AsyncLLMEngine(make_engine(model_dir, step_s=0.002))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)

    async def read(rid, start, pause_s):
        outs = []
        async for out in ae.generate(prompt(start=start), params, rid):
            outs.append(out)
            await asyncio.sleep(pause_s)  # a slow reader: the engine thread steps on meanwhile
        return outs

    try:
        keeps_up = run(read("fast", 1, 0.0))
        behind = run(read("slow", 1, 0.03))
        for outs in (keeps_up, behind):
            final = outs[-1].outputs[0]
            assert outs[-1].finished and len(final.token_ids) == 40
            assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
            lps = [lp for o in outs for lp in o.outputs[0].delta_logprobs]
            assert [list(lp) for lp in lps] == [list(lp) for lp in final.logprobs]
            assert all(o.outputs[0].token_ids == final.token_ids[: len(o.outputs[0].token_ids)] for o in outs)
        assert behind[-1].outputs[0].token_ids == keeps_up[-1].outputs[0].token_ids
        assert len(behind) < 15 < len(keeps_up)  # 40 tokens: about one output per step when keeping up
        assert max(len(o.outputs[0].delta_token_ids) for o in behind) > 1
    finally:
        ae.shutdown()


def test_streams_past_the_message_budget_get_fewer_messages_with_every_token(model_dir, run):
    """max_stream_messages_per_s: 8 streams at a step every few ms are far past 40 messages/s, so each
    stream's tokens come in a few messages (the first token at once); every token still arrives, in order."""
    ae = AsyncLLMEngine(make_engine(model_dir, step_s=0.002, max_num_seqs=8), max_stream_messages_per_s=40)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    async def read(i):
        return [out async for out in ae.generate(prompt(start=10 * i), params, f"s{i}")]

    async def main():
        return await asyncio.gather(*(read(i) for i in range(8)))

    try:
        results = run(main())
        assert ae.engine.outputs.min_interval_s > 0  # the budget was past: streams were paced
        for outs in results:
            final = outs[-1].outputs[0]
            assert outs[-1].finished and len(final.token_ids) == 60
            assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
            assert len(outs[0].outputs[0].delta_token_ids) == 1  # the first token was not held back
        assert sum(len(outs) for outs in results) < 8 * 60 / 4
    finally:
        ae.shutdown()


def test_a_non_streaming_call_gets_its_first_and_final_output_only(model_dir, run):
    """GenerateCall(stream=False) (a non-streaming HTTP request): the replica sends the first output (time to
    first token) and the final one, whose deltas carry every token between; a streaming call gets them all."""
    from raylight.messages import GenerateCall

    rep = make_replica(model_dir, step_s=0.002)
    params = long_params(20)

    async def main():
        streamed = [m async for m in rep.generate(GenerateCall("s", prompt(), params))]
        final_only = [m async for m in rep.generate(GenerateCall("f", prompt(start=7), params, stream=False))]
        return streamed, final_only

    try:
        streamed, final_only = run(main())
        assert len(streamed) >= 10
        assert len(final_only) == 2 and final_only[-1].output.finished and final_only[-1].stats is not None
        first, last = (m.output.outputs[0] for m in final_only)
        assert len(first.delta_token_ids) == 1 and first.delta_token_ids + last.delta_token_ids == last.token_ids
        assert len(last.token_ids) == 20
    finally:
        rep._stop()


def test_one_watch_task_guards_every_request_and_holds_none_after_they_end(model_dir, run):
    """The replica's RequestWatch: one task checks all running requests' deadlines (none polls on its
    own); a finished, timed-out or abandoned request leaves it, and the task ends with the last one."""
    rep = make_replica(model_dir, request_timeout_s=0.6, max_num_seqs=2)

    async def main():
        from raylight.messages import GenerateCall

        tasks = [asyncio.ensure_future(messages(rep, f"r{i}", long_params(3 if i == 0 else 400), start=i))
                 for i in range(3)]
        await asyncio.sleep(0.2)
        watch = rep.watch
        assert {rid for rid, _ in watch.deadlines.values()} <= {"r0", "r1", "r2"}
        assert watch.task is not None and not watch.task.done()
        gen = rep.generate(GenerateCall("left", prompt(start=9), long_params()))
        await gen.__anext__()  # one output, then the caller goes away
        await gen.aclose()
        assert "left" not in {rid for rid, _ in watch.deadlines.values()}
        done = await asyncio.gather(*tasks)
        assert done[0][-1].output.finished  # a short one ran to its end
        assert all(m[-1].error_status == 504 for m in done[1:])  # the long ones met their deadline
        assert watch.deadlines == {}
        await asyncio.sleep(0.3)  # past one poll: the task ends with nothing left to watch
        assert watch.task.done()
        await wait_idle(rep.engine)

    try:
        run(main())
    finally:
        rep._stop()


def test_step_counters_add_up_the_step_log_and_idle_time_counts(model_dir, run):
    """The counters behind /metrics' raylight:engine_step_* and engine_idle_seconds (bench_serving reads
    a window's mean step time and batch rows from two scrapes) agree with the engine's own step log."""
    rep = make_replica(model_dir)

    async def main():
        await asyncio.sleep(0.3)  # the loop waits with no request: idle time
        await asyncio.gather(*(messages(rep, f"r{i}", long_params(5), start=i) for i in range(3)))
        m = rep._metrics()
        log = list(rep.engine.step_log)
        assert m["num_steps"] == len(log) > 0
        assert m["step_rows_total"] == sum(x[0] for x in log) and m["step_tokens_total"] == sum(x[1] for x in log)
        assert m["step_decode_rows_total"] == sum(x[2] for x in log)
        assert m["step_seconds_total"] == pytest.approx(sum(x[3] for x in log))
        assert m["step_rows_total"] >= 3 * 5 and m["step_tokens_total"] >= 3 * (8 + 4)
        assert m["idle_seconds_total"] >= 0.2

    try:
        run(main())
    finally:
        rep._stop()


def test_the_message_budget_is_shared_by_the_running_requests_only(model_dir, run):
    """Requests waiting for a slot send nothing: 2 running of 6 at a budget of 40 messages/s get an output
    every 2/40 s, not every 6/40 s."""
    ae = AsyncLLMEngine(make_engine(model_dir, step_s=0.002, max_num_seqs=2), max_stream_messages_per_s=40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    seen = []

    async def read(i):
        async for _ in ae.generate(prompt(start=10 * i), params, f"w{i}"):
            seen.append(ae.engine.outputs.min_interval_s)

    async def main():
        await asyncio.gather(*(read(i) for i in range(6)))

    try:
        run(main())
        assert max(seen) == pytest.approx(2 / 40)
    finally:
        ae.shutdown()


def test_a_request_id_in_use_is_refused_and_the_first_request_keeps_its_guard(model_dir, run):
    """A caller reusing a running request's id gets 400; the first request still meets its deadline (its
    reader, which the watch ends it through, was not replaced)."""
    rep = make_replica(model_dir, request_timeout_s=0.5)

    async def main():
        first = asyncio.ensure_future(messages(rep, "same", long_params()))
        await asyncio.sleep(0.1)
        second = await messages(rep, "same", long_params(), start=7)
        assert second[-1].error_status == 400 and "already in use" in second[-1].error_message
        msgs = await first
        assert msgs[-1].error_status == 504
        await wait_idle(rep.engine)

    try:
        run(main())
    finally:
        rep._stop()
