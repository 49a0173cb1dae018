"""Quantizer math (eq. 3), the role registry, and round-to-nearest model surgery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from qvggt_export.quant import QuantConfig, QuantLinear, find_targets, parse_bits, quantize_model
from qvggt_export.quant import functional as qf


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_codes_in_range_and_error_within_half_step(bits):
    x = torch.randn(64, 96) * torch.logspace(-3, 2, 96)  # heavy-tailed channels
    step = qf.per_token_step(x, bits)
    codes = qf.quantize(x, step, bits)
    qmin, qmax = qf.qrange(bits)
    assert codes.min() >= -qmax and codes.max() <= qmax  # symmetric: -2^(N-1) never produced by D=max/qmax
    assert torch.equal(codes, codes.round())
    assert torch.all((qf.fake_quantize(x, step, bits) - x).abs() <= step / 2 + 1e-6 * x.abs())
    # the largest value of each token maps exactly to +-qmax
    assert torch.equal(codes.abs().amax(dim=-1), torch.full((64,), float(qmax)))


def test_round_half_to_even_and_zero_tokens():
    step = torch.tensor([[1.0]])
    assert qf.quantize(torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5]]), step, 8).tolist() == [[0, 2, 2, -0, -2]]
    zeros = torch.zeros(2, 8)
    assert torch.equal(qf.fake_quantize(zeros, qf.per_token_step(zeros, 4), 4), zeros)
    with pytest.raises(ValueError, match="2..8 bits"):
        qf.qrange(9)


def test_parse_bits():
    assert parse_bits("W4A4") == (4, 4) and parse_bits("w8a8") == (8, 8)
    for bad in ("w3a3", "w4a16", "int8", "fp8"):  # w6a6 is supported (INT8 containers)
        with pytest.raises(QVGGTError, match="unsupported format"):
            parse_bits(bad)


def test_roles_tiny_and_vggt1b():
    tiny = find_targets(build_vggt("tiny"))
    assert len(tiny) == 4 * 4 * 2
    assert {t.role for t in tiny} == {f"{k}.{n}" for k in ("frame", "global") for n in ("qkv", "proj", "fc1", "fc2")}
    assert len(find_targets(build_vggt("vggt-1b", device="meta"))) == 192  # the paper's 192 aggregator linears
    with pytest.raises(QVGGTError, match="no patch_embed blocks"):
        find_targets(build_vggt("tiny"), ["patch_embed.qkv"])
    with pytest.raises(QVGGTError, match="unknown layer role"):
        find_targets(build_vggt("tiny"), ["frame.q_proj"])
    assert len(find_targets(build_vggt("tiny-dino"), ["patch_embed.fc1"])) == 2


def test_quant_linear_matches_reference_math():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    q = QuantLinear.from_linear(linear, weight_bits=4, act_bits=4)
    x = torch.randn(3, 5, 32)
    w_step = linear.weight.detach().double().abs().amax(1, keepdim=True) / 7
    w_dq = (torch.round(linear.weight.detach().double() / w_step).clamp(-8, 7) * w_step).float()
    x_step = (x.abs().amax(-1, keepdim=True) / 7).clamp_min(qf.MIN_STEP)
    expected = (torch.round(x / x_step).clamp(-8, 7) * x_step) @ w_dq.T + linear.bias
    assert torch.allclose(q(x), expected, rtol=1e-5, atol=1e-6)
    assert q.weight_codes.dtype == torch.int8 and int(q.weight_codes.abs().max()) <= 7


def test_quantize_model_in_place_and_error_order():
    images = torch.rand(1, 3, 3, 70, 70, generator=torch.Generator().manual_seed(1))
    reference = build_vggt("tiny")
    with torch.no_grad():
        fp = reference(images)["world_points"]
    errors = {}
    for bits in ("w8a8", "w4a4"):
        model = build_vggt("tiny")
        layers = quantize_model(model, QuantConfig(bits=bits))
        assert len(layers) == 32
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 32
        assert isinstance(model.camera_head.trunk[0].attn.qkv, nn.Linear)  # heads stay float
        with torch.no_grad():
            out = model(images)["world_points"]
        errors[bits] = float((out - fp).norm() / fp.norm())
        with pytest.raises(QVGGTError, match="already quantized"):
            quantize_model(model, QuantConfig(bits=bits))
    assert 0 < errors["w8a8"] < errors["w4a4"]
    assert errors["w8a8"] < 1e-2
