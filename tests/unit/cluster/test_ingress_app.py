"""Each ingress builds its own FastAPI app with its own API key: two servers in one process share
nothing. No Ray is started: `OpenAIServer` is plain Python, driven here by a fake engine handle."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("ray")  # ingress.py imports ray.serve (no cluster is started)

from fastapi.testclient import TestClient

from raylight.cluster.ingress import OpenAIIngress, OpenAIServer, build_api
from raylight.messages import GenerateCall, ReplicaMessage
from raylight.outputs import CompletionOutput, RequestOutput


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class _Stream:
    """What `handle.options(stream=True).generate.remote(call)` returns: an async iterator of
    ReplicaMessages with cancel()."""

    def __init__(self, msgs):
        self.msgs = list(msgs)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.msgs:
            raise StopAsyncIteration
        return self.msgs.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeEngine:
    """Answers health, and each generate call with the prompt's ids echoed back reversed."""

    def __init__(self):
        self.calls: list[GenerateCall] = []
        self.health = _Remote(self._health)
        self.generate = _Remote(self._generate)

    async def _health(self):
        return True

    def _generate(self, call: GenerateCall):
        self.calls.append(call)
        ids = list(reversed(call.prompt))
        out = RequestOutput(call.request_id, None, list(call.prompt), [CompletionOutput(
            0, "".join(f"<{i}>" for i in ids), ids, finish_reason="length", delta_text="", delta_token_ids=ids)],
            finished=True)
        return _Stream([ReplicaMessage(output=out, replica_id="r0")])

    def options(self, **_):
        return self


def _client(key, engine=None, name="m"):
    server = OpenAIServer(engine or FakeEngine(), name, tokenizer=None, max_model_len=64, api_key=key,
                          default_max_tokens=4)
    return TestClient(build_api(server)), server


def _bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_two_servers_in_one_process_each_accept_only_their_own_key():
    a, server_a = _client("key-a", name="model-a")
    b, server_b = _client("key-b", name="model-b")  # built after a: must not change a's key
    assert a.app is not b.app
    for client, own, other, name in ((a, "key-a", "key-b", "model-a"), (b, "key-b", "key-a", "model-b")):
        ok = client.get("/v1/models", headers=_bearer(own))
        assert ok.status_code == 200, ok.text
        assert [m["id"] for m in ok.json()["data"]] == [name]
        for headers in (_bearer(other), {}, {"Authorization": own}, _bearer(own + "x")):
            r = client.get("/v1/models", headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        # auth runs before body validation: a bad body with the wrong key is a 401, not a 400
        assert client.post("/v1/completions", headers=_bearer(other), json={"prompt": []}).status_code == 401
        assert client.get("/health").status_code == 200  # the one route without a key
    assert (server_a.api_key, server_b.api_key) == ("key-a", "key-b")


def test_a_server_without_a_key_is_open_beside_one_with_a_key():
    open_, _ = _client(None)
    locked, _ = _client("secret")
    assert open_.get("/v1/models").status_code == 200
    assert open_.get("/v1/models", headers=_bearer("anything")).status_code == 200
    assert locked.get("/v1/models").status_code == 401
    assert locked.get("/v1/models", headers=_bearer("secret")).status_code == 200


def test_routes_reach_their_own_server():
    engine_a, engine_b = FakeEngine(), FakeEngine()
    a, _ = _client("key-a", engine_a, name="model-a")
    b, _ = _client("key-b", engine_b, name="model-b")
    r = a.post("/v1/completions", headers=_bearer("key-a"), json={"model": "model-a", "prompt": [1, 2, 3]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "model-a" and body["choices"][0]["text"] == "<3><2><1>"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert [c.prompt for c in engine_a.calls] == [[1, 2, 3]] and engine_b.calls == []
    assert engine_a.calls[0].params.max_tokens == 4  # the server's default_max_tokens
    # the other server's model name is not this one's
    r = b.post("/v1/completions", headers=_bearer("key-b"), json={"model": "model-a", "prompt": [1]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    # validation errors keep OpenAI's shape on every app
    r = b.post("/v1/completions", headers=_bearer("key-b"), json={"model": "model-b", "prompt": [1], "top_p": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = b.post("/tokenize", headers=_bearer("key-b"), json={"prompt": "text"})  # no tokenizer: ids only
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert engine_b.calls == []
    assert b.get("/version", headers=_bearer("key-b")).json()["version"]
    assert "raylight:prompt_tokens_total 0.0" in b.get("/metrics", headers=_bearer("key-b")).text
    assert "raylight:prompt_tokens_total 3.0" in a.get("/metrics", headers=_bearer("key-a")).text


def test_the_serve_deployment_builds_its_app_per_instance():
    """Serve 2.60: `@serve.ingress()` without an app calls `__serve_build_asgi_app__` on each
    replica's instance after its constructor; no app is pickled with the class."""
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    assert issubclass(OpenAIIngress, OpenAIServer) and issubclass(OpenAIIngress, ASGIAppReplicaWrapper)
    server = OpenAIServer(FakeEngine(), "m", None, 64, api_key="k")
    api1, api2 = server.__serve_build_asgi_app__(), OpenAIServer.__serve_build_asgi_app__(server)
    assert api1 is not api2
    import raylight.cluster.ingress as ingress

    assert not hasattr(ingress, "app")  # no module-level app left
