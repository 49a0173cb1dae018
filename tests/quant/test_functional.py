"""Integer quantizer math: granularities, bounds, asymmetric exactness and straight-through gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qvggt_export.errors import QVGGTError
from qvggt_export.quant import functional as qf

BITS = st.integers(2, 8)
FINITE = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def _matrices(max_side: int = 12) -> st.SearchStrategy[np.ndarray]:
    shape = st.tuples(st.integers(1, max_side), st.integers(1, max_side))
    return arrays(np.float32, shape, elements=FINITE)


# --------------------------------------------------------------------------------------------------------------------
# Granularities and shapes


@pytest.mark.parametrize(("granularity", "kwargs", "shape"), [
    ("tensor", {}, ()),
    ("channel", {}, (4, 1, 1)),
    ("channel", {"axis": 1}, (1, 6, 1)),
    ("channel", {"axis": -1}, (1, 1, 10)),
    ("token", {}, (4, 6, 1)),
    ("block", {"block_size": 4}, (4, 6, 10)),
])
def test_compute_step_shapes_broadcast(granularity: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    x = torch.randn(4, 6, 10)
    step = qf.compute_step(x, 4, granularity, **kwargs)  # type: ignore[arg-type]
    assert tuple(step.shape) == shape
    assert qf.fake_quantize(x, step, 4).shape == x.shape


def test_compute_step_values_per_granularity() -> None:
    x = torch.randn(3, 5, 8)
    assert torch.equal(qf.compute_step(x, 8, "tensor"), x.abs().max() / 127)
    assert torch.equal(qf.compute_step(x, 4, "channel", axis=1), x.abs().amax(dim=(0, 2), keepdim=True) / 7)
    assert torch.equal(qf.compute_step(x, 4, "token"), x.abs().amax(dim=-1, keepdim=True) / 7)


def test_existing_helpers_agree_with_compute_step() -> None:
    w, x = torch.randn(16, 32), torch.randn(2, 7, 32)
    assert torch.equal(qf.per_channel_step(w, 4), qf.compute_step(w, 4, "channel").squeeze(1))
    assert torch.equal(qf.per_token_step(x, 8), qf.compute_step(x, 8, "token"))
    assert torch.equal(qf.fake_quantize_dynamic(x, 8), qf.fake_quantize(x, qf.per_token_step(x, 8), 8))


def test_per_block_with_a_partial_last_block() -> None:
    # d = 10, B = 4: blocks [0:4], [4:8], [8:10]; the partial block gets the step of its own 2 elements.
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0, 7.0, 1.0, 1.0, -1.0, 0.25, -0.5]])
    compact = qf.block_steps(x, 4, 4)
    assert torch.equal(compact, torch.tensor([[2.0, 7.0, 0.5]]) / 7)
    expanded = qf.compute_step(x, 4, "block", block_size=4)
    assert torch.equal(expanded, torch.tensor([[2.0] * 4 + [7.0] * 4 + [0.5] * 2]) / 7)
    assert torch.equal(qf.expand_block_steps(compact, 4, 10), expanded)


def test_block_size_larger_than_row_is_one_block() -> None:
    x = torch.randn(3, 5)
    assert torch.equal(qf.compute_step(x, 4, "block", block_size=64), qf.compute_step(x, 4, "token").expand(3, 5))


@pytest.mark.parametrize(("granularity", "kwargs", "match"), [
    ("row", {}, "granularity must be one of"),
    ("block", {}, "positive integer block_size"),
    ("block", {"block_size": 0}, "positive integer block_size"),
    ("token", {"block_size": 4}, "only used with granularity='block'"),
    ("channel", {"axis": 3}, "out of range"),
    ("tensor", {"axis": 0}, "axis is only used"),
    ("token", {"axis": 0}, "axis is only used"),
])
def test_bad_granularity_options_raise(granularity: str, kwargs: dict, match: str) -> None:
    with pytest.raises(QVGGTError, match=match):
        qf.compute_step(torch.randn(4, 6, 8), 4, granularity, **kwargs)  # type: ignore[arg-type]


def test_bad_bits_still_raise_value_error() -> None:
    with pytest.raises(ValueError, match="2..8 bits"):
        qf.compute_step(torch.randn(4), 9, "tensor")
    with pytest.raises(ValueError, match="2..8 bits"):
        qf.uqrange(1)


# --------------------------------------------------------------------------------------------------------------------
# Symmetric quantizer bounds (paper eq. 3)


@given(x=_matrices(), bits=BITS, granularity=st.sampled_from(["tensor", "channel", "token", "block"]),
       block=st.integers(1, 5))
@settings(max_examples=80, deadline=None)
def test_dynamic_codes_in_range_and_error_within_half_step(x: np.ndarray, bits: int, granularity: str,
                                                           block: int) -> None:
    t = torch.from_numpy(x)
    step = qf.compute_step(t, bits, granularity, block_size=block if granularity == "block" else None)  # type: ignore[arg-type]
    codes = qf.quantize(t, step, bits)
    qmin, qmax = qf.qrange(bits)
    assert torch.all((codes >= qmin) & (codes <= qmax))
    assert torch.equal(codes, codes.round())
    # Dynamic steps put every element inside the range, so only rounding error remains (+ fp32 slack).
    err = (qf.fake_quantize(t, step, bits) - t).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-30)
    # The largest magnitude in each group maps to +-qmax (never clipped to qmin on the positive side).
    assert codes.abs().max() <= qmax


@given(x=_matrices(), bits=BITS, step=st.floats(1e-3, 10.0))
@settings(max_examples=60, deadline=None)
def test_static_step_clips_outside_and_rounds_inside(x: np.ndarray, bits: int, step: float) -> None:
    t = torch.from_numpy(x).double()
    s = torch.tensor(step, dtype=torch.float64)
    qmin, qmax = qf.qrange(bits)
    fq = qf.fake_quantize(t, s, bits)
    inside = (t / s >= qmin) & (t / s <= qmax)
    assert torch.all((fq - t).abs()[inside] <= step / 2 + 1e-12)
    assert torch.all(fq[t / s > qmax] == qmax * s)
    assert torch.all(fq[t / s < qmin] == qmin * s)
    # Fake quantization is a projection: applying it twice changes nothing.
    assert torch.equal(qf.fake_quantize(fq, s, bits), fq)


# --------------------------------------------------------------------------------------------------------------------
# Asymmetric (zero-point) quantizer


@given(x=_matrices(), bits=BITS)
@settings(max_examples=80, deadline=None)
def test_asymmetric_zero_point_integer_and_min_max_in_range(x: np.ndarray, bits: int) -> None:
    w = torch.from_numpy(x).double()
    step, zp = qf.asymmetric_params(w, bits)
    _, qmax = qf.uqrange(bits)
    assert step.shape == zp.shape == (w.shape[0], 1)
    assert torch.equal(zp, zp.round()) and torch.all((zp >= 0) & (zp <= qmax))
    codes = qf.quantize_asymmetric(w, step, zp, bits)
    assert torch.all((codes >= 0) & (codes <= qmax)) and torch.equal(codes, codes.round())
    # Every element (row min and max included) comes back within half a step: nothing is clipped.
    err = (qf.fake_quantize_asymmetric(w, step, zp, bits) - w).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-9) + 1e-30)
    # Zero is exactly representable (code == zero point).
    zeros = torch.zeros_like(w)
    assert torch.equal(qf.quantize_asymmetric(zeros, step, zp, bits), zp.expand_as(w))
    assert torch.equal(qf.fake_quantize_asymmetric(zeros, step, zp, bits).abs(), zeros)


def test_asymmetric_by_hand() -> None:
    w = torch.tensor([[-1.0, 0.0, 2.0, 0.5],   # lo = -1, hi = 2: s = 3/15 = 0.2, z = 5
                      [1.0, 2.0, 3.0, 1.5],    # all positive: lo = 0, z = 0
                      [-4.0, -1.0, -2.0, 0.0]])  # all non-positive: hi = 0, z = qmax
    step, zp = qf.asymmetric_params(w, 4)
    assert torch.allclose(step.squeeze(1), torch.tensor([0.2, 0.2, 4 / 15]))
    assert zp.squeeze(1).tolist() == [5.0, 0.0, 15.0]
    codes = qf.quantize_asymmetric(w, step, zp, 4)
    # 0.5 / 0.2 = 2.5 rounds to even: 2 + 5 = 7.
    assert codes[0].tolist() == [0.0, 5.0, 15.0, 7.0] and codes[1, 2] == 15 and codes[2, 0] == 0
    # Values on the grid survive exactly.
    on_grid = (codes - zp) * step
    assert torch.equal(qf.fake_quantize_asymmetric(on_grid, step, zp, 4), on_grid)


def test_asymmetric_beats_symmetric_on_a_skewed_row() -> None:
    w = torch.rand(64, 256) * 3 + 0.1  # all positive: symmetric wastes the negative half of its codes
    sym = (qf.fake_quantize_dynamic(w, 4, "channel") - w).pow(2).mean()
    step, zp = qf.asymmetric_params(w, 4)
    asym = (qf.fake_quantize_asymmetric(w, step, zp, 4) - w).pow(2).mean()
    assert asym < 0.5 * sym


def test_asymmetric_per_block_and_constant_rows() -> None:
    w = torch.zeros(2, 10)
    step, zp = qf.asymmetric_params(w, 8, "block", block_size=4)
    assert step.shape == zp.shape == (2, 10)
    assert torch.all(step == qf.MIN_STEP) and torch.all(zp == 0)
    assert torch.equal(qf.fake_quantize_asymmetric(w, step, zp, 8), w)


# --------------------------------------------------------------------------------------------------------------------
# Straight-through estimators


def test_round_ste_forward_is_bit_exact_and_backward_identity() -> None:
    halves = torch.arange(-20, 21, dtype=torch.float32) / 2  # ties, which go to even
    x = torch.cat([halves, torch.randn(10_000) * 100, torch.randn(1000) * 1e7]).requires_grad_()
    y = qf.round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    assert y[:41].tolist() == torch.round(halves).tolist() and y[21].item() == 0.0 and y[23].item() == 2.0
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_ste_forward_equals_fake_quantize(bits: int) -> None:
    x = torch.randn(8, 33) * 3
    step = qf.compute_step(x, bits, "token") * 0.7  # some clipping
    assert torch.equal(qf.fake_quantize_ste(x, step, bits), qf.fake_quantize(x, step, bits))


def test_fake_quantize_ste_gradients_by_hand() -> None:
    # bits 3: codes -4..3, step 0.5. v = x / s = [0.6, -1.4, 2.9, 5.0, -7.0].
    x = torch.tensor([0.3, -0.7, 1.45, 2.5, -3.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y = qf.fake_quantize_ste(x, s, 3)
    assert torch.allclose(y.detach(), torch.tensor([0.5, -0.5, 1.5, 1.5, -2.0], dtype=torch.float64))
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    # LSQ: round(v) - v inside, qmax / qmin outside: (1 - .6) + (-1 + 1.4) + (3 - 2.9) + 3 + (-4).
    assert s.grad.item() == pytest.approx(0.4 + 0.4 + 0.1 + 3 - 4)


@given(seed=st.integers(0, 2**31 - 1), bits=BITS)
@settings(max_examples=30, deadline=None)
def test_fake_quantize_ste_gradients_match_lsq_formula(seed: int, bits: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 16, dtype=torch.float64, generator=gen) * 2).requires_grad_()
    step = (torch.rand(4, 1, dtype=torch.float64, generator=gen) * 0.5 + 0.05).requires_grad_()  # per token
    upstream = torch.randn(4, 16, dtype=torch.float64, generator=gen)
    (qf.fake_quantize_ste(x, step, bits) * upstream).sum().backward()

    qmin, qmax = qf.qrange(bits)
    v = (x / step).detach()
    inside = (v >= qmin) & (v <= qmax)
    expected_dx = upstream * inside
    dstep = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
    expected_dstep = (upstream * dstep).sum(dim=-1, keepdim=True)
    assert torch.allclose(x.grad, expected_dx, atol=1e-12)
    assert torch.allclose(step.grad, expected_dstep, atol=1e-9)


def test_learning_the_step_reduces_error() -> None:
    # Gaussian token at 3 bits: the max-based step (~1.37) is far from the MSE-optimal clipping
    # (~0.63); LSQ gradients with the paper's step learning rate (5e-2) must find it.
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    step = qf.compute_step(x, 3, "token").clone().requires_grad_()
    start = (qf.fake_quantize(x, step.detach(), 3) - x).pow(2).mean().item()
    opt = torch.optim.Adam([step], lr=5e-2)
    for _ in range(100):
        opt.zero_grad()
        (qf.fake_quantize_ste(x, step, 3) - x).pow(2).mean().backward()
        opt.step()
    end = (qf.fake_quantize(x, step.detach(), 3) - x).pow(2).mean().item()
    assert end < 0.5 * start, f"MSE {start:.4f} -> {end:.4f} (observed 0.154 -> 0.044)"
