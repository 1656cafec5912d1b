"""Stage-to-stage hand-off for pipeline parallelism.

A stage's output is (hidden, residual), both [num_tokens, hidden_size]: the residual stream is
carried separately because each layer fuses "add residual, then norm" into one op. Both travel
as one [2, num_tokens, hidden_size] message from TP rank t of stage s to TP rank t of stage s + 1
(every TP rank of a stage holds the full, all-reduced activations). The receiver knows the shape
from the step's token count, which every rank already has from the broadcast step inputs, so
there is no size handshake.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from raylight.parallel.state import ParallelGroups

Intermediate = tuple[torch.Tensor, torch.Tensor]  # (hidden, residual)


class PendingSend:
    """An isend in flight; holds its buffer, which must outlive the send."""

    def __init__(self, work: dist.Work, msg: torch.Tensor):
        self.work, self.msg = work, msg

    def wait(self) -> None:
        self.work.wait()
        self.msg = None


def send_intermediate(groups: ParallelGroups, hidden: torch.Tensor, residual: torch.Tensor,
                      async_op: bool = False) -> Optional[PendingSend]:
    """Sends this stage's output to the next stage. With async_op, returns at once with a handle to
    wait on, so a stage can start its next micro-batch while the send is in flight."""
    assert groups.next_rank is not None, "the last stage has no next stage"
    msg = torch.stack((hidden, residual))
    if async_op:
        return PendingSend(dist.isend(msg, dst=groups.next_rank), msg)
    dist.send(msg, dst=groups.next_rank)
    return None


def recv_intermediate(groups: ParallelGroups, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                      device: torch.device) -> Intermediate:
    """Receives (hidden, residual) for a step of `num_tokens` tokens from the previous stage."""
    assert groups.prev_rank is not None, "the first stage has no previous stage"
    msg = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
    dist.recv(msg, src=groups.prev_rank)
    return msg[0], msg[1]


class StageModel:
    """This rank's part of a pipelined model, called like the model itself: receives the previous
    stage's (hidden, residual) before running its layers and sends its own to the next stage after.

    Returns the final hidden states on the last stage and None on the others. The send is
    asynchronous so a stage is free to take the next step's inputs at once; it is waited on
    before the next send (a stage's sends complete in order anyway), which bounds the buffers
    in flight to one.
    """

    def __init__(self, model, groups: ParallelGroups):
        self.model, self.groups = model, groups
        self.config = model.config
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device  # of the activations received
        self._pending: Optional[PendingSend] = None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, attn_meta):
        out = self.model(input_ids, positions, kv_caches, attn_meta, self.receive(positions.shape[0]))
        if self.groups.is_last_stage:
            return out
        self.send(*out)
        return None

    def receive(self, num_tokens: int) -> Optional[Intermediate]:
        """The previous stage's (hidden, residual) for a step of `num_tokens` tokens; None on the first stage."""
        if self.groups.is_first_stage:
            return None
        return recv_intermediate(self.groups, num_tokens, self.config.hidden_size, self.dtype, self.device)

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Hands this stage's output to the next stage, asynchronously (after this stage's previous send)."""
        self.wait()
        self._pending = send_intermediate(self.groups, hidden, residual, async_op=True)

    def compute_logits(self, hidden: torch.Tensor, gather_all: bool = False,
                       float32: bool = True) -> Optional[torch.Tensor]:
        return self.model.compute_logits(hidden, gather_all, float32)

    def wait(self) -> None:
        """Until this stage's last send has completed."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
