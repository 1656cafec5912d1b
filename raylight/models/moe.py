"""Mixture-of-experts decoders with HF weight names: Qwen3-MoE, Qwen2-MoE (with its gated shared expert)
and Mixtral. Attention, norms, embedding and head are the Llama family's (`models/llama.py`); the
sparse layers' MLP is a `SparseMoeBlock`: a replicated router (`gate`), the experts
(`parallel.moe_layer.FusedMoE`, tensor- or expert-parallel) and, for Qwen2-MoE, a dense shared expert
scaled by sigmoid(shared_expert_gate(x)). Layers outside `cfg.moe_layers` keep the dense MLP.

Checkpoint names: per-expert tensors `...mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen) or
`...block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` (Mixtral, whose block is our `mlp`), and the fused
3-D `...mlp.experts.gate_up_proj` / `.down_proj` some transformers 5 exports write.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional

import torch
from torch import nn

from raylight.kernels.config import DEFAULT_KERNELS, KernelConfig
from raylight.models.config import ModelArchConfig
from raylight.models.llama import LlamaForCausalLM, LlamaMLP
from raylight.parallel.moe_layer import ExpertParallelContext, FusedMoE
from raylight.parallel.state import ParallelGroups

_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelArchConfig, ctx: ExpertParallelContext, moe_index: int, groups: ParallelGroups,
                 kernels: KernelConfig):
        super().__init__()
        # The router is small and replicated: every rank routes the tokens it runs.
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = FusedMoE(ctx, moe_index, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                                cfg.norm_topk_prob, cfg.router_weights_in_model_dtype)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            shared = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size)
            self.shared_expert = LlamaMLP(shared, groups, kernels)  # TP-split, a partial sum like the experts'
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.expert_parallel and ctx.ep_size > 1:
            lo, n = self.experts.token_share(x.shape[0])
            logits = self.gate(x[lo:lo + n])  # each EP rank routes its share of the tokens
        else:
            logits = self.gate(x)
        out = self.experts(x, logits)
        if self.shared_expert is not None:
            # sigmoid(gate) is the same on every rank, so scaling a partial sum keeps it one.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoEForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelArchConfig, attn_backend, max_positions: int,
                 groups: Optional[ParallelGroups] = None, kernels: KernelConfig = DEFAULT_KERNELS):
        groups = groups or ParallelGroups.single()
        start, end = groups.layer_range(cfg.num_hidden_layers)
        # MoE layers of this stage, numbered 0.. in order: their rows in the EPLB maps and load.
        self.moe_index = {layer: i for i, layer in enumerate(l for l in cfg.moe_layers if start <= l < end)}
        self.ep = ExpertParallelContext(groups, len(self.moe_index), cfg.num_experts, cfg.hidden_size)
        # make_mlp runs inside LlamaForCausalLM.__init__, before it sets config/groups/kernels on self.
        self._block_args = (cfg, groups, kernels)
        super().__init__(cfg, attn_backend, max_positions, groups, kernels)
        self.moe_blocks = [self.model.layers[layer].mlp for layer in self.moe_index]

    def make_mlp(self, layer: int) -> Optional[nn.Module]:
        if layer not in self.moe_index:
            return None
        cfg, groups, kernels = self._block_args
        return SparseMoeBlock(cfg, self.ep, self.moe_index[layer], groups, kernels)

    # ---- EPLB ----
    def enable_eplb(self, window_size: int, device: torch.device) -> None:
        self.ep.enable_eplb(window_size, device)

    def expert_weights(self) -> list[list[torch.Tensor]]:
        """Per local MoE layer, the tensors EPLB moves between ranks: [w13, w2], slot-major."""
        return [[b.experts.w13_weight, b.experts.w2_weight] for b in self.moe_blocks]

    # ---- weights ----
    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        loaded: set[str] = set()

        def rest():
            for name, tensor in weights:
                name = name.replace(".block_sparse_moe.", ".mlp.")
                if not self._load_expert(name, tensor, loaded):
                    yield name, tensor

        return super().load_weights(rest()) | loaded

    def _block(self, prefix: str) -> Optional[SparseMoeBlock]:
        layer = int(prefix.rsplit(".", 1)[1])
        return self.model.layers[layer].mlp if layer in self.moe_index else None

    def _load_expert(self, name: str, tensor, loaded: set[str]) -> bool:
        """Expert tensors go into this rank's slots; False for every other tensor."""
        m, fused = _EXPERT.match(name), _FUSED.match(name)
        if not (m or fused):
            return False
        prefix = (m or fused).group(1)
        if self._elsewhere(name):
            return True  # another pipeline stage's layer
        block = self._block(prefix)
        if block is None:
            raise ValueError(f"checkpoint tensor {name!r}: layer is not sparse in this config")
        target = f"{prefix}.mlp.experts"
        if m:
            expert, part = int(m.group(2)), _PART[m.group(3)]
            if block.experts.load_expert(expert, part, tensor):
                loaded.add(f"{target}#{expert}.{part}")
            return True
        full = tensor if isinstance(tensor, torch.Tensor) else tensor.read()
        for expert in range(full.shape[0]):
            parts = ({"down": full[expert]} if fused.group(2) == "down_proj"
                     else dict(zip(("gate", "up"), full[expert].chunk(2, dim=0))))
            for part, w in parts.items():
                if block.experts.load_expert(expert, part, w):
                    loaded.add(f"{target}#{expert}.{part}")
        return True

    def expected_weights(self) -> set[str]:
        names = {n for n in super().expected_weights() if not n.endswith(("w13_weight", "w2_weight"))}
        for layer, block in zip(self.moe_index, self.moe_blocks):
            for e in set(self.ep.local_logical(block.experts.moe_index)):
                names.update(f"model.layers.{layer}.mlp.experts#{e}.{p}" for p in ("gate", "up", "down"))
        return names

    @torch.no_grad()
    def fill_dummy_experts(self, seed: int) -> None:
        for layer, block in zip(self.moe_index, self.moe_blocks):
            block.experts.fill_dummy(seed, layer)
