"""Schemathesis over the OpenAPI of the app `build_api(server)` builds (checklist row 38), in-process
against a fake engine and tokenizer (no Ray, no model), positive and negative modes: never a 5xx,
never a hang, every response matches the schema (errors are OpenAI-shaped, documented for every route).
Bounded: a fixed number of examples per route and mode, each request under a wall-clock alarm."""

from __future__ import annotations

import os
import signal
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("ray")  # ingress.py imports ray.serve (no cluster is started)

from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from raylight.cluster.ingress import OpenAIServer, build_api
from raylight.testing.fake_engine import FakeEngine, FakeTokenizer

EXAMPLES = 150  # per route and mode: about 30 s on 2 shared cores
PER_CALL_S = 10
DERANDOMIZE = os.environ.get("RAYLIGHT_FUZZ_RANDOM") != "1"  # fixed examples in CI; 1: new ones


def _app(api_key=None):
    server = OpenAIServer(FakeEngine(), "m", FakeTokenizer(), max_model_len=256, api_key=api_key,
                          default_max_tokens=4, max_request_body_bytes=64 * 1024)
    return build_api(server)


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang(f"a request took longer than {PER_CALL_S} s")


SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", _app())
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_fuzz_never_5xx_never_hangs_and_matches_the_schema(operation, mode):
    if mode == GenerationMode.NEGATIVE and not (operation.body or operation.query or operation.headers):
        pytest.skip("nothing to make invalid")
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))
    def run(case):
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(PER_CALL_S)
        try:
            t0 = time.perf_counter()
            # A schema-valid body may still break a rule the schema cannot say (best_of == n, top_logprobs
            # needs logprobs, a prompt within the window): its 400 is documented, so not a failure.
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert response.status_code < 500, (case.body, response.text)
        assert time.perf_counter() - t0 < PER_CALL_S
        seen.append(response.status_code)

    run()
    assert seen
