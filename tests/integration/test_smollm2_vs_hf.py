"""Greedy outputs on the real SmolLM2-135M weights equal HF transformers' token for token (float32, CPU)."""

from __future__ import annotations

import pytest

from raylight import LLM, SamplingParams

from raylight.testing.helpers import SMOLLM2_CHAT, SMOLLM2_PROMPTS, assert_no_leaks, hf_greedy

MAX_NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
# A shared system preamble long enough to fill several 16-token blocks.
PREAMBLE = ("You are a careful assistant. Answer briefly and precisely, and never invent facts. "
            "If a question is ambiguous, say which reading you chose. ")


@pytest.fixture(scope="module")
def prompt_ids(smollm2_hf):
    _, tok = smollm2_hf
    ids = [tok(p).input_ids for p in SMOLLM2_PROMPTS]
    chat = tok.apply_chat_template(SMOLLM2_CHAT, add_generation_prompt=True, tokenize=True)
    ids.append(list(chat["input_ids"] if hasattr(chat, "keys") else chat))
    return ids


@pytest.fixture(scope="module")
def reference(smollm2_hf, prompt_ids):
    return hf_greedy(smollm2_hf[0], prompt_ids, MAX_NEW)


def _check(llm, prompt_ids, reference):
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], GREEDY, use_tqdm=False)
    assert len(outs) == len(prompt_ids)
    for out, ids, ref in zip(outs, prompt_ids, reference):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == ("length" if len(ref) == MAX_NEW and ref[-1] != 2 else "stop")
    assert_no_leaks(llm)
    return outs


def test_default_model_matches_hf(smollm2_dir, prompt_ids, reference):
    llm = LLM()  # no model: the default SmolLM2
    assert llm.engine.model_name == "SmolLM2-135M-Instruct"
    assert sum(len(r) for r in reference) >= 8 * 30
    outs = _check(llm, prompt_ids, reference)
    tok = llm.get_tokenizer()
    for out in outs:  # text is the decode of the tokens
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_text_prompts_and_chat_match_hf(smollm2_dir, smollm2_hf, prompt_ids, reference):
    llm = LLM(smollm2_dir)
    outs = llm.generate(SMOLLM2_PROMPTS, GREEDY, use_tqdm=False)
    for out, ref in zip(outs, reference):
        assert out.outputs[0].token_ids == ref
    chat = llm.chat(SMOLLM2_CHAT, GREEDY, use_tqdm=False)[0]
    assert chat.prompt_token_ids == prompt_ids[-1]
    assert chat.outputs[0].token_ids == reference[-1]
    assert chat.outputs[0].text.strip()
    assert_no_leaks(llm)


def test_chunked_prefill_budget_of_7(smollm2_dir, prompt_ids, reference):
    # every other prompt (the chat one included): five prompts cut into 7-token chunks are as good a
    # check as nine, at about half the CPU time
    llm = LLM(smollm2_dir, max_num_batched_tokens=7)
    _check(llm, prompt_ids[::2], reference[::2])
    assert llm.get_metrics()["num_steps"] > MAX_NEW  # prompts really were split over steps


def test_prefix_caching_hits_and_keeps_outputs(smollm2_dir, smollm2_hf, prompt_ids):
    hf, tok = smollm2_hf
    long_ids = [tok(PREAMBLE + p).input_ids for p in SMOLLM2_PROMPTS[:4]]
    ref = hf_greedy(hf, long_ids, MAX_NEW)
    llm = LLM(smollm2_dir, enable_prefix_caching=True)
    _check(llm, long_ids, ref)
    first_hits = llm.get_metrics()["prefix_cache_hit_tokens"]
    _check(llm, long_ids, ref)  # the same batch again: its full prompt blocks are cached
    m = llm.get_metrics()
    assert m["prefix_cache_hit_tokens"] > first_hits
    assert m["prefix_cache_hit_tokens"] >= sum((len(i) - 1) // 16 * 16 for i in long_ids)

    salted = llm.generate([{"prompt_token_ids": long_ids[0]}], GREEDY, use_tqdm=False, cache_salt="tenant-b")
    assert salted[0].num_cached_tokens == 0  # another salt never shares blocks
    assert salted[0].outputs[0].token_ids == ref[0]
    assert_no_leaks(llm)


def test_preemption_keeps_outputs(smollm2_dir, prompt_ids, reference):
    llm = LLM(smollm2_dir, num_kv_blocks=12)  # 192 tokens for 8 sequences of ~45 tokens each
    _check(llm, prompt_ids, reference)
    assert llm.get_metrics()["preemptions"] > 0


def test_preemption_with_chunking_and_prefix_cache(smollm2_dir, prompt_ids, reference):
    llm = LLM(smollm2_dir, num_kv_blocks=10, max_num_batched_tokens=13, enable_prefix_caching=True)
    _check(llm, prompt_ids, reference)
    _check(llm, prompt_ids, reference)
    assert llm.get_metrics()["preemptions"] > 0
