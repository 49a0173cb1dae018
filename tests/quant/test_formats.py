"""FP8 E4M3 and NVFP4 fake quantization: hand-computed values, grid membership, bounds, symmetry, idempotence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qvggt_export.errors import QVGGTError
from qvggt_export.quant import formats as ff

FP4_GRID = torch.tensor(ff.FP4_E2M1_VALUES)
SIGNED_FP4_GRID = torch.cat([-FP4_GRID, FP4_GRID])
# Every finite float8_e4m3fn value, from its 256 bit patterns (0x7F / 0xFF are NaN).
E4M3_VALUES = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).double()
E4M3_VALUES = E4M3_VALUES[~E4M3_VALUES.isnan()].unique()


def _rows(width: int) -> st.SearchStrategy[np.ndarray]:
    shape = st.tuples(st.integers(1, 4), st.integers(1, width))
    return arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, allow_nan=False, width=32))


def _nearest(values: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid value by brute force, and whether the nearest is unique (no tie)."""
    dist = (values[:, None] - grid[None, :]).abs()
    best, idx = dist.min(dim=1)
    ties = (dist <= best[:, None] + 1e-12).sum(dim=1) > 1
    return grid[idx], ~ties


# --------------------------------------------------------------------------------------------------------------------
# FP4 E2M1 grid rounding


def test_fp4_rounding_by_hand_including_ties_to_even() -> None:
    x = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 6.0, 6.5, 100.0, -0.75, -5.0, -7.0])
    expected = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -1.0, -4.0, -6.0]
    assert ff.round_to_fp4_e2m1(x).tolist() == expected


def test_fp4_rounding_is_nearest_grid_value() -> None:
    x = torch.linspace(-7, 7, 20_001, dtype=torch.float64)
    nearest, unique = _nearest(x.clamp(-6, 6), SIGNED_FP4_GRID.double())
    assert torch.equal(ff.round_to_fp4_e2m1(x)[unique], nearest[unique])


@given(x=_rows(64))
@settings(max_examples=60, deadline=None)
def test_fp4_rounding_properties(x: np.ndarray) -> None:
    t = torch.from_numpy(x) / 100  # mostly within the grid's range
    q = ff.round_to_fp4_e2m1(t)
    assert torch.isin(q, SIGNED_FP4_GRID).all()
    assert torch.equal(ff.round_to_fp4_e2m1(q), q)  # idempotent
    assert torch.equal(ff.round_to_fp4_e2m1(-t), -q)  # sign symmetric
    inside = t.abs() <= 6
    # Half the grid spacing: 0.25 below 2, 0.5 below 4, 1 up to 6, i.e. at most max(|x|, 1) / 4.
    assert torch.all((q - t).abs()[inside] <= 0.25 * t.abs().clamp_min(1)[inside])


# --------------------------------------------------------------------------------------------------------------------
# FP8 E4M3


def test_fp8_rounding_by_hand() -> None:
    x = torch.tensor([17.0, 19.0, 0.3, 449.0, 1e6, -0.3, 2.0**-10, 3 * 2.0**-10, 2.0**-9])
    # 17 ties between 16 (even) and 18; 19 ties between 18 and 20 (even); 0.3 -> 0.3125 (step 1/32);
    # saturate at 448; 2^-10 ties between 0 and the smallest subnormal 2^-9 -> 0; 3 * 2^-10 -> 2^-8.
    expected = [16.0, 20.0, 0.3125, 448.0, 448.0, -0.3125, 0.0, 2.0**-8, 2.0**-9]
    assert ff.round_to_fp8_e4m3(x).tolist() == expected


def test_fp8_rounding_is_nearest_e4m3_value() -> None:
    x = torch.randn(20_000, dtype=torch.float64) * torch.logspace(-3, 2.6, 20_000, dtype=torch.float64)
    nearest, unique = _nearest(x, E4M3_VALUES)
    assert torch.equal(ff.round_to_fp8_e4m3(x)[unique], nearest[unique])
    assert E4M3_VALUES.max() == ff.FP8_E4M3_MAX


@given(x=_rows(64), per_token=st.booleans())
@settings(max_examples=60, deadline=None)
def test_fp8_dynamic_error_bound_symmetry_idempotence(x: np.ndarray, per_token: bool) -> None:
    t = torch.from_numpy(x)
    granularity = "token" if per_token else "tensor"
    scale = ff.fp8_e4m3_scale(t, granularity)
    assert scale.shape == ((t.shape[0], 1) if per_token else ())
    fq = ff.fake_quantize_fp8(t, granularity=granularity)
    # 3 mantissa bits: relative error <= 2^-4 for normals; subnormal spacing 2^-9 (times the scale).
    bound = 2.0**-4 * t.abs() + 2.0**-10 * scale
    assert torch.all((fq - t).abs() <= bound * (1 + 1e-5))
    assert torch.equal(ff.fake_quantize_fp8(-t, granularity=granularity), -fq)
    assert torch.equal(ff.fake_quantize_fp8(fq, scale), fq)  # static scale: a projection
    # The group maximum lands on 448 * scale (no clipping with a dynamic scale).
    amax = t.abs().amax(dim=-1, keepdim=True) if per_token else t.abs().amax()
    assert torch.allclose(fq.abs().amax(dim=-1, keepdim=True) if per_token else fq.abs().amax(), amax, rtol=1e-6)


