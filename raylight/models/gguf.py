"""GGUF files -> HF-format safetensors directories (dequantized), converted once and cached.

transformers already knows how to dequantize GGUF tensors, undo llama.cpp's Q/K
permutation and rebuild the tokenizer (with its chat template) from GGUF metadata,
so we lean on it for the one-time conversion and load the result with our own code.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def cache_root() -> str:
    """Where raylight keeps converted models. Override with RAYLIGHT_CACHE_DIR."""
    root = os.environ.get("RAYLIGHT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raylight")
    # Private: converted weights are loaded as they are found, so nobody else may write them.
    os.makedirs(root, mode=0o700, exist_ok=True)
    mode = os.stat(root).st_mode & 0o777
    if mode & 0o022:
        if os.stat(root).st_uid == os.getuid():
            os.chmod(root, mode & ~0o077)
        else:
            raise PermissionError(f"the model cache {root} is writable by other users and not ours; "
                                  f"set RAYLIGHT_CACHE_DIR to a private directory")
    return root


@contextmanager
def file_lock(path: str):
    """Serialises conversions between processes (several replicas may start at once)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_converted(out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, "config.json")) and os.path.exists(
        os.path.join(out_dir, "model.safetensors"))


def converted_dir_for(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_root(), "gguf", f"{stem}-{key}")


def ensure_converted(gguf_path: str, out_dir: str | None = None) -> str:
    out_dir = out_dir or converted_dir_for(gguf_path)
    if is_converted(out_dir):
        return out_dir
    with file_lock(out_dir + ".lock"):
        if not is_converted(out_dir):
            convert_gguf_to_hf(gguf_path, out_dir)
    return out_dir


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an HF safetensors directory at %s (once)", gguf_path, out_dir)
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "float32"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)

    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir) or ".", prefix=".convert-")
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
