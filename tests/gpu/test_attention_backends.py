"""Each GPU attention backend against the torch reference on a ragged batch (bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylight.kernels.attention import AttentionSpec, CommonAttentionMetadata, get_attention_backend
from raylight.kernels.attention.torch_ref import TorchAttentionBackend

pytestmark = pytest.mark.gpu


def ragged_step(bs: int, num_blocks: int, heads: int, kv_heads: int, dim: int, dtype, seed=0):
    """Decodes with contexts of 1, 16, 17 and 100 tokens, then a fresh 33-token prompt and a
    7-token chunk on a 40-token cached prefix (block-boundary cases included)."""
    g = torch.Generator().manual_seed(seed)
    decode_ctx = [1, 16, 17, 100]
    prefills = [(0, 33), (40, 7), (31, 1 + 16)]
    seq_lens = [c + 1 for c in decode_ctx] + [c + q for c, q in prefills]
    q_lens = [1] * len(decode_ctx) + [q for _, q in prefills]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, cursor = [], 0
    for L in seq_lens:
        n = -(-L // bs)
        tables.append(perm[cursor: cursor + n])
        cursor += n
    width = max(map(len, tables))
    block_tables = np.zeros((len(tables), width), dtype=np.int64)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = t
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    slots = []
    for i, (L, ql) in enumerate(zip(seq_lens, q_lens)):
        for p in range(L - ql, L):
            slots.append(block_tables[i, p // bs] * bs + p % bs)
    T = int(qsl[-1])
    dev = torch.device("cuda")
    common = CommonAttentionMetadata(len(decode_ctx), qsl, np.array(seq_lens), block_tables,
                                     torch.tensor(slots, device=dev))
    cache = torch.randn(num_blocks, 2, bs, kv_heads, dim, generator=g).to(dev, dtype)
    q = torch.randn(T, heads, dim, generator=g).to(dev, dtype)
    k = torch.randn(T, kv_heads, dim, generator=g).to(dev, dtype)
    v = torch.randn(T, kv_heads, dim, generator=g).to(dev, dtype)
    return common, cache, q, k, v


@pytest.mark.parametrize("backend_name", ["flashinfer"])
@pytest.mark.parametrize("bs, heads, kv_heads, dim, window", [(16, 32, 8, 64, None), (16, 8, 8, 128, None),
                                                              (16, 32, 8, 128, 24)])
def test_backend_matches_reference(backend_name, bs, heads, kv_heads, dim, window):
    pytest.importorskip(backend_name)
    dtype = torch.bfloat16
    common, cache, q, k, v = ragged_step(bs, 64, heads, kv_heads, dim, dtype)
    spec = AttentionSpec(bs, heads, kv_heads, dim, dtype, torch.device("cuda"), window)
    backend = get_attention_backend(backend_name, spec)
    ref = TorchAttentionBackend(bs, window, torch.device("cuda"))
    ref_cache = cache.clone()
    scale = dim**-0.5
    want = ref.forward(q, k, v, ref_cache, ref.build(common), scale).float()
    got = backend.forward(q, k, v, cache, backend.build(common), scale).float()
    assert torch.equal(cache, ref_cache)  # K/V landed in the same slots
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-2, float(rel)
    per_token = (got - want).abs().amax(dim=(1, 2))
    assert float(per_token.max()) < 0.1, per_token