def test_fp8_static_scale_saturates_and_codes_are_fp8() -> None:
    x = torch.tensor([1.0, 500.0, -1000.0, 0.0])
    codes = ff.quantize_fp8(x, 1.0)
    assert codes.dtype == torch.float8_e4m3fn
    assert codes.float().tolist() == [1.0, 448.0, -448.0, 0.0]
    # 500 / 2 = 250 lies between 240 and 256 (spacing 16 at 2^7): 256 -> 512.
    assert ff.fake_quantize_fp8(x, torch.tensor(2.0)).tolist() == [1.0, 512.0, -896.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fp8_and_nvfp4_preserve_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(3, 32).to(dtype)
    assert ff.fake_quantize_fp8(x).dtype == dtype
    assert ff.fake_quantize_fp8(x, granularity="token").dtype == dtype
    assert ff.fake_quantize_nvfp4(x).dtype == dtype
    assert ff.round_to_fp4_e2m1(x).dtype == dtype


def test_fp8_rejects_bad_options() -> None:
    with pytest.raises(QVGGTError, match="'tensor' or 'token'"):
        ff.fake_quantize_fp8(torch.randn(4), granularity="block")  # type: ignore[arg-type]
    with pytest.raises(QVGGTError, match="floating-point"):
        ff.fake_quantize_fp8(torch.ones(4, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------------------------
# NVFP4


def test_nvfp4_by_hand() -> None:
    g = 1.0
    # Block 1: amax 12 -> scale 2 (exact in E4M3): [6, 2.5, -1.3, 0.15] -> fp4 [6, 2, -1.5, 0] -> x2.
    # Block 2: amax 7 -> 7/6 = 1.1667 -> E4M3 1.125 (spacing 1/8); 7 / 1.125 = 6.22 saturates to 6 -> 6.75.
    x = torch.tensor([[12.0, 5.0, -2.6, 0.3, 7.0, 1.0, 0.0, -3.0]])
    codes, scales, gs = ff.quantize_nvfp4(x, block_size=4, global_scale=g)
    assert scales.tolist() == [[2.0, 1.125]] and gs.item() == 1.0
    assert codes.tolist() == [[6.0, 2.0, -1.5, 0.0, 6.0, 1.0, 0.0, -3.0]]
    assert ff.fake_quantize_nvfp4(x, 4, g).tolist() == [[12.0, 4.0, -3.0, 0.0, 6.75, 1.125, 0.0, -3.375]]


@given(x=_rows(50), dynamic=st.booleans())
@settings(max_examples=60, deadline=None)
def test_nvfp4_properties(x: np.ndarray, dynamic: bool) -> None:
    t = torch.from_numpy(x)
    g = None if dynamic else 1.0
    codes, scales, gs = ff.quantize_nvfp4(t, global_scale=g)
    d = t.shape[-1]
    assert codes.shape == t.shape and scales.shape == (t.shape[0], -(-d // 16))
    assert torch.isin(codes, SIGNED_FP4_GRID).all()
    assert torch.equal(ff.round_to_fp8_e4m3(scales), scales)  # block scales are E4M3 values
    assert torch.all(scales <= ff.FP8_E4M3_MAX)
    fq = ff.fake_quantize_nvfp4(t, global_scale=g)
    assert torch.equal(ff.fake_quantize_nvfp4(-t, global_scale=g), -fq)
    # Error bound from the scales actually used: FP4 rounding inside the range, plus saturation.
    eff = scales.repeat_interleave(16, dim=-1)[..., :d] * gs
    v = t.abs() / eff.clamp_min(1e-30)
    bound = 0.25 * eff * v.clamp(1, 6) + (t.abs() - 6 * eff).clamp_min(0)
    ok = (fq - t).abs() <= bound * (1 + 1e-5) + 1e-30
    assert torch.all(ok | (scales.repeat_interleave(16, dim=-1)[..., :d] == 0))
    # With a fixed global scale NVFP4 fake quantization is a projection.
    gs_fixed = gs if dynamic else 1.0
    once = ff.fake_quantize_nvfp4(t, global_scale=gs_fixed)
    assert torch.equal(ff.fake_quantize_nvfp4(once, global_scale=gs_fixed), once)


def test_nvfp4_dynamic_global_scale_keeps_block_scales_in_e4m3_range() -> None:
    x = torch.randn(8, 64) * 1e4
    x[0, 0] = 1e6
    _, scales, gs = ff.quantize_nvfp4(x)
    assert gs.item() == pytest.approx(1e6 / (6 * 448))
    assert scales.max().item() == ff.FP8_E4M3_MAX  # the block holding the tensor max uses the top scale
    rel = (ff.fake_quantize_nvfp4(x) - x).norm() / x.norm()
    assert rel < 0.15, f"relative L2 error {rel:.3f}"
    # Without the global scale, block scales of 1e4-sized values saturate E4M3 and the error explodes.
    assert (ff.fake_quantize_nvfp4(x, global_scale=1.0) - x).norm() / x.norm() > 0.5


def test_nvfp4_zero_blocks_and_partial_block() -> None:
    x = torch.zeros(2, 20)
    x[1, 17] = 3.0  # the only nonzero value sits in the partial second block (elements 16..19)
    codes, scales, _ = ff.quantize_nvfp4(x)
    assert scales.shape == (2, 2)
    assert scales[0].tolist() == [0.0, 0.0] and scales[1, 0] == 0
    fq = ff.fake_quantize_nvfp4(x)
    assert not fq.isnan().any()
    assert torch.allclose(fq, x, rtol=1e-6, atol=0)  # dynamic g = 3 / 2688: exact up to fp32 rounding
    assert torch.equal(ff.fake_quantize_nvfp4(x, global_scale=1.0), x)  # 3 = 6 * 0.5, all exact
    with pytest.raises(QVGGTError, match="positive integer"):
        ff.quantize_nvfp4(x, block_size=0)
