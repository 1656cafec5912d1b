"""The batched sampler: exact distributions, seeds, penalties, bias, bans, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylight.sampling_params import SamplingParams
from raylight.engine.request import Request
from raylight.workers.sampler import Sampler
from raylight.messages import SampleRow
from raylight.workers.sampling_state import SamplingState

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
V = len(LOGITS)
DRAWS = 20_000


def expected(params: SamplingParams) -> np.ndarray:
    """The exact distribution, computed independently: temperature, min_p, top_k, top_p."""
    p = np.exp(LOGITS.double().numpy() / params.temperature)
    p /= p.sum()
    if params.min_p > 0:
        p = np.where(p < params.min_p * p.max(), 0.0, p)
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(V, dtype=bool)
    k = params.top_k if params.top_k > 0 else V
    kept = p[order][:k] / p[order][:k].sum()
    mass = 0.0
    for rank, tok in enumerate(order[:k]):
        if mass >= params.top_p:
            break
        keep[tok] = kept[rank] > 0
        mass += kept[rank]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def rows_for(params_list: list[SamplingParams]) -> list[SampleRow]:
    rows = []
    for i, p in enumerate(params_list):
        req = Request(f"r{i}", [0], p, 16)
        rows.append(SampleRow(req.request_id, req.request_id, p, 0, req.prompt_token_ids, req.output_token_ids,
                              req.eos_token_ids))
    return rows


def draw(params: SamplingParams, n: int = DRAWS, seed: int = 0) -> np.ndarray:
    state = SamplingState(V, torch.device("cpu"))
    rows = rows_for([params] * n)
    tokens = Sampler(torch.device("cpu"), seed)(LOGITS.repeat(n, 1), state.metadata(rows)).token_ids
    return np.bincount(tokens.numpy(), minlength=V)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.7),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.9),
    SamplingParams(temperature=0.8, min_p=0.1, top_k=4),
    SamplingParams(temperature=2.0, min_p=0.05, top_k=6, top_p=0.7),
], ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_empirical_frequencies_match_the_exact_distribution(params):
    counts = draw(params)
    probs = expected(params)
    assert counts[probs == 0].sum() == 0, (counts, probs)  # excluded tokens never appear
    support = probs > 0
    exp_counts = probs[support] * DRAWS
    chi2 = float((((counts[support] - exp_counts) ** 2) / exp_counts).sum())
    # Critical chi-square values at p = 0.001 for 1..7 degrees of freedom.
    critical = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32][max(support.sum() - 2, 0)]
    assert chi2 < critical, (chi2, counts, exp_counts)


def test_greedy_rows_take_the_argmax_beside_random_rows():
    state = SamplingState(V, torch.device("cpu"))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)]
    logits = torch.stack([LOGITS, LOGITS, LOGITS.flip(0)])
    out = Sampler(torch.device("cpu"))(logits, state.metadata(rows_for(params))).token_ids.tolist()
    assert out[0] == 0 and out[2] == V - 1


def test_seeded_rows_do_not_depend_on_the_batch():
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = []
    state = SamplingState(V, torch.device("cpu"))
    rows = rows_for([p])
    for _ in range(10):
        alone.append(Sampler(torch.device("cpu"), 0)(LOGITS[None], state.metadata(rows)).token_ids.item())
    # The same request in a batch with unseeded and other-seeded neighbours, another global seed.
    state = SamplingState(V, torch.device("cpu"))
    rows = rows_for([SamplingParams(temperature=1.0), p, SamplingParams(temperature=0.7, seed=9)])
    rows[1].seq_id = "r0-again"
    batched = []
    for _ in range(10):
        out = Sampler(torch.device("cpu"), 77)(LOGITS.repeat(3, 1), state.metadata(rows)).token_ids
        batched.append(out[1].item())
    assert alone == batched
    assert len(set(alone)) > 1  # really sampling


def test_logit_bias_and_min_tokens_ban():
    state = SamplingState(V, torch.device("cpu"))
    p_bias = SamplingParams(temperature=0.0, logit_bias={5: 100.0})
    p_ban = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0])
    rows = rows_for([p_bias, p_ban])
    out = Sampler(torch.device("cpu"))(LOGITS.repeat(2, 1), state.metadata(rows)).token_ids.tolist()
    assert out == [5, 1]  # token 0 (the argmax) is banned until min_tokens are out
    rows[1].num_output_tokens = 2
    out = Sampler(torch.device("cpu"))(LOGITS.repeat(2, 1), state.metadata(rows)).token_ids.tolist()
    assert out[1] == 0


def test_allowed_token_ids_mask_before_the_bias():
    """allowed_token_ids (vLLM): only the listed tokens can be sampled, greedy or random; a bias reorders
    them but cannot bring back a token outside the list."""
    state = SamplingState(V, torch.device("cpu"))
    only = SamplingParams(temperature=0.0, allowed_token_ids=[3, 6])
    biased_in = SamplingParams(temperature=0.0, allowed_token_ids=[3, 6], logit_bias={6: 10.0})
    biased_out = SamplingParams(temperature=0.0, allowed_token_ids=[3, 6], logit_bias={0: 100.0})
    free = SamplingParams(temperature=0.0)
    rows = rows_for([only, biased_in, biased_out, free])
    out = Sampler(torch.device("cpu"))(LOGITS.repeat(4, 1), state.metadata(rows)).token_ids.tolist()
    assert out == [3, 6, 3, 0]
    assert set(draw(SamplingParams(temperature=1.5, allowed_token_ids=[1, 7]), n=2000).nonzero()[0]) == {1, 7}


def test_penalties_follow_their_definitions():
    dev = torch.device("cpu")
    logits = torch.tensor([[1.0, 0.9, -0.5, 0.0]])
    req = Request("r", [2], SamplingParams(), 16)  # token 2 in the prompt
    req.append_output_token(0)
    req.append_output_token(0)  # token 0 generated twice
    from raylight.workers.sampler import apply_logit_processors

    def processed(params):
        state = SamplingState(4, dev)
        meta = state.metadata([SampleRow("r", "r", params, 2, req.prompt_token_ids, req.output_token_ids)])
        return apply_logit_processors(logits, meta)[0].tolist()

    assert processed(SamplingParams(repetition_penalty=2.0)) == pytest.approx([0.5, 0.9, -1.0, 0.0])
    assert processed(SamplingParams(frequency_penalty=0.3)) == pytest.approx([0.4, 0.9, -0.5, 0.0])
    assert processed(SamplingParams(presence_penalty=0.3)) == pytest.approx([0.7, 0.9, -0.5, 0.0])


def test_logprobs_are_raw_and_ranked():
    state = SamplingState(V, torch.device("cpu"))
    params = SamplingParams(temperature=0.0, logprobs=3, logit_bias={4: 50.0})
    out = Sampler(torch.device("cpu"))(LOGITS[None], state.metadata(rows_for([params])))
    raw = LOGITS.log_softmax(-1)
    assert out.token_ids.item() == 4  # chosen after the bias ...
    assert out.logprobs.item() == pytest.approx(raw[4].item())  # ... but reported from the raw distribution
    assert out.ranks.item() == 5
    assert out.top_ids[0].tolist() == [0, 1, 2]
    assert out.top_logprobs[0].tolist() == pytest.approx(raw[:3].tolist())


def test_argmax_in_chunks_is_argmax_with_first_index_on_ties():
    from raylight.workers.sampler import _chunks, argmax_in_chunks

    g = torch.Generator().manual_seed(0)
    for vocab in (128256, 49152, 32000):
        c = _chunks(vocab)
        assert c and vocab % c == 0
        x = torch.randn(6, vocab, generator=g)
        x[1] = 0.0  # all tied: index 0
        x[2, 7] = x[2, vocab - 1] = 100.0  # tie across chunks: the first
        x[3, vocab // 2] = float("inf")
        x[4] = torch.randint(0, 3, (vocab,), generator=g).float()  # many ties
        x[5, c * 3 + 1] = x[5, c * 3 + 2] = 50.0  # tie inside one chunk
        assert torch.equal(argmax_in_chunks(x, c), x.argmax(dim=-1))
    assert _chunks(50257) == 0  # no divisor in range: plain argmax


def test_rows_sampled_in_chunks_draw_what_they_draw_in_one_piece(monkeypatch):
    # Seeded rows draw from their own generators: the chunking (bounded temporaries) cannot change them,
    # whatever else is in each chunk (greedy rows, other settings).
    from raylight.workers import sampler

    params = [SamplingParams(temperature=1.0, seed=s, top_k=k, top_p=p, min_p=m)
              for s, k, p, m in [(1, 0, 1.0, 0.0), (2, 3, 0.9, 0.0), (3, 0, 0.8, 0.1), (4, 5, 1.0, 0.05)]]
    params.insert(2, SamplingParams(temperature=0.0))
    logits = LOGITS.repeat(len(params), 1) + torch.arange(len(params))[:, None] * 0.1

    def tokens() -> list[int]:
        state = SamplingState(V, torch.device("cpu"))
        return [Sampler(torch.device("cpu"), 0)(logits, state.metadata(rows_for(params))).token_ids.tolist()
                for _ in range(20)]

    whole = tokens()
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_ROWS", 2)
    assert tokens() == whole
    assert len({tuple(t) for t in whole}) > 1  # really sampling


def test_the_worst_case_metadata_takes_every_path_and_samples_valid_tokens():
    from raylight.workers.sampler import worst_case_metadata

    rows, vocab = 5, 300
    meta = worst_case_metadata(rows, vocab, torch.device("cpu"))
    assert not meta.all_greedy and meta.max_num_logprobs == 20
    assert all(t is not None for t in (meta.top_k, meta.top_p, meta.min_p, meta.repetition_penalty,
                                       meta.output_counts, meta.prompt_mask, meta.bias, meta.banned,
                                       meta.token_mask))
    out = Sampler(torch.device("cpu"))(torch.randn(rows, vocab), meta)
    assert out.token_ids.shape == (rows,) and bool(((out.token_ids >= 0) & (out.token_ids < vocab)).all())
    assert out.top_ids.shape == (rows, 20)


def test_penalties_in_place_equal_the_out_of_place_arithmetic_bit_for_bit():
    # The processors apply the penalties in place (one [rows, vocab] temporary at a time); the numbers
    # must be exactly those of the plain HF/vLLM expressions, zeros and signs included.
    from raylight.workers.sampler import apply_logit_processors, worst_case_metadata

    g = torch.Generator().manual_seed(3)
    import dataclasses

    rows, vocab = 7, 513
    meta = dataclasses.replace(worst_case_metadata(rows, vocab, torch.device("cpu")), bias=None, banned=None,
                               token_mask=None)
    meta.output_counts.copy_(torch.randint(0, 3, (rows, vocab), generator=g).float())
    meta.prompt_mask.copy_(torch.rand(rows, vocab, generator=g) < 0.2)
    meta.repetition_penalty.copy_(torch.rand(rows, generator=g) + 0.7)
    meta.frequency_penalty.copy_(torch.rand(rows, generator=g) - 0.5)
    meta.presence_penalty.copy_(torch.rand(rows, generator=g))
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[:, :5] = 0.0
    before = logits.clone()
    got = apply_logit_processors(logits, meta)
    assert torch.equal(logits, before)  # the caller's logits are left alone

    counts, rep = meta.output_counts, meta.repetition_penalty[:, None]
    seen = meta.prompt_mask | (counts > 0)
    want = torch.where(seen, torch.where(before > 0, before / rep, before * rep), before)
    want = want - meta.frequency_penalty[:, None] * counts
    want = want - meta.presence_penalty[:, None] * (counts > 0).float()
    assert torch.equal(got, want)


def test_chunked_sampling_equals_one_piece_with_every_processor_and_logprobs(monkeypatch):
    # Penalties, bias, bans, allowed tokens and logprobs, chunk by chunk (rows split across chunks of
    # 3): tokens (seeded rows and greedy ones), logprobs, ranks and top logprobs are those of one piece.
    from raylight.workers import sampler

    rng = np.random.default_rng(5)
    params = []
    for i in range(8):
        params.append(SamplingParams(
            temperature=0.0 if i % 3 == 0 else 0.8, seed=100 + i, top_k=[0, 5][i % 2], top_p=[1.0, 0.9][i % 2],
            repetition_penalty=1.3, frequency_penalty=0.2 * (i % 2), presence_penalty=0.1,
            logit_bias={int(rng.integers(V)): 2.0} if i % 4 == 1 else None,
            allowed_token_ids=sorted(rng.choice(V, 6, replace=False).tolist()) if i == 5 else None,
            min_tokens=3 if i == 6 else 0, logprobs=3))
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(1)) * 2

    def run():
        state = SamplingState(V, torch.device("cpu"))
        out = Sampler(torch.device("cpu"), 0)(logits, state.metadata(rows_for(params)))
        return [out.token_ids, out.logprobs, out.ranks, out.top_ids, out.top_logprobs]

    before = logits.clone()
    whole = run()
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_ROWS", 3)
    chunked = run()
    for w, c in zip(whole, chunked):
        assert w is not None and torch.equal(w, c)
    assert torch.equal(logits, before)  # the raw logits are left alone


@pytest.mark.parametrize("chunk", [256, 1])
def test_a_grammar_row_whose_bans_leave_nothing_falls_back_to_the_grammar(monkeypatch, chunk):
    # Row 0's grammar allows only token 6, which min_tokens bans (the grammar's end): the grammar wins and
    # the row takes 6. Row 1's grammar allows 2 and 6, 6 is banned: it takes 2. Row 2 is unconstrained
    # and keeps its argmax (0), banned or not. The same chunk by chunk.
    from raylight.workers import sampler
    from raylight.workers.sampler import SamplingMetadata

    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_ROWS", chunk)
    bits = torch.tensor([[1 << 6], [(1 << 2) | (1 << 6)]], dtype=torch.int32)
    meta = SamplingMetadata(temperature=None, greedy=None, all_greedy=True, generators=[None] * 3,
                            banned=(torch.tensor([0, 1]), torch.tensor([6, 6])),
                            token_mask=(torch.tensor([0, 1]), bits))
    logits = LOGITS.repeat(3, 1)
    assert Sampler(torch.device("cpu"))(logits, meta).token_ids.tolist() == [6, 2, 0]


def test_greedy_rows_take_the_argmax_of_half_precision_logits_as_of_their_float32_copy():
    # The logits arrive in the model's dtype; a greedy-only step takes their argmax as they are. The
    # float32 conversion is exact, so ties (frequent in bf16) resolve to the same first index.
    from raylight.workers.sampler import SamplingMetadata, argmax_in_chunks

    g = torch.Generator().manual_seed(0)
    meta = SamplingMetadata(temperature=None, greedy=None, all_greedy=True, generators=[None] * 40)
    for dtype in (torch.bfloat16, torch.float16):
        logits = (torch.randn(40, 1024, generator=g) * 4).round().to(dtype)  # many ties per row
        want = logits.float().argmax(dim=-1)
        assert torch.equal(Sampler(torch.device("cpu"))(logits, meta).token_ids, want)
        assert torch.equal(argmax_in_chunks(logits, 32), want)  # the CUDA few-row path's arithmetic
    # anything else converts first: the same tokens and float32 logprobs
    logits = torch.randn(3, 1024, generator=g).to(torch.bfloat16)
    lp = SamplingMetadata(temperature=None, greedy=None, all_greedy=True, generators=[None] * 3, max_num_logprobs=2)
    got, ref = Sampler(torch.device("cpu"))(logits, lp), Sampler(torch.device("cpu"))(logits.float(), lp)
    assert got.logprobs.dtype == torch.float32 and torch.equal(got.token_ids, ref.token_ids)
    assert torch.equal(got.logprobs, ref.logprobs) and torch.equal(got.top_ids, ref.top_ids)
