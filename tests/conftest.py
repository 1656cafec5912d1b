"""Shared fixtures: the real SmolLM2 weights; the helpers are in raylight/testing/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from raylight.models.fetch import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
