"""A tensor-parallel replica under Ray Serve on CPU: `build_app` with tensor_parallel_size=2 gets a
placement group of one {CPU: 2} bundle, rank 0 (the replica, or its engine process) starts rank 1 as a
Ray actor in that bundle, and a chat request over HTTP answers what the single-process engine generates."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from raylight import LLM, SamplingParams

from raylight.testing.helpers import SMOLLM2_CHAT, serve_app

MODEL = "SmolLM2-135M-Instruct"
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 512, "max_num_seqs": 8, "kv_cache_memory": 2**26}


# Rank 0 on a thread of the replica (the CPU default), or in the replica's engine process (the GPU
# default), which joins the Ray cluster to start rank 1 as an actor in the replica's placement group.
@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def tp2_server(smollm2_dir, request):
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(engine_args={**ENGINE, "tensor_parallel_size": 2}, ray_actor_options={"num_cpus": 1},
                    default_max_tokens=16, engine_process=request.param)
    with serve_app(cfg, "raylight-tp2", timeout_s=240) as base:
        yield base


def test_tp2_replica_over_http_matches_single_process(tp2_server, smollm2_dir):
    client = openai.OpenAI(base_url=f"{tp2_server}/v1", api_key="unused", max_retries=0, timeout=120)
    chat = client.chat.completions.create(model=MODEL, messages=SMOLLM2_CHAT, max_tokens=16, temperature=0)
    # Rank 1 is a Ray actor beside the replica (rank 0) in bundle 0 of its placement group: the two
    # ranks use up the bundle's 2 CPUs.
    bundle_cpus = [k for k in ray.cluster_resources() if k.startswith("CPU_group_0_")]
    assert len(bundle_cpus) == 1
    assert ray.available_resources().get(bundle_cpus[0], 0.0) == 0.0

    with LLM(smollm2_dir, **ENGINE) as llm:
        want = llm.chat(SMOLLM2_CHAT, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0].outputs[0]
    assert chat.choices[0].message.content == want.text
    assert chat.usage.completion_tokens == len(want.token_ids)
