"""The planted-outlier testbed: deterministic, and each option plants what its docstring says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qvggt_export.model import build_vggt
from qvggt_export.model.config import resolve_config
from qvggt_export.model.outliers import PlantedOutliers

_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _build(**options) -> torch.nn.Module:
    config = dataclasses.replace(resolve_config("tiny-outliers"), planted_outliers=PlantedOutliers(**options))
    return build_vggt(config)


def _aggregator_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    agg = model.aggregator
    return [block.get_submodule(name) for blocks in (agg.frame_blocks, agg.global_blocks) for block in blocks
            for name in _LINEARS]


def test_planting_is_deterministic_and_the_preset_uses_the_defaults():
    a, b = build_vggt("tiny-outliers"), _build()
    assert resolve_config("tiny-outliers").planted_outliers == PlantedOutliers()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_special_tokens_carry_the_planted_channels():
    """Default: per-token random values x scale; shared: one +-scale value per channel for every special token."""
    plain = _build(special_token_channels=0).aggregator
    random_values = _build().aggregator
    shared = _build(shared_special_values=True).aggregator
    for agg in (random_values, shared):
        tokens = torch.cat([agg.camera_token, agg.register_token], dim=2).reshape(-1, plain.camera_token.shape[-1])
        big = tokens.abs().amin(dim=0) > 5.0  # planted channels are >> the N(0,1) of the rest
        assert 1 <= int(big.sum()) <= 3
        if agg is shared:
            values = tokens[:, big]
            assert torch.equal(values, values[:1].expand_as(values))  # identical for all 10 special tokens
            assert torch.equal(values.abs(), torch.full_like(values, 40.0))
        else:
            values = tokens.detach()[:, big].flatten()
            assert len({round(float(v), 4) for v in values}) == values.numel()


def test_gaussian_weights_keep_the_scale_but_not_the_uniform_shape():
    """PyTorch's default init is uniform (row max / RMS = sqrt(3)): the best case for round-to-nearest and the
    worst for a rotation, which makes rows Gaussian. Trained weights are not uniform; the option redraws them."""
    uniform = _aggregator_linears(_build(norm_channels=0, hidden_units=0, value_channels=0))
    gaussian = _aggregator_linears(_build(gaussian_weights=True, norm_channels=0, hidden_units=0, value_channels=0))

    def ratio(linear: torch.nn.Linear) -> float:
        w = linear.weight.detach()
        return float((w.abs().amax(1) / w.pow(2).mean(1).sqrt()).mean())

    assert all(abs(ratio(u) - 3 ** 0.5) < 0.05 for u in uniform)
    assert all(ratio(g) > 2.0 for g in gaussian)  # observed 2.5-3.2 (rows of 64 or 256 Gaussian values)
    for u, g in zip(uniform, gaussian, strict=True):
        assert abs(float(g.weight.detach().std()) / float(u.weight.detach().std()) - 1) < 0.1


def test_massive_units_fire_on_special_tokens_only():
    """Step 4: special tokens' fc2 inputs become massive (special/patch RMS ratio observed 4.0 -> 19.3);
    the option needs the shared special direction."""
    images = torch.rand(1, 2, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    ratios = {}
    for units in (0, 2):
        model = _build(shared_special_values=True, gaussian_weights=True, massive_hidden_units=units,
                       norm_channels=0, hidden_units=0, value_channels=0)
        seen = []
        fc2 = model.aggregator.global_blocks[1].mlp.fc2
        handle = fc2.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].detach()))
        with torch.no_grad():
            model.aggregator(images)
        handle.remove()
        x = seen[0].reshape(2, 30, -1)  # [B, S*P, C] -> frames x (5 special + 25 patch tokens)
        rms = x.pow(2).mean(-1).sqrt()
        ratios[units] = float(rms[:, :5].mean() / rms[:, 5:].mean())
    assert ratios[2] > 3 * ratios[0], ratios  # observed 19.3 vs 4.0
    with pytest.raises(ValueError, match="needs shared_special_values"):
        PlantedOutliers(massive_hidden_units=2)
