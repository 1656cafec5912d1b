import pytest
import torch

from raylight.kernels import kv_copy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_copy_equals_torch(dtype):
    dev = torch.device("cuda")
    src = torch.randn(300, 2, 16, 8, 128, device=dev).to(dtype)
    dst = torch.randn(500, 2, 16, 8, 128, device=dev).to(dtype)
    ref = dst.clone()
    g = torch.Generator().manual_seed(0)
    src_ids = torch.randperm(300, generator=g)[:97].to(dev)
    dst_ids = torch.randperm(500, generator=g)[:97].to(dev)
    assert kv_copy.can_copy(dst, src)
    kv_copy.copy_blocks(dst, dst_ids, src, src_ids)
    ref[dst_ids] = src[src_ids]
    torch.cuda.synchronize()
    assert torch.equal(dst, ref)


def test_refuses_what_it_cannot_copy():
    dev = torch.device("cuda")
    a = torch.zeros(4, 2, 16, 8, 128, device=dev)
    assert not kv_copy.can_copy(a, a.cpu())
    assert not kv_copy.can_copy(a[:, :, :, :4], a[:, :, :, :4])  # a head slice: not whole blocks
    assert not kv_copy.can_copy(a.to(torch.bfloat16), a)
