"""Our Triton attention kernels against the torch reference, run on CPU by Triton's interpreter (fp32).

The GPU twin (tests/gpu/test_triton_attention.py) reuses `make_step` and runs the same cases
compiled, in bf16 and fp32, plus large batches and CUDA-graph capture.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, so this must precede the
    # first import of triton_kernels. On a GPU machine the GPU tests cover the compiled kernels
    # instead, and the variable must not leak into them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from raylight.kernels.attention import AttentionSpec, CommonAttentionMetadata, get_attention_backend  # noqa: E402
from raylight.kernels.attention.torch_ref import TorchAttentionBackend  # noqa: E402

try:
    from triton.runtime.interpreter import InterpretedFunction

    from raylight.kernels.attention import triton_kernels as tk
    from raylight.kernels.attention.triton_backend import TritonAttentionBackend

    INTERPRETED = isinstance(tk._write_kv_kernel, InterpretedFunction)
    HAVE_TRITON = True
except ImportError:  # CI: no triton
    INTERPRETED = HAVE_TRITON = False

# Not pytest.importorskip at module level: the GPU tests import make_step from here.
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs triton, run by its CPU interpreter")

DECODE_CTX = [1, 16, 17, 100]  # block-boundary cases for block size 16
PREFILLS = [(0, 33), (40, 7), (31, 17)]  # (cached context, chunk length): fresh prompt, chunks on a prefix


def make_step(decode_ctx, prefills, *, bs, heads, kv_heads, dim, dtype, device, num_blocks=None, seed=0):
    """One flattened step: decodes (cached context each, one new token) then prefill chunks.

    Blocks come from a random permutation of `num_blocks` (default: what the step needs plus 3),
    so tables are scattered; the cache starts random (the new tokens' slots are overwritten by
    the backend's KV write). Returns (common, cache, q, k, v)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + 1 for c in decode_ctx] + [c + n for c, n in prefills]
    q_lens = [1] * len(decode_ctx) + [n for _, n in prefills]
    per_seq = [-(-L // bs) for L in seq_lens]
    num_blocks = num_blocks or sum(per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = np.zeros((len(seq_lens), max(per_seq)), dtype=np.int64)
    cursor = 0
    for i, n in enumerate(per_seq):
        block_tables[i, :n] = perm[cursor: cursor + n]
        cursor += n
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    slots = [block_tables[i, p // bs] * bs + p % bs
             for i, (L, n) in enumerate(zip(seq_lens, q_lens)) for p in range(L - n, L)]
    T = int(qsl[-1])
    common = CommonAttentionMetadata(len(decode_ctx), qsl, np.array(seq_lens, dtype=np.int64), block_tables,
                                     torch.tensor(slots, dtype=torch.int64, device=device))
    cache = torch.randn(num_blocks, 2, bs, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(T, heads, dim, generator=g).to(device, dtype)
    # K/V as strided views of one projection output, the way the model hands them over.
    kv = torch.randn(T, 2 * kv_heads * dim, generator=g).to(device, dtype)
    k = kv[:, : kv_heads * dim].view(T, kv_heads, dim)
    v = kv[:, kv_heads * dim:].view(T, kv_heads, dim)
    return common, cache, q, k, v


def reference(common, cache, q, k, v, bs, window, scale):
    ref = TorchAttentionBackend(bs, window, cache.device)
    ref_cache = cache.clone()
    out = ref.forward(q, k, v, ref_cache, ref.build(common), scale)
    return out, ref_cache


def rel_err(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def triton_backend(bs, heads, kv_heads, dim, window, dtype=torch.float32, device="cpu"):
    spec = AttentionSpec(bs, heads, kv_heads, dim, dtype, torch.device(device), window)
    return TritonAttentionBackend(spec)


def check_against_reference(backend, common, cache, q, k, v, tol):
    s = backend.spec
    scale = s.head_dim**-0.5
    want, ref_cache = reference(common, cache, q, k, v, s.block_size, s.sliding_window, scale)
    got = backend.forward(q, k, v, cache, backend.build(common), scale)
    assert torch.equal(cache, ref_cache)  # K/V landed in the same slots
    assert rel_err(got, want) < tol, rel_err(got, want)
    return got


# ---------------------------------------------------------------------------------------------


@interpreted
def test_write_kv_matches_indexing_and_skips_padding():
    bs, kvh, dim, T = 4, 2, 64, 7
    cache = torch.randn(5, 2, bs, kvh, dim)
    kv = torch.randn(T, 2 * kvh * dim)
    k, v = kv[:, : kvh * dim].view(T, kvh, dim), kv[:, kvh * dim:].view(T, kvh, dim)
    slots = torch.tensor([3, 0, -1, 19, 8, -1, 5])
    want = cache.clone()
    live = slots >= 0
    want[slots[live] // bs, 0, slots[live] % bs] = k[live]
    want[slots[live] // bs, 1, slots[live] % bs] = v[live]
    tk.write_kv(k, v, cache, slots)
    assert torch.equal(cache, want)
    tk.write_kv(k, v, cache, slots.to(torch.int32))  # int32 slot mappings work too
    assert torch.equal(cache, want)


@interpreted
@pytest.mark.parametrize("bs, heads, kv_heads, dim", [(16, 8, 2, 64), (16, 6, 2, 80), (32, 4, 4, 128)])
def test_forward_rope_equals_rotary_then_forward(bs, heads, kv_heads, dim):
    # rope_write_kv (rotary on q and k, K/V into the cache, one kernel) against rotary_qk then the KV write:
    # the same bits in q's attention output and in the cache, a padding slot (-1) included.
    from raylight.kernels import fused
    from raylight.kernels.rotary import RotaryEmbedding

    common, cache, q, k, v = make_step(DECODE_CTX, PREFILLS, bs=bs, heads=heads, kv_heads=kv_heads, dim=dim,
                                       dtype=torch.float32, device="cpu")
    common.slot_mapping[2] = -1
    T = q.shape[0]
    rope = RotaryEmbedding(dim, 256, 10000.0, None)
    positions = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(1))
    cos, sin = rope.cos[positions][:, None, :], rope.sin[positions][:, None, :]
    backend = triton_backend(bs, heads, kv_heads, dim, None)
    scale = dim**-0.5
    fused_cache = cache.clone()
    got = backend.forward_rope(q, k, v, cos, sin, fused_cache, backend.build(common), scale)
    q_rot, k_rot = fused.rotary_qk(q, k, cos, sin)
    want = backend.forward(q_rot, k_rot, v, cache, backend.build(common), scale)
    assert torch.equal(fused_cache, cache) and torch.equal(got, want)
    # and the kernel alone: the rotated q it returns is rotary_qk's
    assert torch.equal(fused.rope_write_kv(q, k, v, cos, sin, cache.clone(), common.slot_mapping), q_rot)


@interpreted
@pytest.mark.parametrize("bs, heads, kv_heads, dim, window", [
    (16, 8, 2, 64, None),  # GQA group of 4
    (16, 4, 4, 128, None),  # MHA
    (16, 8, 2, 64, 24),  # sliding window, shorter than most sequences
    (16, 6, 2, 80, None),  # head dim that is not a power of two, group of 3
    (32, 4, 2, 256, 40),  # widest heads, larger blocks, window
])
def test_mixed_batch_matches_reference(bs, heads, kv_heads, dim, window):
    step = make_step(DECODE_CTX, PREFILLS, bs=bs, heads=heads, kv_heads=kv_heads, dim=dim,
                     dtype=torch.float32, device="cpu")
    check_against_reference(triton_backend(bs, heads, kv_heads, dim, window), *step, tol=1e-4)


@interpreted
@pytest.mark.parametrize("window", [None, 40])
def test_split_decode_matches_unsplit_and_reference(window):
    bs, heads, kv_heads, dim = 8, 4, 1, 64
    step = make_step([1, 7, 60, 150], [], bs=bs, heads=heads, kv_heads=kv_heads, dim=dim,
                     dtype=torch.float32, device="cpu")
    backend = triton_backend(bs, heads, kv_heads, dim, window)
    backend.min_split_tokens = 16  # force splitting on these short contexts
    assert backend.build(step[0]).num_splits > 1
    got = check_against_reference(backend, *step, tol=1e-4)
    backend.target_programs = backend.full_batch_target_programs = 1  # no splitting
    assert backend.build(step[0]).num_splits == 1
    common, cache, q, k, v = step
    unsplit = backend.forward(q, k, v, cache, backend.build(common), dim**-0.5)
    assert rel_err(got, unsplit) < 1e-5


@interpreted
def test_prefill_only_on_cached_prefixes_across_blocks():
    bs, heads, kv_heads, dim = 8, 4, 2, 64
    step = make_step([], [(5, 20), (16, 3), (0, 1), (9, 40)], bs=bs, heads=heads, kv_heads=kv_heads, dim=dim,
                     dtype=torch.float32, device="cpu")
    check_against_reference(triton_backend(bs, heads, kv_heads, dim, None), *step, tol=1e-4)


@interpreted
def test_garbage_past_seq_len_is_never_read():
    bs, heads, kv_heads, dim = 16, 4, 2, 64
    common, cache, q, k, v = make_step([2, 20], [(3, 9)], bs=bs, heads=heads, kv_heads=kv_heads, dim=dim,
                                       dtype=torch.float32, device="cpu")
    backend = triton_backend(bs, heads, kv_heads, dim, None)
    meta = backend.build(common)
    clean = backend.forward(q, k, v, cache, meta, 0.125)
    for i, L in enumerate(common.seq_lens.tolist()):  # NaN in every slot past each sequence's end
        last = common.block_tables[i, (L - 1) // bs]
        cache[last, :, (L - 1) % bs + 1:] = float("nan")
    poisoned = backend.forward(q, k, v, cache, meta, 0.125)
    assert torch.equal(clean, poisoned)


@interpreted
def test_graph_metadata_matches_build():
    bs, heads, kv_heads, dim, batch, max_blocks = 16, 8, 2, 64, 4, 12
    backend = triton_backend(bs, heads, kv_heads, dim, None)
    meta = backend.make_graph_metadata(batch, max_blocks)
    for seed, ctx in enumerate([[1, 16, 17, 100], [40, 3, 120, 64]]):  # refilled in place, step after step
        common, cache, q, k, v = make_step(ctx, [], bs=bs, heads=heads, kv_heads=kv_heads, dim=dim,
                                           dtype=torch.float32, device="cpu", seed=seed)
        assert common.block_tables.shape[1] < max_blocks
        eager_cache = cache.clone()
        want = backend.forward(q, k, v, eager_cache, backend.build(common), dim**-0.5)
        backend.fill_graph_metadata(meta, common)
        got = backend.forward(q, k, v, cache, meta, dim**-0.5)
        assert torch.equal(cache, eager_cache)
        assert rel_err(got, want) < 1e-5
        assert not meta.block_tables[:, common.block_tables.shape[1]:].any()  # padded with 0


@interpreted
def test_registry(monkeypatch):
    spec = AttentionSpec(16, 4, 2, 64, torch.float32, torch.device("cpu"))
    assert get_attention_backend("triton", spec).name == "triton"
    assert get_attention_backend("auto", spec).name == "torch"  # never the interpreter unasked
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        get_attention_backend("triton", spec)


def test_decode_launch_options_come_from_the_tuned_table_or_the_environment(monkeypatch):
    monkeypatch.setattr(tk, "DECODE_TUNED", {64: dict(TILE=128, num_warps=8, num_stages=2)})
    assert tk._decode_launch(64, fp32=False) == dict(TILE=128, num_warps=8, num_stages=2)
    assert tk._decode_launch(128, fp32=False) == {}  # not tuned: the shared defaults
    # RAYLIGHT_DECODE_ATTN_CONFIG's entries, read once at import, override the table per head dim.
    monkeypatch.setattr(tk, "DECODE_TUNED", tk.parse_decode_config("64:32,2,4;128:64,4,3"))
    assert tk._decode_launch(64, fp32=False) == dict(TILE=32, num_warps=2, num_stages=4)
    assert tk._decode_launch(128, fp32=False) == dict(TILE=64, num_warps=4, num_stages=3)
    assert tk._decode_launch(64, fp32=True) == {}  # float32 (our accuracy mode) keeps its own tiles


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_warmup_builds_each_split_variant_on_both_sides_of_the_pdl_rule(monkeypatch):
    # PDL is decided per launch from the query's rows (kernels/pdl.py): with it asked for, the warm-up
    # must run every split count with a query of at most PDL_MAX_TOKENS rows and one of more, or a
    # step of many tokens compiles its variant live (W1 on an H100: 1.2 s inside its first mixed steps).
    from raylight.kernels.pdl import PDL_MAX_TOKENS

    spec = AttentionSpec(16, 4, 2, 64, torch.float32, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(tk, "decode_attention", lambda out, q, *a, **kw: seen.append((q.shape[0], a[6], kw["pdl"])))
    monkeypatch.setattr(tk, "prefill_attention", lambda *a, **kw: None)
    for pdl, rows in ((False, [1]), (True, [1, PDL_MAX_TOKENS + 1])):
        seen.clear()
        TritonAttentionBackend(spec, pdl=pdl).warmup(torch.zeros(2, 2, 16, 2, 64))
        splits = [1 << i for i in range(TritonAttentionBackend.MAX_SPLITS.bit_length())]
        assert sorted(seen) == sorted((n, s, pdl) for n in rows for s in splits)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_split_count_a_small_batch_at_four_programs_per_sm_a_full_one_at_sixteen(monkeypatch):
    # An H100's 132 SMs and the 8B / 1B shapes' 8 KV heads; graphs ask with the model's length (4096)
    backend = triton_backend(16, 32, 8, 128, None)
    backend.target_programs, backend.full_batch_target_programs = 4 * 132, 16 * 132
    splits = {bs: backend.num_splits(bs, 4096) for bs in (1, 8, 32, 48, 64, 72, 128, 256, 512)}
    # up to 33 sequences the 4-per-SM target still splits: as before (8B batch 8 and 32 measured so)
    assert [splits[b] for b in (1, 8, 32)] == [32, 8, 2]
    # a batch that fills the GPU alone splits long sequences against 16 per SM, never beyond it
    assert [splits[b] for b in (48, 64, 72, 128, 256, 512)] == [4, 4, 2, 2, 1, 1]
    assert backend.num_splits(48, 256) == 2  # a short context is not split below MIN_SPLIT_TOKENS
    monkeypatch.setenv("RAYLIGHT_DECODE_PROGRAMS_PER_SM", "4")  # the one-target rule of before
    old_rule = TritonAttentionBackend(backend.spec)
    assert old_rule.full_batch_target_programs == old_rule.target_programs
