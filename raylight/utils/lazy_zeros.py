"""Zero-filled host tensors whose pages exist only once written: the CPU KV cache.

Why: `torch.zeros` writes every byte, so each CPU engine paid for its whole KV budget up front (the
default is 2 GiB: about 2.5 s and 2 GiB of resident memory per engine on the CI machine, before a
single token) although a laptop session or a test touches a few blocks of it. An anonymous private
mapping is zero-filled by the kernel page by page on first touch, and given back to the system
(munmap) as soon as the tensor is freed. Private, so a forked child gets a copy-on-write view, as with
any other host memory.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype, device=device), lazily backed on the host (see above)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor holds the mapping alive
