"""Our Llama-family code against HF transformers on small random models (float32, CPU)."""

from __future__ import annotations

import pytest

from raylight import LLM, SamplingParams

from raylight.testing.helpers import assert_no_leaks, hf_greedy, make_random_hf_model, random_prompts

KINDS = ["llama", "llama-tied", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module", params=KINDS)
def random_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = make_random_hf_model(request.param, path)
    prompts = random_prompts(6, 512, 3, 70, seed=1)
    return request.param, path, hf, prompts, hf_greedy(hf, prompts, 24, stop_at_eos=False)


@pytest.mark.parametrize("engine_args", [
    dict(),
    dict(max_num_batched_tokens=7),
    dict(num_kv_blocks=16, block_size=8),
    dict(block_size=4, max_num_batched_tokens=5, num_kv_blocks=30),
], ids=["plain", "chunk7", "preempt", "tiny-blocks"])
def test_greedy_matches_hf(random_model, engine_args):
    kind, path, _, prompts, ref = random_model
    llm = LLM(path, **engine_args)
    assert llm.get_tokenizer() is None
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    for out, r in zip(outs, ref):
        assert out.outputs[0].token_ids == r, kind
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == ""  # no tokenizer
    if "num_kv_blocks" in engine_args and engine_args["num_kv_blocks"] <= 16:
        assert llm.get_metrics()["preemptions"] > 0
    assert_no_leaks(llm)


def test_logits_match_hf_on_a_prefix_hit(random_model):
    """A second request sharing a cached prefix computes the same next token as a cold run."""
    kind, path, _, prompts, ref = random_model
    llm = LLM(path, block_size=4)
    shared = prompts[0] + prompts[1]
    first = llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    again = llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(shared) - 1) // 4 * 4 > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_no_leaks(llm)
