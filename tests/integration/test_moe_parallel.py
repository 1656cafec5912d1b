"""Expert parallelism end to end on CPU (gloo): `LLM(moe_model, tensor_parallel_size=N,
enable_expert_parallel=True)` gives the single-process engine's greedy tokens, through both token
movers (the fixed-shape low-latency dispatch for small steps, the normal one for large), with EPLB
re-placing experts and moving weights between ranks while it serves, and with experts split by
features instead (plain tensor parallelism)."""

from __future__ import annotations

import pytest

from raylight import LLM, SamplingParams
from raylight.testing.helpers import make_random_hf_model, random_prompts

PROMPTS = random_prompts(6, 512, 20, 60, seed=4)
ENGINE = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory=2**22)
EPLB = dict(enable_eplb=True, eplb_config=dict(num_redundant_experts=4, step_interval=3, window_size=2))


@pytest.fixture(scope="module", params=["qwen3-moe", "qwen2-moe"])
def moe_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    make_random_hf_model(request.param, path)
    with LLM(path, **ENGINE, max_num_batched_tokens=16) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10),
                                                             use_tqdm=False)]
    return path, ref


@pytest.mark.parametrize("case", [
    dict(tensor_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=16),  # low-latency path
    dict(tensor_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=512),  # normal path too
    dict(tensor_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=512, **EPLB),
    dict(tensor_parallel_size=4, enable_expert_parallel=True, max_num_batched_tokens=64, **EPLB),
    dict(tensor_parallel_size=2, pipeline_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=64,
         **EPLB),  # one EP group per stage, each balancing its own layers
    dict(tensor_parallel_size=2, max_num_batched_tokens=64),  # experts split by features, not placed
], ids=["ep2-ll", "ep2-normal", "ep2-eplb", "ep4-eplb", "ep2xpp2-eplb", "tp2-no-ep"])
def test_expert_parallel_matches_single_process(moe_model, case):
    path, ref = moe_model
    with LLM(path, **ENGINE, **case) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
        m = llm.get_metrics()
    assert [o.outputs[0].token_ids for o in outs] == ref
    if case.get("enable_eplb"):
        assert m["eplb_rebalances"] >= 1
        assert m["eplb_bytes_moved"] > 0  # rank 0 received expert weights from a peer
