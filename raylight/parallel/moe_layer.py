"""The experts of a mixture-of-experts layer, over the ranks of one pipeline stage.

Two ways to spread a layer's experts over the stage's TP ranks (`ParallelConfig.enable_expert_parallel`):

- Tensor parallel (default): every rank holds every expert, each expert's intermediate features split
  like a dense MLP's (gate/up by rows, down by columns). Every rank runs every token through its
  slices; the partial sums are reduced with the rest of the layer (in the next add+RMSNorm).
- Expert parallel: rank r holds whole experts, the physical slots [r*S, (r+1)*S). Activations are
  replicated over the TP ranks (attention is TP), so each rank routes only its share of the tokens
  (`shard_range` of them), sends them to the ranks owning their experts through a DeepEP-style buffer
  (`parallel/ep_buffer.py`: `dispatch`/`combine`, or the fixed-shape `low_latency_*` pair for small
  steps, which never waits on the host and so can sit in a CUDA graph), and writes the combined result
  into its rows of an otherwise zero tensor: the same all-reduce that finishes a TP layer then
  assembles every rank's rows. Communication: one all-to-all each way plus that all-reduce.

With EPLB (`ExpertParallelContext.enable_eplb`) routing maps logical experts to physical slots through
the shared `ExpertPlacement` (round-robin over an expert's replicas) and records each slot's load;
`parallel/eplb` moves the weights between steps. Maps and weights change in place only, so captured
CUDA graphs stay valid.

Weights: `w13` [slots, 2 * I_local, H] (gate rows, then up rows, HF's order) and `w2` [slots, H, I_local].
Each checkpoint expert tensor is loaded into every local slot that holds its expert.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from raylight.kernels.fused_moe import fused_experts, select_experts, warmup_fused_experts
from raylight.parallel.eplb.placement import initial_phy2log
from raylight.parallel.state import ParallelGroups, shard_range

# Per-rank token count up to which EP uses the fixed-shape low-latency dispatch (no host sync, CUDA
# graph capturable); its buffers hold slots * ranks * this many rows.
LL_MAX_TOKENS_PER_RANK = 128


class ExpertParallelContext:
    """What the MoE layers of one model share: the EP coordinates, the token-moving buffer, and, with
    EPLB, the placement (logical -> physical maps) and the load recorder. One per model (per rank)."""

    def __init__(self, groups: ParallelGroups, num_moe_layers: int, num_experts: int, hidden: int):
        cfg = groups.config
        self.groups = groups
        self.num_moe_layers = num_moe_layers
        self.num_logical = num_experts
        self.expert_parallel = cfg.enable_expert_parallel
        self.ep_size, self.ep_rank = groups.ep_size, groups.ep_rank
        self.num_physical = num_experts + cfg.num_redundant_experts
        if self.num_physical % self.ep_size:
            raise ValueError(f"{num_experts} experts + {cfg.num_redundant_experts} redundant do not divide over "
                             f"{self.ep_size} expert-parallel ranks")
        self.slots_per_rank = self.num_physical // self.ep_size
        self.hidden = hidden
        self.placement = None  # ExpertPlacement, with EPLB
        self.recorder = None  # ExpertLoadRecorder, with EPLB
        self._buffer = None
        self.ll_max_tokens = LL_MAX_TOKENS_PER_RANK
        # Benchmarks only (scripts/bench_eplb.py): RAYLIGHT_MOE_ROUTER_ZIPF=s adds log of a Zipf(s) popularity
        # to every router's logits, a skewed load EPLB must undo (dummy weights route almost uniformly).
        skew = float(os.environ.get("RAYLIGHT_MOE_ROUTER_ZIPF", "0") or 0)
        self.router_bias = (-skew * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
                            if skew > 0 else None)

    def local_slots(self) -> range:
        """This rank's physical slots."""
        return range(self.ep_rank * self.slots_per_rank, (self.ep_rank + 1) * self.slots_per_rank)

    def local_logical(self, moe_index: int) -> list[int]:
        """The logical expert each local slot of MoE layer `moe_index` holds now."""
        slots = self.local_slots()
        if self.placement is not None:
            return self.placement.phy2log[moe_index, slots.start:slots.stop].tolist()
        return initial_phy2log(self.num_logical, self.num_physical)[slots.start:slots.stop]

    @property
    def buffer(self):
        """The EP token mover (built on first use: its collectives need the world up)."""
        if self._buffer is None:
            from raylight.parallel.ep_buffer import make_ep_buffer

            self._buffer = make_ep_buffer(self.groups.ep_group, self.num_physical, self.hidden, self.ll_max_tokens)
        return self._buffer

    def enable_eplb(self, window_size: int, device: torch.device) -> None:
        """Routes through a placement and records load from now on. Call before any CUDA graph capture."""
        from raylight.parallel.eplb import ExpertLoadRecorder, ExpertPlacement

        # Replica choice by (token + k): spreads a hot expert's pairs over its replicas better than by the
        # flat (token, k) position when top-k puts that expert first (0.970 vs 0.946 on the Zipf test).
        self.placement = ExpertPlacement(self.num_moe_layers, self.num_logical, self.num_physical, self.ep_size,
                                         device, replica_spread="token")
        self.recorder = ExpertLoadRecorder(self.num_moe_layers, self.num_physical, window_size, device)

    def to_physical(self, moe_index: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids -> physical slots (and their load recorded), or as they are without EPLB."""
        if self.placement is None:
            return topk_ids
        physical = self.placement.map_to_physical(moe_index, topk_ids)
        self.recorder.record(moe_index, physical)
        return physical


class FusedMoE(nn.Module):
    """Router-weighted sum of the top-k experts for every token: the experts part of a sparse block
    (the router, `gate`, and any shared expert are the model's). Returns this rank's partial sum."""

    def __init__(self, ctx: ExpertParallelContext, moe_index: int, intermediate_size: int, top_k: int,
                 renormalize: bool, round_weights: bool = False):
        super().__init__()
        self.ctx, self.moe_index = ctx, moe_index
        self.top_k, self.renormalize = top_k, renormalize
        self.round_weights = round_weights  # top-k weights rounded to the model dtype (as the family's HF code)
        groups, H = ctx.groups, ctx.hidden
        self.intermediate_size = intermediate_size
        if ctx.expert_parallel:  # whole experts per rank
            self.i_start, self.i_local = 0, intermediate_size
        else:  # every expert, its features split over the TP ranks
            self.i_start, self.i_local = shard_range(intermediate_size, groups.tp_size, groups.tp_rank)
        S = ctx.slots_per_rank
        self.w13_weight = nn.Parameter(torch.empty(S, 2 * self.i_local, H), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(S, H, self.i_local), requires_grad=False)

    # ---- weights ----
    def slots_of(self, expert: int) -> list[int]:
        """Local slots that hold logical `expert` (none when another EP rank has it)."""
        return [s for s, e in enumerate(self.ctx.local_logical(self.moe_index)) if e == expert]

    @torch.no_grad()
    def load_expert(self, expert: int, part: str, w) -> bool:
        """Copies one checkpoint tensor of logical `expert` ('gate', 'up': [I, H]; 'down': [H, I]) into the
        local slots holding it; False when none does. `w` may be lazy (narrowed before it is read)."""
        slots = self.slots_of(expert)
        if not slots:
            return False
        I, lo, n = self.intermediate_size, self.i_start, self.i_local
        if part == "down":
            if tuple(w.shape) != (self.ctx.hidden, I):
                raise ValueError(f"shape mismatch: expert down {tuple(w.shape)}, model {(self.ctx.hidden, I)}")
            src = w.narrow(1, lo, n)
            for s in slots:
                self.w2_weight[s].copy_(src)
        else:
            if tuple(w.shape) != (I, self.ctx.hidden):
                raise ValueError(f"shape mismatch: expert {part} {tuple(w.shape)}, model {(I, self.ctx.hidden)}")
            src, at = w.narrow(0, lo, n), (0 if part == "gate" else n)
            for s in slots:
                self.w13_weight[s, at:at + n].copy_(src)
        return True

    @torch.no_grad()
    def fill_dummy(self, seed: int, layer: int) -> None:
        """Random weights that depend only on (seed, layer, logical expert): replicas and the same expert
        on different EP layouts are equal, so EP and EPLB runs of dummy models compare with EP=1's."""
        dev = self.w13_weight.device
        I, H = self.intermediate_size, self.ctx.hidden
        for s, e in enumerate(self.ctx.local_logical(self.moe_index)):
            gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + layer * 4099 + e)
            full13 = torch.empty(2, I, H, device=dev, dtype=self.w13_weight.dtype).normal_(0.0, 0.02, generator=gen)
            full2 = torch.empty(H, I, device=dev, dtype=self.w2_weight.dtype).normal_(0.0, 0.02, generator=gen)
            n, lo = self.i_local, self.i_start
            self.w13_weight[s].copy_(full13[:, lo:lo + n].reshape(2 * n, H))
            self.w2_weight[s].copy_(full2[:, lo:lo + n])

    # ---- forward ----
    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x: [T, H] (the same on every TP rank); router_logits: [T, E] for all T tokens, or, under EP,
        for this rank's share of them (`token_share`)."""
        ctx = self.ctx
        if not ctx.expert_parallel or ctx.ep_size == 1:
            weights, ids = self._route(router_logits)
            ids = ctx.to_physical(self.moe_index, ids)  # all slots are local: physical id = local slot
            return fused_experts(x, self.w13_weight, self.w2_weight, weights, ids)
        lo, n = self.token_share(x.shape[0])
        xs = x[lo:lo + n]
        weights, ids = self._route(router_logits)
        ids = ctx.to_physical(self.moe_index, ids)
        per_rank = -(-x.shape[0] // ctx.ep_size)  # the most tokens any EP rank routes
        if per_rank <= ctx.ll_max_tokens:
            out = self._low_latency(xs, weights, ids, per_rank)
        else:
            out = self._normal(xs, weights, ids)
        partial = torch.zeros_like(x)
        partial[lo:lo + n] = out
        return partial

    def _route(self, router_logits):
        """(float32 weights, logical expert ids), [T, top_k] each."""
        bias = self.ctx.router_bias
        if bias is not None:
            if bias.device != router_logits.device:
                bias = self.ctx.router_bias = bias.to(router_logits.device)
            router_logits = router_logits + bias.to(router_logits.dtype)
        return select_experts(router_logits, self.top_k, self.renormalize,
                              router_logits.dtype if self.round_weights else None)

    def warmup(self, max_tokens: int) -> int:
        """JIT-compiles the expert kernels for every step size up to `max_tokens` (see
        `warmup_fused_experts`). Under EP the normal dispatch hands a rank at most every token once, with
        top_k ids each; the low-latency path one id per row, local slots x ranks x its token cap rows."""
        calls = warmup_fused_experts(self.w13_weight, self.w2_weight, self.top_k, max_tokens)
        ctx = self.ctx
        if ctx.expert_parallel and ctx.ep_size > 1:
            rows = ctx.slots_per_rank * ctx.ep_size * ctx.ll_max_tokens
            calls += warmup_fused_experts(self.w13_weight, self.w2_weight, 1, rows)
        return calls

    def token_share(self, num_tokens: int) -> tuple[int, int]:
        """(start, count) of the tokens this EP rank routes."""
        return shard_range(num_tokens, self.ctx.ep_size, self.ctx.ep_rank)

    def _normal(self, xs, weights, ids):
        buf = self.ctx.buffer
        P = self.ctx.num_physical
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(ids, P)
        recv_x, recv_ids, recv_w, _, handle, _ = buf.dispatch(
            xs, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights)
        y = fused_experts(recv_x, self.w13_weight, self.w2_weight, recv_w, recv_ids)
        return buf.combine(y, handle)[0]

    def _low_latency(self, xs, weights, ids, max_tokens):
        """Fixed shapes, no host sync: each (token, k) pair lands in its expert's rows of a
        [local experts, ranks * max_tokens, H] buffer; the experts run over every row (empty ones are -1)."""
        buf = self.ctx.buffer
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(xs, ids, max_tokens, self.ctx.num_physical,
                                                                    use_fp8=False)
        E_loc, rows, H = recv_x.shape
        # Expert e's rows are packed from the top (sources ascending): the first recv_count[e] are real.
        valid = torch.arange(rows, device=recv_x.device)[None, :] < recv_count[:, None]
        expert = torch.arange(E_loc, device=recv_x.device)[:, None].expand(E_loc, rows)
        local_ids = torch.where(valid, expert, -1).reshape(-1, 1)
        ones = torch.ones(local_ids.shape, dtype=recv_x.dtype, device=recv_x.device)
        y = fused_experts(recv_x.reshape(-1, H), self.w13_weight, self.w2_weight, ones, local_ids)
        return buf.low_latency_combine(y.view(E_loc, rows, H), ids, weights, handle)[0]
