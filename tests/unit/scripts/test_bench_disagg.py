"""scripts/bench_disagg.py's two-device pieces (issue 20), on CPU: the push's comparison with its
baselines, and the baselines themselves (a plain copy, and a plain send/recv over a two-rank gloo group
between two threads standing in for the two engine processes)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from raylight.testing.helpers import load_script


def test_each_push_is_held_against_the_faster_baseline_of_its_size():
    bench = load_script("bench_disagg")
    probe = {"auto": [dict(tokens=1024, bytes=100, gb_s=30.0), dict(tokens=8192, bytes=800, gb_s=10.0)],
             "pairs": [dict(tokens=1024, bytes=100, gb_s=None)]}
    base = dict(device_to_device={"copies": [dict(bytes=100, gb_s=50.0), dict(bytes=800, gb_s=40.0)]},
                send_recv={"transfers": [dict(bytes=100, gb_s=20.0), dict(bytes=800, gb_s=45.0)]})
    rows = bench.compare_pushes(probe, base)
    assert [(r["transport"], r["tokens"], r["baseline_gb_s"]) for r in rows] == [
        ("auto", 1024, 50.0), ("auto", 8192, 45.0), ("pairs", 1024, 50.0)]
    assert rows[0]["fraction"] == 0.6 and rows[0]["at_least_half"]
    assert abs(rows[1]["fraction"] - 10 / 45) < 1e-12 and not rows[1]["at_least_half"]
    assert rows[2]["fraction"] is None and not rows[2]["at_least_half"]  # a push that moved nothing
    skipped = dict(device_to_device={"skipped": "this process sees one GPU"}, send_recv={"transfers": []})
    assert bench.compare_pushes({"auto": probe["auto"][:1]}, skipped)[0]["fraction"] is None


def test_the_baselines_move_every_size_on_cpu():
    from raylight.kvtransfer import pairs

    bench = load_script("bench_disagg")
    engine = SimpleNamespace(device=torch.device("cpu"))
    sizes = [1 << 10, 3 << 20]
    copies = bench.device_to_device(engine, sizes)
    assert [c["bytes"] for c in copies["copies"]] == sizes and all(c["gb_s"] > 0 for c in copies["copies"])
    store = pairs.host_store("127.0.0.1")
    got = {}

    def side(role):
        got[role] = bench.pair_send_recv(engine, role, "127.0.0.1", store.port, sizes)

    threads = [threading.Thread(target=side, args=(role,)) for role in ("prefill", "decode")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got["prefill"] == {"backend": "gloo", "transfers": []}  # the sender reports nothing
    assert [t["bytes"] for t in got["decode"]["transfers"]] == sizes
    assert all(t["gb_s"] > 0 for t in got["decode"]["transfers"])
