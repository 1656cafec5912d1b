"""Issue 19 over HTTP: structured-output and tool fields are validated (400 naming the field, nothing
reaches the engine), reach the engine as one constraint, and tool calls come back in OpenAI's shape,
whole and streamed; the tool-call parsers are linear on adversarial text. The end-to-end round trip
runs the official openai client against the real server (SmolLM2) in this process: parse() with a
pydantic response_format and with a pydantic function tool, streamed 'required' tool calls, and bad
schemas / regexes / a regex past the compile cap answered 400 while the server stays healthy
(reliability checklist rows 10-12)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray")
pytest.importorskip("xgrammar")

from fastapi.testclient import TestClient

from raylight.cluster.ingress import OpenAIServer, build_api
from raylight.cluster.tool_parsers import (HermesToolParser, Llama3JsonToolParser, ToolCallStream, check_tools)
from raylight.messages import ReplicaMessage
from raylight.outputs import CompletionOutput, RequestOutput
from raylight.testing.fake_engine import FakeEngine, FakeTokenizer, Stream

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


class ScriptedEngine(FakeEngine):
    """Streams the given text pieces as one sequence's deltas (token ids are the piece indices)."""

    def __init__(self, pieces):
        super().__init__()
        self.pieces = pieces

    def _generate(self, call):
        self.calls.append(call)
        msgs, text = [], ""
        for i, piece in enumerate(self.pieces):
            text += piece
            last = i == len(self.pieces) - 1
            out = RequestOutput(call.request_id, None, list(call.prompt), [CompletionOutput(
                0, text, list(range(i + 1)), finish_reason="stop" if last else None, delta_text=piece,
                delta_token_ids=[i])], finished=last)
            msgs.append(ReplicaMessage(output=out, replica_id="r0"))
        return Stream(msgs)


def _client(engine=None, **kw):
    server = OpenAIServer(engine or FakeEngine(), "m", FakeTokenizer(), max_model_len=4096, default_max_tokens=4, **kw)
    return TestClient(build_api(server)), server


