"""The startup heap out of the cyclic garbage collector's way, in a long-running serving process.

After imports (torch, transformers, Ray, Serve) and a model load a process holds ~700k objects the
collector tracks; on our CPU one full (oldest-generation) collection of them took 121 ms, and one ran
every couple of seconds of engine work. In the engine's process that is a stall of every stream; in the
ingress or the replica, of every request passing through. Objects alive at the end of start-up live as
long as the process, so `freeze_heap` collects once and moves them to the permanent generation: later
collections walk only what was made since (vLLM's engine core does the same)."""

from __future__ import annotations

import contextlib
import gc
import logging
import time

logger = logging.getLogger("raylight")


def freeze_heap(where: str) -> None:
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("%s: froze %d start-up objects out of the garbage collector's walks (%.0f ms)", where,
                gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)


@contextlib.contextmanager
def collector_paused():
    """No cyclic collection inside the block, one just before it. For CUDA graph capture: a collection
    mid-capture may free an earlier engine's objects (a cycle left behind by `del llm`), and a CUDA call
    their teardown makes may be one a capturing stream forbids, and the capture then fails at the next
    launch. The likely cause of "operation failed due to a previous error during capture" seen once (H100,
    tests/gpu/test_pdl_gpu.py building five engines in one process; not reproduced in the next run)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
