"""The shape of a model, read from an HF `config.json` (transformers 4.x or 5.x style). Which
architectures exist, and what each reads differently, is `models/registry.py`'s."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: Optional[str] = None
    hidden_act: str = "silu"
    # Mixture of experts (0 experts: a dense model). `moe_layers`: the layers whose MLP is the
    # sparse block; the others keep a dense MLP of `intermediate_size`.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to one
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert; 0: none
    router_weights_in_model_dtype: bool = False  # Qwen-MoE rounds the top-k weights to the model dtype (Mixtral not)
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArchConfig":
        # The registry imports the model classes, which import this module: imported here, not above.
        from raylight.models import registry

        arch = registry.architecture_of(d)
        hook = registry.entry(arch).config_hook
        hidden_act = d.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; only silu is implemented")

        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope_params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(d.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        rope_scaling = None if rope_type in (None, "default") else {**rope_params, "rope_type": rope_type}

        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        fields = dict(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            qk_norm=False,
            sliding_window=d.get("sliding_window"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            hidden_act=hidden_act,
        )
        if hook is not None:
            fields.update(hook(d))  # the architecture's own reading of its config
        return cls(**fields)

    @classmethod
    def from_dir(cls, path: str) -> "ModelArchConfig":
        with open(os.path.join(path, "config.json")) as f:
            cfg = cls.from_dict(json.load(f))
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            cfg.eos_token_ids = list(dict.fromkeys(cfg.eos_token_ids + extra))
        return cfg


# Real model shapes for benchmarks with random ("dummy") weights.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
    ),
    # Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8, expert width 768), about 61 GB in bf16.
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    ),
    # A small MoE of the same family, for CPU runs of the MoE paths with dummy weights.
    "qwen3-moe-tiny": dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=4096, hidden_size=256, intermediate_size=512,
        moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    # A one-layer model whose forward costs next to nothing: the engine's host work per step stands out
    # (scripts/bench_host.py on CPU).
    "llama-tiny": dict(
        architectures=["LlamaForCausalLM"], vocab_size=1024, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True, torch_dtype="float32",
    ),
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
    ),
}