@pytest.mark.parametrize("route, extra, param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format"),
    ("chat", {"response_format": "json"}, "response_format"),
    ("both", {"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs"),
    ("both", {"structured_outputs": {"choice": []}}, "structured_outputs"),
    ("both", {"structured_outputs": {"regex": "a" * 70000}}, "structured_outputs"),
    ("both", {"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ("both", {"guided_json": 5}, "guided_json"),
    ("both", {"guided_regex": "a", "guided_choice": ["x"]}, "guided_choice"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ("chat", {"tools": [TOOL, TOOL], "tool_choice": "required"}, "tools"),
    ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"tools": [TOOL]}, "tool_choice"),  # auto (the default with tools) without a tool-call parser
    ("chat", {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_structured_and_tool_fields_get_400_naming_them(route, extra, param):  # row 10
    client, server = _client()
    routes = [("/v1/chat/completions", {"messages": MSG})] if route == "chat" else [
        ("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "x"})]
    for path, body in routes:
        r = client.post(path, json={**body, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] is not None and err["param"].split(".")[0] == param, err
    assert server.engine.calls == []


def test_constraints_reach_the_engine_as_one_structured_outputs():
    client, server = _client()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, "json"),
             ({"response_format": {"type": "json_object"}}, "json_object"),
             ({"structured_outputs": {"regex": "[0-9]+"}}, "regex"), ({"guided_choice": ["a", "b"]}, "choice"),
             ({"guided_grammar": 'root ::= "x"'}, "grammar"), ({"response_format": {"type": "text"}}, None),
             ({"tools": [TOOL], "tool_choice": "required"}, "json"),
             ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "json"),
             ({"tools": [TOOL], "tool_choice": "none"}, None)]
    for extra, kind in cases:
        assert client.post("/v1/chat/completions", json={"messages": MSG, **extra}).status_code == 200, extra
        so = server.engine.calls[-1].params.structured_outputs
        assert (so.kind if so is not None else None) == kind, extra
    assert server.engine.calls[-2].params.structured_outputs.json == TOOL["function"]["parameters"]  # named
    assert client.post("/v1/completions", json={"prompt": "x", "guided_regex": "a+"}).status_code == 200
    assert server.engine.calls[-1].params.structured_outputs.regex == "a+"


def test_hermes_and_llama3_parsers():
    h = HermesToolParser()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    content, calls = h.extract(text)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"] * 2
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert h.extract("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert h.extract("plain answer") == ("plain answer", [])
    _, calls = h.extract('<tool_call>{"name": "f", "arguments": {"x": 1}}')  # EOS before the closing tag
    assert calls[0].arguments == '{"x": 1}'
    ll = Llama3JsonToolParser()
    content, calls = ll.extract('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert ll.extract("The answer is 4.") == ("The answer is 4.", [])
    assert ll.extract('{"name": "f", "parameters": {"a": 1}} and more') == (
        '{"name": "f", "parameters": {"a": 1}} and more', [])
    with pytest.raises(ValueError, match="tools.0.function.name"):
        check_tools([{"type": "function", "function": {"name": ""}}], None)


def test_parsers_are_linear_on_adversarial_text():  # row 11
    nasty = ["<tool_call>" * 20000 + "{" * 50000, "<tool_call>{\"name\": \"" + "\\\"" * 100000,
             "{" * 100000, "<|python_tag|>" + "[{" * 50000, "<tool_call" * 30000]
    for text in nasty:
        for parser in (HermesToolParser(), Llama3JsonToolParser()):
            t0 = time.perf_counter()
            parser.extract(text)
            stream = ToolCallStream("auto", parser)
            for i in range(0, len(text), 4096):  # streamed in pieces
                stream.feed(text[i:i + 4096], False)
            stream.feed("", True)
            assert time.perf_counter() - t0 < 2.0, (parser.name, text[:30])


def _streamed_tool_calls(events):
    calls, content, finish = {}, "", None
    for ev in events:
        for ch in ev["choices"]:
            d = ch["delta"]
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.get("id") or slot["id"]
                slot["name"] += tc.get("function", {}).get("name") or ""
                slot["arguments"] += tc.get("function", {}).get("arguments") or ""
            finish = ch.get("finish_reason") or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _sse(r):
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_auto_tool_calls_stream_and_parse_in_openai_shape():  # checklist (b) 12
    pieces = ["Sure", ". <tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": ",
              "\"Paris\"}}\n</tool_call>"]
    client, server = _client(ScriptedEngine(pieces), tool_call_parser="hermes")
    body = {"messages": MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "tools": [TOOL]}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Sure."
    (call,) = whole["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # the tools and the earlier call were rendered for the template (FakeTokenizer's has no tools: system prompt)
    prompt = "".join(chr(i + 31) for i in server.engine.calls[-1].prompt)
    content, calls, finish = _streamed_tool_calls(_sse(client.post("/v1/chat/completions",
                                                                   json={**body, "stream": True})))
    assert content.strip() == "Sure." and finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert len(prompt) > 0
    # no call in the text: plain content, finish_reason stop
    client, _ = _client(ScriptedEngine(["No ", "tools <tool", " needed"]), tool_call_parser="hermes")
    content, calls, finish = _streamed_tool_calls(_sse(client.post("/v1/chat/completions",
                                                                   json={**body, "stream": True})))
    assert (content, calls, finish) == ("No tools <tool needed", [], "stop")


def test_named_tool_call_streams_its_arguments():
    pieces = ['{"city"', ': "Par', 'is"}']
    client, _ = _client(ScriptedEngine(pieces))
    body = {"messages": MSG, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "stream": True}
    events = _sse(client.post("/v1/chat/completions", json=body))
    content, calls, finish = _streamed_tool_calls(events)
    assert calls == [{"id": calls[0]["id"], "name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert finish == "tool_calls" and not content
    assert sum(1 for ev in events for ch in ev["choices"] for _ in ch["delta"].get("tool_calls") or []) >= 3


# ---------------------------------------------------------------- the real server, the official client

@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    from raylight.testing.local_server import local_server

    with local_server({"model": smollm2_dir, "max_model_len": 1024, "num_kv_blocks": 256,
                       "grammar_compile_timeout_s": 0.5}, default_max_tokens=48) as (base, replica):
        yield base, replica


def test_openai_parse_round_trips_with_pydantic_and_tools(smollm2_server):  # checklist (b) 11, 12
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    base, _ = smollm2_server

    class Weather(pydantic.BaseModel):
        city: str
        days: int

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    msgs = [{"role": "user", "content": "The weather in Paris for the next 3 days, please."}]
    r = parse(model="model", messages=msgs, response_format=Weather, max_tokens=48, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Weather)
    r = parse(model="model", messages=msgs, tools=[openai.pydantic_function_tool(Weather)],
              tool_choice={"type": "function", "function": {"name": "Weather"}}, max_tokens=48, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and isinstance(call.function.parsed_arguments, Weather)
    # 'required', streamed: the deltas accumulate to calls whose arguments validate
    stream = client.chat.completions.create(model="model", messages=msgs, tools=[openai.pydantic_function_tool(Weather)],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=48,
                                            temperature=0, stream=True)
    events = [json.loads(chunk.model_dump_json()) for chunk in stream]
    for ev in events:
        for ch in ev["choices"]:
            ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
    _, calls, finish = _streamed_tool_calls(events)
    assert finish == "tool_calls" and len(calls) == 1 and calls[0]["name"] == "Weather"
    Weather.model_validate_json(calls[0]["arguments"])


def test_bad_specs_get_400_within_the_cap_and_the_server_stays_healthy(smollm2_server):  # rows 10-12
    import httpx

    base, replica = smollm2_server
    bad = [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
           {"structured_outputs": {"regex": "(("}},
           {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
               "type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}}}],
            "tool_choice": "required"},
           {"structured_outputs": {"regex": "(.{1,100}){1,100}x"}}]  # compiles for ~1 s: over the 0.5 s cap
    with httpx.Client(base_url=base, timeout=30) as c:
        for extra in bad:
            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, **extra})
            assert r.status_code == 400, r.text
            assert time.monotonic() - t0 < 3.0
            err = r.json()["error"]
            assert err["param"] in ("response_format", "structured_outputs", "tools") and "/project" not in err["message"]
        assert "did not compile within 0.5 s" in err["message"]
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "Colors: ", "max_tokens": 8, "guided_choice": ["red", "blue"]})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("red", "blue")
    assert replica.engine.grammars.num_timed_out >= 1
