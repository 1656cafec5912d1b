"""Model sources: local HF dirs, GGUF files, hub ids, dummy presets."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from raylight import LLM, SamplingParams
from raylight.models.config import PRESETS, ModelArchConfig
from raylight.models.loader import resolve_model

from raylight.testing.helpers import make_random_hf_model, random_prompts


def test_hub_id_without_network_fails_clearly():
    from huggingface_hub.errors import LocalEntryNotFoundError

    with mock.patch("huggingface_hub.snapshot_download", side_effect=LocalEntryNotFoundError("offline")):
        with pytest.raises(RuntimeError, match=r"could not fetch model 'org/some-model' from the Hugging Face hub.*"
                                               r"pass a local"):
            resolve_model("org/some-model")


def test_unknown_path_is_a_clear_error():
    with pytest.raises(ValueError, match="not a local directory, a .gguf file or a hub id"):
        resolve_model("./no/such/dir")


def test_dir_without_weights(tmp_path):
    path = str(tmp_path)
    make_random_hf_model("llama", path)
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(path, f))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model(path)


def test_dummy_preset_shapes():
    r = resolve_model("llama-3.2-1b", "dummy")
    assert r.path is None and r.load_format == "dummy"
    a = r.arch
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads,
            a.intermediate_size, a.vocab_size, a.tie_word_embeddings) == (2048, 16, 32, 8, 8192, 128256, True)
    assert a.rope_scaling["rope_type"] == "llama3"


def test_dummy_weights_generate_token_ids():
    llm = LLM("smollm2-135m", load_format="dummy", max_model_len=256, num_kv_blocks=64)
    outs = llm.generate(random_prompts(3, 49152, 4, 30), SamplingParams(temperature=0.0, max_tokens=5,
                                                                          ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5, 5]
    assert all(0 <= t < 49152 for o in outs for t in o.outputs[0].token_ids)


def test_dummy_load_of_a_real_dir_keeps_shapes_not_weights(tmp_path):
    path = str(tmp_path)
    hf = make_random_hf_model("qwen3", path)
    llm = LLM(path, load_format="dummy")
    ours = dict(llm.engine.model.named_parameters())
    assert ours["model.embed_tokens.weight"].shape == hf.model.embed_tokens.weight.shape
    assert not torch.equal(ours["model.embed_tokens.weight"], hf.model.embed_tokens.weight)


def test_transformers5_rope_parameters_are_read():
    cfg = dict(PRESETS["smollm2-135m"])
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": 12345.0, "rope_type": "default"}
    a = ModelArchConfig.from_dict(cfg)
    assert a.rope_theta == 12345.0 and a.rope_scaling is None


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelArchConfig.from_dict({**PRESETS["smollm2-135m"], "architectures": ["GPT2LMHeadModel"]})


def test_gguf_file_loads_like_the_default_model(smollm2_dir, tmp_path, monkeypatch):
    """A .gguf path is converted once into the cache and gives the same greedy tokens."""
    from raylight.models.fetch import default_gguf_path

    gguf = default_gguf_path()  # in the real cache (smollm2_dir fetched it)
    monkeypatch.setenv("RAYLIGHT_CACHE_DIR", str(tmp_path))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    from_gguf = LLM(gguf).generate(["The capital of France is"], params, use_tqdm=False)[0]
    assert os.listdir(os.path.join(str(tmp_path), "gguf"))  # converted into the (new) cache
    monkeypatch.delenv("RAYLIGHT_CACHE_DIR")
    from_dir = LLM(smollm2_dir).generate(["The capital of France is"], params, use_tqdm=False)[0]
    assert from_gguf.outputs[0].token_ids == from_dir.outputs[0].token_ids
    assert from_gguf.outputs[0].text
