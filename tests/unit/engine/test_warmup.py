"""engine/warmup: the start-up warm-up runs the real step path (a full-budget prefill, a mixed step,
decodes, greedy and sampled rows) and leaves no trace a user or a router could see."""

from __future__ import annotations

import pytest

from raylight import LLM, SamplingParams
from raylight.engine.warmup import warmup_prompt_lengths
from raylight.testing.helpers import make_random_hf_model, random_prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("warmup") / "llama")
    make_random_hf_model("llama", path)
    return path


def test_prompt_lengths_fill_the_budget_and_fit_window_and_cache():
    assert warmup_prompt_lengths(8192, 131072, 10**6, 4) == (8192, 4097)
    long_len, short_len = warmup_prompt_lengths(8192, 512, 10**6, 4)  # the window is smaller than the budget
    assert long_len + 4 < 512 and short_len <= long_len
    long_len, short_len = warmup_prompt_lengths(8192, 131072, 1000, 4)  # both must fit the KV cache at once
    assert long_len + short_len + 8 <= 1000
    assert warmup_prompt_lengths(1, 4, 8, 4) == (1, 1)  # tiny engines still warm up on something


def test_warmup_leaves_no_trace_and_changes_no_output(model_dir):
    args = dict(device="cpu", max_num_batched_tokens=96, max_num_seqs=8, enable_kv_events=True, seed=3,
                kv_cache_memory=2**22)
    warm = LLM(model_dir, warmup=True, **args)
    cold = LLM(model_dir, warmup=False, **args)
    e = warm.engine
    assert e.warmup_s > 0 and cold.engine.warmup_s == 0
    # Nothing of the warm-up requests is left: blocks, prefix cache, router events, counters.
    assert e.kv.num_free_blocks == e.kv.num_blocks and not e.kv.pool.cached
    assert e.take_kv_events() == []
    m = warm.get_metrics()
    assert (m["num_steps"], m["prompt_tokens_total"], m["generation_tokens_total"], m["prefix_cache_queries"]) == (0,) * 4
    assert not e.has_unfinished_requests() and not e.scheduler.requests and not e.outputs.groups

    prompts = random_prompts(5, 512, 20, 150, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)]
    for p in params:
        got = [o.outputs[0].token_ids for o in warm.generate(prompts, p, use_tqdm=False)]
        want = [o.outputs[0].token_ids for o in cold.generate(prompts, p, use_tqdm=False)]
        assert got == want
    # The first request's blocks became the only cached prefix; no warm-up salt hit anyone.
    assert warm.get_metrics()["prefix_cache_hit_tokens"] == cold.get_metrics()["prefix_cache_hit_tokens"]
    assert warm.get_metrics()["num_steps"] == cold.get_metrics()["num_steps"]
