"""kernels/attention.int32_device_views: one transfer, every view on a 16-byte boundary (Triton
compiles a kernel variant per pointer alignment, so unaligned views would recompile mid-run)."""

from __future__ import annotations

import numpy as np
import torch

from raylight.kernels.attention import int32_device_views


def test_views_hold_the_arrays_and_start_16_byte_aligned():
    rng = np.random.default_rng(0)
    for sizes in ([3, 4, 9, 0, 5], [1, 2, 257, 13, 13], [0, 0, 1]):
        parts = [rng.integers(-5, 1000, n) for n in sizes]
        views = int32_device_views(parts, torch.device("cpu"))
        base = views[0].untyped_storage().data_ptr()
        assert all(v.untyped_storage().data_ptr() == base for v in views)  # one buffer, one copy
        for p, v in zip(parts, views):
            assert v.dtype == torch.int32 and v.tolist() == p.tolist()
            assert (v.data_ptr() - base) % 16 == 0
