"""Sampling and outputs end to end on SmolLM2-135M (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from raylight import LLM, SamplingParams
from raylight.engine.tokenizer import IncrementalDetokenizer

from raylight.testing.helpers import assert_no_leaks

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(smollm2_dir)


def test_seeded_requests_are_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=16)
    alone = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.9, max_tokens=24), SamplingParams(temperature=0.0, max_tokens=8),
              SamplingParams(temperature=1.2, seed=7, max_tokens=20)]
    batch = llm.generate(["Hello there", PROMPT, "Once upon a time", "def f(x):"], [others[0], p, others[1], others[2]],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    reordered = llm.generate([PROMPT, "Tell me a story"], [p, others[0]], use_tqdm=False)
    assert reordered[0].outputs[0].token_ids == alone
    assert_no_leaks(llm)


def test_stop_string_across_tokens_is_excluded(llm):
    base = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode(base.token_ids[: i + 1]) for i in range(len(base.token_ids))]
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(2, len(pieces) - 1)
             if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][len(pieces[i]) : len(pieces[i]) + 2]
    assert stop in base.text
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == base.text[: base.text.index(stop)]
    assert stop not in c.text
    kept = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]
    assert_no_leaks(llm)


def test_streamed_deltas_equal_the_final_text_with_stop_strings(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, stop=["\n\n", "capital"])
    rid = engine.add_request("Write a list of three fruits:", params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            deltas.append(out.outputs[0].delta_text)
            final = out
    assert "".join(deltas) == final.outputs[0].text


def test_n4_shares_the_prompt_blocks_and_samples_distinct_completions(llm):
    engine = llm.engine
    tok = llm.get_tokenizer()
    prompt = tok("Write a short poem about the sea. " * 6).input_ids[:40]  # 2 full blocks + 8 tokens
    assert len(prompt) == 40
    total = engine.get_metrics()["kv_blocks_total"]
    rid = engine.add_request(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=3))
    used_after_fork = None
    outs = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs = out
            if used_after_fork is None:
                used_after_fork = total - engine.get_metrics()["kv_blocks_free"]
    # 2 shared full prompt blocks + 4 private copies of the partly filled third block, not 4 x 3.
    assert used_after_fork == 2 + 4
    assert outs.request_id == rid and outs.finished and len(outs.outputs) == 4
    assert [c.index for c in outs.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 for c in outs.outputs)
    assert len({tuple(c.token_ids) for c in outs.outputs}) == 4
    assert_no_leaks(llm)


def test_n_with_greedy_gives_identical_completions(llm):
    out = llm.generate([PROMPT], SamplingParams(n=3, temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    single = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == single.outputs[0].token_ids


def test_logprobs_and_prompt_logprobs_match_hf(llm, smollm2_hf):
    hf, tok = smollm2_hf
    prompt_ids = tok("The quick brown fox jumps over the lazy dog because").input_ids
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=5, prompt_logprobs=3)
    out = llm.generate([prompt_ids], params, use_tqdm=False)[0]
    c = out.outputs[0]
    ids = torch.tensor([prompt_ids + c.token_ids])
    with torch.inference_mode():
        ref = hf(ids).logits[0].float().log_softmax(-1)
    # prompt logprobs: position i holds log p(prompt[i] | prompt[:i]); position 0 has none.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt_ids)
    for i in range(1, len(prompt_ids)):
        entry = out.prompt_logprobs[i]
        assert entry[prompt_ids[i]].logprob == pytest.approx(ref[i - 1, prompt_ids[i]].item(), abs=1e-4)
        top = ref[i - 1].topk(3)
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
    # sampled-token logprobs, with the top 5 alternatives each
    assert len(c.logprobs) == 10
    cum = 0.0
    for j, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(prompt_ids) - 1 + j]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy
        top = row.topk(5)
        assert set(top.indices.tolist()) <= set(entry)
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
        assert entry[token].decoded_token == tok.decode([token])
        cum += row[token].item()
    assert c.cumulative_logprob == pytest.approx(cum, abs=1e-3)


def test_prompt_logprobs_with_chunking_and_a_warm_cache(smollm2_dir, smollm2_hf):
    hf, tok = smollm2_hf
    llm = LLM(smollm2_dir, max_num_batched_tokens=7)
    prompt_ids = tok("A prompt that is long enough to be split over several steps of seven tokens.").input_ids
    llm.generate([prompt_ids], SamplingParams(max_tokens=1), use_tqdm=False)  # warm the prefix cache
    out = llm.generate([prompt_ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt_ids])).logits[0].float().log_softmax(-1)
    got = [out.prompt_logprobs[i][prompt_ids[i]].logprob for i in range(1, len(prompt_ids))]
    want = [ref[i - 1, prompt_ids[i]].item() for i in range(1, len(prompt_ids))]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(len(out.prompt_logprobs[i]) == 1 for i in range(1, len(prompt_ids)))


def test_penalties_change_greedy_output_and_stay_leak_free(llm):
    plain = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    penal = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.5,
                                                  frequency_penalty=1.0), use_tqdm=False)[0].outputs[0]
    assert penal.token_ids != plain.token_ids
    # frequency penalty makes any repeated token rarer
    from collections import Counter

    assert max(Counter(penal.token_ids).values()) <= max(Counter(plain.token_ids).values())
    assert_no_leaks(llm)


def test_min_tokens_and_stop_token_ids(llm):
    eos = llm.get_tokenizer().eos_token_id
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=40, min_tokens=35), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 35
    assert eos not in out.outputs[0].token_ids[:34]
    first = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    stop_tok = first.token_ids[3]
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == first.token_ids[: first.token_ids.index(stop_tok) + 1]
    assert out.text == llm.get_tokenizer().decode(out.token_ids[:-1])  # the stop token's text is not output


MIXED = [
    "北京是中国的首都，有很多历史古迹。",
    "Emoji: 🎉🚀👩‍💻 and flags 🇫🇷🇯🇵!",
    "Accents: naïve café, crème brûlée, São Paulo, Ångström, Zürich.",
    "Mixed: Hello 世界 🌍 — señor, 你好吗？ Ça va? 😀",
    "  leading spaces,\ttabs,\nnewlines and  double  spaces ",
]


@pytest.mark.parametrize("text", MIXED)
@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_detokenization_equals_full_decode(smollm2_hf, text, skip_special):
    _, tok = smollm2_hf
    ids = tok(text).input_ids + [tok.eos_token_id] + tok(" and more 🎉").input_ids
    detok = IncrementalDetokenizer(tok, skip_special)
    deltas = [detok.step(t) for t in ids]
    full = tok.decode(ids, skip_special_tokens=skip_special)
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas)  # never a half character


OVERLAP_PROMPTS = [PROMPT, "Write a list of three fruits:", "Once upon a time", "def f(x):", "Hello there"]


def _overlap_params():
    return [SamplingParams(temperature=0.0, max_tokens=30, stop=["\n\n", "capital", " the"]),
            SamplingParams(temperature=0.0, max_tokens=25, stop=[","]),
            SamplingParams(temperature=0.8, seed=5, max_tokens=20, n=2, logprobs=2),
            SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=0.5),
            SamplingParams(temperature=0.0, max_tokens=3, min_tokens=2, prompt_logprobs=2)]


@pytest.fixture(scope="module")
def in_step_outputs(llm):
    """The plain engine's outputs for the overlap tests, computed once for all three modes."""
    assert llm.engine.policy.name == "plain"
    return llm.generate(OVERLAP_PROMPTS, _overlap_params(), use_tqdm=False)


