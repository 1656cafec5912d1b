"""Start-up warm-up: a few synthetic requests through the engine's real step path before it says
it is ready, so that no user request waits for a compiler or for the allocator.

Why: a kernel variant is compiled (Triton, FlashInfer's JIT) or loaded from the disk cache, and a CUDA
module is loaded (lazy loading), the first time a step needs it; the caching allocator grows the first
time a step's activations are that large (KV profiling empties it). On a fresh H200 the first
8,192-token prefill step took 12 s with FlashInfer compiling inside it, and 65-90 ms even on a warm
cache against about 26 ms of GPU work (benchmarks/results/throughput-gpu-fixed-*-20261204-1259*).

What runs: one prompt of the whole token budget alone (a full prefill step, then a one-row logits
step), then a shorter one beside its decode (a mixed step), then both decode (a captured CUDA-graph
batch); one greedy row and one sampled row (temperature, top-p, top-k, a seed). On an H200 a run
without the one-row step built a GEMV variant inside the first single-prompt request. Afterwards nothing is left of them: their blocks are free,
the prefix cache is reset, KV events (a KV-aware router's view) are dropped, and the counters are zero.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from raylight.sampling_params import SamplingParams

logger = logging.getLogger("raylight.engine")

WARMUP_PREFIX = "__raylight-warmup-"
MAX_WARMUP_STEPS = 64  # 2 requests x 4 tokens need about 8; a bound, not a budget


def warmup_prompt_lengths(budget: int, max_model_len: int, kv_tokens: int, new_tokens: int) -> tuple[int, int]:
    """(long, short) prompt lengths: the long one fills one step's token budget, the short one runs
    beside its decode; both fit the context window with room for `new_tokens`, and both fit the KV
    cache together."""
    cap = max(1, min(budget, max_model_len - new_tokens - 1, kv_tokens // 2 - new_tokens - 1))
    return cap, max(1, min(cap // 2 + 1, cap))


def warm_up(engine) -> float:
    """Runs the warm-up requests to completion on `engine` (an LLMEngine) and wipes their traces.
    Returns the seconds it took."""
    t0 = time.perf_counter()
    new_tokens = 4
    long_len, short_len = warmup_prompt_lengths(engine.args.max_num_batched_tokens, engine.max_model_len,
                                                engine.num_blocks * engine.block_size, new_tokens)
    rng = np.random.default_rng(0)
    vocab = engine.arch.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=0, max_tokens=new_tokens, ignore_eos=True)
    salt = WARMUP_PREFIX + "salt"  # its own prefix-cache namespace: never a hit for anyone else

    def add(i: int, n: int, params: SamplingParams) -> None:
        engine.add_request(rng.integers(0, vocab, n).tolist(), params, request_id=f"{WARMUP_PREFIX}{i}",
                           cache_salt=salt)

    # The long prompt alone first: its last chunk is a one-row logits step (the single-row GEMV
    # path of the LM head, which no batched step takes); the short one joins once it decodes.
    add(0, long_len, greedy)
    steps = 0
    while engine.has_unfinished_requests() and engine.generation_tokens_total == 0 and steps < MAX_WARMUP_STEPS:
        engine.step()
        steps += 1
    add(1, short_len, sampled)
    while engine.has_unfinished_requests():
        steps += 1
        if steps > MAX_WARMUP_STEPS:  # never hang a start-up on the warm-up: abort and go on
            logger.warning("warm-up did not finish in %d steps; aborting it", MAX_WARMUP_STEPS)
            engine.abort_request([f"{WARMUP_PREFIX}{i}" for i in range(2)])
            while engine.has_unfinished_requests():
                engine.step()
            break
        engine.step()
    engine.forget_history()
    seconds = time.perf_counter() - t0
    logger.info("warm-up: prompts of %d and %d tokens, %d steps, %.2fs", long_len, short_len, steps, seconds)
    return seconds

