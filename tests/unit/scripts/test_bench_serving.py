"""scripts/bench_serving.py's figures: the engine window between two scrapes of /metrics' step counters
(and the offline engine's from its step log), and each rate's timeline."""

from __future__ import annotations

from raylight.testing.helpers import load_script


def test_two_scrapes_of_the_step_counters_give_a_window():
    bench = load_script("bench_serving")
    names = bench._ENGINE_COUNTERS
    before = {names["steps"]: 40, names["busy_s"]: 0.2, names["rows"]: 400, names["tokens"]: 1000, names["idle_s"]: 1.5}
    after = {names["steps"]: 140, names["busy_s"]: 1.2, names["rows"]: 20400, names["tokens"]: 31000,
             names["idle_s"]: 2.0}
    w = bench.engine_window(before, after)
    assert w == dict(steps=100, busy_s=1.0, idle_s=0.5, mean_step_ms=10.0, mean_rows=200.0, mean_tokens=300.0)
    assert bench.engine_window({}, {}) is None  # a peer server without these counters
    assert bench.step_window([(2, 10, 1, 0.01), (4, 4, 4, 0.03)]) == dict(
        steps=2, busy_s=0.04, mean_step_ms=20.0, mean_rows=3.0, mean_tokens=7.0)


def test_the_timeline_says_when_the_first_token_and_completion_came():
    bench = load_script("bench_serving")
    recs = [dict(sent_wall=100.0, done_wall=106.5, ttft=5.0, error=None),
            dict(sent_wall=100.5, done_wall=107.2, ttft=2.0, error=None),
            dict(sent_wall=100.2, done_wall=None, error="ClientError")]
    tl = bench.timeline(recs, 100.0)
    assert tl == dict(first_token_s=2.5, first_done_s=6.5, last_sent_s=0.5, completions_per_s=[0] * 6 + [1, 1])
