"""DSFQ transforms: exact float equivalence for every variant, statistics, and error paths."""

from __future__ import annotations

import pytest
import torch

from qvggt_export.calib import SyntheticSequenceConfig, generate_sequences
from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from qvggt_export.quant import QuantLinear
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.dsfq import TRANSFORM_METHODS, apply_transforms, collect_channel_stats, layer_signs
from qvggt_export.quant.hadamard import hadamard_matrix
from qvggt_export.quant.modules import TransformedLinear
from qvggt_export.quant.roles import find_targets
from qvggt_export.quant.transforms import fold_weight, smoothing_scales, transform_input

OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


def _batches(count: int, seed: int, size: int = 70, frames: int = 3) -> list[torch.Tensor]:
    config = SyntheticSequenceConfig(num_sequences=count, frames=frames, height=size, width=size, seed=seed)
    return [s.unsqueeze(0) for s in generate_sequences(config)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in TRANSFORM_METHODS if m != "rtn"])
def test_transforms_leave_float_outputs_unchanged(method):
    """Rotation and smoothing are exact equivalences: outputs within 1e-5 relative (observed ~2e-7)."""
    calib, images = _batches(2, 0), _batches(1, 50)[0]
    reference = build_vggt("tiny-outliers")
    model = build_vggt("tiny-outliers")
    targets = find_targets(model)
    stats = collect_channel_stats(model, targets, calib, seed=0, raw=True, rotated=True)
    assert apply_transforms(model, targets, method, stats) == 32
    assert all(isinstance(model.get_submodule(t.name), TransformedLinear) for t in targets)
    with torch.no_grad():
        want, got = reference(images), model(images)
    errors = {k: _rel(got[k], want[k]) for k in OUTPUTS}
    assert max(errors.values()) <= 1e-5, errors


def test_fold_weight_identity_property():
    torch.manual_seed(0)
    weight, x = torch.randn(24, 64, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    pre, post = torch.randn(64, dtype=torch.float64).sign(), torch.rand(64, dtype=torch.float64) + 0.5
    for rotate in (False, True):
        folded = fold_weight(weight, pre, post, rotate)
        assert torch.allclose(transform_input(x, pre, post, rotate) @ folded.T, x @ weight.T, atol=1e-12)


def test_dsfq_smooths_in_the_rotated_space():
    """DSFQ's factors come from the rotated activations and the rotated weight (not the raw weight)."""
    calib = _batches(2, 0)
    model = build_vggt("tiny-outliers")
    targets = find_targets(model, ["frame.fc1"])
    name = targets[0].name
    weight = model.get_submodule(name).weight.detach().clone()
    stats = collect_channel_stats(model, targets, calib, seed=3, raw=False, rotated=True)
    apply_transforms(model, targets, "dsfq", stats, alpha=0.5, seed=3)
    signs = layer_signs(name, weight.shape[1], 3).double()
    rotated_weight_max = fold_weight(weight.double(), signs, None, rotate=True).abs().amax(dim=0)
    expected = smoothing_scales(stats[name].rotated_absmax, rotated_weight_max, 0.5)
    module = model.get_submodule(name)
    assert module.rotate and torch.allclose(module.input_post.double(), 1.0 / expected, rtol=1e-6)
    assert torch.equal(module.input_pre, signs.float())


def test_rotated_statistics_use_the_layer_signs():
    calib = _batches(1, 0)
    model = build_vggt("tiny-outliers")
    targets = find_targets(model, ["global.qkv"])
    captured = {}
    module = model.get_submodule(targets[0].name)
    handle = module.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach().clone()))
    stats = collect_channel_stats(model, targets, calib, seed=0, raw=True, rotated=True)
    handle.remove()
    x = captured["x"].reshape(-1, module.in_features)
    signs = layer_signs(targets[0].name, module.in_features, 0)
    assert torch.allclose(stats[targets[0].name].raw_absmax, x.abs().amax(0))
    assert torch.allclose(stats[targets[0].name].rotated_absmax, transform_input(x, signs, None, True).abs().amax(0),
                          rtol=1e-5)


@pytest.mark.slow
def test_w8a8_dsfq_within_one_percent_of_float():
    calib, held_out = _batches(4, 0), _batches(2, 100)
    reference = build_vggt("tiny-outliers")
    model = build_vggt("tiny-outliers")
    result = calibrate(model, QuantConfig(bits="w8a8", method="dsfq"), calib)
    assert result.transformed == 32 and len(result.layers) == 32
    assert all(isinstance(model.get_submodule(layer.name), QuantLinear) for layer in result.layers)
    with torch.no_grad():
        for images in held_out:
            want, got = reference(images), model(images)
            for key in OUTPUTS:
                error = float((got[key] - want[key]).norm() / want[key].norm())
                assert error < 0.01, f"{key}: {error:.4f}"


def test_error_paths():
    model = build_vggt("tiny-outliers")
    with pytest.raises(QVGGTError, match="calibration set is empty"):
        calibrate(model, QuantConfig(bits="w4a4", method="dsfq"), [])
    bad = _batches(1, 0)[0].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(QVGGTError, match="non-finite activation .* entering aggregator.frame_blocks.0.attn.qkv"):
        calibrate(build_vggt("tiny-outliers"), QuantConfig(bits="w4a4", method="dsfq"), [bad])
    odd = build_vggt({"aggregator": {"img_size": 28, "embed_dim": 92, "depth": 1, "num_heads": 1,
                                     "patch_embed": "conv"},
                      "camera_head": {"dim_in": 184, "trunk_depth": 1, "num_heads": 1},
                      "depth_head": None, "point_head": None, "track_head": None})
    with pytest.raises(QVGGTError, match="aggregator.frame_blocks.0.attn.qkv: cannot rotate its 92 input channels"):
        calibrate(odd, QuantConfig(bits="w4a4", method="rotate"), [])


@pytest.mark.slow
def test_variant_factors_follow_the_paper():
    """Checked against DESIGN.md section 1 / paper Tab. 4: Scale divides raw channels by c(X, W) (raw statistics,
    raw weight column maxima); Scale-then-Rotate does that, then rotates with R = diag(v) H (signs on the input
    channels, before the Walsh-Hadamard matrix, the randomisation QuaRot/QuIP# use: signs after H would only flip
    output signs and change no magnitude); statistics are maxima over every token of every calibration batch."""
    calib = _batches(2, 0)
    model = build_vggt("tiny-outliers")
    targets = find_targets(model, ["global.fc2"])
    name = targets[0].name
    weight = model.get_submodule(name).weight.detach().clone()
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 256)))
    stats = collect_channel_stats(model, targets, calib, seed=1, raw=True, rotated=True)
    handle.remove()
    assert len(seen) == 2 and torch.equal(stats[name].raw_absmax, torch.cat(seen).abs().amax(0))
    c = smoothing_scales(stats[name].raw_absmax, weight.abs().amax(dim=0), 0.5)
    signs = layer_signs(name, 256, 1).double()
    for method, pre in (("smooth", 1.0 / c), ("smooth_rotate", signs / c)):
        copy = build_vggt("tiny-outliers")
        apply_transforms(copy, targets, method, stats, alpha=0.5, seed=1)
        module = copy.get_submodule(name)
        assert module.rotate == (method == "smooth_rotate") and module.input_post is None
        assert torch.allclose(module.input_pre.double(), pre, rtol=1e-6)
    x = torch.randn(3, 256, dtype=torch.float64)
    dense = (x * signs) @ hadamard_matrix(256)
    assert torch.allclose(transform_input(x, signs, None, True), dense, atol=1e-12)
