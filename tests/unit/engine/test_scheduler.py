"""Bookkeeping tests for engine/scheduler.py, driven by a fake model (CPU only, no weights).

The fake model mimics workers/model_runner.py: it writes each scheduled token's "KV" into the
slots its block table maps it to, checks every scheduled request can read back its whole prefix
from its block table (so a wrong prefix hit, a premature eviction or a stale block table shows
up as wrong content), and samples one token for each request that reached the end of its known
tokens (num_computed_tokens + scheduled == num_tokens).
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from typing import Optional

import pytest

from raylight.sampling_params import SamplingParams
from raylight.engine.kv_cache.manager import KVCacheManager
from raylight.workers.model_runner import ModelRunnerOutput, SampledToken
from raylight.engine.request import Request, RequestStatus
from raylight.engine.scheduler import Scheduler, SchedulerOutput

EOS = 2
STOP = 3


def default_token(request_id: str, position: int) -> int:
    """The 'model output' for a request at a position: deterministic, never EOS or STOP."""
    return 1000 + zlib.crc32(f"{request_id}:{position}".encode()) % 1000


def expected_output(request_id: str, prompt_len: int, n: int) -> list[int]:
    return [default_token(request_id, prompt_len + i) for i in range(n)]


class FakeModel:
    def __init__(self, sched: Scheduler, scripts: Optional[dict[str, list[int]]] = None):
        self.sched = sched
        self.kv = sched.kv
        self.bs = sched.kv.block_size
        self.scripts = scripts or {}
        self.slots: dict[int, int] = {}  # slot -> fingerprint of the whole prefix ending at that token
        self.num_calls = 0

    @staticmethod
    def fingerprints(tokens: list[int]) -> list[int]:
        out, acc = [], 0
        for t in tokens:
            acc = hash((acc, t))
            out.append(acc)
        return out

    def slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.bs] * self.bs + pos % self.bs

    def next_token(self, req: Request) -> int:
        script = self.scripts.get(req.request_id)
        i = len(req.output_token_ids)
        if script is not None and i < len(script):
            return script[i]
        return default_token(req.request_id, req.num_tokens)

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        self.num_calls += 1
        fps = {}
        # every layer writes all new K/V of the step first, reading only what the scheduler's output
        # carries (as the runner does): the block table, the first position, the new token ids ...
        for i, (req, n) in enumerate(zip(out.requests, out.num_scheduled_tokens)):
            ids = self.kv.block_ids(req.request_id)
            row = out.block_tables[i].tolist()
            # the request's blocks, then 0s up to the step's longest table
            assert row == ids + [0] * (out.block_tables.shape[1] - len(ids)) and out.request_ids[i] == req.request_id
            table = row[: len(ids)]
            c = out.num_computed_before[i]
            assert c == req.num_computed_tokens and len(table) * self.bs >= c + n, f"{req.request_id}: table too short"
            if not out.uses_pending_token[i]:
                assert out.new_token_ids[i] == req.all_token_ids[c : c + n]
            fp = fps[req.request_id] = self.fingerprints(req.all_token_ids[: c + n])
            for p in range(c, c + n):
                self.slots[self.slot(table, p)] = fp[p]
        # ... then attention reads the whole prefix through the block table
        for req, n in zip(out.requests, out.num_scheduled_tokens):
            table = self.kv.block_ids(req.request_id)
            fp = fps[req.request_id]
            for p in range(req.num_computed_tokens + n):
                assert self.slots.get(self.slot(table, p)) == fp[p], (
                    f"{req.request_id}: wrong KV at position {p} (block {table[p // self.bs]})")
        return {
            req.request_id: self.next_token(req)
            for req, n in zip(out.requests, out.num_scheduled_tokens)
            if req.num_computed_tokens + n == req.num_tokens
        }


def as_runner_output(sampled: dict[str, int]) -> ModelRunnerOutput:
    return ModelRunnerOutput(sampled={rid: [SampledToken(t)] for rid, t in sampled.items()})


def make_sched(num_blocks=64, block_size=4, budget=64, max_seqs=16, max_model_len=4096, caching=True) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size, caching), budget, max_seqs, max_model_len)


def make_req(rid: str, prompt: list[int] | int, max_tokens: int = 4, *, eos=(), stop=(), min_tokens=0,
             ignore_eos=False, salt=None) -> Request:
    if isinstance(prompt, int):
        prompt = [100 + (zlib.crc32(rid.encode()) + i) % 800 for i in range(prompt)]
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=ignore_eos,
                            stop_token_ids=list(stop))
    return Request(rid, list(prompt), params, max_tokens, eos_token_ids=frozenset(eos), cache_salt=salt)


def check_blocks(sched: Scheduler) -> None:
    """Every block's ref count equals the number of running requests whose table holds it;
    waiting requests hold nothing; free blocks are exactly those with no reference."""
    kv = sched.kv
    counts: Counter[int] = Counter()
    for r in sched.running:
        ids = kv.block_ids(r.request_id)
        assert ids == [b.block_id for b in kv.req_blocks[r.request_id]]
        assert len(set(ids)) == len(ids)
        counts.update(ids)
    assert set(kv.req_blocks) == {r.request_id for r in sched.running}
    for r in sched.waiting:
        assert r.request_id not in kv.block_table.row_of
    for b in kv.pool.blocks:
        assert b.ref_cnt == counts[b.block_id], b
    assert kv.num_free_blocks == sum(1 for b in kv.pool.blocks if b.ref_cnt == 0)


def check_schedule(sched: Scheduler, out: SchedulerOutput, prev_running: list[Request],
                   prev_waiting: list[Request]) -> None:
    assert len(out.requests) == len(out.num_scheduled_tokens)
    assert out.total_num_tokens <= sched.max_num_batched_tokens
    assert len({r.request_id for r in out.requests}) == len(out.requests)
    assert len(sched.running) <= sched.max_num_seqs
    for r, n in zip(out.requests, out.num_scheduled_tokens):
        assert n >= 1
        assert n <= r.num_tokens - r.num_computed_tokens
        assert r in sched.running and r.status == RequestStatus.RUNNING
    # running requests first, in their running order; then admissions in arrival order
    was_running = [r in prev_running for r in out.requests]
    k = was_running.count(True)
    assert all(was_running[:k]) and not any(was_running[k:]), "a waiting request went before a running one"
    assert out.requests[:k] == [r for r in prev_running if r in out.requests[:k]]
    admitted = out.requests[k:]
    assert admitted == prev_waiting[: len(admitted)], "waiting requests admitted out of order"
    for v in out.preempted:
        assert v.status == RequestStatus.PREEMPTED
        assert v.num_computed_tokens == 0
        assert v in sched.waiting and v not in sched.running
        assert v not in out.requests
    if out.preempted:
        assert not admitted, "admitted a waiting request in a step that preempted"
    check_blocks(sched)


def step(sched: Scheduler, model: FakeModel) -> SchedulerOutput:
    """One engine step, as engine/llm_engine.py runs it."""
    prev_running, prev_waiting = list(sched.running), list(sched.waiting)
    out = sched.schedule()
    check_schedule(sched, out, prev_running, prev_waiting)
    if not out.requests:
        for req in sched.unschedulable():
            sched.finish(req, RequestStatus.FINISHED_LENGTH)
        check_blocks(sched)
        return out
    sampled = model.execute(out)
    changed = [r for r, _ in sched.update(out, as_runner_output(sampled))]
    assert {r.request_id for r in changed} == set(sampled)
    for r in changed:
        if r.is_finished:
            assert r not in sched.running and r not in sched.waiting
            assert r.request_id not in sched.requests
    check_blocks(sched)
    return out


def run_all(sched: Scheduler, model: FakeModel, max_steps: int = 2000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        assert len(outs) < max_steps, "scheduler made no progress"
        outs.append(step(sched, model))
    assert_no_leaks(sched)
    return outs


def assert_no_leaks(sched: Scheduler) -> None:
    kv = sched.kv
    assert not sched.running and not sched.waiting
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.req_blocks == {} and kv.block_table.row_of == {} and kv.num_cached_blocks == {}
    assert sched.requests == {}


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {r.request_id: n for r, n in zip(out.requests, out.num_scheduled_tokens)}


# --------------------------------------------------------------------------- token budget, chunking


def test_chunked_prefill_splits_long_prompt_over_steps():
    sched = make_sched(budget=16)
    model = FakeModel(sched)
    req = make_req("a", 50, max_tokens=3)
    sched.add_request(req)
    per_step, n_out = [], []
    while sched.has_unfinished():
        out = step(sched, model)
        per_step.append(scheduled(out)["a"])
        n_out.append(len(req.output_token_ids))
    assert per_step == [16, 16, 16, 2, 1, 1]
    assert n_out == [0, 0, 0, 1, 2, 3]  # no token is sampled from a partial prompt
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == expected_output("a", 50, 3)
    assert_no_leaks(sched)


def test_budget_never_exceeded_and_fully_used_under_load():
    sched = make_sched(num_blocks=256, budget=10)
    model = FakeModel(sched)
    reqs = [make_req(f"r{i}", 3 + 7 * i, max_tokens=5) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    outs = run_all(sched, model)
    totals = [o.total_num_tokens for o in outs]
    assert max(totals) == 10
    assert all(t <= 10 for t in totals)
    # while prompts remain there is always demand beyond the budget: the first steps use all of it
    assert totals[:5] == [10] * 5
    assert sum(totals) == sum(r.num_prompt_tokens + 5 - 1 for r in reqs)  # last token never computed
    for r in reqs:
        assert r.output_token_ids == expected_output(r.request_id, r.num_prompt_tokens, 5)


def test_budget_of_one_token():
    sched = make_sched(budget=1)
    model = FakeModel(sched)
    a, b = make_req("a", 3, max_tokens=2), make_req("b", 2, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    outs = run_all(sched, model)
    assert all(o.total_num_tokens == 1 and len(o.requests) == 1 for o in outs)
    assert len(outs) == (3 + 1) + (2 + 1)
    assert a.output_token_ids == expected_output("a", 3, 2)
    assert b.output_token_ids == expected_output("b", 2, 2)


# --------------------------------------------------------------------------- ordering, seqs cap, mixing


def test_running_requests_are_scheduled_before_waiting_ones():
    sched = make_sched(budget=16)
    model = FakeModel(sched)
    a = make_req("a", 40, max_tokens=2)
    sched.add_request(a)
    assert scheduled(step(sched, model)) == {"a": 16}
    b = make_req("b", 8, max_tokens=2)
    sched.add_request(b)
    out = step(sched, model)
    assert out.requests == [a] and out.num_scheduled_tokens == [16]  # a eats the whole budget
    assert b.status == RequestStatus.WAITING and list(sched.waiting) == [b]
    out = step(sched, model)
    assert out.requests == [a, b] and out.num_scheduled_tokens == [8, 8]
    out = step(sched, model)  # both decode; a (older) still first
    assert out.requests == [a, b] and out.num_scheduled_tokens == [1, 1]
    assert not sched.has_unfinished()
    assert_no_leaks(sched)


def test_waiting_requests_admitted_in_arrival_order():
    sched = make_sched(budget=12)
    model = FakeModel(sched)
    reqs = [make_req(f"r{i}", 5, max_tokens=1) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out = step(sched, model)
    assert out.requests == reqs[:3] and out.num_scheduled_tokens == [5, 5, 2]
    run_all(sched, model)
    assert all(len(r.output_token_ids) == 1 for r in reqs)


def test_max_num_seqs_caps_running_set():
    sched = make_sched(budget=64, max_seqs=2)
    model = FakeModel(sched)
    reqs = [make_req(f"r{i}", 5, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out = step(sched, model)
    assert out.requests == reqs[:2]
    assert len(sched.running) == 2 and list(sched.waiting) == reqs[2:]
    outs = [out]
    max_running = 2
    while sched.has_unfinished():
        outs.append(step(sched, model))
        assert len(outs[-1].requests) <= 2
        max_running = max(max_running, len(sched.running))
    assert max_running == 2
    # r2 is admitted only once r0 and r1 have finished (3 tokens each: steps 1..3)
    first_step = {r.request_id: next(i for i, o in enumerate(outs) if r in o.requests) for r in reqs}
    assert first_step == {"r0": 0, "r1": 0, "r2": 3, "r3": 3, "r4": 6}
    for r in reqs:
        assert r.output_token_ids == expected_output(r.request_id, 5, 3)
    assert_no_leaks(sched)


def test_mixed_prefill_and_decode_in_one_step():
    sched = make_sched(budget=64)
    model = FakeModel(sched)
    a = make_req("a", 6, max_tokens=4)
    sched.add_request(a)
    step(sched, model)
    assert len(a.output_token_ids) == 1
    b = make_req("b", 10, max_tokens=2)
    c = make_req("c", 70, max_tokens=2)  # only part of it fits
    sched.add_request(b)
    sched.add_request(c)
    out = step(sched, model)
    assert out.requests == [a, b, c]
    assert out.num_scheduled_tokens == [1, 10, 64 - 1 - 10]
    assert len(a.output_token_ids) == 2  # decoded
    assert len(b.output_token_ids) == 1  # prefilled and sampled its first token
    assert len(c.output_token_ids) == 0  # partial prefill: no token
    assert c.num_computed_tokens == 53
    run_all(sched, model)
    assert a.output_token_ids == expected_output("a", 6, 4)
    assert b.output_token_ids == expected_output("b", 10, 2)
    assert c.output_token_ids == expected_output("c", 70, 2)


# --------------------------------------------------------------------------- preemption


def test_preemption_of_newest_when_blocks_run_out():
    # bs 4, 6 blocks; three 8-token prompts fill the pool exactly
    sched = make_sched(num_blocks=6, block_size=4, budget=64, max_seqs=3)
    model = FakeModel(sched)
    a, b, c = (make_req(x, 8, max_tokens=6) for x in "abc")
    d = make_req("d", 4, max_tokens=2)  # waits: max_num_seqs=3
    for r in (a, b, c, d):
        sched.add_request(r)
    out = step(sched, model)
    assert out.requests == [a, b, c] and sched.kv.num_free_blocks == 0
    assert list(sched.waiting) == [d]
    # every request now needs a 3rd block: a takes one of c's, b the other
    out = step(sched, model)
    assert out.preempted == [c]
    assert out.requests == [a, b] and out.num_scheduled_tokens == [1, 1]
    assert sched.stats.preemptions == 1
    assert c.status == RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0
    assert list(sched.waiting) == [c, d]  # front of the queue, ahead of the older waiting request
    assert sched.running == [a, b]
    assert "c" not in sched.kv.req_blocks
    assert len(c.output_token_ids) == 1  # its sampled token is kept and will be recomputed
    run_all(sched, model)
    for r in (a, b, c):
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_output(r.request_id, 8, 6)
    assert d.output_token_ids == expected_output("d", 4, 2)


def test_preempted_request_completes_like_an_unpreempted_run():
    def run(num_blocks):
        sched = make_sched(num_blocks=num_blocks, block_size=4, budget=64)
        model = FakeModel(sched)
        reqs = [make_req("a", 8, max_tokens=8), make_req("b", 8, max_tokens=8)]
        for r in reqs:
            sched.add_request(r)
        run_all(sched, model)
        return sched, reqs

    big, (a0, b0) = run(64)
    assert big.stats.preemptions == 0
    small, (a1, b1) = run(5)  # 2 + 2 blocks for the prompts, 4 + 4 needed in the end
    assert small.stats.preemptions >= 1
    assert b1.num_computed_tokens < b1.num_tokens
    assert len(a1.output_token_ids) == len(a0.output_token_ids) == 8
    assert len(b1.output_token_ids) == len(b0.output_token_ids) == 8
    assert a1.output_token_ids == a0.output_token_ids
    assert b1.output_token_ids == b0.output_token_ids
    assert b1.status == RequestStatus.FINISHED_LENGTH


def test_preempted_request_resumes_with_all_its_tokens():
    sched = make_sched(num_blocks=5, block_size=4, budget=64)
    model = FakeModel(sched)
    a, b = make_req("a", 8, max_tokens=8), make_req("b", 8, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    b_table = list(sched.kv.block_ids("b"))
    out = step(sched, model)
    assert out.preempted == [b]
    assert b.num_computed_tokens == 0 and b.num_tokens == 9
    # run until b is scheduled again: it recomputes all 9 known tokens (minus prefix hits), samples once
    while b not in (out := step(sched, model)).requests:
        pass
    n = scheduled(out)["b"]
    assert b.num_cached_tokens == 0  # first-admission statistic is not overwritten
    # b's blocks were freed tail first, so a's growth evicted b's 2nd block and b's 1st block
    # is still a prefix hit: 4 tokens reused, 5 recomputed
    assert n == 5
    assert sched.kv.block_ids("b")[0] == b_table[0]
    assert b.num_computed_tokens == 9
    assert len(b.output_token_ids) == 2
    run_all(sched, model)
    assert b.output_token_ids == expected_output("b", 8, 8)
    assert sched.stats.prefix_cache_hit_tokens == 0  # resumptions do not count as prefix hits


def test_preemption_of_several_victims_keeps_their_order():
    """Victims go newest first (here the last one is the request being scheduled itself), and
    the waiting queue ends up with them in their original order, ahead of everything else."""
    sched = make_sched(num_blocks=8, block_size=4, budget=64, max_seqs=4)
    model = FakeModel(sched)
    a, b, c, d = (make_req(x, 8, max_tokens=5) for x in "abcd")
    e = make_req("e", 2, max_tokens=1)  # waits: max_num_seqs=4
    for r in (a, b, c, d, e):
        sched.add_request(r)
    out = step(sched, model)
    assert out.requests == [a, b, c, d] and sched.kv.num_free_blocks == 0
    # each needs a 3rd block: a preempts d (2 blocks back), b takes the other, c preempts itself
    out = step(sched, model)
    assert out.preempted == [d, c]
    assert out.requests == [a, b]
    assert sched.stats.preemptions == 2
    assert list(sched.waiting) == [c, d, e]
    assert sched.running == [a, b]
    assert c.num_computed_tokens == d.num_computed_tokens == 0
    run_all(sched, model)
    for r in (a, b, c, d):
        assert r.output_token_ids == expected_output(r.request_id, 8, 5)
    assert e.output_token_ids == expected_output("e", 2, 1)


def test_resumption_is_not_counted_as_a_new_prefix_query():
    sched = make_sched(num_blocks=5, block_size=4, budget=64)
    model = FakeModel(sched)
    prompt_b = list(range(200, 208))
    sched.add_request(make_req("p", prompt_b, max_tokens=1))
    run_all(sched, model)
    a, b = make_req("a", 8, max_tokens=8), make_req("b", prompt_b, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    out = step(sched, model)
    assert scheduled(out) == {"a": 8, "b": 4}  # b's first block is p's
    assert b.num_cached_tokens == 4
    out = step(sched, model)
    assert out.preempted == [b]
    run_all(sched, model)
    assert sched.stats.preemptions == 1
    assert sched.stats.prefix_cache_queries == 8 + 8 + 8
    assert sched.stats.prefix_cache_hit_tokens == 4
    assert b.num_cached_tokens == 4
    assert b.output_token_ids == expected_output("b", 8, 8)


def test_different_salts_never_share_blocks_concurrently():
    sched = make_sched(num_blocks=64, block_size=4, budget=64)
    model = FakeModel(sched)
    prompt = list(range(100, 121))
    a = make_req("a", prompt, max_tokens=2, salt="t1")
    b = make_req("b", prompt, max_tokens=2, salt="t2")
    c = make_req("c", prompt, max_tokens=2, salt="t1")
    for r in (a, b, c):
        sched.add_request(r)
    out = step(sched, model)
    assert scheduled(out) == {"a": 21, "b": 21, "c": 1}
    ta, tb, tc = (set(sched.kv.block_ids(x)) for x in "abc")
    assert not ta & tb and not tb & tc
    assert len(ta & tc) == 5
    run_all(sched, model)
    assert sched.stats.prefix_cache_hit_tokens == 20


def test_has_unfinished():
    sched = make_sched()
    model = FakeModel(sched)
    assert not sched.has_unfinished()
    sched.add_request(make_req("a", 3, max_tokens=1))
    assert sched.has_unfinished()
    step(sched, model)
    assert not sched.has_unfinished()
    assert_no_leaks(sched)


def test_request_that_must_preempt_itself():
    """The only running request that can't grow is preempted itself, and nothing else runs
    that step; with a waiting request behind it nothing is admitted either."""
    sched = make_sched(num_blocks=4, block_size=4, budget=64, max_seqs=1)
    model = FakeModel(sched)
    a = make_req("a", 16, max_tokens=3)  # 16 tokens = 4 blocks; the 17th needs a 5th
    b = make_req("b", 2, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    assert a.num_tokens == 17
    prev_running, prev_waiting = list(sched.running), list(sched.waiting)
    out = sched.schedule()
    check_schedule(sched, out, prev_running, prev_waiting)
    assert out.requests == [] and out.preempted == [a]
    assert list(sched.waiting) == [a, b]  # b was not admitted in the step that preempted
    assert sched.kv.num_free_blocks == 4
    assert sched.unschedulable() == [a]
    # the engine ends it; b then runs normally
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    run_all(sched, model)
    assert len(a.output_token_ids) == 1
    assert b.output_token_ids == expected_output("b", 2, 1)


# --------------------------------------------------------------------------- prefix cache


def test_prefix_cache_hits_for_second_identical_request():
    sched = make_sched(num_blocks=64, block_size=4, budget=64)
    model = FakeModel(sched)
    prompt = list(range(100, 141))  # 41 tokens: 10 full blocks + 1
    a = make_req("a", prompt, max_tokens=3)
    sched.add_request(a)
    run_all(sched, model)
    assert sched.stats.prefix_cache_hit_tokens == 0
    assert sched.stats.prefix_cache_queries == 41
    b = make_req("b", prompt, max_tokens=3)
    sched.add_request(b)
    out = step(sched, model)
    assert scheduled(out) == {"b": 1}  # 40 tokens hit, only the last is computed
    assert b.num_cached_tokens == 40
    assert sched.stats.prefix_cache_hit_tokens == 40
    assert sched.stats.prefix_cache_queries == 82
    run_all(sched, model)
    assert b.output_token_ids == expected_output("b", 41, 3)


def test_prefix_cache_exact_block_multiple_prompt():
    sched = make_sched(num_blocks=64, block_size=4, budget=64)
    model = FakeModel(sched)
    prompt = list(range(100, 116))  # exactly 4 full blocks
    sched.add_request(make_req("a", prompt, max_tokens=2))
    run_all(sched, model)
    b = make_req("b", prompt, max_tokens=2)
    sched.add_request(b)
    out = step(sched, model)
    assert scheduled(out) == {"b": 4}  # at most 3 blocks hit: the last block is recomputed
    assert sched.stats.prefix_cache_hit_tokens == 12
    run_all(sched, model)


def test_prefix_cache_hit_within_the_same_step():
    sched = make_sched(num_blocks=64, block_size=4, budget=64)
    model = FakeModel(sched)
    prompt = list(range(100, 121))  # 21 tokens: 5 full blocks
    a, b = make_req("a", prompt, max_tokens=2), make_req("b", prompt, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out = step(sched, model)
    # a's blocks are registered when allocated; b shares them and reads them after a writes them
    assert scheduled(out) == {"a": 21, "b": 1}
    assert sched.kv.block_ids("b")[:5] == sched.kv.block_ids("a")[:5]
    assert sched.stats.prefix_cache_hit_tokens == 20
    run_all(sched, model)


def test_partial_prefix_hit_and_salt_isolation():
    sched = make_sched(num_blocks=64, block_size=4, budget=64)
    model = FakeModel(sched)
    shared = list(range(500, 512))  # 3 blocks
    sched.add_request(make_req("a", shared + [1, 2, 3, 4, 5], max_tokens=2))
    run_all(sched, model)
    sched.add_request(make_req("b", shared + [9, 9], max_tokens=2))
    run_all(sched, model)
    assert sched.stats.prefix_cache_hit_tokens == 12
    sched.add_request(make_req("c", shared + [9, 9], max_tokens=2, salt="other-tenant"))
    run_all(sched, model)
    assert sched.stats.prefix_cache_hit_tokens == 12  # a salted request sees nothing unsalted
    sched.add_request(make_req("d", shared + [7, 7], max_tokens=2, salt="other-tenant"))
    run_all(sched, model)
    assert sched.stats.prefix_cache_hit_tokens == 24  # but sees what its own salt cached


def test_prefix_cache_disabled():
    sched = make_sched(num_blocks=64, block_size=4, budget=64, caching=False)
    model = FakeModel(sched)
    prompt = list(range(100, 141))
    for rid in ("a", "b"):
        sched.add_request(make_req(rid, prompt, max_tokens=2))
        run_all(sched, model)
    assert sched.stats.prefix_cache_hit_tokens == 0
    assert sched.stats.prefix_cache_queries == 82


def test_prefix_cache_with_concurrent_sharers_and_eviction_pressure():
    """Many requests share a system prompt in a tight pool: content must always be right
    (checked by the fake model) and nothing may leak."""
    sched = make_sched(num_blocks=14, block_size=4, budget=24, max_seqs=4)
    model = FakeModel(sched)
    system = list(range(300, 320))  # 5 blocks
    reqs = [make_req(f"r{i}", system + [i, i + 1, i + 2], max_tokens=6) for i in range(8)]
    for r in reqs:
        sched.add_request(r)
    run_all(sched, model)
    assert sched.stats.prefix_cache_hit_tokens >= 20
    for r in reqs:
        assert r.output_token_ids == expected_output(r.request_id, 23, 6)


# --------------------------------------------------------------------------- abort


def test_abort_running_request_frees_its_blocks():
    sched = make_sched(num_blocks=16, block_size=4)
    model = FakeModel(sched)
    a, b = make_req("a", 10, max_tokens=20), make_req("b", 6, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    step(sched, model)
    held_b = len(sched.kv.block_ids("b"))
    free_before = sched.kv.num_free_blocks
    aborted = sched.abort(["a"])
    assert aborted == [a]
    assert a.status == RequestStatus.FINISHED_ABORTED and a.is_finished
    assert sched.kv.num_free_blocks == 16 - held_b == free_before + 3
    assert a not in sched.running and "a" not in sched.requests
    assert sched.abort(["a"]) == []  # already gone
    assert sched.abort(["nope"]) == []
    check_blocks(sched)
    run_all(sched, model)
    assert len(b.output_token_ids) == 20


def test_abort_waiting_and_preempted_requests():
    sched = make_sched(num_blocks=5, block_size=4, max_seqs=2)
    model = FakeModel(sched)
    a, b, c = make_req("a", 8, max_tokens=8), make_req("b", 8, max_tokens=8), make_req("c", 3, max_tokens=2)
    for r in (a, b, c):
        sched.add_request(r)
    step(sched, model)
    out = step(sched, model)
    assert out.preempted == [b]
    assert list(sched.waiting) == [b, c]
    assert [r.request_id for r in sched.abort(["b", "c"])] == ["b", "c"]
    assert not sched.waiting
    assert b.status == c.status == RequestStatus.FINISHED_ABORTED
    run_all(sched, model)
    assert len(a.output_token_ids) == 8
    assert len(c.output_token_ids) == 0


def test_abort_between_schedule_and_update():
    sched = make_sched(num_blocks=16, block_size=4)
    model = FakeModel(sched)
    a = make_req("a", 6, max_tokens=5)
    sched.add_request(a)
    step(sched, model)
    out = sched.schedule()
    sampled = model.execute(out)
    assert "a" in sampled
    sched.abort(["a"])
    changed = sched.update(out, as_runner_output(sampled))
    assert changed == []
    assert len(a.output_token_ids) == 1  # the in-flight token is dropped
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert_no_leaks(sched)


def test_abort_everything_leaves_no_leaks():
    sched = make_sched(num_blocks=32, block_size=4, budget=20, max_seqs=3)
    model = FakeModel(sched)
    reqs = [make_req(f"r{i}", 9 + i, max_tokens=50) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(4):
        step(sched, model)
    assert sched.running and sched.waiting
    aborted = sched.abort([r.request_id for r in reqs])
    assert len(aborted) == 6
    assert_no_leaks(sched)


# --------------------------------------------------------------------------- finishing


def test_finish_by_max_tokens():
    sched = make_sched()
    model = FakeModel(sched)
    reqs = [make_req(f"r{n}", 5, max_tokens=n) for n in (1, 2, 7)]
    for r in reqs:
        sched.add_request(r)
    run_all(sched, model)
    for r, n in zip(reqs, (1, 2, 7)):
        assert len(r.output_token_ids) == n
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.stop_reason is None


def test_finish_by_eos():
    sched = make_sched()
    model = FakeModel(sched, scripts={"a": [11, 12, EOS, 13, 14]})
    a = make_req("a", 5, max_tokens=10, eos={EOS})
    sched.add_request(a)
    outs = run_all(sched, model)
    assert a.output_token_ids == [11, 12, EOS]
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert a.stop_reason is None  # end of sequence: null, as vLLM
    assert len(outs) == 3


def test_eos_ignored_when_ignore_eos():
    sched = make_sched()
    model = FakeModel(sched, scripts={"a": [11, EOS, EOS, 13]})
    a = make_req("a", 5, max_tokens=4, eos={EOS}, ignore_eos=True)
    sched.add_request(a)
    run_all(sched, model)
    assert a.output_token_ids == [11, EOS, EOS, 13]
    assert a.status == RequestStatus.FINISHED_LENGTH


def test_eos_of_another_request_does_not_stop():
    sched = make_sched()
    model = FakeModel(sched, scripts={"a": [EOS, 5, 6]})
    a = make_req("a", 5, max_tokens=3)  # no eos ids for this request
    sched.add_request(a)
    run_all(sched, model)
    assert a.output_token_ids == [EOS, 5, 6]
    assert a.status == RequestStatus.FINISHED_LENGTH


def test_finish_by_stop_token_ids():
    sched = make_sched()
    model = FakeModel(sched, scripts={"a": [11, STOP, 13], "b": [11, 12, 13, 14]})
    a = make_req("a", 5, max_tokens=10, stop=[STOP, 77])
    b = make_req("b", 7, max_tokens=4, stop=[77])
    sched.add_request(a)
    sched.add_request(b)
    run_all(sched, model)
    assert a.output_token_ids == [11, STOP]
    assert a.status == RequestStatus.FINISHED_STOPPED and a.stop_reason == STOP
    assert b.output_token_ids == [11, 12, 13, 14]
    assert b.status == RequestStatus.FINISHED_LENGTH


def test_min_tokens_suppresses_early_eos():
    sched = make_sched()
    model = FakeModel(sched, scripts={"a": [EOS] * 10, "b": [STOP] * 10})
    a = make_req("a", 5, max_tokens=10, eos={EOS}, min_tokens=4)
    b = make_req("b", 5, max_tokens=10, stop=[STOP], min_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    run_all(sched, model)
    assert a.output_token_ids == [EOS] * 4
    assert a.status == RequestStatus.FINISHED_STOPPED and a.stop_reason is None
    assert b.output_token_ids == [STOP] * 3
    assert b.status == RequestStatus.FINISHED_STOPPED


def test_min_tokens_equal_max_tokens_finishes_by_length():
    sched = make_sched()
    model = FakeModel(sched, scripts={"a": [EOS] * 10})
    a = make_req("a", 5, max_tokens=3, eos={EOS}, min_tokens=3)
    sched.add_request(a)
    run_all(sched, model)
    assert len(a.output_token_ids) == 3
    assert a.status == RequestStatus.FINISHED_STOPPED  # the 3rd token is EOS and min_tokens is met


def test_finish_by_max_model_len():
    sched = make_sched(max_model_len=12)
    model = FakeModel(sched)
    a = make_req("a", 9, max_tokens=100)
    sched.add_request(a)
    run_all(sched, model)
    assert a.num_tokens == 12
    assert len(a.output_token_ids) == 3
    assert a.status == RequestStatus.FINISHED_LENGTH


def test_finished_requests_leave_while_others_continue():
    sched = make_sched(num_blocks=32, block_size=4)
    model = FakeModel(sched, scripts={"b": [EOS]})
    a = make_req("a", 6, max_tokens=5)
    b = make_req("b", 6, max_tokens=5, eos={EOS})
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    assert b.is_finished and sched.running == [a]
    assert set(sched.kv.req_blocks) == {"a"}
    assert sched.kv.num_free_blocks == 32 - 2
    run_all(sched, model)


# --------------------------------------------------------------------------- unschedulable


def test_unschedulable_reports_request_bigger_than_pool():
    sched = make_sched(num_blocks=2, block_size=4, budget=64)
    model = FakeModel(sched)
    a = make_req("a", 7, max_tokens=10)  # 2 blocks for the prompt; the 9th token needs a 3rd
    sched.add_request(a)
    assert sched.unschedulable() == []  # fits for now
    step(sched, model)  # prefill 7, sample -> 8 tokens
    assert sched.unschedulable() == []  # running: never reported
    step(sched, model)  # compute 8th, sample -> 9 tokens
    assert a.num_tokens == 9
    out = sched.schedule()
    assert out.requests == [] and out.preempted == [a]
    assert sched.unschedulable() == [a]
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert len(a.output_token_ids) == 2
    assert_no_leaks(sched)


def test_unschedulable_through_engine_loop_with_chunked_prompt():
    sched = make_sched(num_blocks=3, block_size=4, budget=4)
    model = FakeModel(sched)
    a = make_req("a", 16, max_tokens=2)  # needs 4 blocks > 3: chunks run, then it can't grow
    b = make_req("b", 3, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    run_all(sched, model)
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == []
    assert b.output_token_ids == expected_output("b", 3, 2)


def test_unschedulable_empty_when_request_fits_or_others_run():
    sched = make_sched(num_blocks=4, block_size=4)
    assert sched.unschedulable() == []
    sched.add_request(make_req("a", 16, max_tokens=1))  # exactly the pool
    assert sched.unschedulable() == []
    sched2 = make_sched(num_blocks=4, block_size=4)
    big = make_req("big", 17, max_tokens=1)
    sched2.add_request(big)
    assert sched2.unschedulable() == [big]
    # with something running, nothing is reported: the big request is not alone in the engine
    sched3 = make_sched(num_blocks=4, block_size=4, max_seqs=1)
    model3 = FakeModel(sched3)
    small = make_req("small", 3, max_tokens=3)
    sched3.add_request(small)
    step(sched3, model3)
    big3 = make_req("big", 17, max_tokens=1)
    sched3.add_request(big3)
    assert sched3.running == [small] and list(sched3.waiting) == [big3]
    assert sched3.unschedulable() == []
    sched3.abort(["big"])
    run_all(sched3, model3)


# --------------------------------------------------------------------------- randomized


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_invariants_and_outputs(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    max_len_tokens = 40
    num_blocks = -(-max_len_tokens // bs) + rng.randint(0, 10)  # every request fits alone
    sched = make_sched(num_blocks=num_blocks, block_size=bs, budget=rng.choice([5, 16, 48]),
                       max_seqs=rng.choice([2, 4, 8]), caching=rng.random() < 0.8)
    model = FakeModel(sched)
    prefixes = [[rng.randrange(100, 900) for _ in range(rng.randint(0, 20))] for _ in range(3)]
    reqs, pending = [], []
    for i in range(14):
        p = rng.choice(prefixes) + [rng.randrange(100, 900) for _ in range(rng.randint(1, 12))]
        mt = rng.randint(1, max_len_tokens - len(p))
        pending.append(make_req(f"s{seed}-{i}", p, max_tokens=mt, salt=rng.choice([None, None, "x"])))
    aborted = set()
    steps = 0
    while pending or sched.has_unfinished():
        if pending and rng.random() < 0.5:
            r = pending.pop(0)
            reqs.append(r)
            sched.add_request(r)
        if reqs and rng.random() < 0.03:
            victim = rng.choice(reqs)
            if sched.abort([victim.request_id]):
                aborted.add(victim.request_id)
        step(sched, model)
        steps += 1
        assert steps < 3000
    assert_no_leaks(sched)
    for r in reqs:
        assert r.is_finished
        if r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            continue
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_output(r.request_id, r.num_prompt_tokens, r.max_tokens)


# --------------------------------------------------------------------------- async scheduling (ahead)


def test_scheduling_ahead_runs_on_the_token_in_flight():
    """schedule(ahead=True) while a step is in flight: a request that step samples for gets one
    placeholder token, unless that token surely ends it (length) or the host must act on it first
    (an n > 1 request forks on it); update() of both steps settles the counters, and a request that
    the first step ends (EOS) has its ahead row skipped."""
    sched = make_sched(block_size=4)
    r1 = make_req("r1", 8, max_tokens=5, eos=[EOS])
    r2 = make_req("r2", 5, max_tokens=1)
    r3 = make_req("r3", 6, max_tokens=5)
    r3.fork_ids, r3.fork_params = ["r3#1"], [SamplingParams(max_tokens=5)]  # n=2
    for r in (r1, r2, r3):
        sched.add_request(r)
    out1 = sched.schedule()
    assert out1.samples == [True] * 3 and not any(out1.uses_pending_token)
    assert (r1.num_in_flight_tokens, r1.num_pending_tokens) == (8, 1)
    out2 = sched.schedule(ahead=True)
    assert scheduled(out2) == {"r1": 1}  # r2 ends by length on its first token; r3 forks on it
    assert out2.uses_pending_token == [True] and out2.num_computed_before == [8] and out2.samples == [True]
    assert len(sched.kv.block_ids("r1")) * 4 >= 9  # a slot for the placeholder's KV
    assert (r1.num_in_flight_tokens, r1.num_pending_tokens) == (9, 2)
    out = as_runner_output({"r1": 1001, "r2": 1002})
    out.sampled["r3"] = [SampledToken(1003), SampledToken(1013)]  # the fork step: one token per sequence
    sched.update(out1, out)
    assert (r1.num_computed_tokens, r1.num_in_flight_tokens, r1.num_pending_tokens) == (8, 1, 1)
    assert r2.status == RequestStatus.FINISHED_LENGTH and r3.num_pending_tokens == 0
    sched.update(out2, as_runner_output({"r1": EOS}))
    assert r1.output_token_ids == [1001, EOS] and r1.status == RequestStatus.FINISHED_STOPPED
    assert (r1.num_in_flight_tokens, r1.num_pending_tokens) == (0, 0)
    # r3 and its fork run on, then ahead of themselves
    out3 = sched.schedule()
    assert scheduled(out3) == {"r3": 1, "r3#1": 1} and out3.num_computed_before == [6, 6]
    out4 = sched.schedule(ahead=True)
    assert scheduled(out4) == {"r3": 1, "r3#1": 1} and out4.uses_pending_token == [True, True]
    sched.update(out3, as_runner_output({"r3": 1010, "r3#1": 1011}))
    assert r3.status == RequestStatus.RUNNING and r3.output_token_ids == [1003, 1010]
    sched.abort(["r3"])  # ended while its ahead row is in flight
    assert [r.request_id for r, _ in sched.update(out4, as_runner_output({"r3": 1004, "r3#1": 1014}))] == ["r3#1"]
    sched.abort(["r3#1"])
    assert_no_leaks(sched)


def test_scheduling_ahead_never_preempts_and_reports_running_short():
    sched = make_sched(num_blocks=4, block_size=4)
    a, b = make_req("a", 7, max_tokens=20), make_req("b", 7, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    out1 = sched.schedule()
    assert scheduled(out1) == {"a": 7, "b": 7}
    sched.update(out1, as_runner_output({"a": 1001, "b": 1002}))
    out2 = sched.schedule()  # tokens 8 fit the second blocks
    out3 = sched.schedule(ahead=True)  # token 9 needs a third block each: none is free
    assert scheduled(out2) == {"a": 1, "b": 1}
    assert not out3.requests and out3.out_of_blocks and not out3.preempted
    sched.update(out2, as_runner_output({"a": 1003, "b": 1004}))
    out4 = sched.schedule()  # not ahead: preempts the newest, whose blocks the oldest takes
    assert out4.preempted == [b] and scheduled(out4) == {"a": 1}
    sched.update(out4, as_runner_output({"a": 1005}))
    for r in (a, b):
        sched.abort([r.request_id])
    assert_no_leaks(sched)
