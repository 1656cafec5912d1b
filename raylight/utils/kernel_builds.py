"""`KernelBuilds`, for scripts/bench_throughput.py and tests/gpu/test_warmup_gpu.py (issue 18: nothing
compiles in the request path)."""

from __future__ import annotations

import os


class KernelBuilds:
    """Counts the kernels built while it runs: Triton variants compiled or loaded from Triton's disk
    cache (its post-compile hook), and new FlashInfer JIT modules (shared objects appearing in its
    workspace). After the engine is ready both must stay at zero: any build is a request waiting."""

    def __init__(self):
        self.triton: list[str] = []
        self._prev_hook = None
        self._fi_before: set[str] = set()

    @staticmethod
    def _fi_modules() -> set[str]:
        """FlashInfer's JIT modules on disk: under $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer when that is
        set (scripts/gpu_env.sh sets it), else ~/.cache/flashinfer."""
        base = os.environ.get("FLASHINFER_WORKSPACE_BASE")
        root = os.path.join(base, ".cache", "flashinfer") if base else os.path.expanduser("~/.cache/flashinfer")
        return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".so")}

    def start(self) -> "KernelBuilds":
        self._fi_before = self._fi_modules()
        try:
            import triton.knobs as knobs
        except Exception:
            return self
        self._prev_hook = knobs.runtime.jit_post_compile_hook

        def hook(*args, **kwargs):
            fn = kwargs.get("fn")  # a JITFunction (its Python function in .fn), or absent in other Triton versions
            name = getattr(getattr(fn, "fn", fn), "__name__", None)
            self.triton.append(name or str(kwargs.get("repr", "?"))[:80])
            return self._prev_hook(*args, **kwargs) if self._prev_hook else None

        knobs.runtime.jit_post_compile_hook = hook
        return self

    def stop(self) -> dict:
        try:
            import triton.knobs as knobs

            knobs.runtime.jit_post_compile_hook = self._prev_hook
        except Exception:
            pass
        fi_new = sorted(self._fi_modules() - self._fi_before)
        return dict(triton=len(self.triton), triton_kernels=sorted(set(self.triton)),
                    flashinfer=len(fi_new), flashinfer_modules=[os.path.basename(m) for m in fi_new])
