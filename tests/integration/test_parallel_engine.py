"""`LLM(..., tensor_parallel_size=T, pipeline_parallel_size=P)` end to end on CPU (gloo): the
ranks are child processes of the test's, and every output equals the single-process engine's
in float32: greedy tokens and their logprobs, prompt logprobs, chunked prefill, n=2 seeded
sampling. A rank that dies fails the engine quickly and leaves no process behind. The ranks start
from a module entry point, so an engine made from `python -c` or stdin works too."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from raylight import LLM, SamplingParams

from raylight.testing.helpers import SMOLLM2_PROMPTS, count_placeholders, make_random_hf_model, random_prompts

# Small pool and token budget: prompts of up to 40 tokens prefill in chunks of 16 over several steps.
ENGINE = dict(device="cpu", dtype="float32", max_num_batched_tokens=16, kv_cache_memory=2**22, block_size=4)
LAYOUTS = {  # id: (tp, pp, layer split)
    "tp2": (2, 1, None),
    "pp2-split3+1": (1, 2, [3, 1]),  # the first stage (rank 1) holds 3 of the 4 layers
    "tp2xpp2": (2, 2, None),
}


def _requests():
    prompts = random_prompts(5, 512, 3, 40, seed=3)
    params = [SamplingParams(max_tokens=6, temperature=0, logprobs=2) for _ in prompts]
    params[1] = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3)  # a 30+-token prompt: 3 chunks
    params[2] = SamplingParams(n=2, max_tokens=6, temperature=0.9, seed=7)
    return prompts, params


def _summary(outputs) -> list[dict]:
    """Per request: token ids (must match exactly) and every logprob (to match closely), keyed by
    (prompt or completion index, position, token)."""
    out = []
    for o in outputs:
        lps = {("prompt", i, t): lp.logprob for i, pos in enumerate(o.prompt_logprobs or []) if pos
               for t, lp in pos.items()}
        for c in o.outputs:
            lps.update({(c.index, i, t): lp.logprob for i, pos in enumerate(c.logprobs or []) for t, lp in pos.items()})
        out.append(dict(tokens=[c.token_ids for c in o.outputs], logprobs=lps))
    return out


def _assert_close(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert g["logprobs"].keys() == w["logprobs"].keys()
        for k, v in g["logprobs"].items():
            assert v == pytest.approx(w["logprobs"][k], abs=1e-3), k


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A random 4-layer Qwen3 (qk-norm, 4 query / 2 KV heads) and the single-process outputs."""
    path = str(tmp_path_factory.mktemp("qwen3-parallel"))
    make_random_hf_model("qwen3", path, num_hidden_layers=4)
    prompts, params = _requests()
    with LLM(path, **ENGINE) as llm:
        ref = _summary(llm.generate(prompts, params, use_tqdm=False))
    return path, prompts, params, ref


def _children_gone(llm) -> bool:
    return all(not p.is_alive() for p in llm.engine.executor.launcher.procs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_engine_matches_single_process(qwen3, layout):
    path, prompts, params, ref = qwen3
    tp, pp, split = LAYOUTS[layout]
    llm = LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, pipeline_layer_split=split, **ENGINE)
    try:
        assert llm.engine.executor.world_size == tp * pp
        _assert_close(_summary(llm.generate(prompts, params, use_tqdm=False)), ref)
        if split == [3, 1]:
            # Rank 0 (1 layer) could hold 3x the blocks rank 1 (3 layers) can: the pool is rank 1's.
            per_layer = 2 * ENGINE["block_size"] * 2 * 32 * 4  # K and V, block, KV heads, head_dim, fp32
            assert llm.engine.num_blocks == ENGINE["kv_cache_memory"] // (3 * per_layer)
        m = llm.get_metrics()
        assert m["kv_blocks_free"] == m["kv_blocks_total"] and m["num_running"] == 0
        # The return path: every rank reports, in rank order, having run every step rank 0 ran.
        reports = llm.engine.collect_rank_reports()
        assert [r.rank for r in reports] == list(range(tp * pp))
        assert {r.num_steps for r in reports} == {llm.engine.num_steps} and llm.engine.num_steps > 0
        assert llm.generate(prompts[:1], params[:1], use_tqdm=False)[0].finished  # steps go on afterwards
    finally:
        llm.shutdown()
    assert _children_gone(llm)


