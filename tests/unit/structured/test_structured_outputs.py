"""Structured outputs in the engine (issue 19): a random Llama with SmolLM2's tokenizer, whose free
output is garbage, must still produce output that parses and validates under every grammar (a test
of the per-row token mask, of end-of-sequence allowed only where the grammar may end, and of the
matchers following the tokens actually sampled, with and without async scheduling); constrained
rows leave free rows of the same steps unchanged; bad specs fail alone, within the compile cap, and
the compile cache stays bounded (reliability checklist rows 10-12)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from raylight import LLM, SamplingParams
from raylight.utils.structured_params import StructuredOutputsParams
from raylight.testing.helpers import make_random_hf_model

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                      "country": {"enum": ["FR", "DE", "US"]}},
                    "required": ["zip", "country"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
        "required": ["tags", "scores"], "additionalProperties": False},
    "bounds": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "ratio": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "ok": {"type": "boolean"}}, "required": ["age", "ratio", "ok"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000},
        "note": {"type": "string", "maxLength": 6}, "kind": {"enum": ["a", "b"]}},
        "required": ["id"], "additionalProperties": False},
}
PROMPT = [5, 6, 7, 8, 9]
FREE = [SamplingParams(max_tokens=12, temperature=0.0), SamplingParams(max_tokens=12, temperature=1.0, seed=7)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    d = str(tmp_path_factory.mktemp("rand-smol"))
    make_random_hf_model("llama", d, vocab_size=49152, eos_token_id=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smollm2_dir, f), d)
    return d


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_model_len=512, num_kv_blocks=512, grammar_compile_timeout_s=5.0)


@pytest.fixture(scope="module")
def llm_async(model_dir):
    return LLM(model_dir, max_model_len=512, num_kv_blocks=512, async_scheduling=True)


def _json(schema, **kw):
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True, **kw)


def _constrained():
    """Every schema, greedy and sampled (seeded), plus a regex, a choice, a grammar and n=2."""
    params = []
    for name, schema in SCHEMAS.items():
        params.append(SamplingParams(max_tokens=160, temperature=0.0, structured_outputs=_json(schema)))
        params.append(SamplingParams(max_tokens=160, temperature=1.0, seed=len(params),
                                     structured_outputs=_json(schema)))
    params.append(SamplingParams(max_tokens=40, temperature=1.0, seed=3,
                                 structured_outputs=StructuredOutputsParams(regex=r"[a-f]{2,6}-[0-9]{3}")))
    params.append(SamplingParams(max_tokens=40, temperature=1.0, seed=4,
                                 structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe so"])))
    params.append(SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=StructuredOutputsParams(
        grammar='root ::= "(" item ("," item)* ")"\nitem ::= [0-9]')))
    params.append(SamplingParams(n=2, max_tokens=160, temperature=1.0, seed=9,
                                 structured_outputs=_json(SCHEMAS["optional"])))
    return params


def _check(params, out):
    so = params.structured_outputs
    for c in out.outputs:
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        if so.json is not None:
            jsonschema.validate(json.loads(c.text), so.json)
        elif so.regex is not None:
            assert re.fullmatch(so.regex, c.text), c.text
        elif so.choice is not None:
            assert c.text in so.choice
        else:
            assert re.fullmatch(r"\([0-9](,[0-9])*\)", c.text), c.text


def _texts(outs):
    return [[c.text for c in o.outputs] for o in outs]


def test_constrained_outputs_validate_and_free_rows_are_unchanged(llm, llm_async):
    """Constrained and free rows share steps: every constrained output validates, and the free rows
    give the same tokens as without them. Async scheduling (steps run ahead; a constrained row's mask
    waits for the token in flight) gives the same outputs as plain steps."""
    free_alone = llm.generate([PROMPT] * len(FREE), FREE, use_tqdm=False)
    constrained = _constrained()
    outs = llm.generate([PROMPT] * (len(constrained) + len(FREE)), constrained + FREE, use_tqdm=False)
    for p, o in zip(constrained, outs):
        _check(p, o)
    assert _texts(outs[len(constrained):]) == _texts(free_alone)
    assert [o.outputs[0].token_ids for o in outs[len(constrained):]] == [o.outputs[0].token_ids for o in free_alone]

    deferred = [0]
    finish = llm_async.engine.runner.finish_sampling

    def counted(handle):
        deferred[0] += handle.sample_deferred and handle.logits is not None
        return finish(handle)

    llm_async.engine.runner.finish_sampling = counted
    outs_async = llm_async.generate([PROMPT] * (len(constrained) + len(FREE)), constrained + FREE, use_tqdm=False)
    assert deferred[0] > 0  # steps ran ahead of constrained rows and sampled once their token was known
    assert _texts(outs_async) == _texts(outs)
    for eng in (llm.engine, llm_async.engine):
        assert not eng.structured.active  # every sequence's matcher was released
        m = eng.get_metrics()
        assert m["kv_blocks_free"] == m["kv_blocks_total"]


def test_bad_specs_fail_alone_within_the_cap_and_the_cache_stays_bounded(llm):
    bad = [StructuredOutputsParams(json={"type": "foo"}), StructuredOutputsParams(regex="(("),
           StructuredOutputsParams(json={"type": "string", "pattern": "[a-"}),
           StructuredOutputsParams(grammar="root ::= undefined_rule"),
           StructuredOutputsParams(json={"properties": {"a": {"$ref": "#/nowhere"}}})]
    for so in bad:
        with pytest.raises(ValueError, match="structured_outputs: invalid") as e:
            llm.generate([PROMPT], SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
        assert "/project" not in str(e.value) and ".cc:" not in str(e.value)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    # A regex that takes seconds to compile is refused at the cap, and the engine serves on meanwhile.
    service = llm.engine.grammars
    cap = service.timeout_s
    service.timeout_s = 0.2
    try:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="did not compile within"):
            llm.generate([PROMPT], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
                regex="(.{1,100}){1,100}x")), use_tqdm=False)
        assert time.monotonic() - t0 < 1.5
        out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8
    finally:
        service.timeout_s = cap
    # A stream of unique schemas: the compile cache stays under its byte limit.
    limit = 2 * 1024**2
    service._compiler = None  # a fresh compiler with a small cache (as grammar_cache_bytes sets it)
    service.cache_bytes = limit
    total = biggest = 0
    for i in range(40):
        schema = {"type": "object", "properties": {f"field_{i}_{j}": {"type": "string"} for j in range(12)}}
        size = service.compile(StructuredOutputsParams(json=schema)).memory_size_bytes
        total, biggest = total + size, max(biggest, size)
        assert service.cache_size_bytes() <= limit + biggest  # evicted down to the limit after each insert
    assert total > 2 * limit and service.cache_size_bytes() > 0


def test_the_time_cap_starts_once_the_vocabulary_is_ready(llm, monkeypatch):
    """The vocabulary (xgrammar's TokenizerInfo) is built once, on the first compile: a cap shorter than
    that build must not refuse the first request's grammar, sync or async; the cap still holds after."""
    import asyncio

    import xgrammar as xgr

    from raylight.structured.compiler import GrammarCompileService

    real = xgr.TokenizerInfo.from_huggingface

    def slow_build(*a, **kw):
        time.sleep(1.0)  # a large vocabulary on a slow host
        return real(*a, **kw)

    monkeypatch.setattr(xgr.TokenizerInfo, "from_huggingface", slow_build)
    eng = llm.engine
    choice = StructuredOutputsParams(choice=["red", "blue"])
    for use_async in (False, True):
        service = GrammarCompileService(eng.tokenizer, 49152, eng.eos_token_ids, timeout_s=0.3)
        assert service.deadline(time.monotonic()) is None  # no vocabulary yet: no cap running
        t0 = time.monotonic()
        grammar = asyncio.run(service.compile_async(choice)) if use_async else service.compile(choice)
        assert grammar is not None and time.monotonic() - t0 >= 1.0
        submitted = time.monotonic()
        assert service.deadline(submitted) == submitted + 0.3
        assert service.deadline(service.vocab_ready_at - 5) == service.vocab_ready_at + 0.3
        with pytest.raises(ValueError, match="did not compile within 0.3 s"):
            slow = StructuredOutputsParams(regex="(.{1,100}){1,100}x")
            asyncio.run(service.compile_async(slow)) if use_async else service.compile(slow)
        service.shutdown()
