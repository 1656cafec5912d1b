"""Checklist rows 36 and 37: a model repository's code and pickles never run, and the model cache is
private."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest

from raylight import LLM, SamplingParams
from raylight.models.gguf import cache_root
from raylight.testing.helpers import make_random_hf_model


class _Trap:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_remote_code(path: str, marker: str) -> None:
    code = f"open({marker!r}, 'w').write('ran')\n"
    for name in ("modeling_evil.py", "tokenization_evil.py", "configuration_evil.py"):
        with open(os.path.join(path, name), "w") as f:
            f.write(code)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    json.dump(cfg, open(cfg_path, "w"))


def test_remote_code_in_a_model_directory_never_runs(tmp_path):
    path, marker = str(tmp_path / "model"), str(tmp_path / "ran")
    make_random_hf_model("llama", path)
    _plant_remote_code(path, marker)
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:  # a pickle beside the safetensors
        pickle.dump(_Trap(marker), f)
    out = LLM(path, device="cpu", dtype="float32", kv_cache_memory=2**22).generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    assert not os.path.exists(marker), "a repository's code or pickle ran"


def test_pickled_weights_alone_are_refused_unread(tmp_path):
    path, marker = tmp_path / "model", str(tmp_path / "ran")
    make_random_hf_model("llama", str(path))
    for f in path.glob("*.safetensors"):
        f.unlink()
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Trap(marker), f)
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(path), device="cpu")
    assert not os.path.exists(marker)


def test_the_model_cache_is_private(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RAYLIGHT_CACHE_DIR", str(root))
    assert stat.S_IMODE(os.stat(cache_root()).st_mode) & 0o077 == 0  # created 0700
    os.chmod(root, 0o777)  # loosened by someone: tightened again when it is ours
    assert stat.S_IMODE(os.stat(cache_root()).st_mode) & 0o022 == 0
