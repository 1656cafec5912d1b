"""Async scheduling (engine/overlap.py `OverlapPolicy.run_ahead` in the step loop) gives the same results as the plain step, on
CPU in float32, where it runs the same code as on CUDA (it is off there by default only because
nothing runs concurrently). Step N+1 is launched before N's tokens are read; its placeholder
tokens come from N's sampled ids on the device."""

from __future__ import annotations

import pytest

from raylight import LLM, SamplingParams

from raylight.testing.helpers import assert_no_leaks, count_placeholders, make_random_hf_model, random_prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama-async"))
    make_random_hf_model("llama", path)
    return path


def outputs_of(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def assert_same_logprobs(got, want):
    """Same tokens and ranks; values to float32 noise (steps batch requests differently)."""
    for g, w in zip(got, want):
        for gc, wc in zip(g.outputs, w.outputs):
            assert (gc.logprobs is None) == (wc.logprobs is None)
            for gp, wp in zip(gc.logprobs or [], wc.logprobs or []):
                assert list(gp) == list(wp) and [v.rank for v in gp.values()] == [v.rank for v in wp.values()]
                assert [v.logprob for v in gp.values()] == pytest.approx([v.logprob for v in wp.values()], abs=1e-4)


ENGINE = dict(max_num_batched_tokens=32, block_size=4)


@pytest.mark.parametrize("num_kv_blocks", [400, 30])  # plenty, and so few that requests are preempted
def test_async_scheduling_equals_the_plain_step(model_dir, num_kv_blocks):
    prompts = random_prompts(12, 512, 3, 40, seed=1)
    sync = LLM(model_dir, num_kv_blocks=num_kv_blocks, async_scheduling=False, **ENGINE)
    probe = sync.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    stop_tok = probe[0].outputs[0].token_ids[6]  # sampled mid-way: the request ends on a sampled token
    params = [SamplingParams(temperature=0.0, max_tokens=5 + 3 * i) for i in range(12)]
    params[0] = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_tok])
    params[3] = SamplingParams(temperature=0.9, seed=3, max_tokens=20, n=2)  # forks on its first token
    params[4] = SamplingParams(temperature=0.0, max_tokens=20, presence_penalty=0.7, repetition_penalty=1.3)
    params[5] = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=10, logprobs=2,
                               stop_token_ids=[stop_tok])
    params[6] = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=11, max_tokens=25)
    want = sync.generate(prompts, params, use_tqdm=False)
    llm = LLM(model_dir, num_kv_blocks=num_kv_blocks, async_scheduling=True, **ENGINE)
    assert llm.engine.async_scheduling
    used = count_placeholders(llm)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert outputs_of(got) == outputs_of(want)
    assert_same_logprobs(got, want)
    assert want[0].outputs[0].finish_reason == "stop" and len(want[0].outputs[0].token_ids) < 30
    assert used[0] > 100  # most decode steps ran ahead
    if num_kv_blocks == 30:
        assert llm.get_metrics()["preemptions"] > 0
    assert_no_leaks(llm)


def test_abort_while_a_step_runs_ahead(model_dir):
    prompts = random_prompts(4, 512, 5, 20, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = LLM(model_dir, async_scheduling=True, **ENGINE)
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    finals = {}
    for _ in range(4):
        for o in engine.step():
            finals[o.request_id] = o
    assert engine._in_flight  # a step is out while we abort
    aborted = engine.abort_request([ids[1]])
    assert aborted and aborted[0].outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        for o in engine.step():
            finals[o.request_id] = o
    want = LLM(model_dir, async_scheduling=False, **ENGINE).generate([prompts[i] for i in (0, 2, 3)], params,
                                                                      use_tqdm=False)
    assert [finals[ids[i]].outputs[0].token_ids for i in (0, 2, 3)] == [w.outputs[0].token_ids for w in want]
    assert ids[1] not in finals or not finals[ids[1]].finished
    assert_no_leaks(llm)


def test_async_scheduling_needs_a_single_rank(model_dir):
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(model_dir, async_scheduling=True, num_microbatches=2)


def install_replay_on_cpu(llm, max_batch_size: int = 16):
    """A CudaGraphRunner whose 'graphs' run the model eagerly on the runner's persistent buffers: the
    host side of graph decode (padding, placeholder ids filled on the device, metadata refills) runs
    on CPU exactly as on CUDA, where only capture and replay differ."""
    import torch

    from raylight.workers.cuda_graphs import CudaGraphRunner, _Graph

    engine = llm.engine
    runner, backend = engine.runner, engine.attn_backend

    class Meta:
        built = None

    class Graphable:  # the CPU backend with the two graph-metadata calls of the CUDA backends
        def make_graph_metadata(self, bs, max_blocks):
            return Meta()

        def fill_graph_metadata(self, meta, common):
            meta.built = backend.build(common)

    class Replay:
        def __init__(self, bs, meta, hidden):
            self.bs, self.meta, self.hidden = bs, meta, hidden

        def replay(self):
            g = runner.graphs
            self.hidden.copy_(runner.model(g.input_ids[: self.bs], g.positions[: self.bs], runner.kv_caches,
                                           self.meta.built))

    # One block past the pool's, as on CUDA: padding rows write there (the cache is still empty here).
    scratch = engine.kv.num_blocks
    for i, cache in enumerate(runner.kv_caches):
        runner.kv_caches[i] = torch.cat([cache, torch.zeros_like(cache[:1])])
    graphs = CudaGraphRunner(runner.model, Graphable(), runner.kv_caches, max_batch_size, max_blocks_per_seq=64,
                             scratch_block=scratch, block_size=engine.block_size, device=torch.device("cpu"))
    hidden_size = runner.model.config.hidden_size
    for bs in graphs.sizes:
        meta, hidden = Meta(), torch.zeros(bs, hidden_size)
        graphs.graphs[bs] = _Graph(Replay(bs, meta, hidden), meta, hidden)
    runner.graphs = graphs
    return graphs


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_graph_decode_path_equals_the_plain_step(model_dir, async_scheduling):
    """Decode steps through the graph runner's buffers (on CPU, see install_replay_on_cpu) give the
    plain engine's tokens: requests end at different steps, so rows shift, and placeholders cover all
    rows, some (beside a forked request's first decode), or none."""
    prompts = random_prompts(10, 512, 3, 30, seed=5)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(10)]
    params[2] = SamplingParams(temperature=0.8, seed=7, max_tokens=20)
    # The last prompt forks after every prompt is in: its two sequences join decode-only steps with
    # known tokens beside the other rows' placeholders.
    params[9] = SamplingParams(temperature=0.0, max_tokens=12, n=2)
    want = LLM(model_dir, num_kv_blocks=400, async_scheduling=False, **ENGINE).generate(prompts, params,
                                                                                       use_tqdm=False)
    llm = LLM(model_dir, num_kv_blocks=400, async_scheduling=async_scheduling, **ENGINE)
    graphs = install_replay_on_cpu(llm)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert outputs_of(got) == outputs_of(want)
    assert graphs.num_replays > 20
    assert_no_leaks(llm)
