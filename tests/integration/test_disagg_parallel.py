"""Heterogeneous tensor parallelism between the pools (gloo, child-process ranks): prefill TP=1 into
decode TP=2, and prefill TP=2 into decode TP=1. Each decode rank receives its share of the KV heads
(kvtransfer/layout.py's plan); greedy outputs equal the plain engine's."""

from __future__ import annotations

import pytest

from raylight.config import EngineArgs
from raylight.engine.llm_engine import LLMEngine
from raylight.sampling_params import SamplingParams
from raylight.testing.disagg import disagg_generate, plain_generate
from raylight.testing.helpers import assert_no_leaks, make_random_hf_model, random_prompts

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama4kv"))
    make_random_hf_model("llama", d, num_key_value_heads=4, num_attention_heads=8, hidden_size=128, weight_std=0.1)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    plain = LLMEngine(_args(model_dir))
    prompts = random_prompts(3, 512, 10, 40, seed=21)
    outs = [plain_generate(plain, ids, GREEDY, f"r{i}").outputs[0].token_ids for i, ids in enumerate(prompts)]
    plain.shutdown()
    return prompts, outs


def _args(model_dir, **kw):
    return EngineArgs(**{**dict(model=model_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
                                max_num_batched_tokens=16, kv_lease_s=20.0), **kw})


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1)])
def test_heterogeneous_tp_equals_plain(model_dir, reference, prefill_tp, decode_tp):
    prompts, expected = reference
    # one TP > 1 engine per process (it owns the process's torch.distributed world)
    prefill = LLMEngine(_args(model_dir, kv_role="prefill", tensor_parallel_size=prefill_tp))
    decode = LLMEngine(_args(model_dir, kv_role="decode", tensor_parallel_size=decode_tp))
    try:
        for i, ids in enumerate(prompts):
            res, out = disagg_generate(prefill, decode, ids, GREEDY, f"d{i}")
            assert not res.local
            assert out.outputs[0].token_ids == expected[i], f"prompt {i}"
        m = decode.get_metrics()
        assert m["kv_remote_prefills"] == len(prompts) and not m["kv_handoff_failures"]
        assert_no_leaks(decode)
        assert_no_leaks(prefill)
    finally:
        prefill.shutdown()
        decode.shutdown()
