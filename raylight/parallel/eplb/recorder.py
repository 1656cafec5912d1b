"""Per-step expert load recording on physical slot ids, kept in a fixed window on the device.

`record` runs inside the MoE forward (possibly inside a CUDA graph), so it only scatter-adds into
buffers allocated here once; nothing is read back to the host. The window is summed and
all-reduced only when the balancer asks for it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ExpertLoadRecorder:
    def __init__(self, num_layers: int, num_physical: int, window_size: int, device: torch.device | str = "cpu"):
        if window_size < 1:
            raise ValueError("window_size must be >= 1")
        self.num_layers, self.num_physical, self.window_size = num_layers, num_physical, window_size
        self.device = torch.device(device)
        # (token, k) assignments per physical slot during the current forward pass.
        self.pass_load = torch.zeros(num_layers, num_physical, dtype=torch.int64, device=self.device)
        self.window = torch.zeros(window_size, num_layers, num_physical, dtype=torch.int64, device=self.device)
        self.steps = 0  # passes closed by end_step (host counter: identical on every rank)

    def record(self, layer: int, physical_ids: Tensor) -> None:
        """Counts one assignment per entry of `physical_ids` (any shape); -1 (dropped/padding) is
        ignored by adding 0 at slot 0, which keeps the op shape-static (no boolean indexing)."""
        ids = physical_ids.reshape(-1)
        valid = ids >= 0
        self.pass_load[layer].scatter_add_(0, ids.clamp(min=0).long(), valid.long())

    def end_step(self) -> None:
        """Closes the pass: it becomes window slot (step % W), overwriting the oldest."""
        self.window[self.steps % self.window_size].copy_(self.pass_load)
        self.pass_load.zero_()
        self.steps += 1

    def window_load(self) -> Tensor:
        """[L, P] load summed over the last min(steps, W) passes."""
        return self.window.sum(0)

    def clear_layer(self, layer: int) -> None:
        """Forgets one layer's window: its counts are on slot ids of a map that was just replaced,
        and would be attributed to the wrong experts."""
        self.window[:, layer].zero_()

    def reset(self) -> None:
        self.pass_load.zero_()
        self.window.zero_()
        self.steps = 0
