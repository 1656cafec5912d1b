"""utils/host_copy on CUDA: host-to-device copies are staged in page-locked memory; device tensors pass through."""

import numpy as np
import pytest
import torch

from raylight.utils.host_copy import copy_to, pinned, to_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_copies_go_through_page_locked_memory():
    dev = torch.device("cuda")
    a = np.arange(1 << 16, dtype=np.int64)  # 512 KiB: large enough for a pageable copy to sync
    assert pinned(a, dev).is_pinned()
    t = to_device(a, dev)
    del a  # the copy reads its own page-locked buffer
    dst = torch.zeros(3, 4, dtype=torch.int32, device=dev)
    copy_to(dst[:, 1:3], np.arange(6, dtype=np.int32).reshape(3, 2))
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.arange(1 << 16))
    assert dst.cpu().tolist() == [[0, 0, 1, 0], [0, 2, 3, 0], [0, 4, 5, 0]]


def test_device_tensors_are_copied_as_they_are():
    """A source already on the GPU (attention metadata built from device tensors) is not pinned:
    pinning is for host memory only, and a device-to-device copy never syncs."""
    dev = torch.device("cuda")
    src = torch.arange(8, device=dev)
    assert pinned(src, dev) is src
    dst = torch.zeros(8, dtype=torch.long, device=dev)
    copy_to(dst, src)
    assert torch.equal(to_device(src, dev), src) and dst.cpu().tolist() == list(range(8))
