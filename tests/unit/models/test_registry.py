"""The model registry: one entry per architecture, the only table config parsing, model building
and the workers' head counts read."""

from __future__ import annotations

import pytest

from raylight.models import registry
from raylight.models.config import PRESETS, ModelArchConfig
from raylight.models.llama import LlamaForCausalLM

BASE = {k: v for k, v in PRESETS["smollm2-135m"].items() if k != "architectures"}


@pytest.mark.parametrize("arch", sorted(registry.REGISTRY))
def test_every_entry_resolves_by_name_and_model_type(arch):
    e = registry.entry(arch)
    assert registry.model_class(arch) is e.model_class
    assert ModelArchConfig.from_dict({**BASE, "architectures": [arch]}).architecture == arch
    for model_type in e.model_types:
        assert ModelArchConfig.from_dict({**BASE, "model_type": model_type}).architecture == arch


def test_unknown_architecture_and_model_type():
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelArchConfig.from_dict({**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelArchConfig.from_dict({**BASE, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="supported: "):
        registry.entry("GPT2LMHeadModel")


def test_config_hooks():
    def parse(arch, **extra):
        return ModelArchConfig.from_dict({**BASE, "architectures": [arch], "sliding_window": 4096, **extra})

    llama = parse("LlamaForCausalLM", attention_bias=True)
    assert (llama.attention_bias, llama.qk_norm, llama.sliding_window) == (True, False, 4096)
    qwen2 = parse("Qwen2ForCausalLM")
    assert (qwen2.attention_bias, qwen2.qk_norm, qwen2.sliding_window) == (True, False, None)
    assert parse("Qwen2ForCausalLM", use_sliding_window=True).sliding_window == 4096
    qwen3 = parse("Qwen3ForCausalLM", attention_bias=False)
    assert (qwen3.attention_bias, qwen3.qk_norm, qwen3.sliding_window) == (False, True, None)
    assert parse("MistralForCausalLM").sliding_window == 4096


def test_local_head_counts_through_the_model_class():
    cfg = ModelArchConfig.from_dict(PRESETS["smollm2-135m"])  # 9 heads over 3 KV heads
    assert registry.local_head_counts(cfg, 1) == (9, 3)
    assert [registry.local_head_counts(cfg, 2, r) for r in (0, 1)] == [(6, 2), (3, 1)]
    assert LlamaForCausalLM.local_head_counts(cfg, 2, 1) == (3, 1)


@pytest.mark.parametrize("tie", [False, True])
def test_kernel_config_reaches_every_layer(tie):
    import torch

    from raylight.kernels.attention.torch_ref import TorchAttentionBackend
    from raylight.kernels.config import KernelConfig
    from raylight.kernels.norm import RMSNorm

    cfg = ModelArchConfig.from_dict({**PRESETS["smollm2-135m"], "num_hidden_layers": 2, "hidden_size": 64,
                                     "intermediate_size": 128, "vocab_size": 100, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "tie_word_embeddings": tie,
                                     "architectures": ["Qwen3ForCausalLM"]})  # qk_norm: two more norms
    kernels = KernelConfig(fused_kernels=False, gemv=False)
    model = registry.model_class(cfg.architecture)(cfg, TorchAttentionBackend(16, None, torch.device("cpu")), 64,
                                                   None, kernels)
    with_config = [m for m in model.modules() if hasattr(m, "kernels")]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(with_config) == 1 + 2 * 4 + 1  # the model, 4 projections per layer, the LM head
    assert all(m.kernels is kernels for m in with_config)
    assert len(norms) == 2 * 4 + 1 and not any(m.fused_kernels for m in norms)
    assert not any(m.fused_kernels for m in model.modules() if hasattr(m, "fused_kernels"))
