"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) over the paged KV cache,
sharded over tensor- and pipeline-parallel ranks by the `ParallelGroups` it is given.

Parameter names follow HF checkpoints, except that q/k/v are merged into `qkv_proj`
and gate/up into `gate_up_proj` (one matmul each instead of three and two). With the
default single-process groups every parameter has its full shape and the model is the
plain single-device one.

Under TP each rank holds its heads (`LlamaForCausalLM.local_head_counts`), its slice of the MLP and of the
vocabulary. Under PP a rank builds only its stage's layers [start, end) (the others are
parameterless placeholders, so names keep their global layer index); the first stage owns
the embedding, the last one the final norm and the LM head.

`kernels` (the engine's `KernelConfig`) reaches every layer that may pick a fused op or GEMV.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from raylight.kernels.config import DEFAULT_KERNELS, KernelConfig
from raylight.kernels.norm import RMSNorm
from raylight.kernels.rotary import RotaryEmbedding, apply_rotary_qk
from raylight.models.config import ModelArchConfig
from raylight.parallel.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, default_weight_loader, head_shard)
from raylight.parallel.pipeline import Intermediate
from raylight.parallel.state import ParallelGroups


def local_head_counts(cfg: ModelArchConfig, tp_size: int, tp_rank: int = 0) -> tuple[int, int]:
    """(num_heads, num_kv_heads) that TP rank `tp_rank` runs attention over: what its
    `AttentionSpec` and its KV cache must use. Ranks differ only when the KV heads do not divide
    evenly over tp (e.g. 3 over 2); rank 0 then has the most, so it sizes the KV budget.
    (Callers outside models/ go through `models.registry.local_head_counts`.)"""
    h = head_shard(cfg.num_attention_heads, cfg.num_key_value_heads, tp_size, tp_rank)
    return h.num_heads, h.num_kv_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, attn_backend, groups: ParallelGroups, kernels: KernelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.attention_bias, groups, kernels=kernels)
        heads = self.qkv_proj.heads  # this rank's heads
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        # o_proj's input is the concatenated head outputs, so its columns split with the heads.
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, False, groups,
                                        input_shard=(heads.q_start * cfg.head_dim, self.q_size),
                                        reduce_results=False,  # reduced in the decoder layer's norm
                                        kernels=kernels)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels.fused_kernels, kernels.pdl)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels.fused_kernels, kernels.pdl)
        self.qk_norm = cfg.qk_norm
        self.fused_kernels, self.pdl = kernels.fused_kernels, kernels.pdl
        self.rope_kv = kernels.fused_kernels and kernels.rope_kv  # rotary + KV write in one kernel where offered
        self.attn = attn_backend

    def forward(self, x, cos, sin, kv_cache, attn_meta):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # A backend that offers it rotates q and k and writes K/V in one kernel (the piecewise graphs' capture
        # stand-in does not: their pieces keep the rotary, their eager attention the write).
        forward_rope = getattr(self.attn, "forward_rope", None) if self.rope_kv else None
        if forward_rope is not None:
            o = forward_rope(q, k, v, cos, sin, kv_cache, attn_meta, self.scale)
        else:
            q, k = apply_rotary_qk(q, k, cos, sin, self.fused_kernels, self.pdl)
            o = self.attn.forward(q, k, v, kv_cache, attn_meta, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig, groups: ParallelGroups, kernels: KernelConfig):
        super().__init__()
        # Gate and up are split the same way, so silu(gate) * up pairs matching features locally.
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, groups,
                                                       kernels=kernels)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, groups,
                                           reduce_results=False, kernels=kernels)  # reduced in the next norm

    def forward(self, x):
        return self.down_proj(self.gate_up_proj(x), silu_and_mul=True)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, attn_backend, groups: ParallelGroups, kernels: KernelConfig,
                 mlp: Optional[nn.Module] = None):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, attn_backend, groups, kernels)
        # A MoE model passes its sparse block; it too returns this TP rank's partial sum.
        self.mlp = mlp if mlp is not None else LlamaMLP(cfg, groups, kernels)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels.fused_kernels, kernels.pdl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels.fused_kernels, kernels.pdl)
        self.groups = groups

    def forward(self, x, residual, cos, sin, kv_cache, attn_meta):
        """x: the embeddings (residual None), or the previous layer's MLP output as this TP rank's
        partial sum. Returns this layer's MLP output, again a partial sum, and the residual (whole).
        Each TP reduction happens inside the add+RMSNorm after it (`reduce_add_norm`)."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.groups.reduce_add_norm(x, residual, self.input_layernorm)
        x = self.self_attn(x, cos, sin, kv_cache, attn_meta)
        x, residual = self.groups.reduce_add_norm(x, residual, self.post_attention_layernorm)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig, attn_backend, max_positions: int, groups: ParallelGroups,
                 kernels: KernelConfig, make_mlp: Optional[Callable[[int], Optional[nn.Module]]] = None):
        super().__init__()
        self.start_layer, self.end_layer = groups.layer_range(cfg.num_hidden_layers)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, groups)
                             if groups.is_first_stage else None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, attn_backend, groups, kernels, make_mlp(i) if make_mlp else None)
            if self.start_layer <= i < self.end_layer
            else nn.Identity()
            for i in range(cfg.num_hidden_layers))
        self.local_layers = list(self.layers)[self.start_layer : self.end_layer]
        self.norm = (RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels.fused_kernels, kernels.pdl)
                     if groups.is_last_stage else None)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.groups = groups

    def forward(self, input_ids, positions, kv_caches, attn_meta, intermediate: Optional[Intermediate] = None):
        if self.embed_tokens is not None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate
        # cos/sin gathered once per step, shared by every layer.
        cos = self.rotary_emb.cos[positions].to(x.dtype)[:, None, :]
        sin = self.rotary_emb.sin[positions].to(x.dtype)[:, None, :]
        for layer, kv_cache in zip(self.local_layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, attn_meta)
        if self.norm is None:
            # The next stage continues the residual stream. x is still this TP rank's partial sum:
            # TP rank t sends it to TP rank t of the next stage, whose first layer reduces it.
            return x, residual
        x, _ = self.groups.reduce_add_norm(x, residual, self.norm)
        return x


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name fragment -> (our merged parameter fragment, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }
    merged_shards = {".qkv_proj.": ("q", "k", "v"), ".gate_up_proj.": (0, 1)}

    def __init__(self, cfg: ModelArchConfig, attn_backend, max_positions: int,
                 groups: Optional[ParallelGroups] = None, kernels: KernelConfig = DEFAULT_KERNELS):
        super().__init__()
        self.config = cfg
        self.groups = groups = groups or ParallelGroups.single()
        self.kernels = kernels
        self.model = LlamaModel(cfg, attn_backend, max_positions, groups, kernels, self.make_mlp)
        if not groups.is_last_stage:
            self.lm_head = None
        else:
            # Tied on a model whose first stage is also its last: one weight. Tied across stages:
            # the last stage keeps its own copy, filled from the checkpoint's embedding.
            tie_to = self.model.embed_tokens if cfg.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, groups, tie_to=tie_to, kernels=kernels)

    def make_mlp(self, layer: int) -> Optional[nn.Module]:
        """Layer `layer`'s MLP when it is not the dense one (a MoE model's sparse block); None: dense."""
        return None

    @classmethod
    def local_head_counts(cls, cfg: ModelArchConfig, tp_size: int, tp_rank: int = 0) -> tuple[int, int]:
        """(num_heads, num_kv_heads) of TP rank `tp_rank`: see the module's `local_head_counts`."""
        return local_head_counts(cfg, tp_size, tp_rank)

    # ---- what an executor needs to size and drive this rank ----
    @property
    def layer_range(self) -> tuple[int, int]:
        return self.model.start_layer, self.model.end_layer

    @property
    def num_local_layers(self) -> int:
        return self.model.end_layer - self.model.start_layer

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of each of this rank's `num_local_layers` KV cache tensors (local KV heads)."""
        return (num_blocks, 2, block_size, self.model.local_layers[0].self_attn.num_kv_heads, self.config.head_dim)

    def forward(self, input_ids, positions, kv_caches, attn_meta, intermediate: Optional[Intermediate] = None):
        """First stage: from `input_ids`; later stages: from the previous stage's (hidden, residual).
        Last stage: returns the final hidden states; earlier stages: (hidden, residual) to send on.
        `kv_caches` holds one tensor per local layer."""
        return self.model(input_ids, positions, kv_caches, attn_meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor, gather_all: bool = False,
                       float32: bool = True) -> Optional[torch.Tensor]:
        """Full-vocabulary logits, float32 (or the model's dtype with float32=False). Last stage only; under
        TP every rank of the stage must call it (it gathers the vocabulary slices): TP rank 0 gets the
        logits, the others None unless gather_all."""
        return self.lm_head(hidden, gather_all, float32)

    # ---- weights ----
    _LAYER = re.compile(r"^model\.layers\.(\d+)\.")

    def _elsewhere(self, name: str) -> bool:
        """Is this checkpoint tensor owned by another PP stage?"""
        m = self._LAYER.match(name)
        if m:
            return not self.model.start_layer <= int(m.group(1)) < self.model.end_layer
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is None
        if name.startswith(("model.norm.", "lm_head.")):
            return self.lm_head is None
        return False

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Copies checkpoint tensors into our parameters as they stream in; returns the names filled.

        Each tensor may be lazy (see `parallel.layers`): parameters narrow it to this rank's slice
        before reading, and tensors of other PP stages are skipped without being read."""
        params = dict(self.named_parameters())
        tied = self.config.tie_word_embeddings
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and tied:
                continue  # tied: the embedding is the head
            targets = [name]
            if (tied and name == "model.embed_tokens.weight" and self.lm_head is not None
                    and (self.model.embed_tokens is None or self.lm_head.weight is not self.model.embed_tokens.weight)):
                # Tied across PP stages: the last stage's head is filled from the embedding tensor.
                targets = ([name] if self.model.embed_tokens is not None else []) + ["lm_head.weight"]
            for target in targets:
                shard = None
                for frag, (merged, shard_id) in self.stacked_params.items():
                    if frag in target:
                        target, shard = target.replace(frag, merged), shard_id
                        break
                if target not in params:
                    if self._elsewhere(target):
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                param = params[target]
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, tensor) if shard is None else loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                loaded.add(target if shard is None else f"{target}#{shard}")
        return loaded

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            for merged, shards in self.merged_shards.items():
                if merged in name:
                    names.update(f"{name}#{s}" for s in shards)
                    break
            else:
                names.add(name)
        return names
