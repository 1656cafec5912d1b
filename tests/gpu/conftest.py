"""Shared by the GPU tests: the small random Llama they run the engine on."""

from __future__ import annotations

import pytest

from raylight.testing.helpers import make_random_hf_model


@pytest.fixture(scope="session")
def gpu_llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama-gpu"))
    # head_dim 64 (256 / 4): a size every GPU backend supports. weight_std 0.04 (0.64/sqrt(hidden)) keeps the
    # activations' scale flat across layers: with conftest's default (0.15, meant for hidden 64) HF's own bf16
    # run picks fp32's top-1 on only ~90% of steps on CPU, so no bf16 engine could reach the issue's 95%.
    make_random_hf_model("llama", path, hidden_size=256, intermediate_size=512, embed_std=1.0, weight_std=0.04)
    return path


class _EveryShape(dict):
    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        from raylight.kernels import gemv

        return gemv.ROWS_DEFAULT


@pytest.fixture
def few_rows_everywhere(monkeypatch):
    """The few-row kernel (its default config) for every shape on any GPU: the committed tables list the
    8B shapes on an H100 only, so the small test model would otherwise never take it."""
    from raylight.kernels import gemv

    monkeypatch.setattr(gemv, "ROWS_CONFIGS", _EveryShape())
