"""Host-to-device copies of a step's inputs that never make the host wait for the device.

A copy from pageable host memory may synchronise with the stream once it is large enough for the
driver to stage it (about 64 KiB: an 8192-token step's ids, positions and slots are each that big,
as are long block tables). Under async scheduling that wait stalls the host until the step in
flight finishes, so the next step's launch no longer overlaps it. Copies from page-locked memory
are truly asynchronous; torch's caching host allocator recycles the page-locked buffers once the
copies that read them have run, so a buffer may be dropped as soon as the copy is queued.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch


def pinned(t: Union[np.ndarray, torch.Tensor], device: torch.device) -> torch.Tensor:
    """`t` as a tensor to copy to `device` from: page-locked when it is on the host and `device` is
    CUDA; a tensor already on a device is returned as it is (a device-to-device copy never syncs)."""
    t = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
    if device.type != "cuda" or t.device.type != "cpu" or t.is_pinned():
        return t
    return t.pin_memory()


def to_device(a: Union[np.ndarray, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A host array on `device`, queued without a stream sync."""
    return pinned(a, device).to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, src: Union[np.ndarray, torch.Tensor]) -> None:
    """dst.copy_(src) from host memory, queued without a stream sync."""
    dst.copy_(pinned(src, dst.device), non_blocking=True)


def gather_rows(t: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """t[index] for a host index array, the index queued without a stream sync; when the index is
    0..n-1 (a decode step's rows in their usual order) the first n rows as a view, with no index to
    upload and no gather kernel."""
    n = len(index)
    if n and index[-1] == n - 1 and np.array_equal(index, np.arange(n)):
        return t[:n]
    return t[to_device(index, t.device)]
