"""Shared by the engine tests: a small random Llama checkpoint on disk."""

from __future__ import annotations

import pytest

from raylight.testing.helpers import make_random_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_random_hf_model("llama", path)
    return path
