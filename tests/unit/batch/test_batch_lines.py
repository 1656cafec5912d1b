"""The batch job's files without an engine: parsing lines, keys, torn part files, resume and merge, and the
request validation and error rows (raylight/batch/lines.py, responses.py)."""

from __future__ import annotations

import json

import pytest

from raylight.batch.lines import PartWriter, done_keys, iter_rows, merge, parse_line, part_path, read_input, row_key
from raylight.batch.responses import api_error_row, line_error_row, prepare
from raylight.cluster.protocol import APIError


def req(cid, url="/v1/completions", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body or {"prompt": [1, 2]}})


def test_parse_lines_and_keys(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([req("a"), "{oops", "", json.dumps({"url": "/v1/completions", "body": {}}), req("a"),
                               json.dumps({"custom_id": "g", "method": "GET", "url": "/v1/completions", "body": {}}),
                               json.dumps({"custom_id": "u", "url": "/v1/embeddings", "body": {}}),
                               json.dumps({"custom_id": "b", "url": "/v1/completions", "body": "x"}), "[1]"]) + "\n")
    items = read_input(str(path))
    assert [it.line for it in items] == [1, 2, 4, 5, 6, 7, 8, 9]  # the blank line 3 is no request
    assert [it.key for it in items] == [("id", "a"), ("line", 2), ("line", 4), ("line", 5), ("id", "g"), ("id", "u"),
                                        ("id", "b"), ("line", 9)]
    assert [it.error[0] if it.error else None for it in items] == [
        None, "invalid_json", "missing_custom_id", "duplicate_custom_id", "invalid_method", "invalid_url",
        "invalid_body", "invalid_json"]
    rows = [line_error_row(it) for it in items[1:]]
    assert [row_key(r) for r in rows] == [it.key for it in items[1:]]
    assert rows[0]["line"] == 2 and rows[0]["custom_id"] is None and rows[0]["response"] is None
    assert "line" not in rows[3] and rows[3]["custom_id"] == "g"


def test_torn_rows_are_skipped_and_cut_before_appending(tmp_path):
    out = str(tmp_path / "out.jsonl")
    part = part_path(out, 1)
    with open(part, "w") as f:
        f.write(json.dumps({"custom_id": "a", "error": None}) + "\n" + '{"custom_id": "b", "err')
    assert [r["custom_id"] for r in iter_rows(part)] == ["a"]
    assert done_keys(out) == {("id", "a")}
    w = PartWriter(part)
    w.write({"custom_id": "c", "error": None})
    w.close()
    assert [r["custom_id"] for r in iter_rows(part)] == ["a", "c"]
    assert open(part).read().count("\n") == 2


def test_merge_orders_by_input_keeps_old_rows_and_removes_parts(tmp_path):
    inp, out = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
    inp.write_text("\n".join([req("x"), "{bad", req("y"), req("z")]) + "\n")
    items = read_input(str(inp))
    with open(out, "w") as f:  # an earlier run's output, with a row the input no longer has
        f.write(json.dumps({"custom_id": "old", "error": None}) + "\n" + json.dumps({"custom_id": "y", "error": None}) + "\n")
    for rank, rows in ((0, [{"custom_id": "z", "error": None}, {"custom_id": None, "line": 2, "error": {"code": "e"}}]),
                       (1, [{"custom_id": "y", "error": {"code": "dup"}}])):
        w = PartWriter(part_path(out, rank))
        for r in rows:
            w.write(r)
        w.close()
    assert done_keys(out) == {("id", "old"), ("id", "y"), ("id", "z"), ("line", 2)}
    written, errors, missing = merge(out, items)
    rows = list(iter_rows(out))
    assert [row_key(r) for r in rows] == [("line", 2), ("id", "y"), ("id", "z"), ("id", "old")]
    assert rows[1]["error"] is None  # one row per key: the output's, not the part's repeat
    assert (written, errors, [m.key for m in missing]) == (4, 1, [("id", "x")])
    assert not list(tmp_path.glob("out.jsonl.part-*"))


class _Tok:
    chat_template = "{{ messages }}"

    def __call__(self, text, add_special_tokens=True):
        return type("E", (), {"input_ids": [1] * len(text.split())})()

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **kw):
        return [1] * sum(len(m["content"].split()) + 2 for m in messages)


def item(body, url="/v1/chat/completions"):
    return parse_line(json.dumps({"custom_id": "c", "method": "POST", "url": url, "body": body}), 1, set())


@pytest.mark.parametrize("body,param,code", [
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream", None),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, "tools", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature", None),
    ({"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 60}, "max_tokens",
     "context_length_exceeded"),
])
def test_invalid_bodies_get_the_servers_400(body, param, code):
    with pytest.raises(APIError) as e:
        prepare(item(body), _Tok(), 64, 16)
    assert e.value.status == 400 and e.value.param == param and e.value.code == code
    row = api_error_row(item(body), e.value)
    assert row["custom_id"] == "c" and row["response"]["status_code"] == 400 and row["error"]["message"]
    assert row["response"]["body"]["error"]["param"] == param


def test_prepare_valid_lines():
    chat = prepare(item({"messages": [{"role": "user", "content": "a b"}], "max_completion_tokens": 5, "n": 2}),
                   _Tok(), 64, 16)
    assert chat.chat and chat.prompts == [[1] * 4] and chat.params.max_tokens == 5 and chat.params.n == 2
    comp = prepare(item({"prompt": ["a b c", "d e"], "temperature": 0}, "/v1/completions"), _Tok(), 64, 16)
    assert not comp.chat and comp.prompts == [[1, 1, 1], [1, 1]] and comp.params.max_tokens == 16
    assert prepare(item({"prompt": [7, 8]}, "/v1/completions"), None, 64, 16).prompts == [[7, 8]]
    assert comp.request_id.startswith("cmpl-") and chat.request_id.startswith("chatcmpl-")


def test_batch_rows_carry_what_the_server_returns():
    """A batch line's body is written by the server's own shaping (cluster/openai_outputs.py): echo,
    truncate_prompt_tokens, return_token_ids and top_logprobs 0 behave as on /v1/completions."""
    from raylight.batch.responses import ok_row
    from raylight.outputs import CompletionOutput, Logprob, RequestOutput

    comp = prepare(item({"prompt": [5, 6, 7, 8, 9, 10], "truncate_prompt_tokens": 3, "echo": True, "max_tokens": 2,
                         "return_token_ids": True}, "/v1/completions"), None, 64, 16)
    assert comp.prompts == [[8, 9, 10]]
    out = RequestOutput("r", None, [8, 9, 10], [CompletionOutput(0, "xy", [3, 4], "length")], True)
    body = ok_row(comp, [out], "m", None)["response"]["body"]
    assert body["choices"][0]["prompt_token_ids"] == [8, 9, 10] and body["choices"][0]["token_ids"] == [3, 4]
    assert body["usage"]["prompt_tokens"] == 3
    chat = prepare(item({"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 0}),
                   _Tok(), 64, 16)
    entry = {3: Logprob(-0.5, 2, "c"), 1: Logprob(-0.1, 1, "a")}
    out = RequestOutput("r", None, [1, 1, 1], [CompletionOutput(0, "c", [3], "length", logprobs=[entry])], True)
    content = ok_row(chat, [out], "m", None)["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "c" and content[0]["top_logprobs"] == []
