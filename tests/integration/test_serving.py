"""The OpenAI-compatible server on a real Ray Serve app over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from raylight.testing.helpers import leave_stream, read_metrics, serve_app, wait_engines_idle

API_KEY = "sk-raylight-test"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(smollm2_dir):
    from raylight.cluster.app import AppConfig

    cfg = AppConfig(engine_args={"device": "cpu", "max_model_len": 2048, "max_num_seqs": 16},
                    ray_actor_options={"num_cpus": 2}, api_key=API_KEY, max_queued_requests=4,
                    default_max_tokens=32)
    with serve_app(cfg, "raylight") as base:
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def metrics(base) -> dict[str, float]:
    return read_metrics(base, headers=auth())


def test_models_and_misc_routes(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server}/version", headers=auth()).json()["version"]
    tok = httpx.post(f"{server}/tokenize", headers=auth(), json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    text = httpx.post(f"{server}/detokenize", headers=auth(), json={"tokens": tok["tokens"]}).json()["prompt"]
    assert text == "Hello world"
    chat_tok = httpx.post(f"{server}/tokenize", headers=auth(),
                          json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tok["count"] > tok["count"]
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed


def test_chat_and_completions_non_streaming(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=16, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 16 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 8


def test_streaming_equals_non_streaming_at_temperature_zero(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=24,
                  temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert usage_chunks[0].usage.completion_tokens == full.usage.completion_tokens

    comp_full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)
    comp_stream = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in comp_stream) == comp_full.choices[0].text
    assert all(c.usage is None for c in comp_stream)  # no usage chunk unless asked


def test_n_logprobs_stop_and_seed(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                         n=2, max_tokens=12, temperature=1.0, seed=5, logprobs=True, top_logprobs=3)
    assert sorted(c.index for c in out.choices) == [0, 1]
    for c in out.choices:
        assert len(c.logprobs.content) == out.usage.completion_tokens // 2 or c.finish_reason == "stop"
        for item in c.logprobs.content:
            assert item.logprob <= 0 and len(item.top_logprobs) == 3
            assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                           n=2, max_tokens=12, temperature=1.0, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]

    base = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    words = base.choices[0].text.split()
    stop = words[1] if len(words) > 1 else words[0]
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                        temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert base.choices[0].text.startswith(stopped.choices[0].text)

    comp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == comp.choices[0].text


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 2.0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 30}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 3000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_bad_inputs_get_openai_errors(server, client, path, body, status, param):
    r = httpx.post(f"{server}{path}", headers=auth(), json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert "Traceback" not in err["message"] and "/" not in err["message"].replace("(0, 1]", "")
    # the server keeps serving
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


def test_api_key_is_required_everywhere_but_health(server):
    for method, path in [("get", "/v1/models"), ("get", "/metrics"), ("get", "/version"),
                         ("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/tokenize")]:
        for headers in [{}, {"Authorization": "Bearer wrong"}]:
            r = getattr(httpx, method)(f"{server}{path}", headers=headers, **({"json": {}} if method == "post" else {}))
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    # ~2000 tokens would take far longer than the 10 s we wait, unless the request is aborted.
    body = {"model": MODEL, "prompt": "Write a very long essay about the sea.", "max_tokens": 2000,
            "temperature": 0, "ignore_eos": True, "stream": True}
    leave_stream(server, body, headers=auth())
    idle, m = wait_engines_idle(server, headers=auth())
    if not idle:
        pytest.fail(f"request not aborted: {m}")


async def _burst(server, n):
    async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        async def one(i):
            try:
                r = await c.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=24,
                                               temperature=0, extra_body={"ignore_eos": True})
                return "ok", r.usage.completion_tokens
            except openai.RateLimitError as e:
                return "429", e.response.headers.get("retry-after")
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=300)


def test_over_capacity_burst_gets_completions_or_429(server):
    results = asyncio.run(_burst(server, 40))
    kinds = [k for k, _ in results]
    assert set(kinds) <= {"ok", "429"} and len(kinds) == 40
    assert kinds.count("ok") >= 4 and kinds.count("429") >= 1, kinds
    assert all(v == 24 for k, v in results if k == "ok")
    assert all(v == "1" for k, v in results if k == "429")  # Retry-After


def test_async_client_streaming(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                                     max_tokens=10, temperature=0, stream=True)
            parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            full = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                                   max_tokens=10, temperature=0)
            return "".join(parts), full.choices[0].message.content
    streamed, full = asyncio.run(run())
    assert streamed == full


def test_metrics_after_traffic(server):
    m = metrics(server)
    for name in ["raylight:num_requests_running", "raylight:num_requests_waiting", "raylight:kv_cache_usage_perc",
                 "raylight:prefix_cache_hit_rate", "raylight:num_preemptions_total",
                 "raylight:time_to_first_token_seconds_count", "raylight:inter_token_latency_seconds_count",
                 "raylight:e2e_request_latency_seconds_count", "raylight:prompt_tokens_total",
                 "raylight:generation_tokens_total"]:
        assert name in m, name
    assert m["raylight:generation_tokens_total"] > 0 and m["raylight:time_to_first_token_seconds_count"] > 0