def test_tp2_with_async_scheduling_matches_single_process(qwen3):
    """TP=2 running each step ahead of the last one's tokens: rank 0 broadcasts the placeholder ids
    it sampled to its TP peer before the step's forward."""
    path, prompts, params, ref = qwen3
    llm = LLM(path, tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    placeholders = count_placeholders(llm)
    try:
        assert llm.engine.async_scheduling
        _assert_close(_summary(llm.generate(prompts, params, use_tqdm=False)), ref)
        assert placeholders[0] > 5
        m = llm.get_metrics()
        assert m["kv_blocks_free"] == m["kv_blocks_total"] and m["num_running"] == 0
    finally:
        llm.shutdown()
    assert _children_gone(llm)


def test_smollm2_tp2_matches_single_process(smollm2_dir):
    """SmolLM2's 9 heads / 3 KV heads split unevenly (5 + 4, 2 + 1) over two TP ranks."""
    params = SamplingParams(max_tokens=12, temperature=0)
    kwargs = dict(device="cpu", dtype="float32", kv_cache_memory=2**26)
    with LLM(smollm2_dir, **kwargs) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(SMOLLM2_PROMPTS, params, use_tqdm=False)]
    with LLM(smollm2_dir, tensor_parallel_size=2, **kwargs) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(SMOLLM2_PROMPTS, params, use_tqdm=False)]
    assert got == ref


def test_dead_rank_fails_the_engine_and_leaves_no_process(qwen3):
    """Rank 1 killed mid-generation: the step loop dies within seconds, waiting and new requests get
    EngineDeadError, and shutdown leaves no child process."""
    from raylight.engine.async_engine import AsyncLLMEngine, EngineDeadError

    path, prompts, _, _ = qwen3
    llm = LLM(path, tensor_parallel_size=2, **{**ENGINE, "max_num_batched_tokens": 64})
    engine = AsyncLLMEngine(llm.engine)
    victim = llm.engine.executor.launcher.procs[0]

    async def run() -> float:
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        gen = engine.generate(prompts[0], params, "long")
        await gen.__anext__()  # the ranks are running steps
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass
        elapsed = time.monotonic() - t0
        with pytest.raises(EngineDeadError):
            await engine.generate(prompts[1], params, "after").__anext__()
        return elapsed

    try:
        elapsed = asyncio.run(asyncio.wait_for(run(), timeout=60))
        assert elapsed < 15, elapsed
        assert not engine.healthy()
    finally:
        engine.shutdown()
        llm.shutdown()
    assert _children_gone(llm)


def test_pp_shutdown_with_microbatches_in_flight(qwen3):
    """Stopping a PP=2 engine mid-generation, with a micro-batch still in the pipeline, finishes
    that step (the first stage is waiting to hand it over) and leaves no process behind."""
    path, prompts, params, _ = qwen3
    llm = LLM(path, pipeline_parallel_size=2, **ENGINE)
    engine = llm.engine
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    while not engine._in_flight:
        engine.step()
    started = time.monotonic()
    llm.shutdown()
    assert not engine._in_flight and time.monotonic() - started < 30
    assert _children_gone(llm)


# Made from code with no file behind `__main__` (stdin, `python -c`, a notebook): the ranks must not
# need to re-run `__main__` (multiprocessing's spawn did, and died with FileNotFoundError '<stdin>').
NO_FILE_SCRIPT = """
import sys
from raylight import LLM, SamplingParams
engine = dict(device="cpu", dtype="float32", kv_cache_memory=2**22, block_size=4, distributed_timeout_s=60)
params = SamplingParams(max_tokens=6, temperature=0)
prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
with LLM(sys.argv[-1], **engine) as llm:
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
with LLM(sys.argv[-1], tensor_parallel_size=2, **engine) as llm:
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
print("TOKENS", ref, got, flush=True)
print("SAME" if got == ref and len(ref[0]) == 6 else "DIFFERENT", flush=True)
"""


@pytest.mark.parametrize("how", ["stdin", "dash-c"])
def test_tp2_from_code_without_a_file(qwen3, tmp_path, how):
    path = qwen3[0]
    if how == "stdin":
        cmd, stdin = [sys.executable, "-", path], NO_FILE_SCRIPT
    else:
        cmd, stdin = [sys.executable, "-c", NO_FILE_SCRIPT, path], None
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_rank_failing_at_start_fails_the_engine_fast(qwen3, monkeypatch):
    """Rank 1 dies before it joins (here: a debugging variable only the ranks other than 0 read,
    set to nonsense): `LLM(...)` raises within seconds naming the child's own error, instead of
    rank 0 waiting the whole rendezvous timeout (300 s) and reporting a timeout."""
    from raylight.workers.executor import RankDiedError

    monkeypatch.setenv("RAYLIGHT_DUMP_STACKS_AFTER_S", "not-a-number")
    t0 = time.monotonic()
    with pytest.raises(RankDiedError) as info:
        LLM(qwen3[0], tensor_parallel_size=2, distributed_timeout_s=300, **ENGINE)
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert "rank 1" in msg and "could not convert string to float: 'not-a-number'" in msg, msg


def test_local_ranks_listen_on_loopback_only(qwen3):
    """Rank 0's rendezvous store and gloo sockets of an offline engine accept 127.0.0.1 only (torch's own
    TCPStore would listen on every interface)."""
    psutil = pytest.importorskip("psutil")
    with LLM(qwen3[0], tensor_parallel_size=2, **ENGINE) as llm:
        procs = [psutil.Process()] + [psutil.Process(pid) for pid in llm.engine.executor.launcher.pids]
        listening = [c.laddr for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
