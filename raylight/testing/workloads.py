"""Seeded benchmark workloads shared by the offline and serving benchmarks (scripts/bench_serving.py,
scripts/bench_throughput.py) and their tests: a ShareGPT-like mix of prompt and output lengths with random
prompt token ids, and Poisson arrival times. Only numpy; the same seed gives the same requests on every
machine, so an offline run, our server and a peer's server see identical work."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

# ShareGPT conversations as served-model benchmarks use them (first turn; Llama-3 tokenizer): prompts have a
# median near 100-150 tokens with a long tail into the thousands, answers a median near 150 with a tail to
# several hundred. Lognormal shapes with those medians, clipped to a window a 4K context holds.
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_RANGE = 128, 1.2, (4, 3072)
OUTPUT_MEDIAN, OUTPUT_SIGMA, OUTPUT_RANGE = 150, 0.9, (4, 768)
LOW_ID = 100  # random ids stay away from the special tokens at the start of most vocabularies


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    """`n` integer lengths, lognormal with this median and log-space sigma, clipped to [lo, hi]."""
    x = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return np.clip(np.rint(x), lo, hi).astype(np.int64)


def sharegpt_like(n: int, seed: int, vocab: int, *, prompt_range: tuple[int, int] = PROMPT_RANGE,
                  output_range: tuple[int, int] = OUTPUT_RANGE, prompt_median: float = PROMPT_MEDIAN,
                  prompt_sigma: float = PROMPT_SIGMA, output_median: float = OUTPUT_MEDIAN,
                  output_sigma: float = OUTPUT_SIGMA) -> tuple[list[list[int]], list[int]]:
    """`n` requests: (prompts as token-id lists, output lengths). Prompt lengths lognormal (median 128)
    clipped to `prompt_range`, output lengths lognormal (median 150) clipped to `output_range`, token ids
    uniform in [100, vocab - 1). Deterministic in (n, seed, vocab, the ranges): the first k requests of
    a larger n are not the same as n=k's (draw the pool once and slice it)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if vocab <= LOW_ID + 1:
        raise ValueError(f"vocab must be > {LOW_ID + 1}, got {vocab}")
    for name, (lo, hi) in (("prompt_range", prompt_range), ("output_range", output_range)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be 1 <= lo <= hi, got {(lo, hi)}")
    rng = np.random.default_rng(seed)
    in_lens = lognormal_lengths(rng, n, prompt_median, prompt_sigma, *prompt_range)
    out_lens = lognormal_lengths(rng, n, output_median, output_sigma, *output_range)
    ids = rng.integers(LOW_ID, vocab - 1, int(in_lens.sum()))
    bounds = np.concatenate([[0], np.cumsum(in_lens)])
    prompts = [ids[bounds[i]:bounds[i + 1]].tolist() for i in range(n)]
    return prompts, out_lens.tolist()


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of `n` requests arriving as a Poisson process of `rate`
    requests per second; `rate` inf (or <= 0 taken as inf) sends them all at time 0. The first request
    goes at 0."""
    if n <= 0:
        return []
    if not rate or rate <= 0 or math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def describe(prompts: list[list[int]], out_lens: list[int], rate: Optional[float] = None) -> dict:
    """Summary of a workload for a benchmark record."""
    p = np.array([len(x) for x in prompts] or [0])
    o = np.array(out_lens or [0])
    d = dict(requests=len(prompts), prompt_tokens=int(p.sum()), output_tokens=int(o.sum()),
             prompt_len_mean=float(p.mean()), prompt_len_p50=float(np.median(p)), prompt_len_max=int(p.max()),
             output_len_mean=float(o.mean()), output_len_p50=float(np.median(o)), output_len_max=int(o.max()))
    if rate is not None:
        d["rate"] = rate
    return d
