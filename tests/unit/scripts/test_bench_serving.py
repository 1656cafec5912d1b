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


def test_targets_give_every_server_its_ratios_to_the_offline_engine():
    bench = load_script("bench_serving")

    def server(low_itl, sat_tok_s):
        return {"kind": "server", "rates": [dict(rate="1", itl_ms_p50=low_itl, output_tok_s=100.0),
                                            dict(rate="inf", itl_ms_p50=20.0, output_tok_s=sat_tok_s)]}

    servers = {"offline": {"kind": "offline", "saturation": {"rate": "inf", "output_tok_s": 1000.0},
                           "batch1_ms_per_token": 2.0},
               "raylight": server(2.1, 950.0), "raylight-engine_process-false": server(3.0, 400.0),
               "vllm": server(2.4, 800.0)}
    t = bench.targets(servers)
    assert t["saturation_target_met"] and t["low_load_target_met"]
    assert t["servers_vs_offline"]["raylight-engine_process-false"] == {
        "saturation_vs_offline": 0.4, "low_load_itl_p50_vs_engine_step": 1.5}
    assert t["servers_vs_offline"]["vllm"]["saturation_vs_offline"] == 0.8
    assert t["raylight_over_vllm"]["inf"]["output_tok_s"] == 950.0 / 800.0


def test_cpu_seconds_of_server_processes_are_read_by_kind():
    """A child process whose command line names our ingress counts as the ingress; its CPU per request is
    the difference across a rate divided by the requests."""
    import subprocess
    import sys
    import time

    bench = load_script("bench_serving")
    process_cpu_s, cpu_per_request = bench.process_cpu_s, bench.cpu_per_request

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", busy, "OpenAIIngress"])
    try:
        before = process_cpu_s()
        deadline = time.time() + 20
        while True:
            after = process_cpu_s()
            if after.get("ingress", 0.0) - before.get("ingress", 0.0) >= 0.2 or time.time() > deadline:
                break
            time.sleep(0.1)
    finally:
        p.kill()
    per = cpu_per_request(before, after, 10)
    assert per["ingress"] >= 20  # at least 0.2 s over 10 requests
    assert cpu_per_request({"proxy": 1.0}, {"proxy": 1.5}, 5) == {"proxy": 100.0}
