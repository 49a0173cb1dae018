"""FP8 / NVFP4 quantized linears: the module math against qvggt_export.quant.formats, surgery with every
method, save/reload, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from qvggt_export.quant import FloatQuantLinear, QuantConfig, QuantLinear, format_family, parse_bits
from qvggt_export.quant import formats as ff
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.config import METHODS
from qvggt_export.quant.modules import TransformedLinear
from qvggt_export.quant.state import load_quantized, save_quantized


def _linear(in_features: int = 64, out_features: int = 24, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 1, in_features))  # channels over three decades
        layer.weight[3, 5] = 7.0  # an outlier weight
    return layer


def test_fp8_linear_matches_formats_math() -> None:
    layer = _linear()
    q = FloatQuantLinear.from_linear(layer, "fp8")
    w = layer.weight.detach()
    scale = ff.fp8_e4m3_scale(w, "token")
    assert torch.equal(q.dequantized_weight(), ff.fake_quantize_fp8(w, scale))
    # each row's largest |w| maps onto E4M3's max exactly
    assert torch.equal(q.weight_code_values().abs().amax(dim=1), torch.full((24,), 448.0))
    x = torch.randn(3, 5, 64) * torch.logspace(-1, 1, 64)
    x[0, 0, 7] = 300.0
    expected = F.linear(ff.fake_quantize_fp8(x, granularity="token"), q.dequantized_weight(), layer.bias.detach())
    with torch.no_grad():
        got = q(x)
    # The per-token scale is applied after the GEMM (it factors out exactly); only fp32 rounding differs.
    err = float((got - expected).abs().max() / expected.abs().max())
    assert err < 1e-6, err  # observed ~1e-7


def test_nvfp4_linear_matches_formats_math() -> None:
    layer = _linear()
    q = FloatQuantLinear.from_linear(layer, "nvfp4", input_amax=5.0)
    w = layer.weight.detach()
    codes, scales, g = ff.quantize_nvfp4(w)
    assert torch.equal(q.weight_code_values(), codes)
    assert torch.equal(q.block_scale_values(), scales)
    assert float(q.weight_scale[0]) == float(g)
    assert set(q.weight_code_values().abs().unique().tolist()) <= set(ff.FP4_E2M1_VALUES)
    assert float(q.input_global_scale[0]) == pytest.approx(5.0 / (6 * 448), rel=1e-7)
    x = torch.randn(2, 7, 64) * 2
    x[1, 2, 9] = 9.0  # above the calibrated amax: its block scale saturates, as in TensorRT
    expected = F.linear(ff.fake_quantize_nvfp4(x, 16, q.input_global_scale[0]), ff.dequantize_nvfp4(codes, scales, g),
                        layer.bias)
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_float_linear_keeps_the_input_transform(fmt: str) -> None:
    layer = _linear()
    signs = torch.where(torch.rand(64) < 0.5, -1.0, 1.0)
    post = torch.rand(64) + 0.5
    transformed = TransformedLinear(layer.weight.detach(), layer.bias.detach(), signs, post, rotate=True)
    q = FloatQuantLinear.from_linear(transformed, fmt, input_amax=20.0)
    x = torch.randn(4, 64)
    assert q.rotate and torch.equal(q.input_pre, signs) and torch.equal(q.input_post, post)
    t = transformed.transform(x)
    assert torch.equal(q.transform(x), t)
    ref = F.linear(t, transformed.weight, transformed.bias)
    assert float((q(x) - ref).norm() / ref.norm()) < (0.05 if fmt == "fp8" else 0.25)


@pytest.fixture(scope="module")
def tiny_batches() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.rand(1, 1, 3, 70, 70)]


@pytest.fixture(scope="module")
def float_points(tiny_batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return build_vggt("tiny", seed=0).eval()(tiny_batches[0])["world_points"]


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "method"), [("fp8", m) for m in METHODS] + [("nvfp4", "rtn"), ("nvfp4", "dsfq")])
def test_calibrate_every_method(fmt: str, method: str, tiny_batches: list[torch.Tensor],
                                float_points: torch.Tensor) -> None:
    model = build_vggt("tiny", seed=0).eval()
    result = calibrate(model, QuantConfig(bits=fmt, method=method), tiny_batches)
    layers = [m for m in model.modules() if isinstance(m, FloatQuantLinear)]
    assert len(layers) == len(result.layers) == 32 and not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(m.format == fmt for m in layers)
    assert all(m.rotate == (method in ("rotate", "smooth_rotate", "dsfq")) for m in layers)
    if fmt == "nvfp4":  # static activation global scales from the calibration maxima
        assert sorted(result.input_amax) == sorted(layer.name for layer in result.layers)
        assert all(float(m.input_global_scale[0]) == pytest.approx(result.input_amax[m.name] / 2688, rel=1e-6)
                   for m in layers)
    with torch.no_grad():
        got = model(tiny_batches[0])["world_points"]
    rel = float((got - float_points).norm() / float_points.norm())
    # observed: fp8 <= 1e-3, nvfp4 ~ 3e-3 (random tiny weights); a wrong scale is O(1)
    assert 0 < rel < (5e-3 if fmt == "fp8" else 3e-2), rel


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_save_and_reload_exactly(fmt: str, tiny_batches: list[torch.Tensor], tmp_path) -> None:  # noqa: ANN001
    model = build_vggt("tiny", seed=0).eval()
    config = QuantConfig(bits=fmt, method="rotate")
    calibrate(model, config, tiny_batches)
    save_quantized(model, tmp_path / "q", "tiny", config)
    loaded, loaded_config = load_quantized(tmp_path / "q")
    assert loaded_config == config
    reference, reloaded = model.state_dict(), loaded.state_dict()
    assert reference.keys() == reloaded.keys() and all(torch.equal(reference[k], reloaded[k]) for k in reference)
    images = torch.rand(1, 2, 3, 70, 70)  # 2 frames: with 1, pose_enc differs by 1 ulp after any reload (w8a8 too)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert all(torch.equal(a[k], b[k]) for k in ("pose_enc", "depth", "world_points"))
    assert next(m for m in loaded.modules() if isinstance(m, FloatQuantLinear)).weight_codes.dtype == torch.uint8


def test_formats_and_bad_input() -> None:
    assert format_family("FP8") == "fp8" and format_family("nvfp4") == "nvfp4" and format_family("w6a6") == "int"
    assert QuantConfig(bits="FP8").bits == "fp8"
    with pytest.raises(QVGGTError, match="floating-point format"):
        parse_bits("fp8")
    with pytest.raises(QVGGTError, match="unsupported format 'fp4'"):
        QuantConfig(bits="fp4")
    with pytest.raises(QVGGTError, match=r"recon_iters=5.*integer formats"):
        QuantConfig(bits="fp8", recon_iters=5)
    with pytest.raises(QVGGTError, match="recon_iters=1"):
        QuantConfig(bits="nvfp4", recon_iters=1)
    assert QuantConfig(bits="nvfp4", method="rtn").needs_calibration  # static activation global scale
    with pytest.raises(QVGGTError, match="divisible by 16"):
        FloatQuantLinear.from_linear(nn.Linear(40, 8), "nvfp4", input_amax=1.0)
    with pytest.raises(QVGGTError, match="calibrated input amax"):
        FloatQuantLinear.from_linear(nn.Linear(32, 8), "nvfp4")
    with pytest.raises(QVGGTError, match="finite and > 0"):
        FloatQuantLinear.from_linear(nn.Linear(32, 8), "nvfp4", input_amax=float("nan"))
    with pytest.raises(QVGGTError, match="format must be one of"):
        FloatQuantLinear(32, 8, "fp6")
    with pytest.raises(QVGGTError, match="needs calibration data"):
        calibrate(build_vggt("tiny", seed=0).eval(), QuantConfig(bits="nvfp4", method="rtn"), [])
