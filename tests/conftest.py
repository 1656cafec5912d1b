"""Shared fixtures: the real SmolLM2 weights; the helpers are in raylight/testing/helpers.py."""

from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (macOS, musl): nothing to trim
    _LIBC = None


@pytest.fixture(autouse=True, scope="module")
def _return_freed_memory():
    """After each module, hand the heap pages its engines and models freed back to the OS. glibc keeps
    them otherwise (torch's CPU tensors come from malloc, whose mmap threshold grows with each large
    free): the suite's process had grown to 11 GiB of the CI machine's 24 a quarter of the way through
    (that run, with 50% I/O wait, took 31 min against the usual 24-28). tests/unit/models plus
    remote_prefill ended at 0.6 GiB with this, 2.3-3.2 GiB without."""
    yield
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)

# The helpers that run apps on the local Ray + Serve that raylight.testing.helpers.local_serve keeps
# between modules; a module that imports none of them gets the CPU that an idle Ray and Serve take.
_LOCAL_SERVE_USERS = ("serve_app", "serve_app_under_load", "local_serve")


@pytest.fixture(autouse=True, scope="module")
def _local_serve_only_where_used(request):
    """Shuts down the shared local Ray + Serve before a module that does not use it (idle, they take ~7%
    of a core), and at the end of the session."""
    from raylight.testing.helpers import shutdown_local_serve

    if not any(hasattr(request.module, name) for name in _LOCAL_SERVE_USERS):
        shutdown_local_serve()
    yield


@pytest.fixture(autouse=True, scope="session")
def _local_serve_shut_down_at_exit():
    yield
    from raylight.testing.helpers import shutdown_local_serve

    shutdown_local_serve()


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
