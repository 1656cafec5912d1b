"""The repository's only importable top-level name is `raylight`: with the repository root first
on sys.path (as pytest, `serve run` and `python -c` from the root have it), nothing of ours shadows
a dependency. transformers 5.25 imports Hugging Face's `kernels` package, which our old root-level
`kernels/` folder shadowed on a fresh machine."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json, os, sys
root = os.getcwd()
sys.path.insert(0, root)
report = {"shadowing": []}
for entry in sorted(os.listdir(root)):
    name = entry[:-3] if entry.endswith(".py") else entry
    if name.startswith(".") or not name.isidentifier() or name == "raylight":
        continue
    if not (os.path.isdir(os.path.join(root, entry)) or entry.endswith(".py")):
        continue
    spec = importlib.util.find_spec(name)
    if spec is None:
        continue
    origin = spec.origin if spec.origin not in (None, "namespace") else None
    if origin is not None and os.path.abspath(origin).startswith(root + os.sep):
        report["shadowing"].append(name)  # a regular module or package of ours: it could shadow
import transformers.integrations.hub_kernels  # noqa: F401  (imports HF's `kernels` where installed)
import importlib.metadata
try:
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    report["kernels"] = None  # not installed: nothing to shadow
else:
    import kernels  # installed: it must import, and be theirs
    report["kernels"] = os.path.abspath(kernels.__file__)
import raylight
report["raylight"] = os.path.abspath(raylight.__file__)
print(json.dumps(report))
"""

LOAD = r"""
import sys, os, tempfile
sys.path.insert(0, os.getcwd())
import torch, transformers
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
with tempfile.TemporaryDirectory() as d:
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    m = transformers.AutoModelForCausalLM.from_pretrained(d)
    out = m(torch.tensor([[1, 2, 3]])).logits
print(tuple(out.shape))
"""


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(_run(PROBE))


def test_no_root_folder_shadows_a_dependency(report):
    assert report["shadowing"] == [], f"importable from the repository root: {report['shadowing']}"
    assert report["raylight"] == str(ROOT / "raylight" / "__init__.py")


def test_kernels_is_hugging_faces_package(report):
    if report["kernels"] is None:
        pytest.skip("Hugging Face's `kernels` package is not installed")
    assert not report["kernels"].startswith(str(ROOT) + os.sep), report["kernels"]


def test_a_model_loads_through_transformers_from_the_root():
    assert _run(LOAD) == "(1, 3, 64)"


def test_the_package_is_a_directory():
    assert not (ROOT / "__init__.py").exists()
    assert "package-dir" not in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "raylight" / "__init__.py").exists()
