"""`raylight serve`/`generate`'s expert-parallel flags, vLLM's spelling: --enable-expert-parallel,
--enable-eplb and --eplb-config '<json>' land in EngineArgs' fields; a bad JSON or field is a usage error,
and --enable-eplb without --enable-expert-parallel exits 2 with EngineArgs' message before Ray starts."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from raylight.cluster.app import AppConfig
from raylight.cluster.cli import app_config_from, build_parser, engine_args_from, main
from raylight.config import EPLBConfig


def config(*flags: str) -> AppConfig:
    return app_config_from(build_parser().parse_args(["serve", *flags]))


def test_flags_map_to_engine_args():
    cfg = config("--tensor-parallel-size", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config",
                 '{"window_size": 10, "step_interval": 40, "num_redundant_experts": 2, "log_balancedness": true}')
    engine = cfg.engine()
    assert engine.enable_expert_parallel and engine.enable_eplb and engine.tensor_parallel_size == 2
    assert engine.eplb_config == EPLBConfig(window_size=10, step_interval=40, num_redundant_experts=2,
                                            log_balancedness=True)


def test_left_out_flags_keep_engine_args_defaults():
    ns = build_parser().parse_args(["generate", "hi", "--eplb-config", '{"window_size": 7}'])
    assert engine_args_from(ns) == {"eplb_config": {"window_size": 7}}  # only the keys given
    engine = config().engine()
    assert not engine.enable_expert_parallel and not engine.enable_eplb and engine.eplb_config == EPLBConfig()
    assert config("--no-enable-expert-parallel").engine().enable_expert_parallel is False


@pytest.mark.parametrize("value,words", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object of EPLBConfig"),
    ('{"window_siz": 10}', "window_siz: Extra inputs are not permitted"),
    ('{"step_interval": 0}', "step_interval: Input should be greater than or equal to 1"),
])
def test_bad_eplb_config_is_a_usage_error(value, words, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--eplb-config", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--eplb-config" in err and words in err, err


def test_eplb_without_expert_parallel_exits_2_before_ray_starts(capsys, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    assert main(["serve", "--enable-eplb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "enable_eplb needs enable_expert_parallel=True" in err, err
