"""Rank functions for test_step_channel (spawned processes import them by module name)."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

from raylight.messages import StepInputs
from raylight.workers.step_channel import StepChannel


def make_steps() -> list[StepInputs]:
    rng = np.random.default_rng(0)

    def step(T: int, B: int, W: int, decodes: int, copies=(), spans=(), placeholders=()):
        qsl = np.linspace(0, T, B + 1).astype(np.int64)
        return StepInputs(input_ids=rng.integers(0, 1000, T), positions=rng.integers(0, 500, T), num_decodes=decodes,
                          query_start_loc=qsl, seq_lens=rng.integers(1, 500, B), block_tables=rng.integers(0, 99, (B, W)),
                          slot_mapping=rng.integers(0, 9999, T), logits_rows=qsl[1:] - 1, kv_copies=list(copies),
                          prompt_logit_spans=list(spans), placeholder_pos=np.array(placeholders, dtype=np.int64))

    return [step(4, 4, 3, 4, placeholders=[0, 2, 3]),  # a decode step, run ahead on three placeholder tokens
            step(300, 3, 40, 0, copies=[(5, 7), (6, 8)], spans=[(0, 256), (256, 299)]),  # over capacity: 2 broadcasts
            step(0, 0, 0, 0)]  # degenerate but legal


def exchange(rank: int, world_size: int, capacity: int) -> list:
    channel = StepChannel(dist.group.WORLD, rank, capacity)
    if rank == 0:
        for s in make_steps():
            channel.send(s)
        channel.send_stop()
        return []
    got = []
    while (s := channel.receive()) is not None:
        got.append(s)
    return got


def reports(rank: int, world_size: int) -> list:
    """Rank 0 sends steps with report requests between them; the others answer with what their
    report callback says (their rank, the steps they received, a load vector whose length varies)."""
    from raylight.messages import RankReport

    received = [0]
    channel = StepChannel(dist.group.WORLD, rank, 256, report=lambda: RankReport(
        rank, received[0], np.arange(rank * 3, dtype=np.int64), [100 + rank] * rank))
    if rank == 0:
        gathered = []
        for s in make_steps():
            channel.send(s)
            gathered.append(channel.gather_reports(RankReport(0, 99)))
        channel.send_stop()
        return [[(r.rank, r.num_steps, r.expert_load.tolist(), r.kv_transfers_done) for r in g] for g in gathered]
    while channel.receive() is not None:
        received[0] += 1
    return received[0]
