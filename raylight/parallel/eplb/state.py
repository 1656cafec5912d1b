"""The balancer's step loop: record -> (every interval) plan -> move one layer per step.

`step()` runs on every EP rank after every forward pass, dummy passes included. Every decision is
a function of the step count and of all-reduced data only, so all ranks issue the same collectives
at the same steps; a rank that skipped a step would hang its peers.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from raylight.parallel.eplb.algorithm import preserve_slots, rebalance_experts
from raylight.parallel.eplb.metrics import balancedness, estimated_physical_load, tokens_per_rank
from raylight.parallel.eplb.placement import ExpertPlacement
from raylight.parallel.eplb.recorder import ExpertLoadRecorder
from raylight.parallel.eplb.rearrange import rearrange_layer

logger = logging.getLogger(__name__)


class EplbState:
    def __init__(self, placement: ExpertPlacement, recorder: ExpertLoadRecorder, expert_weights: list[list[Tensor]],
                 ep_rank: int, ep_size: int, group: Optional[dist.ProcessGroup], step_interval: int,
                 num_groups: int = 1, num_nodes: int = 1, log_balancedness: bool = False,
                 log_balancedness_interval: int = 1, first_rebalance_after: Optional[int] = None):
        if len(expert_weights) != placement.num_layers:
            raise ValueError(f"{len(expert_weights)} weight layers for {placement.num_layers} MoE layers")
        if placement.ep_size != ep_size or recorder.num_physical != placement.num_physical:
            raise ValueError("placement, recorder and EP size disagree")
        if step_interval < 1 or log_balancedness_interval < 1:
            raise ValueError("intervals must be >= 1")
        self.placement, self.recorder, self.expert_weights = placement, recorder, expert_weights
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.group = group if ep_size > 1 else None
        self.step_interval = step_interval
        self.num_groups = num_groups
        # As vLLM: node-aware packing needs whole nodes of GPUs; otherwise treat it as one node.
        self.num_nodes = num_nodes if ep_size % num_nodes == 0 else 1
        self.log_balancedness, self.log_balancedness_interval = log_balancedness, log_balancedness_interval

        self.steps = 0
        self._next_rebalance = first_rebalance_after if first_rebalance_after is not None else step_interval
        self._plan: Optional[Tensor] = None  # [L, P] target map (CPU) while a rebalance is in flight
        self._next_layer = 0
        self._started_s = 0.0  # host time spent on the in-flight rebalance so far
        self._bytes_in_flight = 0
        self._staging: Optional[list[Tensor]] = None

        self.num_rebalances = 0
        self.last_rebalance_s = 0.0
        self.bytes_moved = 0
        self.last_balancedness: dict[str, float] = {}
        self.predicted_balancedness: dict[str, float] = {}  # the plan's own estimate, at the last rebalance

    @property
    def in_flight(self) -> bool:
        return self._plan is not None

    @property
    def target_map(self) -> Optional[Tensor]:
        """[L, P] map the in-flight rebalance is moving to (layers < next layer already moved)."""
        return self._plan

    def step(self) -> None:
        """Once per forward pass, on every EP rank, after the pass's loads were recorded."""
        self.recorder.end_step()
        self.steps += 1
        if self._plan is not None:
            self._move_next_layer()
        if self.log_balancedness and self.steps % self.log_balancedness_interval == 0:
            self.last_balancedness = balancedness(tokens_per_rank(self._global_window_load(), self.ep_size))
            if self.ep_rank == 0:
                logger.info("EPLB step %d: balancedness vllm=%.4f sglang=%.4f; %d steps to next rearrangement",
                            self.steps, self.last_balancedness["vllm"], self.last_balancedness["sglang"],
                            max(0, self._next_rebalance - self.steps))
        if self.steps >= self._next_rebalance:
            self._next_rebalance = self.steps + self.step_interval
            if self._plan is None:  # one shuffle at a time
                self._start_rebalance()

    # ------------------------------------------------------------ internals

    def _global_window_load(self) -> Tensor:
        """[L, P] window load summed over the EP group (a collective: same step on every rank)."""
        load = self.recorder.window_load()
        if self.group is not None:
            dist.all_reduce(load, group=self.group)
        return load

    def _start_rebalance(self) -> None:
        t0 = time.perf_counter()
        load = self._global_window_load()
        self.last_balancedness = balancedness(tokens_per_rank(load, self.ep_size))
        logical = self.placement.logical_load(load).cpu()
        if int(logical.sum()) == 0:  # no traffic in the window: nothing to balance on
            return
        p = self.placement
        phy2log, _, logcnt = rebalance_experts(logical, p.num_physical, self.num_groups, self.num_nodes, self.ep_size)
        old = p.phy2log.cpu()
        plan = preserve_slots(old, phy2log, self.ep_size)
        self.predicted_balancedness = balancedness(
            tokens_per_rank(estimated_physical_load(logical, plan, logcnt), self.ep_size))
        if torch.equal(plan, old):
            return
        self._plan, self._next_layer = plan, 0
        self._started_s, self._bytes_in_flight = time.perf_counter() - t0, 0

    def _move_next_layer(self) -> None:
        t0 = time.perf_counter()
        layer = self._next_layer
        p = self.placement
        old_row = p.phy2log[layer].cpu()
        new_row = self._plan[layer]
        weights = self.expert_weights[layer]
        if self._staging is None or [s.shape for s in self._staging] != [w.shape for w in weights]:
            self._staging = [torch.empty_like(w) for w in weights]  # one layer's worth, reused
        got = rearrange_layer(old_row, new_row, weights, self.ep_rank, self.ep_size, self.group, self._staging)
        p.set_layer(layer, new_row)
        self.recorder.clear_layer(layer)
        self._bytes_in_flight += got
        self.bytes_moved += got
        self._started_s += time.perf_counter() - t0
        self._next_layer += 1
        if self._next_layer == p.num_layers:
            self._plan = None
            self.num_rebalances += 1
            self.last_rebalance_s = self._started_s
            if self.ep_rank == 0:
                logger.info("EPLB: rearranged experts of %d layers in %.3f s (rank 0 received %d bytes); "
                            "balancedness before vllm=%.4f sglang=%.4f, planned vllm=%.4f sglang=%.4f",
                            p.num_layers, self._started_s, self._bytes_in_flight,
                            self.last_balancedness["vllm"], self.last_balancedness["sglang"],
                            self.predicted_balancedness["vllm"], self.predicted_balancedness["sglang"])
