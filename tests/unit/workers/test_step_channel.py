"""Rank 0's step inputs arrive intact at another rank: one fixed-size broadcast, or two when the
step outgrows it; then the stop message ends the receiver's loop. Reports travel back on request."""

from __future__ import annotations

import numpy as np

from raylight.testing.parallel_ranks import run_ranks
from raylight.testing import channel_ranks


def test_steps_round_trip_through_the_channel():
    sent = channel_ranks.make_steps()
    _, got = run_ranks(channel_ranks.exchange, 2, 256)  # 256 elements: the second step needs a second broadcast
    assert len(got) == len(sent)
    for a, b in zip(sent, got):
        for field in ("input_ids", "positions", "query_start_loc", "seq_lens", "block_tables", "slot_mapping",
                      "logits_rows", "placeholder_pos"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.shape == y.shape and np.array_equal(x, y), field
        assert (a.num_decodes, a.kv_copies, a.prompt_logit_spans) == (b.num_decodes, b.kv_copies,
                                                                      b.prompt_logit_spans)


def test_reports_come_back_in_rank_order_between_steps():
    steps = len(channel_ranks.make_steps())
    results = run_ranks(channel_ranks.reports, 3)
    gathered = results[0]
    assert len(gathered) == steps
    for i, g in enumerate(gathered):
        # Each rank answers after the step sent before the request: it has received i + 1 steps.
        assert g[0] == (0, 99, [], [])
        assert g[1] == (1, i + 1, [0, 1, 2], [101])
        assert g[2] == (2, i + 1, [0, 1, 2, 3, 4, 5], [102, 102])
    assert results[1:] == [steps, steps]