@pytest.mark.parametrize("mode", [dict(overlap_host_work=True), dict(num_microbatches=2, max_num_batched_tokens=24),
                                  dict(async_scheduling=True, max_num_batched_tokens=24)])
def test_overlapped_output_processing_gives_identical_results(in_step_outputs, smollm2_dir, mode):
    """Outputs built while the next step runs (the CUDA default), and two micro-batches in flight,
    equal the in-step ones: a request ended by a stop string mid-flight drops its extra token,
    seeded sampling, n=2, logprobs and prompt logprobs stay identical, and nothing leaks."""
    overlapped = LLM(smollm2_dir, **mode)
    e = overlapped.engine
    assert e.policy.name != "plain"
    got = overlapped.generate(OVERLAP_PROMPTS, _overlap_params(), use_tqdm=False)
    want = in_step_outputs
    assert any(c.finish_reason == "stop" for o in want for c in o.outputs)
    for g, w in zip(got, want):
        assert [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in g.outputs] == \
            [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in w.outputs]
        for gc, wc in zip(g.outputs, w.outputs):
            if wc.logprobs is not None:
                assert [list(p) for p in gc.logprobs] == [list(p) for p in wc.logprobs]
        if w.prompt_logprobs is not None:
            assert [p and list(p) for p in g.prompt_logprobs] == [p and list(p) for p in w.prompt_logprobs]
    # Streaming: the concatenated deltas still equal the final text.
    engine = overlapped.engine
    rid = engine.add_request("Write a list of three fruits:", SamplingParams(temperature=0.0, max_tokens=30,
                                                                            stop=["\n\n", "capital"]))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            final = out
    assert final.request_id == rid and final.finished and "".join(deltas) == final.outputs[0].text
    assert_no_leaks(overlapped)


def test_microbatches_in_flight_hold_disjoint_requests(smollm2_dir):
    llm = LLM(smollm2_dir, num_microbatches=2, max_num_batched_tokens=16, num_kv_blocks=24)
    engine = llm.engine
    prompts = ["The capital of France is", "Once upon a time", "def f(x):", "Hello there, how are", "1, 2, 3,"]
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    launch = engine.runner.launch
    in_flight_at_launch = []

    def checked_launch(sched, **kw):  # what is already out when a micro-batch goes: disjoint from it
        held = {r.request_id for s, _, _ in engine._in_flight for r in s.requests}
        assert not held & {r.request_id for r in sched.requests}
        in_flight_at_launch.append(len(engine._in_flight))
        return launch(sched, **kw)

    engine.runner.launch = checked_launch
    finished = 0
    while engine.has_unfinished_requests():
        finished += sum(o.finished for o in engine.step())
        assert len(engine._in_flight) <= 1
    assert max(in_flight_at_launch) == 1 and finished == len(prompts)
    assert_no_leaks(llm)
