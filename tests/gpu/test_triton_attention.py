"""Our Triton attention backend compiled on CUDA: the interpreter cases in bf16 and fp32, large
batches, caches past 2**31 elements, and CUDA-graph capture of the decode path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylight.kernels.attention import AttentionSpec, CommonAttentionMetadata, get_attention_backend

from ..unit.kernels.test_triton_attention import (DECODE_CTX, PREFILLS, check_against_reference, make_step, rel_err,
                                                  reference, triton_backend)

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

# fp32 runs its dots in real fp32 (input_precision="ieee", not TF32), so it meets the tight bound.
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bs, heads, kv_heads, dim, window", [
    (16, 32, 8, 64, None),
    (16, 8, 8, 128, None),
    (16, 32, 8, 128, 24),
    (32, 12, 4, 80, None),  # not a power of two
    (16, 16, 2, 256, 40),
    (16, 64, 1, 128, None),  # a group of 64 heads per KV head
])
def test_mixed_batch_matches_reference(dtype, bs, heads, kv_heads, dim, window):
    step = make_step(DECODE_CTX, PREFILLS, bs=bs, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype,
                     device="cuda")
    check_against_reference(triton_backend(bs, heads, kv_heads, dim, window, dtype, "cuda"), *step, tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_seqs, window", [(256, None), (256, 1000), (3, None)])
def test_large_decode_batch(dtype, num_seqs, window):
    """Contexts up to 2048; 3 sequences split the KV (flash-decoding), 256 fill the GPU unsplit."""
    rng = np.random.default_rng(num_seqs)
    ctx = rng.integers(1, 2048, num_seqs).tolist()
    ctx[0] = 2047
    bs, heads, kv_heads, dim = 16, 32, 8, 128
    backend = triton_backend(bs, heads, kv_heads, dim, window, dtype, "cuda")
    step = make_step(ctx, [], bs=bs, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype, device="cuda")
    assert (backend.build(step[0]).num_splits > 1) == (num_seqs == 3)
    check_against_reference(backend, *step, tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_long_chunks_on_long_prefixes(dtype):
    bs, heads, kv_heads, dim = 16, 32, 8, 128
    step = make_step([5, 700], [(0, 1000), (1500, 512), (2000, 1), (33, 300)], bs=bs, heads=heads,
                     kv_heads=kv_heads, dim=dim, dtype=dtype, device="cuda")
    for window in (None, 256):
        common, cache, q, k, v = step
        check_against_reference(triton_backend(bs, heads, kv_heads, dim, window, dtype, "cuda"), common,
                                cache.clone(), q, k, v, tol=TOL[dtype])


def test_cache_beyond_int32_offsets():
    """Blocks past 2**31 elements: every offset must be computed in int64."""
    bs, kv_heads, dim, heads = 16, 8, 128, 32
    per_block = 2 * bs * kv_heads * dim
    num_blocks = 2**31 // per_block + 64
    if torch.cuda.mem_get_info()[0] < num_blocks * per_block * 2 * 1.3:
        pytest.skip("not enough free GPU memory for a 4 GiB cache")
    cache = torch.zeros(num_blocks, 2, bs, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    high = list(range(num_blocks - 40, num_blocks))  # every block of the sequence sits past 2**31 elements
    seq_len, T = 40 * bs, 1
    tables = np.array([high], dtype=np.int64)
    slot = high[-1] * bs + (seq_len - 1) % bs
    common = CommonAttentionMetadata(1, np.array([0, 1]), np.array([seq_len]), tables,
                                     torch.tensor([slot], device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    cache[high] = torch.randn(40, 2, bs, kv_heads, dim, generator=g, device="cuda").to(torch.bfloat16)
    q = torch.randn(T, heads, dim, generator=g, device="cuda").to(torch.bfloat16)
    k, v = (torch.randn(T, kv_heads, dim, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    backend = triton_backend(bs, heads, kv_heads, dim, None, torch.bfloat16, "cuda")
    got = backend.forward(q, k, v, cache, backend.build(common), dim**-0.5)
    assert torch.equal(cache[high[-1], 0, (seq_len - 1) % bs], k[0])
    sub = cache[high].clone()  # the same sequence in a small cache, for the reference
    small = CommonAttentionMetadata(1, np.array([0, 1]), np.array([seq_len]), np.arange(40)[None],
                                    torch.tensor([39 * bs + (seq_len - 1) % bs], device="cuda"))
    want, _ = reference(small, sub, q, k, v, bs, None, dim**-0.5)
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_cuda_graph_replays_new_contents(dtype):
    bs, heads, kv_heads, dim, batch, max_blocks = 16, 32, 8, 128, 8, 64
    backend = triton_backend(bs, heads, kv_heads, dim, None, dtype, "cuda")
    meta = backend.make_graph_metadata(batch, max_blocks)
    steps = [make_step(ctx, [], bs=bs, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype, device="cuda",
                       seed=seed, num_blocks=max_blocks * batch)
             for seed, ctx in enumerate([[1, 16, 17, 100, 5, 64, 900, 3], [300, 2, 33, 1000, 48, 7, 129, 15]])]
    common0, cache0, q0, k0, v0 = steps[0]
    assert all(s[1].shape == cache0.shape for s in steps)
    # Static inputs the graph reads; each step copies its data in before replay.
    cache, q, k, v = cache0.clone(), q0.clone(), k0.clone(), v0.clone()
    backend.fill_graph_metadata(meta, common0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the graph
            backend.forward(q, k, v, cache, meta, dim**-0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = backend.forward(q, k, v, cache, meta, dim**-0.5)
    for common, step_cache, sq, sk, sv in steps:
        cache.copy_(step_cache)
        q.copy_(sq)
        k.copy_(sk)
        v.copy_(sv)
        backend.fill_graph_metadata(meta, common)
        graph.replay()
        eager_cache = step_cache.clone()
        eager = backend.forward(sq, sk, sv, eager_cache, backend.build(common), dim**-0.5)
        torch.cuda.synchronize()
        assert torch.equal(cache, eager_cache)
        assert rel_err(out, eager) < (1e-5 if dtype == torch.float32 else 1e-2)
        want, _ = reference(common, step_cache, sq, sk, sv, bs, None, dim**-0.5)
        assert rel_err(out, want) < TOL[dtype]


def test_auto_picks_triton_for_fp32_on_cuda():
    spec = AttentionSpec(16, 8, 2, 64, torch.float32, torch.device("cuda"))
    assert get_attention_backend("auto", spec).name == "triton"  # FlashInfer is half precision only
    assert get_attention_backend("triton", spec).name == "triton"
