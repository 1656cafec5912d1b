"""`raylight serve`'s --api-keys and --max-request-body-bytes: parsed into the AppConfig the app is built
from, checked by it (a bad value exits 2 with a line naming the field, before Ray starts), and in force on
the built server (the ingress's keys and body limit)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

ray = pytest.importorskip("ray")

from raylight.cluster.app import AppConfig, build_app
from raylight.cluster.cli import app_config_from, build_parser, main, split_keys
from raylight.cluster.ingress import OpenAIServer, build_api
from raylight.testing.fake_engine import FakeEngine


def config(*flags: str) -> AppConfig:
    return app_config_from(build_parser().parse_args(["serve", *flags]))


def test_defaults_are_appconfigs():
    cfg = config()
    assert cfg.api_keys == [] and cfg.api_key is None
    assert cfg.max_request_body_bytes == AppConfig().max_request_body_bytes == 16 * 1024 * 1024


def test_api_keys_comma_separated_and_repeated():
    cfg = config("--api-key", "k0", "--api-keys", "k1,k2", "--api-keys", " k3 ,,", "--api-keys", "k4")
    assert cfg.api_key == "k0"
    assert cfg.api_keys == ["k1", "k2", "k3", "k4"]
    assert split_keys(None) == [] and split_keys([",", " "]) == []


def test_engine_process_flag():
    assert config().engine_process is None  # the replica decides: its own process on a GPU
    assert config("--engine-process").engine_process is True
    assert config("--no-engine-process").engine_process is False


def test_max_request_body_bytes():
    assert config("--max-request-body-bytes", "4096").max_request_body_bytes == 4096
    with pytest.raises(SystemExit):  # not a number: argparse's usage error
        build_parser().parse_args(["serve", "--max-request-body-bytes", "lots"])


def test_out_of_range_limit_exits_2_naming_the_field_before_ray_starts(capsys, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    assert main(["serve", "--max-request-body-bytes", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_request_body_bytes" in err and "1024" in err, err


def test_the_flags_reach_the_server():
    """build_app binds the flags' values to the ingress; a server built with them accepts each key,
    refuses others, and answers a body over the limit with 413."""
    cfg = config("--api-key", "k0", "--api-keys", "ka,kb", "--api-keys", "kc", "--max-request-body-bytes", "2048")
    ingress = build_app(cfg)._bound_deployment
    assert ingress.name == "OpenAIIngress"
    api_key, kwargs = ingress.init_args[5], ingress.init_kwargs
    assert api_key == "k0" and kwargs["api_keys"] == ["ka", "kb", "kc"] and kwargs["max_request_body_bytes"] == 2048
    server = OpenAIServer(FakeEngine(), "m", None, 128, api_key, api_keys=kwargs["api_keys"],
                          max_request_body_bytes=kwargs["max_request_body_bytes"])
    client = TestClient(build_api(server))
    for key in ("k0", "ka", "kb", "kc"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer ka,kb"}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    r = client.post("/v1/completions", headers={"Authorization": "Bearer kb"}, content=b"x" * 4096)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/completions", headers={"Authorization": "Bearer kb"},
                    json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_stream_budget_reaches_each_engine_replica():
    """PoolConfig.max_stream_messages_per_s (default 500; null: never paced) is bound to the replicas, whose
    AsyncLLMEngine paces its streams with it (tests/unit/engine/test_async_engine.py)."""
    def replica_args(args):
        return build_app(args)._bound_deployment.init_args[0]._bound_deployment.init_args

    assert replica_args({"engine_args": {"load_format": "dummy"}})[6] == 500.0
    assert replica_args({"engine_args": {"load_format": "dummy"}, "max_stream_messages_per_s": 250})[6] == 250
    assert replica_args({"engine_args": {"load_format": "dummy"}, "max_stream_messages_per_s": None})[6] is None
    # The replica process's GIL switch interval (PoolConfig.gil_switch_interval_s): Python's unless set.
    assert replica_args({"engine_args": {"load_format": "dummy"}})[7] is None
    assert replica_args({"engine_args": {"load_format": "dummy"}, "gil_switch_interval_s": 0.0005})[7] == 0.0005
    # Where the engine runs (PoolConfig.engine_process): None decides by device in the replica.
    assert replica_args({"engine_args": {"load_format": "dummy"}})[8] is None
    assert replica_args({"engine_args": {"load_format": "dummy"}, "engine_process": True})[8] is True
