"""Planted outliers: a small VGGT whose activations are heavy-tailed the way VGGT-1B's are.

The real model's camera and register tokens carry massive activations in a few channels, and a few
channels are large for every token (paper Fig. 3); a randomly initialised small model has neither, so
quantization methods cannot be told apart on it. :func:`plant_outliers` builds that structure into the
weights, deterministically from a seed, in three steps:

1. **Reference-style perturbation** (as the official reference fixtures do, so heads are not flat):
   the learned special tokens (``camera_token``, ``register_token``, ``camera_head.empty_pose_tokens``)
   become N(0, 1); every parameter whose elements are all equal at initialisation gets noise
   (LayerScale ``gamma``: c + 0.2 N(0, 1), anything else: c + 0.1 N(0, 1)).
2. **Massive special-token activations**: in ``special_token_channels`` channels (chosen by the seed),
   the camera and register tokens get ``special_token_scale`` x their N(0,1) values. They ride the
   residual stream through every aggregator block, so each block's ``norm1``/``norm2`` output has
   token-specific outliers on the special tokens (the tokens that are 1 + registers of every frame).
   The ``norm1``/``norm2`` weights of those channels are multiplied by ``special_norm_scale`` in every
   aggregator block, so the outliers survive LayerNorm (which would otherwise cap them at ~sqrt(C)).
3. **Systematic channel outliers**: in every aggregator block, ``norm_channels`` channels of ``norm1``
   and ``norm2`` weights are multiplied by ``norm_scale`` (qkv / fc1 inputs: large for all tokens);
   ``hidden_units`` rows of ``fc1`` by ``hidden_scale`` (heavy-tailed fc2 inputs after GELU); and
   ``value_channels`` rows of the value part of ``qkv`` by ``value_scale`` (heavy-tailed proj inputs).

Options, off by default (the ``tiny-outliers`` preset is bit-identical to the three steps above), for a
testbed closer to what the paper describes (``benchmarks/dsfq_ablation.py --planting``):

* ``gaussian_weights``: every aggregator-block linear weight is redrawn as N(0, std^2) with its own
  initial std, before step 3. PyTorch's default init is *uniform* (row max / RMS = sqrt(3), the best case
  for round-to-nearest and the one a rotation makes worse: rotated rows are Gaussian); trained weights are
  not uniform.
* ``shared_special_values``: the special channels of every camera and register token hold the same value
  ``+-special_token_scale`` (one seeded sign per channel) instead of per-token N(0,1) x scale: the paper's
  special tokens are data-independent and their massive activations sit in a few fixed channels.
* ``massive_hidden_units`` (needs ``shared_special_values``), step 4: in every aggregator block, that many
  ``fc1`` units read the shared special direction with a threshold, so that they are ~``massive_hidden_scale``
  on special tokens and ~0 on patch tokens; their ``fc2`` columns are divided by the same scale. Without it
  no quantized linear sees special tokens much larger than patch tokens: LayerNorm caps a token's channels
  at about sqrt(dim / k) (4.6 at dim 64 with 3 planted channels), and the measured special/patch RMS ratio
  at the linear inputs is only about 1.8.

Every choice comes from ``torch.Generator().manual_seed(seed)``, visiting parameters in
``named_parameters()`` order; the result is identical on every machine.
"""

from __future__ import annotations

import torch
from torch import nn

from qvggt_export.model.config import PlantedOutliers

__all__ = ["PlantedOutliers", "plant_outliers"]

_SPECIAL_TOKENS = ("aggregator.camera_token", "aggregator.register_token", "camera_head.empty_pose_tokens")


@torch.no_grad()
def perturb_like_reference(model: nn.Module, generator: torch.Generator) -> None:
    """Step 1: N(0,1) special tokens, noise on every constant-initialised parameter."""
    for name, param in model.named_parameters():
        if name in _SPECIAL_TOKENS or name.endswith("patch_embed.cls_token") or name.endswith("register_tokens"):
            param.copy_(torch.randn(param.shape, generator=generator))
        elif param.numel() > 1 and bool((param == param.flatten()[0]).all()):
            spread = 0.2 if name.endswith(".gamma") else 0.1
            param.add_(spread * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def plant_outliers(model: nn.Module, config: PlantedOutliers) -> None:
    """Apply steps 1-3 of the module docstring to ``model`` in place."""
    generator = torch.Generator().manual_seed(config.seed)
    perturb_like_reference(model, generator)
    aggregator = model.aggregator
    dim = aggregator.camera_token.shape[-1]

    def pick(count: int, size: int) -> torch.Tensor:
        return torch.randperm(size, generator=generator)[: min(count, size)]

    if config.gaussian_weights:
        for blocks in (aggregator.frame_blocks, aggregator.global_blocks):
            for block in blocks:
                for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                    std = float(linear.weight.std())
                    linear.weight.copy_(std * torch.randn(linear.weight.shape, generator=generator))
    special = pick(config.special_token_channels, dim)
    if config.shared_special_values:
        value = config.special_token_scale * (2.0 * torch.randint(0, 2, (len(special),), generator=generator) - 1.0)
        aggregator.camera_token[..., special] = value
        aggregator.register_token[..., special] = value
    else:
        aggregator.camera_token[..., special] *= config.special_token_scale
        aggregator.register_token[..., special] *= config.special_token_scale
    for blocks in (aggregator.frame_blocks, aggregator.global_blocks):
        for block in blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[pick(config.norm_channels, dim)] *= config.norm_scale
                norm.weight[special] *= config.special_norm_scale
            fc1 = block.mlp.fc1
            rows = pick(config.hidden_units, fc1.out_features)
            fc1.weight[rows] *= config.hidden_scale
            fc1.bias[rows] *= config.hidden_scale
            qkv = block.attn.qkv
            value_rows = 2 * dim + pick(config.value_channels, dim)  # rows are ordered q | k | v
            qkv.weight[value_rows] *= config.value_scale
            qkv.bias[value_rows] *= config.value_scale
            if config.massive_hidden_units:
                _plant_massive_units(block, special, aggregator.camera_token[0, 0, 0, special].sign(),
                                     pick(config.massive_hidden_units, fc1.out_features), config.massive_hidden_scale)


def _plant_massive_units(block: nn.Module, special: torch.Tensor, signs: torch.Tensor, rows: torch.Tensor,
                         scale: float) -> None:
    """Step 4: hidden units that fire only on special tokens, with ``scale``-sized values (fc2 inputs).

    A special token's ``norm2`` output is dominated by its planted channels: each about
    ``sqrt(dim / k) * w`` (``k`` channels, LayerNorm weight ``w``), so its projection on the unit direction
    ``signs / sqrt(k)`` is about ``sqrt(dim) * mean|w|``, while a patch token's is about ``mean|w|``. A unit
    reading that direction with its threshold at half the special projection is ``GELU(gain * (p - t))``:
    ``~scale`` on special tokens, ~0 on patch tokens. The fc2 columns of the unit are divided by ``scale``,
    so the block's output changes little: massive inputs meeting small weights, as massive activations do.
    """
    fc1, fc2, norm = block.mlp.fc1, block.mlp.fc2, block.norm2
    dim, k = norm.weight.shape[0], len(special)
    expected = dim ** 0.5 * float(norm.weight[special].abs().mean())
    threshold = expected / 2
    gain = scale / (expected - threshold)
    for row in rows.tolist():
        fc1.weight[row] = 0.0
        fc1.weight[row, special] = gain * signs / k ** 0.5
        fc1.bias[row] = -gain * threshold
    fc2.weight[:, rows] /= scale
