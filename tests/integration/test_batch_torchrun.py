"""Offline batch jobs under torchrun (`torchrun --nproc-per-node 2 -m raylight.batch ...`), on CPU with SmolLM2.

* Two ranks (two engines) over 40 requests (chat and completions, greedy, a few tokens each) plus two bad
  lines write the same results as one process, one row per line in the input's order; the bad lines get
  error rows (an invalid JSON line keyed by its line number, an invalid body a 400 under its custom_id).
* A job killed midway (SIGKILL to torchrun and its ranks, once some rows exist) and run again completes the
  rest: the rerun skips what the first run wrote, and the output has every line once, equal to the
  one-process run's.
* `--tensor-parallel-size 2` over two ranks runs one engine of two ranks, with the same rows.
About 100 s on 2 cores (five jobs, each starting its engines).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch.distributed.run")

NUM_REQUESTS = 40
ENGINE = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", str(2**26)]
VOLATILE = ("id", "created", "request_id")  # fresh per run


def write_requests(path) -> list[str]:
    """40 requests and two bad lines; returns the custom_ids in input order (None for the invalid JSON)."""
    lines, ids = [], []
    for i in range(NUM_REQUESTS):
        max_tokens = 3 + i % 6  # rows finish at different steps
        if i % 2:
            body = {"model": "m", "prompt": f"Fact number {i}:", "max_tokens": max_tokens, "temperature": 0}
            url = "/v1/completions"
        else:
            body = {"model": "m", "messages": [{"role": "user", "content": f"Name a color, {i}."}],
                    "max_tokens": max_tokens, "temperature": 0}
            url = "/v1/chat/completions"
        lines.append(json.dumps({"custom_id": f"req-{i:02d}", "method": "POST", "url": url, "body": body}))
        ids.append(f"req-{i:02d}")
        if i == 10:
            lines.append('{"custom_id": "broken", "body": ')  # not JSON: keyed by its line number
            ids.append(None)
        if i == 20:
            lines.append(json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"messages": [], "max_tokens": 4}}))
            ids.append("bad-body")
    path.write_text("\n".join(lines) + "\n")
    return ids


def torchrun(*args: str) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "raylight.batch", *args]


def batch_args(inp, out, model, *extra) -> list[str]:
    return ["-i", str(inp), "-o", str(out), "--model", model, *ENGINE, *extra]


def run(cmd, log_path, timeout=240) -> str:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    text = open(log_path).read()
    assert proc.returncode == 0, text[-4000:]
    return text


def descendants(pid: int) -> list[int]:
    """The processes started by `pid`, their children and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def stable(row: dict) -> dict:
    """A row without what differs between runs (ids, timestamps, cached prompt tokens)."""
    row = {k: v for k, v in row.items() if k not in VOLATILE}
    if row.get("response"):
        resp = {k: v for k, v in row["response"].items() if k not in VOLATILE}
        if isinstance(resp.get("body"), dict):
            resp["body"] = {k: v for k, v in resp["body"].items() if k not in VOLATILE}
            if "usage" in resp["body"]:  # prefix-cache hits depend on which engine ran which lines before
                resp["body"]["usage"] = {k: v for k, v in resp["body"]["usage"].items()
                                         if k != "prompt_tokens_details"}
        row["response"] = resp
    return row


@pytest.fixture(scope="module")
def job(tmp_path_factory, smollm2_dir):
    d = tmp_path_factory.mktemp("batch")
    ids = write_requests(d / "requests.jsonl")
    run([sys.executable, "-m", "raylight.batch", *batch_args(d / "requests.jsonl", d / "single.jsonl", smollm2_dir)],
        d / "single.log")
    return d, ids, read_rows(d / "single.jsonl")


def check_single(rows, ids):
    assert [r["custom_id"] for r in rows] == ids
    by_id = {r["custom_id"]: r for r in rows}
    for cid in ids:
        if cid and cid.startswith("req-"):
            r = by_id[cid]
            assert r["error"] is None and r["response"]["status_code"] == 200, r
            body = r["response"]["body"]
            assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"] in ("stop", "length")
    broken = rows[ids.index(None)]
    assert broken["response"] is None and broken["error"]["code"] == "invalid_json" and broken["line"] == 12
    bad = by_id["bad-body"]
    assert bad["response"]["status_code"] == 400 and bad["error"]["message"].startswith("messages")
    assert bad["response"]["body"]["error"]["param"] == "messages"


