"""The engine in its own process (engine/engine_process.py), driven as a replica drives it: greedy
outputs equal the in-process engine's token for token, requests stream and abort, bad input is refused
before any output, gauges, metrics and KV events come back, structured outputs compile in the child,
a failed start raises with the child's traceback, and a child that dies fails every reader and the
health check. Each test starts one engine process (a few seconds: the child imports torch)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from raylight.engine.async_engine import EngineDeadError, QueueFullError
from raylight.engine.engine_process import EngineProcessClient
from raylight.llm import LLM
from raylight.sampling_params import SamplingParams, StructuredOutputsParams
from raylight.testing.helpers import random_prompts

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=256, max_num_seqs=4,
              max_num_batched_tokens=32)


@pytest.fixture
def client(model_dir, request):
    extra = getattr(request, "param", {})
    c = EngineProcessClient({**ENGINE, "model": model_dir, **extra.get("engine", {})},
                            max_queued_requests=extra.get("max_queued_requests"), threads=1)
    yield c
    c.close()


def wait_for(cond, timeout_s=10.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


async def collect(c, prompt, params, rid):
    outs = [o async for o in c.generate(prompt, params, rid)]
    return outs


def test_outputs_equal_the_in_process_engine_and_everything_is_freed(client, model_dir):
    prompts = random_prompts(10, 500, 3, 40, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def main():
        return await asyncio.gather(*[collect(client, p, params, f"r{i}") for i, p in enumerate(prompts)])

    streams = asyncio.run(main())
    want = LLM(**{**ENGINE, "model": model_dir}).generate(prompts, params, use_tqdm=False)
    for outs, ref, p in zip(streams, want, prompts):
        assert outs[-1].finished and len(outs) >= 2  # streamed, not one final message
        # The prompt crosses once; every output the reader gets has it back.
        assert all(o.prompt_token_ids == p for o in outs)
        assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
    assert wait_for(lambda: not client.has_unfinished() and client.load().kv_blocks_free == ENGINE["num_kv_blocks"])
    m = client.metrics()
    assert m["generation_tokens_total"] == 24 * len(prompts) and m["num_running"] == 0 and m["num_steps"] > 0
    assert client.healthy() and client.num_waiting() == 0


def test_bad_input_is_refused_before_any_output_and_ids_in_use_are_refused(client):
    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await collect(client, [10**6], SamplingParams(max_tokens=2), "bad")
        long = client.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True), "dup")
        first = await long.__anext__()
        assert first.request_id == "dup"
        with pytest.raises(ValueError, match="already in use"):
            await collect(client, [1, 2], SamplingParams(max_tokens=2), "dup")
        await long.aclose()  # aborts it
        outs = await collect(client, [1, 2], SamplingParams(max_tokens=3, ignore_eos=True), "dup")  # the id is free again
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert wait_for(lambda: not client.has_unfinished() and client.load().kv_blocks_free == ENGINE["num_kv_blocks"])


@pytest.mark.parametrize("client", [{"max_queued_requests": 1, "engine": {"max_num_seqs": 1}}], indirect=True)
def test_the_queue_bound_holds_and_clients_that_leave_stop_counting(client):
    async def main():
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        a = client.generate([1, 2, 3], params, "a")
        await a.__anext__()  # running
        b = client.generate([4, 5, 6], params, "b")
        task = asyncio.ensure_future(b.__anext__())  # waiting for the one slot
        await asyncio.sleep(0.2)
        assert client.num_waiting() == 1
        with pytest.raises(QueueFullError):
            await collect(client, [7, 8], params, "c")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await b.aclose()
        await a.aclose()

    asyncio.run(main())
    assert wait_for(lambda: client.num_waiting() == 0 and not client.has_unfinished())


@pytest.mark.parametrize("client", [{"engine": {"enable_kv_events": True, "enable_prefix_caching": True}}],
                         indirect=True)
def test_kv_events_come_back(client):
    asyncio.run(collect(client, list(range(1, 30)), SamplingParams(max_tokens=4, ignore_eos=True), "kv"))
    assert client.kv_events_enabled
    got = []
    assert wait_for(lambda: got.extend(client.take_kv_events()) or len(got) > 0)
    assert any(type(e).__name__ == "BlockStored" for e in got)


def test_a_dead_engine_process_fails_its_readers_and_the_health_check(client):
    async def main():
        agen = client.generate([1, 2, 3], SamplingParams(max_tokens=10**4, ignore_eos=True), "long")
        await agen.__anext__()
        os.kill(client.proc.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass
        with pytest.raises(EngineDeadError):
            await collect(client, [1], SamplingParams(max_tokens=1), "after")

    asyncio.run(main())
    assert not client.healthy()
    with pytest.raises(RuntimeError, match="engine process"):
        client.check_ranks()


def test_a_failed_start_raises_with_the_childs_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not start") as err:
        EngineProcessClient({**ENGINE, "model": str(tmp_path / "no-such-model")}, threads=1)
    assert "Traceback" in str(err.value)


def test_structured_outputs_compile_in_the_engine_process(smollm2_dir):
    pytest.importorskip("xgrammar")
    c = EngineProcessClient({"model": smollm2_dir, "device": "cpu", "dtype": "float32", "max_model_len": 256,
                             "num_kv_blocks": 64, "grammar_compile_timeout_s": 0.5}, threads=1)
    try:
        async def main():
            ok = await collect(c, "Pick a color:", SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=
                               StructuredOutputsParams(choice=["red", "blue"])), "s")
            with pytest.raises(ValueError, match="invalid regex"):
                await collect(c, "x", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
                    regex="((")), "bad")
            with pytest.raises(ValueError, match="did not compile within 0.5 s"):  # ~1 s to compile
                await collect(c, "x", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
                    regex="(.{1,100}){1,100}x")), "slow")
            return ok

        outs = asyncio.run(main())
        assert outs[-1].outputs[0].text in ("red", "blue")
        assert c.metrics()["num_running"] == 0
    finally:
        c.close()


def test_a_replica_with_an_engine_process_reports_drains_and_stops(model_dir):
    """The replica (cluster/replica.py, without Ray) over an engine process: its stats come from the
    child's updates, and a drain aborts what is still running, then stops the child cleanly."""
    from raylight.cluster.replica import EngineReplica
    from raylight.messages import GenerateCall

    rep = EngineReplica({**ENGINE, "model": model_dir}, max_queued_requests=8, cpu_threads=1, engine_process=True)
    assert rep.engine is None  # nothing of the engine lives in the replica's process

    async def main():
        params = SamplingParams(max_tokens=10**4, ignore_eos=True)
        agen = rep.generate(GenerateCall("long", [1, 2, 3], params))
        first = await agen.__anext__()
        assert first.output is not None and not first.output.finished
        assert wait_for(lambda: rep.async_engine.num_running() == 1)
        stats = await rep.stats()
        assert stats.healthy and stats.metrics["num_running"] == 1 and stats.metrics["kv_blocks_free"] < 256
        rest = asyncio.ensure_future(_drain(agen))
        assert await rep.drain_and_stop(grace_s=0.2) == 1
        msgs = await rest
        assert msgs[-1].error_status == 503

    asyncio.run(main())
    assert rep.async_engine.proc.returncode == 0  # told to stop, it finished and exited


async def _drain(agen):
    return [m async for m in agen]
