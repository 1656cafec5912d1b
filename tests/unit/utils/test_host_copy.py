"""utils/host_copy: the step's host-to-device copies (page-locked staging on CUDA)."""

import numpy as np
import torch

from raylight.utils.host_copy import copy_to, pinned, to_device


def test_cpu_copies_are_plain_and_exact():
    a = np.arange(10, dtype=np.int64)
    t = to_device(a, torch.device("cpu"))
    assert t.device.type == "cpu" and t.tolist() == a.tolist()
    assert not pinned(a, torch.device("cpu")).is_pinned()  # nothing to pin without CUDA
    dst = torch.zeros(4, dtype=torch.int32)
    copy_to(dst, np.array([4, 3, 2, 1], dtype=np.int32))
    assert dst.tolist() == [4, 3, 2, 1]
    view = torch.zeros(2, 5, dtype=torch.int32)
    copy_to(view[:, :3], np.arange(6, dtype=np.int32).reshape(2, 3))  # a strided destination
    assert view.tolist() == [[0, 1, 2, 0, 0], [3, 4, 5, 0, 0]]

