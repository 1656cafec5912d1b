"""Finding a model (local dir, GGUF file, hub id, preset, default) and filling its weights."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from raylight.kernels.config import KernelConfig
from raylight.models import registry
from raylight.models.config import PRESETS, ModelArchConfig
from raylight.parallel.state import ParallelGroups

logger = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    arch: ModelArchConfig
    path: Optional[str]  # HF-format directory, or None for a preset with dummy weights
    load_format: str  # "safetensors" or "dummy"
    name: str


def resolve_model(model: Optional[str], load_format: str = "auto", revision: Optional[str] = None) -> ResolvedModel:
    if model is None:
        from raylight.defaults import DEFAULT_MODEL_NAME
        from raylight.models.fetch import default_model_dir

        path = default_model_dir()
        return _resolved(path, load_format, DEFAULT_MODEL_NAME)
    if load_format == "dummy" and model in PRESETS:
        return ResolvedModel(ModelArchConfig.from_dict(PRESETS[model]), None, "dummy", model)
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf file; pass a directory or a .gguf file")
        from raylight.models.gguf import ensure_converted

        return _resolved(ensure_converted(model), load_format, os.path.basename(model))
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            ggufs = sorted(glob.glob(os.path.join(model, "*.gguf")))
            if len(ggufs) == 1:
                from raylight.models.gguf import ensure_converted

                return _resolved(ensure_converted(ggufs[0]), load_format, os.path.basename(model.rstrip("/")))
            raise ValueError(f"model directory {model!r} has no config.json (nor a single .gguf file)")
        return _resolved(model, load_format, model)
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", model) and not model.startswith((".", "/")):
        return _resolved(_download_from_hub(model, revision), load_format, model)
    presets = ", ".join(sorted(PRESETS))
    raise ValueError(f"model {model!r} is not a local directory, a .gguf file or a hub id "
                     f"(with load_format='dummy', presets are: {presets})")


def _resolved(path: str, load_format: str, name: str) -> ResolvedModel:
    fmt = "dummy" if load_format == "dummy" else "safetensors"
    if fmt == "safetensors" and not glob.glob(os.path.join(path, "*.safetensors")):
        raise ValueError(f"model directory {path!r} has no *.safetensors weights")
    return ResolvedModel(ModelArchConfig.from_dir(path), path, fmt, name)


def _download_from_hub(repo_id: str, revision: Optional[str]) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:  # offline, gated, unknown repo: one clear message
        raise RuntimeError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}). Without network access, pass a local "
            f"HF directory or a .gguf file, or omit the model to use the default SmolLM2-135M-Instruct."
        ) from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class LazyTensor:
    """A checkpoint tensor not read yet. A tensor-parallel rank narrows it to its own slice, and only
    that slice is read from the (memory-mapped) file; `read()` reads all of it."""

    def __init__(self, file_slice, dtype: torch.dtype):
        self._slice, self.dtype = file_slice, dtype
        self.shape = torch.Size(file_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"slice [{start}, {start + length}) out of range for dim {dim} of {tuple(self.shape)}")
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index].to(self.dtype)

    def read(self) -> torch.Tensor:
        return self._slice[:].to(self.dtype)


def iter_safetensors(path: str, dtype: torch.dtype) -> Iterator[tuple[str, LazyTensor]]:
    """Every tensor of the checkpoint, lazily, one file open at a time (use each before the next)."""
    from safetensors import safe_open

    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, LazyTensor(f.get_slice(name), dtype)


def build_model(resolved: ResolvedModel, attn_backend, dtype: torch.dtype, device: torch.device,
                max_positions: int, seed: int = 0, groups: Optional[ParallelGroups] = None,
                kernels: Optional[KernelConfig] = None) -> torch.nn.Module:
    """This rank's part of the model (all of it with the default single-process groups), filled
    from the checkpoint one tensor slice at a time. `kernels`: the engine's KernelConfig (None:
    the defaults with the environment's overrides)."""
    cls = registry.model_class(resolved.arch.architecture)
    kernels = kernels if kernels is not None else KernelConfig.from_args(None)
    with torch.device(device), _default_dtype(dtype):
        model = cls(resolved.arch, attn_backend, max_positions, groups, kernels)
    if resolved.load_format == "dummy":
        _init_dummy(model, seed)
    else:
        loaded = model.load_weights(iter_safetensors(resolved.path, dtype))
        missing = model.expected_weights() - loaded
        if missing:
            raise ValueError(f"checkpoint at {resolved.path!r} lacks {len(missing)} tensors, "
                             f"e.g. {sorted(missing)[:3]}")
    return model.eval()


@torch.no_grad()
def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights with real shapes (benchmarks); norms stay at one so activations stay sane."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    fill_experts = getattr(model, "fill_dummy_experts", None)
    for name, p in model.named_parameters():
        if fill_experts is not None and name.endswith((".experts.w13_weight", ".experts.w2_weight")):
            continue  # per expert, below
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    if fill_experts is not None:
        # Seeded by (layer, expert), not by slot: replicas match, and so do EP layouts of one model.
        fill_experts(seed)