def test_two_ranks_equal_one_process(job, smollm2_dir):
    d, ids, single = job
    check_single(single, ids)
    log = run(torchrun(*batch_args(d / "requests.jsonl", d / "dp.jsonl", smollm2_dir)), d / "dp.log")
    assert "on 2 engine(s)" in log, log[-3000:]
    assert f"{len(ids)}/{len(ids)}" in log  # rank 0's bar counted both ranks' rows
    dp = read_rows(d / "dp.jsonl")
    assert [stable(r) for r in dp] == [stable(r) for r in single]
    assert not list(d.glob("dp.jsonl.part-*"))  # merged and removed


def test_killed_midway_then_rerun_completes_without_duplicates(job, smollm2_dir):
    d, ids, single = job
    out = d / "resume.jsonl"
    # Small windows, so rows arrive a few at a time and the kill lands in the middle.
    slow = batch_args(d / "requests.jsonl", out, smollm2_dir, "--max-num-seqs", "2", "--max-lines-in-flight", "2",
                      "--progress-interval-s", "0.2")
    log = open(d / "killed.log", "w")
    proc = subprocess.Popen(torchrun(*slow), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            done = sum(1 for p in d.glob("resume.jsonl.part-*") for line in open(p) if '"status_code": 200' in line)
            if done >= 8:
                break
            assert proc.poll() is None, open(d / "killed.log").read()[-3000:]
            assert time.monotonic() < deadline, "no rows within 180 s"
            time.sleep(0.05)
    finally:
        # torchrun and both ranks at once, as a lost machine (torchrun starts each rank in a session of its
        # own, so killing torchrun's process group would leave the ranks running).
        victims = [proc.pid, *descendants(proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        log.close()
    assert not out.exists()  # killed before the merge
    partial = [json.loads(line) for p in d.glob("resume.jsonl.part-*") for line in open(p) if line.endswith("\n")]
    assert 8 <= len(partial) < len(ids), len(partial)

    text = run(torchrun(*batch_args(d / "requests.jsonl", out, smollm2_dir)), d / "rerun.log")
    already = int(text.split(" already done")[0].rsplit(",", 1)[1])
    assert already == len(partial), text[-3000:]  # the complete rows are kept; a torn last row is redone
    rows = read_rows(out)
    assert [r["custom_id"] for r in rows] == ids  # every line once, in input order
    assert [stable(r) for r in rows] == [stable(r) for r in single]
    assert not list(d.glob("resume.jsonl.part-*"))

    # A third run finds everything done and changes nothing.
    text = run(torchrun(*batch_args(d / "requests.jsonl", out, smollm2_dir)), d / "third.log")
    assert f"{len(ids)} already done, 0 to run" in text
    assert [stable(r) for r in read_rows(out)] == [stable(r) for r in single]


def test_tensor_parallel_groups(job, smollm2_dir, tmp_path):
    """--tensor-parallel-size 2 under two ranks: one engine of two ranks (rank 0 leads, its engine starts
    its second rank itself; torchrun's rank 1 only takes part in the start). The first 12 lines (the last
    one not JSON) give the one-process rows."""
    d, ids, single = job
    inp = tmp_path / "first12.jsonl"
    inp.write_text("".join((d / "requests.jsonl").read_text().splitlines(keepends=True)[:12]))
    out = tmp_path / "tp.jsonl"
    log = run(torchrun(*batch_args(inp, out, smollm2_dir, "--tensor-parallel-size", "2")), tmp_path / "tp.log")
    assert "on 1 engine(s), 2 rank(s) each" in log, log[-3000:]
    rows = read_rows(out)
    want = [stable(r) for r in single[:12]]
    got = [stable(r) for r in rows]
    assert got == want
