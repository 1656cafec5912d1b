"""The benchmarks' seeded workloads (raylight/testing/workloads.py): same seed, same requests; lengths and ids
in range; Poisson arrivals at the asked rate."""

from __future__ import annotations

import math

import pytest

from raylight.testing.workloads import describe, poisson_arrivals, sharegpt_like


def test_same_seed_same_requests_other_seed_others():
    a = sharegpt_like(64, seed=3, vocab=1000)
    assert a == sharegpt_like(64, seed=3, vocab=1000)
    assert a != sharegpt_like(64, seed=4, vocab=1000)


def test_lengths_and_ids_in_range():
    prompts, outs = sharegpt_like(2000, seed=0, vocab=32000)
    assert len(prompts) == len(outs) == 2000
    lens = [len(p) for p in prompts]
    assert 4 <= min(lens) and max(lens) <= 3072 and 4 <= min(outs) and max(outs) <= 768
    assert all(100 <= t < 31999 for p in prompts for t in p)
    d = describe(prompts, outs)
    # ShareGPT-like: medians near 128 / 150 tokens, long tails reaching the clips
    assert 100 <= d["prompt_len_p50"] <= 160 and 120 <= d["output_len_p50"] <= 180
    assert max(lens) == 3072 and max(outs) == 768
    assert all(isinstance(t, int) for t in prompts[0]) and all(isinstance(o, int) for o in outs)


def test_custom_ranges_and_bad_arguments():
    prompts, outs = sharegpt_like(300, seed=1, vocab=500, prompt_range=(8, 16), output_range=(2, 3))
    assert {len(p) for p in prompts} <= set(range(8, 17)) and set(outs) <= {2, 3}
    assert sharegpt_like(0, seed=1, vocab=500) == ([], [])
    with pytest.raises(ValueError):
        sharegpt_like(4, seed=1, vocab=50)
    with pytest.raises(ValueError):
        sharegpt_like(4, seed=1, vocab=500, output_range=(5, 4))


def test_poisson_arrivals():
    at = poisson_arrivals(4000, rate=8.0, seed=2)
    assert at == poisson_arrivals(4000, rate=8.0, seed=2)
    assert at[0] == 0.0 and all(b >= a for a, b in zip(at, at[1:]))
    assert len(at) / at[-1] == pytest.approx(8.0, rel=0.1)
    assert poisson_arrivals(3, rate=math.inf, seed=0) == [0.0, 0.0, 0.0]
    assert poisson_arrivals(0, rate=1.0, seed=0) == []
