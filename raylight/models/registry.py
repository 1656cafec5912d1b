"""The one table of the architectures we serve: HF architecture name -> `ModelEntry`.

Adding an architecture is one model file plus one entry here: its model class, the HF
`model_type`s that name it (for configs without an `architectures` list), and an optional hook
that reads its own config fields. Everything else (config parsing in `models/config.py`, model
building in `models/loader.py`, the workers' per-rank head counts) looks the architecture up here.

A model class provides `cls(cfg, attn_backend, max_positions, groups, kernels)`, `load_weights`,
`expected_weights`, and the classmethod `local_head_counts(cfg, tp_size, tp_rank)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from raylight.models.llama import LlamaForCausalLM
from raylight.models.moe import MoEForCausalLM

if TYPE_CHECKING:
    from raylight.models.config import ModelArchConfig

# A hook gets the HF config dict and returns ModelArchConfig fields that override the generic parse.
ConfigHook = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ModelEntry:
    model_class: type
    model_types: tuple[str, ...] = ()  # HF `model_type`s naming this architecture
    config_hook: Optional[ConfigHook] = None


def _qwen_window(d: dict[str, Any]) -> dict[str, Any]:
    # Qwen2/3 configs carry a sliding_window that applies only with use_sliding_window.
    return {} if d.get("use_sliding_window", False) else {"sliding_window": None}


def _sparse_layers(d: dict[str, Any], num_experts: int) -> tuple[int, ...]:
    """Qwen-MoE's rule for which layers are sparse: every decoder_sparse_step-th, minus mlp_only_layers."""
    step, dense = int(d.get("decoder_sparse_step") or 1), set(d.get("mlp_only_layers") or ())
    return tuple(i for i in range(d["num_hidden_layers"]) if num_experts and (i + 1) % step == 0 and i not in dense)


def _qwen_moe(d: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes num_local_experts where Hub configs say num_experts. Missing keys take
    # transformers' Qwen3MoeConfig defaults (real configs carry them all).
    experts = int(d.get("num_experts") or d.get("num_local_experts") or 128)
    return dict(num_experts=experts, num_experts_per_tok=int(d.get("num_experts_per_tok", 8)),
                moe_intermediate_size=int(d.get("moe_intermediate_size", 768)),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                router_weights_in_model_dtype=True,
                moe_layers=_sparse_layers(d, experts), **_qwen_window(d))


def _mixtral(d: dict[str, Any]) -> dict[str, Any]:
    # Every layer is sparse; the experts' width is intermediate_size; top-k weights always renormalised.
    experts = int(d.get("num_local_experts", 8))  # transformers' MixtralConfig defaults where missing
    return dict(num_experts=experts, num_experts_per_tok=int(d.get("num_experts_per_tok", 2)),
                moe_intermediate_size=int(d["intermediate_size"]), norm_topk_prob=True,
                moe_layers=tuple(range(d["num_hidden_layers"])))


REGISTRY: dict[str, ModelEntry] = {
    "LlamaForCausalLM": ModelEntry(LlamaForCausalLM, ("llama",)),
    "MistralForCausalLM": ModelEntry(LlamaForCausalLM, ("mistral",)),
    "Qwen2ForCausalLM": ModelEntry(LlamaForCausalLM, ("qwen2",),
                                   lambda d: {"attention_bias": True, **_qwen_window(d)}),
    "Qwen3ForCausalLM": ModelEntry(LlamaForCausalLM, ("qwen3",), lambda d: {"qk_norm": True, **_qwen_window(d)}),
    "Qwen3MoeForCausalLM": ModelEntry(MoEForCausalLM, ("qwen3_moe",), lambda d: {"qk_norm": True, **_qwen_moe(d)}),
    "Qwen2MoeForCausalLM": ModelEntry(MoEForCausalLM, ("qwen2_moe",),
                                      lambda d: {"attention_bias": bool(d.get("qkv_bias", True)), **_qwen_moe(d)}),
    "MixtralForCausalLM": ModelEntry(MoEForCausalLM, ("mixtral",), _mixtral),
}


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def architecture_of(d: dict[str, Any]) -> str:
    """The architecture an HF config dict names (its `architectures[0]`, else by `model_type`), or a
    clear ValueError when we do not implement it."""
    archs = d.get("architectures") or []
    arch = archs[0] if archs else next(
        (name for name, e in REGISTRY.items() if d.get("model_type", "") in e.model_types), "")
    if arch not in REGISTRY:
        raise ValueError(f"unsupported architecture {arch or d.get('model_type')!r}; "
                         f"supported: {supported_architectures()}")
    return arch


def entry(arch: str) -> ModelEntry:
    try:
        return REGISTRY[arch]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {supported_architectures()}") from None


def model_class(arch: str) -> type:
    return entry(arch).model_class


def local_head_counts(cfg: "ModelArchConfig", tp_size: int, tp_rank: int = 0) -> tuple[int, int]:
    """(num_heads, num_kv_heads) that TP rank `tp_rank` runs attention over, as its model class splits
    them: what its `AttentionSpec` and its KV cache must use."""
    return model_class(cfg.architecture).local_head_counts(cfg, tp_size, tp_rank)
