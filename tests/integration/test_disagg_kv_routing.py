"""KV-aware routing of the decode pool in the disaggregated app, on one local Ray + Serve over real HTTP:
configs/cluster-disagg.yaml's application built through `build_app` (ingress, router, 1 prefill and 2
decode replicas) with `decode: {routing: {policy: kv_aware}}`, serving a small random Llama (token-id
prompts, float32) instead of SmolLM2 so that it fits 2 cores.

The workload: 3 prefixes of 24 blocks (384 tokens), each followed by a unique suffix, 4 rounds; a round
sends one request per prefix, all three at once (the same prefix is never in flight twice). In round 1
each prefix is new: it is prefilled on the prefill replica and pushed to the decode replica the router
picked. In rounds 2-4 the router must send each prefix back to that decode replica. Checked: every
answer is the colocated engine's greedy output; every request of rounds 2-4 has cached_tokens (its decode
replica's prefix-cache hits) covering its whole prefix, which the other decode replica never computed, so
the decode pool's hit tokens are all 9 x 384 = 3456 repeated prefix tokens; only the 3 first requests were
prefilled remotely; /metrics at the ingress counts the requests routed by overlap (at least 9) and both
decode replicas. With Serve's default router about half of rounds 2-4 miss (and are prefilled again on the
prefill replica, whose own hits keep /metrics' prefix_cache_hits, summed over both pools, as high: that
sum alone cannot tell the two routers apart). About 30 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import time

import httpx
import pytest
import yaml

pytest.importorskip("ray")

from raylight.testing.helpers import make_random_hf_model, read_metrics, serve_app

APP = "disagg-kv"
BLOCK = 16
PREFIXES, PREFIX_BLOCKS, ROUNDS = 3, 24, 4
PREFIX_TOKENS = PREFIX_BLOCKS * BLOCK
VOCAB = 512
MAX_TOKENS = 4
CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "cluster-disagg.yaml"
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 1024, "block_size": BLOCK, "num_kv_blocks": 160}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("disagg-kv-model"))
    make_random_hf_model("llama", path, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         weight_std=0.05)
    return path


def config(model_dir):
    from raylight.cluster.app import DisaggAppConfig

    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    args["engine_args"] = {k: v for k, v in args["engine_args"].items() if k != "kv_cache_memory"}
    args["engine_args"].update(ENGINE)
    args.update(model=model_dir, served_model_name="m", default_max_tokens=MAX_TOKENS)
    for role in ("prefill", "decode"):
        args[role]["ray_actor_options"] = {"num_cpus": 0.5}  # 3 engine replicas on a 2-CPU Ray
    args["decode"].update(num_replicas=2, routing={"policy": "kv_aware"})
    cfg = DisaggAppConfig(**args)
    assert cfg.remote_prefill_threshold < PREFIX_TOKENS  # a new prefix goes through the prefill replica
    return cfg


def workload(seed: int) -> list[list[list[int]]]:
    """ROUNDS rounds of PREFIXES prompts: prefix i + a unique suffix of 8 to 23 tokens (under the
    remote prefill threshold, so a cached prefix is finished on the decode replica)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(PREFIX_TOKENS)] for _ in range(PREFIXES)]
    return [[p + [rng.randrange(VOCAB) for _ in range(rng.randrange(8, 24))] for p in prefixes]
            for _ in range(ROUNDS)]


@pytest.fixture(scope="module")
def expected(model_dir):
    """The colocated engine's greedy tokens for every prompt of the workload, in this process."""
    from raylight import LLM, SamplingParams

    prompts = [p for rnd in workload(seed=1) for p in rnd]
    llm = LLM(model_dir, **ENGINE)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def server(model_dir, expected):
    with serve_app(config(model_dir), APP, timeout_s=180) as base:
        yield base


async def complete(client: httpx.AsyncClient, base: str, prompt: list[int]) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1}
    r = await client.post(f"{base}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def run_rounds(base: str, rounds: list[list[list[int]]]) -> list[list[dict]]:
    async with httpx.AsyncClient(timeout=120) as client:
        return [list(await asyncio.gather(*(complete(client, base, p) for p in rnd))) for rnd in rounds]


def test_decode_pool_routes_shared_prefixes_to_the_replica_that_holds_them(server, expected):
    rounds = workload(seed=1)
    before = read_metrics(server, labelled=True)
    results = asyncio.run(run_rounds(server, rounds))
    repeated = (ROUNDS - 1) * PREFIXES * PREFIX_TOKENS  # 3456 prompt tokens a decode replica could hold
    deadline = time.monotonic() + 10  # the replicas' last snapshots reach the ingress with their answers
    while True:
        after = read_metrics(server, labelled=True)
        hits = after.get("raylight:prefix_cache_hits_total", 0.0) - before.get("raylight:prefix_cache_hits_total", 0.0)
        if hits >= repeated or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    got = [[int(t) for t in r["choices"][0]["logprobs"]["tokens"]] for rnd in results for r in rnd]
    assert got == expected  # the token ids (the model has no tokenizer: logprobs name tokens by id)
    # A request's cached_tokens are its decode replica's prefix-cache hits: their sum is the decode pool's.
    cached = [[r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in rnd] for rnd in results]
    decode_hits = sum(map(sum, cached))

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    by_overlap = delta('raylight:kv_router_requests_routed_total{by="overlap"}')
    by_load = delta('raylight:kv_router_requests_routed_total{by="load"}')
    remote = delta("raylight:kv_remote_prefills_total")
    print(f"\ncached tokens per round (prefix {PREFIX_TOKENS} tokens): {cached}\ndecode pool prefix-cache hit "
          f"tokens {decode_hits} of {repeated} repeated prefix tokens (both pools, /metrics: {hits:.0f}); routed "
          f"by overlap {by_overlap:.0f}, by load {by_load:.0f}; remote prefills {remote:.0f}")
    # Rounds 2-4: every request found its whole prefix in its decode replica's cache. (Serve's default
    # router, same workload: about half miss, e.g. [[0, 0, 0], [0, 0, 384], [384, 384, 0], [384, 384, 384]],
    # and each miss is prefilled again on the prefill replica, whose hits then keep /metrics' sum as high.)
    assert all(c >= PREFIX_TOKENS for rnd in cached[1:] for c in rnd), cached
    assert decode_hits >= repeated, (decode_hits, repeated)
    assert hits >= repeated, (hits, repeated)
    assert by_overlap >= (ROUNDS - 1) * PREFIXES, (by_overlap, by_load)
    assert remote == PREFIXES  # only each prefix's first request needed the prefill replica
    requests = {k: v for k, v in after.items() if k.startswith("raylight:kv_router_replica_requests_total{")}
    assert len(requests) == 2 and sum(requests.values()) >= ROUNDS * PREFIXES, requests  # both decode replicas
