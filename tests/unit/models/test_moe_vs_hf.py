"""Our mixture-of-experts families (Qwen3-MoE, Qwen2-MoE with its shared expert, Mixtral) against HF
transformers on small random models: greedy tokens equal, float32 on CPU, in every engine mode."""

from __future__ import annotations

import pytest

from raylight import LLM, SamplingParams
from raylight.testing.helpers import assert_no_leaks, hf_greedy, make_random_hf_model, random_prompts

KINDS = ["qwen3-moe", "qwen2-moe", "mixtral"]


@pytest.fixture(scope="module", params=KINDS)
def random_moe(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = make_random_hf_model(request.param, path)
    prompts = random_prompts(5, 512, 3, 60, seed=2)
    return request.param, path, prompts, hf_greedy(hf, prompts, 16, stop_at_eos=False)


@pytest.mark.parametrize("engine_args", [
    dict(),
    dict(max_num_batched_tokens=7),
    dict(num_kv_blocks=14, block_size=8),
    dict(enable_expert_parallel=True, enable_eplb=True,
         eplb_config=dict(num_redundant_experts=3, step_interval=4, window_size=3)),
], ids=["plain", "chunk7", "preempt", "eplb-live"])
def test_greedy_matches_hf(random_moe, engine_args):
    kind, path, prompts, ref = random_moe
    llm = LLM(path, device="cpu", dtype="float32", **engine_args)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref, kind
    m = llm.get_metrics()
    if "num_kv_blocks" in engine_args:
        assert m["preemptions"] > 0
    if engine_args.get("enable_eplb"):  # experts were re-placed (and weights moved) while serving
        assert m["eplb_rebalances"] >= 1 and m["eplb_bytes_moved"] == 0  # one rank: copies only, nothing received
        assert 0.0 < m["expert_balancedness_vllm"] <= 1.0
    assert_no_leaks(llm)


def test_prefix_hit_matches_cold_run(random_moe):
    kind, path, prompts, _ = random_moe
    llm = LLM(path, device="cpu", dtype="float32", block_size=4)
    shared = prompts[0] + prompts[1]
    first = llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    again = llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(shared) - 1) // 4 * 4 > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids, kind


def test_config_reads_the_sparse_layers(random_moe):
    from raylight.models.config import ModelArchConfig

    kind, path, _, _ = random_moe
    cfg = ModelArchConfig.from_dir(path)
    assert cfg.num_experts in (6, 8) and cfg.num_experts_per_tok in (2, 3)
    assert cfg.moe_layers == ((0, 2) if kind == "qwen3-moe" else (0, 1, 2))
    assert bool(cfg.shared_expert_intermediate_size) == (kind == "qwen2-moe")


def test_fused_3d_expert_tensors_load_like_per_expert_ones(random_moe, tmp_path):
    """Some transformers 5 exports write each layer's experts as one gate_up_proj [E, 2I, H] and one
    down_proj [E, H, I]: the same model from those tensors gives the same tokens."""
    import glob
    import os
    import re
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    kind, path, prompts, ref = random_moe
    if kind == "mixtral":
        pytest.skip("Mixtral's checkpoints name experts w1/w2/w3 only")
    fused = str(tmp_path / "fused")
    shutil.copytree(path, fused)
    [file] = glob.glob(os.path.join(fused, "*.safetensors"))
    tensors, experts = {}, {}
    for name, t in load_file(file).items():
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight$", name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            tensors[name] = t
    for prefix, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([p["gate"], p["up"]]) for p in order])
        tensors[f"{prefix}.down_proj"] = torch.stack([p["down"] for p in order])
    save_file(tensors, file, metadata={"format": "pt"})
    llm = LLM(fused, device="cpu", dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
