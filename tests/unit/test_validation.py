"""Bad input gets a clear ValueError naming the problem, and other requests still complete."""

from __future__ import annotations

import pytest

from raylight import LLM, EngineArgs, SamplingParams

from raylight.testing.helpers import assert_no_leaks, make_random_hf_model, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_random_hf_model("llama", path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    # 6 blocks of 16 tokens; the context window is 128 tokens.
    return LLM(model_dir, max_model_len=128, num_kv_blocks=6)


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt is empty"),
    ("", "prompt is empty"),
    ([1] * 129, "longer than the context window (max_model_len=128)"),
    ([1, 2, 512], "token id 512 at position 2 is outside the vocabulary [0, 512)"),
    ([1, -1], "token id -1 at position 1 is outside the vocabulary"),
    ([1] * 100, "needs 7 KV blocks (100 tokens) but the whole KV cache holds 6 blocks"),
    (3.5, "prompt must be a string or a list of token ids"),
    ("hello", "no tokenizer"),
])
def test_bad_prompt_raises_and_others_complete(llm, prompt, message):
    good = random_prompts(3, 512, 5, 20, seed=3)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in good]
    with pytest.raises(ValueError) as err:
        engine.add_request(prompt, GREEDY)
    assert message in str(err.value)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == sorted(ids)
    assert all(len(o.outputs[0].token_ids) == 8 for o in done.values())
    assert_no_leaks(llm)


def test_generate_rejects_the_batch_up_front_and_stays_usable(llm):
    prompts = random_prompts(3, 512, 5, 20, seed=4)
    with pytest.raises(ValueError, match=r"prompt 1: .*outside the vocabulary"):
        llm.generate([prompts[0], [10**6], prompts[2]], GREEDY, use_tqdm=False)
    assert_no_leaks(llm)  # nothing was queued
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8, 8]


def test_sequence_outgrowing_the_pool_ends_with_length(llm):
    # 90 prompt tokens fit in 6 blocks; 90 + 20 do not, even alone.
    out = llm.generate([[7] * 90], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert 90 + len(out.outputs[0].token_ids) <= 6 * 16 + 1
    assert_no_leaks(llm)


def test_max_model_len_caps_output(model_dir):
    llm = LLM(model_dir, max_model_len=128)
    out = llm.generate([[5] * 120], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8  # the window holds 128 tokens
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"),
    (dict(block_size=0), "block_size"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(dtype="int8"), "dtype"),
    (dict(max_num_sequences=4), "max_num_sequences"),
])
def test_engine_args_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**kwargs)


def test_max_model_len_above_the_model_is_rejected(model_dir):
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds"):
        LLM(model_dir, max_model_len=4096)


def test_kv_memory_too_small_for_one_block(model_dir):
    with pytest.raises(ValueError, match="holds no block"):
        LLM(model_dir, kv_cache_memory=100)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(n=0), "n must be"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(stop=[3]), "stop"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=["a"]), "allowed_token_ids"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**kwargs)
    assert "must be" in str(err.value)  # the allowed range is named too


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=65), r"n must be in \[1, 64\]"),
    (dict(logit_bias={512: 1.0}), "logit_bias: token id 512 is outside the vocabulary"),
    (dict(stop_token_ids=[-1]), "stop_token_ids: -1 is outside the vocabulary"),
    (dict(allowed_token_ids=[1, 512]), "allowed_token_ids: token id 512 is outside the vocabulary"),
])
def test_model_dependent_sampling_checks_run_before_queueing(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[1, 2, 3]], SamplingParams(**kwargs), use_tqdm=False)
    assert_no_leaks(llm)


def test_max_n_is_configurable(model_dir):
    llm = LLM(model_dir, max_n=2, num_kv_blocks=16)
    with pytest.raises(ValueError, match=r"n must be in \[1, 2\]"):
        llm.generate([[1, 2]], SamplingParams(n=3), use_tqdm=False)
    out = llm.generate([[1, 2]], SamplingParams(n=2, max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs) == 2


def test_stop_token_ids_outside_vocab(llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[1, 2, 3]], SamplingParams(stop_token_ids=[99999]), use_tqdm=False)
