"""Issue 23, API conformance: what OpenAI clients, vLLM users and evaluation harnesses rely on, checked on
the real server (SmolLM2 on CPU, the OpenAI app over real HTTP; the ingress talks to its engine replica
in-process instead of through Ray, raylight/testing/local_server.py) with the official `openai` client,
and raw HTTP where the client hides a field."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from raylight.testing.local_server import local_server

MODEL = "smol"
SLOTS = 4  # max_num_seqs
MAX_QUEUED = 4


@pytest.fixture(scope="module")
def served(smollm2_dir):
    args = {"model": smollm2_dir, "device": "cpu", "max_model_len": 1024, "max_num_seqs": SLOTS,
            "max_num_batched_tokens": 256}
    with local_server(args, max_queued_requests=MAX_QUEUED, served_model_name=MODEL) as (base, replica):
        yield base, replica


@pytest.fixture(scope="module")
def base(served):
    return served[0]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


def _wait(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s}s")
        time.sleep(0.02)
    return True


def _aborted(base) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("raylight:request_aborted_total "):
            return float(line.split()[1])
    return 0.0


def _idle(replica) -> bool:
    m = replica.engine.get_metrics()
    return (m["num_running"] == 0 and m["num_waiting"] == 0 and replica.async_engine.num_waiting() == 0
            and m["kv_blocks_free"] == m["kv_blocks_total"])


def _queue_then_leave(base, replica, requests):
    """Sends every (path, body) at once, waits until all of them are queued behind the busy slots (none
    answered: a 429 or a reply fails here), then drops their connections together, as clients that give up
    do. Leaving on a signal, not on a client timeout, keeps a slow machine from letting the first leave
    before the last arrives."""
    async def run():
        async with httpx.AsyncClient(timeout=60) as ac:
            tasks = [asyncio.ensure_future(ac.post(f"{base}{path}", json=body)) for path, body in requests]
            deadline = time.monotonic() + 10
            while replica.async_engine.num_waiting() != len(requests):
                done = [t for t in tasks if t.done()]
                if done:
                    r = done[0].result()
                    pytest.fail(f"a waiting request was answered: {r.status_code} {r.text[:200]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{replica.async_engine.num_waiting()} of {len(requests)} queued within 10 s")
                await asyncio.sleep(0.02)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run(run())


LONG = {"model": MODEL, "max_tokens": 600, "temperature": 0, "ignore_eos": True}


# ---------------------------------------------------------------- 1. departed clients (checklist row 23)

def test_departed_clients_are_aborted_where_they_wait_and_stop_counting(served):
    """Long streams fill every engine slot; more clients wait behind them (streaming and not, chat and
    completions) and give up once all are queued: each is aborted while still queued, the queue is empty
    again at once (the next ones are queued, not refused with 429), and closing the streams frees everything."""
    base, replica = served
    aborted = _aborted(base)
    with httpx.Client(timeout=60) as h:
        running = []
        for i in range(SLOTS):
            ctx = h.stream("POST", f"{base}/v1/completions", json={**LONG, "prompt": f"Story {i}:", "stream": True})
            r = ctx.__enter__()
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            running.append((ctx, lines))  # dropping the line iterator would close the stream
        assert replica.engine.get_metrics()["num_running"] == SLOTS

        kinds = [("/v1/completions", {**LONG, "prompt": "Wait A"}),
                 ("/v1/completions", {**LONG, "prompt": "Wait B", "stream": True}),
                 ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": "Wait C"}]}),
                 ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": "Wait D"}],
                                           "stream": True})]
        waiting = [kinds[i % 4] for i in range(2 * MAX_QUEUED)]
        _queue_then_leave(base, replica, waiting[:MAX_QUEUED])
        t0 = time.monotonic()
        _wait(lambda: replica.async_engine.num_waiting() == 0, 2, "dequeued after the clients left")
        assert time.monotonic() - t0 < 1.0
        # the queue has room again: the next ones wait (then leave) instead of getting 429
        _queue_then_leave(base, replica, waiting[MAX_QUEUED:])
        _wait(lambda: replica.async_engine.num_waiting() == 0, 2, "dequeued again")
        assert replica.engine.get_metrics()["num_running"] == SLOTS
        for ctx, _ in running:
            ctx.__exit__(None, None, None)
    _wait(lambda: _idle(replica), 3, "idle after the streams closed")
    assert _aborted(base) == aborted + SLOTS + 2 * MAX_QUEUED


# ---------------------------------------------------------------- 2-4. streaming n > 1, top_logprobs 0, stream_options

def test_each_streamed_choice_sends_its_finish_reason_once(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a short poem about the sea."}], n=4,
        temperature=1.0, seed=7, max_tokens=40, stop=["e"], stream=True)
    finished_at: dict[int, list[int]] = {}
    later: dict[int, int] = {}
    for k, chunk in enumerate(stream):
        for ch in chunk.choices:
            if ch.index in finished_at:
                later[ch.index] = later.get(ch.index, 0) + 1
            if ch.finish_reason is not None:
                finished_at.setdefault(ch.index, []).append(k)
    assert sorted(finished_at) == [0, 1, 2, 3]
    assert all(len(ks) == 1 for ks in finished_at.values()), finished_at  # once each
    assert not later, later  # nothing more for a finished choice
    assert len({ks[0] for ks in finished_at.values()}) > 1  # they did finish at different chunks


def test_top_logprobs_zero_gives_the_token_logprob_and_no_alternatives(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=0)
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(t.top_logprobs == [] and t.logprob <= 0 for t in content)
    two = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2)
    assert all(len(t.top_logprobs) == 2 for t in two.choices[0].logprobs.content)
    assert [t.token for t in two.choices[0].logprobs.content] == [t.token for t in content]
    # completions' logprobs 0: the chosen token alone (OpenAI's logprobs + 1 entries)
    comp = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=0)
    assert all(len(top) == 1 for top in comp.choices[0].logprobs.top_logprobs)


def test_stream_options_need_stream_true(client):
    for create, kw in ((client.chat.completions.create, {"messages": [{"role": "user", "content": "Hi"}]}),
                       (client.completions.create, {"prompt": "Hi"})):
        with pytest.raises(openai.BadRequestError) as e:
            create(model=MODEL, max_tokens=2, stream_options={"include_usage": True}, **kw)
        assert e.value.body["param"] == "stream_options"
        assert create(model=MODEL, max_tokens=2, stream_options=None, **kw)  # null is no option


# ---------------------------------------------------------------- 5. echo

PROMPT = "The capital of France is"


def test_echo_returns_the_prompt_and_its_logprobs(client, base):
    ids = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    assert len(lp.tokens) == len(ids) + 1 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # a prompt token's logprob is what the model gives it after the tokens before it: the same figure
    # the decode path reports when it scores that prefix's next token
    prefix = client.completions.create(model=MODEL, prompt=ids[:-1], max_tokens=1, temperature=0, logprobs=20)
    last = httpx.post(f"{base}/detokenize", json={"tokens": ids[-1:]}).json()["prompt"]
    assert prefix.choices[0].logprobs.top_logprobs[0][last] == pytest.approx(lp.token_logprobs[len(ids) - 1], abs=2e-3)
    # max_tokens 0: the prompt alone (log-likelihood scoring); usage counts no completion tokens
    only = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True,
                                                       "logprobs": 0}).json()
    assert only["choices"][0]["text"] == PROMPT and only["usage"]["completion_tokens"] == 0
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lp.token_logprobs[:-1]
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True)  # no logprobs
    assert echoed.choices[0].text.startswith(PROMPT) and echoed.choices[0].logprobs is None
    # streamed: the prompt (with its logprobs) comes first
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(PROMPT) and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and len(offsets) == len(ids) + 3


def test_chat_echo_continues_the_final_message(client):
    msgs = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "The color is"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    cont = {"echo": True, "continue_final_message": True, "add_generation_prompt": False}
    out = client.chat.completions.create(**kw, extra_body=cont)
    plain = client.chat.completions.create(**kw, extra_body={**cont, "echo": False})
    assert out.choices[0].message.content == "The color is" + plain.choices[0].message.content
    assert out.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**kw, extra_body=cont, stream=True) if c.choices)
    assert streamed == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:  # continuing needs add_generation_prompt off
        client.chat.completions.create(**kw, extra_body={"continue_final_message": True})
    assert e.value.body["param"] == "continue_final_message"


# ---------------------------------------------------------------- 6. vLLM's request extras

def test_prompt_logprobs_are_returned(client, base):
    ids = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2})
    plps = out.choices[0].model_extra["prompt_logprobs"]
    assert len(plps) == len(ids) and plps[0] is None
    for tok, entry in zip(ids[1:], plps[1:]):
        assert str(tok) in entry and 2 <= len(entry) <= 3  # the prompt's token and the 2 most likely
        assert {e["rank"] for t, e in entry.items() if t != str(tok)} <= {1, 2}
        assert entry[str(tok)]["logprob"] <= 0 and isinstance(entry[str(tok)]["decoded_token"], str)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    plps = chat.model_extra["prompt_logprobs"]
    assert plps[0] is None and len(plps) == len(chat.model_extra["prompt_token_ids"])
    assert all(list(e) == [str(t)] for t, e in zip(chat.model_extra["prompt_token_ids"][1:], plps[1:]))
    with pytest.raises(openai.BadRequestError) as e:  # not in streams (vLLM's rule): a 400, never dropped
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    assert e.value.body["param"] == "prompt_logprobs"


def test_return_token_ids(client, base):
    ids = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                    extra_body={"return_token_ids": True})
    extra = out.choices[0].model_extra
    assert extra["prompt_token_ids"] == ids and len(extra["token_ids"]) == 3
    assert httpx.post(f"{base}/detokenize", json={"tokens": extra["token_ids"]}).json()["prompt"] == out.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, stream=True,
                                            extra_body={"return_token_ids": True}))
    firsts = [c.choices[0].model_extra.get("prompt_token_ids") for c in chunks if c.choices]
    assert firsts[0] == ids and not any(firsts[1:])  # in the first chunk only
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == extra["token_ids"]
    msgs = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0,
                                          extra_body={"return_token_ids": True})
    prompt_ids = httpx.post(f"{base}/tokenize", json={"messages": msgs}).json()["tokens"]
    assert chat.model_extra["prompt_token_ids"] == prompt_ids and chat.usage.prompt_tokens == len(prompt_ids)
    assert len(chat.choices[0].model_extra["token_ids"]) == chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0, stream=True,
                                                 extra_body={"return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids
    assert [t for c in chunks for ch in c.choices for t in ch.model_extra.get("token_ids") or []] == \
        chat.choices[0].model_extra["token_ids"]


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, base):
    prompt = [504, 2380, 314, 253, 1342, 3575, 282, 4649]  # 8 tokens
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                    extra_body={"truncate_prompt_tokens": 4, "return_token_ids": True})
    assert out.usage.prompt_tokens == 4 and out.choices[0].model_extra["prompt_token_ids"] == prompt[-4:]
    right = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={
        "truncate_prompt_tokens": 4, "truncation_side": "right", "return_token_ids": True})
    assert right.choices[0].model_extra["prompt_token_ids"] == prompt[:4]
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                     extra_body={"truncate_prompt_tokens": 20}).usage.prompt_tokens == 8
    # a text past the context window is cut, not refused
    long = "The sea is wide. " * 400
    cut = client.completions.create(model=MODEL, prompt=long, max_tokens=1, extra_body={"truncate_prompt_tokens": 8})
    assert cut.usage.prompt_tokens == 8
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi " * 50}], max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"truncate_prompt_tokens": 0})
    assert e.value.body["param"] == "truncate_prompt_tokens"


def test_allowed_token_ids_and_tokens_as_token_ids(client, base):
    allowed = httpx.post(f"{base}/tokenize", json={"prompt": " yes no maybe", "add_special_tokens": False})
    allowed = allowed.json()["tokens"]
    extra = {"allowed_token_ids": allowed, "return_token_ids": True, "return_tokens_as_token_ids": True}
    out = client.completions.create(model=MODEL, prompt="Is the sea wet? Answer:", max_tokens=6, temperature=1.0,
                                    seed=3, logprobs=2, extra_body=extra)
    ids = out.choices[0].model_extra["token_ids"]
    assert len(ids) == 6 and set(ids) <= set(allowed)
    assert out.choices[0].logprobs.tokens == [f"token_id:{t}" for t in ids]
    assert all(k.startswith("token_id:") for top in out.choices[0].logprobs.top_logprobs for k in top)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=1,
                                          extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    assert [t.token for t in chat.choices[0].logprobs.content] == \
        [f"token_id:{t}" for t in chat.choices[0].model_extra["token_ids"]]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"allowed_token_ids": [10**7]})
    assert e.value.body["param"] == "allowed_token_ids"


def test_continuous_usage_stats(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 5
    assert chunks[-1].choices == [] and len({c.usage.prompt_tokens for c in chunks}) == 1
    plain = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]


@pytest.mark.parametrize("field, value", [("bad_words", ["x"]), ("use_beam_search", True), ("priority", 2),
                                          ("logprob_token_ids", [1]), ("length_penalty", 0.5)])
def test_vllm_extras_not_implemented_get_400_naming_them(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={field: value})
    assert e.value.body["param"] == field and "not supported" in e.value.body["message"]


# ---------------------------------------------------------------- 7. cached tokens

def test_cached_tokens_count_the_prefix_cache_hit(client):
    msgs = [{"role": "user", "content": "Tell me about prefix caching. " * 8}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    again = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 64 > first.usage.prompt_tokens_details.cached_tokens - 1
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    streamed = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    client.completions.create(model=MODEL, prompt=msgs[0]["content"], max_tokens=1)
    comp = client.completions.create(model=MODEL, prompt=msgs[0]["content"], max_tokens=1)
    assert 16 <= comp.usage.prompt_tokens_details.cached_tokens < comp.usage.prompt_tokens  # whole blocks


# ---------------------------------------------------------------- 8. small endpoints

def test_tokenizer_info_invocations_and_load(served, client):
    base, replica = served
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["tokenizer_class"] and "{%" in info["chat_template"]
    assert not any(k.endswith("_file") or k == "name_or_path" for k in info)  # no file paths
    assert not any(isinstance(v, str) and v.startswith("/") for v in info.values())
    chat = httpx.post(f"{base}/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    comp = httpx.post(f"{base}/invocations", json={"prompt": "Hi", "max_tokens": 2})
    assert chat.json()["object"] == "chat.completion" and comp.json()["object"] == "text_completion"
    streamed = httpx.post(f"{base}/invocations", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream") and streamed.text.endswith("[DONE]\n\n")
    bad = httpx.post(f"{base}/invocations", json={"input": "Hi"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    bad = httpx.post(f"{base}/invocations", json={"messages": "Hi"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert httpx.get(f"{base}/load").json() == {"server_load": 0}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{base}/v1/completions", json={**LONG, "prompt": "Load", "stream": True}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert httpx.get(f"{base}/load").json() == {"server_load": 1}
    _wait(lambda: httpx.get(f"{base}/load").json()["server_load"] == 0, 3, "unloaded")
    _wait(lambda: _idle(replica), 3, "idle")


# ---------------------------------------------------------------- lm-evaluation-harness end to end

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Russia", "Moscow"), ("Egypt", "Cairo"), ("England", "London"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("China", "Beijing"), ("Canada", "Ottawa"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Hungary", "Budapest"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Thailand", "Bangkok")]

TASK_YAML = """task: raylight_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "The capital of {{{{country}}}} is"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_scores_a_local_task(base, tmp_path):
    """lm-evaluation-harness's `local-completions` model scores a 24-item multiple-choice task written here
    (capitals, each against two wrong ones) through /v1/completions with echo and logprobs, tokenizing with
    our /tokenizer_info, /tokenize and /detokenize (its remote tokenizer), 4 prompts per request. Run as
    lm-eval's own command, bounded in time."""
    pytest.importorskip("lm_eval")
    import json
    import os
    import subprocess
    import sys

    data = tmp_path / "capitals.jsonl"
    with open(data, "w") as f:
        for i, (country, capital) in enumerate(CAPITALS):
            wrong = [CAPITALS[(i + 7) % len(CAPITALS)][1], CAPITALS[(i + 13) % len(CAPITALS)][1]]
            choices = sorted([capital, *wrong], key=lambda c: (i * 31 + len(c)) % 7)  # lm-eval puts " " before
            f.write(json.dumps({"country": country, "choices": choices, "answer": choices.index(capital)}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "capitals.yaml").write_text(TASK_YAML.format(data=data))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OPENAI_API_KEY": "none", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model={MODEL},base_url={base}/v1/completions,num_concurrent=2,max_retries=3,tokenizer_backend=remote",
           "--batch_size", "4", "--tasks", "raylight_capitals", "--include_path", str(tmp_path / "tasks"),
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    results = next((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(results.read_text())["results"]["raylight_capitals"]["acc,none"]
    samples = [json.loads(line) for line in open(next((tmp_path / "out").rglob("samples_raylight_capitals_*.jsonl")))]
    assert len(samples) == len(CAPITALS)
    assert acc >= 0.6, acc  # SmolLM2 knows most of these capitals (chance: 1/3)
    # lm-eval's log-likelihood of a continuation is the sum of our echoed logprobs over its tokens
    s = samples[0]
    doc = s["doc"]
    ctx = f"The capital of {doc['country']} is"
    ll = float(s["resps"][0][0][0])
    ctx_ids = httpx.post(f"{base}/tokenize", json={"prompt": ctx, "add_special_tokens": False}).json()["tokens"]
    whole = httpx.post(f"{base}/tokenize", json={"prompt": f"{ctx} {doc['choices'][0]}",
                                                  "add_special_tokens": False}).json()
    echo = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": whole["tokens"], "max_tokens": 0,
                                                       "echo": True, "logprobs": 1}).json()
    ours = sum(echo["choices"][0]["logprobs"]["token_logprobs"][len(ctx_ids):])
    assert ll == pytest.approx(ours, abs=1e-3)
