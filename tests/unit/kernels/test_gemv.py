"""kernels/gemv.py's Triton kernels against F.linear, run on CPU by Triton's interpreter (fp32): the
single-row GEMV and the few-row kernel (`gemv_rows`), odd shapes (N not a multiple of the block, K not a
multiple of BLOCK_K), every row count up to a block and past it, with and without the SiLU-and-mul input.
The GPU twin (tests/gpu/test_gemv_gpu.py) runs them compiled in bf16/fp16 and inside CUDA graphs."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first decorated

from raylight.kernels import gemv  # noqa: E402
from raylight.kernels.config import ROWS_ENV_VAR, KernelConfig  # noqa: E402
from raylight.kernels.fused import torch_silu_and_mul  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None

interpreted = pytest.mark.skipif(torch.cuda.is_available() or not HAVE_TRITON,
                                 reason="needs triton, run by its CPU interpreter")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@interpreted
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 40])
@pytest.mark.parametrize("shape,config", [((96, 64), (32, 32, 4, 1)), ((50, 70), (16, 32, 4, 1))])
def test_rows_kernel_matches_linear(rows, shape, config):
    N, K = shape
    g = torch.Generator().manual_seed(rows * 1000 + N)
    w = torch.randn(N, K, generator=g) * 0.1
    x = torch.randn(rows, K, generator=g)
    got = gemv.gemv_rows(x, w, config)
    assert got.shape == (rows, N)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-4, atol=1e-4)
    # Rows are independent: each equals its own product (no row reads another's padding).
    torch.testing.assert_close(gemv.gemv_rows(x[-1:], w, config)[0], got[-1], rtol=1e-4, atol=1e-4)


@interpreted
@pytest.mark.parametrize("rows", [2, 17])
@pytest.mark.parametrize("shape,config", [
    ((96, 256), (32, 32, 4, 1, 4)),   # K splits evenly: 4 x 64 columns
    ((50, 200), (16, 32, 4, 1, 3)),   # odd N and K: splits of 96, 96 and 8 columns, the last partly masked
    ((40, 64), (16, 32, 4, 1, 8)),    # more splits asked than K has chunks: 2 splits of one chunk each
])
def test_split_k_rows_kernel_matches_linear_and_leaves_its_counts_at_zero(rows, shape, config):
    N, K = shape
    g = torch.Generator().manual_seed(rows + N + K)
    w = torch.randn(N, K, generator=g) * 0.1
    x = torch.randn(rows, K, generator=g)
    want = F.linear(x, w)
    for _ in range(2):  # the second call finds the arrival counts back at zero
        torch.testing.assert_close(gemv.gemv_rows(x, w, config), want, rtol=1e-4, atol=1e-4)
    assert not gemv._split_counts(x.device).any()
    # the same bits as the unsplit kernel's up to summation order
    torch.testing.assert_close(gemv.gemv_rows(x, w, config[:4]), want, rtol=1e-4, atol=1e-4)


def test_split_k_configs_round_trip_the_table_format():
    table = {(4096, 4096, 16): (32, 128, 4, 4, 4), (6144, 4096, 16): (32, 128, 4, 4), (4096, 4096, 32): None}
    assert gemv.parse_config(gemv.format_config(table)) == table


@interpreted
def test_single_row_gemv_with_the_silu_and_mul_input():
    N, K = 48, 80
    g = torch.Generator().manual_seed(1)
    w = torch.randn(N, K, generator=g) * 0.1
    x = torch.randn(1, 2 * K, generator=g)
    want = F.linear(torch_silu_and_mul(x), w)
    torch.testing.assert_close(gemv.gemv(x, w, (16, 32, 4, 1), silu_and_mul=True), want, rtol=1e-4, atol=1e-4)


@interpreted
def test_single_row_gemv_matches_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 97, generator=g) * 0.1
    x = torch.randn(1, 97, generator=g)
    torch.testing.assert_close(gemv.gemv(x, w, (16, 32, 4, 1)), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_rows_outside_the_kernel_are_refused_and_cpu_tensors_go_to_torch():
    with pytest.raises(ValueError, match="1 to 64 rows"):
        gemv.gemv_rows(torch.zeros(gemv.MAX_ROWS + 1, 8), torch.zeros(4, 8))
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert not gemv.applies(x, w, max_rows=8)  # not CUDA
    torch.testing.assert_close(gemv.linear(x, w, kernels=KernelConfig(gemv_max_rows=8)), F.linear(x, w))


def test_max_rows_from_args_and_env():
    assert KernelConfig().gemv_max_rows == 64  # on by default where its table has the shape (H100 sweep)
    assert KernelConfig.from_args(None, environ={ROWS_ENV_VAR: "32"}).gemv_max_rows == 32
    assert KernelConfig.from_args(KernelConfig(gemv_max_rows=8), environ={}).gemv_max_rows == 8
    assert KernelConfig.from_args(KernelConfig(gemv_max_rows=8), environ={ROWS_ENV_VAR: "16"}).gemv_max_rows == 16
    for junk in ("0", "-2", "many", ""):  # not a positive integer: the argument stays in charge
        assert KernelConfig.from_args(KernelConfig(gemv_max_rows=8), environ={ROWS_ENV_VAR: junk}).gemv_max_rows == 8


def test_the_rows_table_round_trips_its_env_format_and_marks_where_cublas_wins(monkeypatch):
    text = "4096,14336,32:cublas;6144,4096,16:32,256,4,4"
    table = gemv.parse_config(text + ";")
    assert table == {(6144, 4096, 16): (32, 256, 4, 4), (4096, 14336, 32): None}
    assert gemv.parse_config(gemv.format_config(table)) == table
    assert gemv.parse_config("") == {}
    assert gemv.parse_config("3072,4096:8,1024,8,4") == {(3072, 4096): (8, 1024, 8, 4)}  # the single-row table
    assert [gemv.row_tile(r) for r in (2, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]
    monkeypatch.setattr(gemv, "ROWS_CONFIGS", table)
    assert gemv.rows_config(6144, 4096, 8) == (32, 256, 4, 4)
    assert gemv.rows_config(4096, 14336, 20) is None  # cuBLAS at this tile: linear will not route here
    assert gemv.rows_config(4096, 14336, 8) is None  # not measured at this tile: cuBLAS as well


def test_pdl_is_on_by_default_and_never_on_cpu():
    from raylight.kernels.pdl import launch_options

    assert KernelConfig().pdl is True  # measured faster at batch 1 (H100)
    assert KernelConfig.from_args(None, environ={"RAYLIGHT_PDL": "0"}).pdl is False
    assert KernelConfig.from_args(KernelConfig(pdl=False), environ={"RAYLIGHT_PDL": "1"}).pdl is True
    assert launch_options(True, torch.zeros(1)) == {"PDL": False}
    assert launch_options(False, torch.zeros(1)) == {"PDL": False}
    assert launch_options(True, torch.zeros(65, 8)) == {"PDL": False}
    # the weight prefetch goes with PDL only (ahead of its wait), so never on CPU
    assert KernelConfig().gemv_prefetch == 0
    assert KernelConfig.from_args(None, environ={"RAYLIGHT_GEMV_PREFETCH": "512"}).gemv_prefetch == 512
    assert gemv._launch(True, 512, torch.zeros(1)) == {"PDL": False}


@pytest.mark.parametrize("max_rows", [1, 2, 8, 16, 20, 33, 48, 64, 256])
def test_warmup_row_counts_reach_every_variant_a_launch_can_ask_for(max_rows):
    # A variant: the single-row GEMV, or the few-row kernel at a row tile with the row count a multiple
    # of 16 or not (Triton specializes the plain argument so). Every count 1..max_rows must share its
    # variant with one the start-up runs, and the start-up runs no count a step cannot have.
    def variant(m: int):
        return "gemv" if m == 1 else (gemv.row_tile(m), m % 16 == 0)

    counts = gemv.warmup_row_counts(max_rows)
    limit = min(max_rows, gemv.MAX_ROWS)
    assert all(1 <= m <= limit for m in counts) and len(set(map(variant, counts))) == len(counts)
    assert {variant(m) for m in range(1, limit + 1)} == set(map(variant, counts))
