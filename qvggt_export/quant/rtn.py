"""Round-to-nearest quantization of VGGT (the paper's "Base"): model surgery over the role registry.

Integer formats become :class:`QuantLinear`, FP8 / NVFP4 become :class:`FloatQuantLinear`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.modules import FloatQuantLinear, QuantLinear, TransformedLinear
from qvggt_export.quant.roles import find_targets, iter_modules, replace_module

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedLayer:
    name: str
    role: str
    in_features: int
    out_features: int
    weight_rel_error: float  # ||W - W_q||_F / ||W||_F


def quantize_linear(module: nn.Module, config: QuantConfig, name: str, weight_step: torch.Tensor | None = None,
                    input_amax: float | None = None) -> QuantLinear | FloatQuantLinear:
    """Round-to-nearest quantization of one float (or transformed) linear in ``config``'s format: a
    :class:`QuantLinear` (integer formats; ``weight_step`` optional learned steps) or a :class:`FloatQuantLinear`
    (fp8, nvfp4; nvfp4 needs ``input_amax``, its calibrated max |transformed input|)."""
    family = config.family
    if family == "int":
        return QuantLinear.from_linear(module, config.weight_bits, config.act_bits, name, weight_step=weight_step)
    if family == "nvfp4" and input_amax is None:
        raise QVGGTError(f"{name}: nvfp4 needs its calibrated input amax (run calibrate() with calibration batches)")
    return FloatQuantLinear.from_linear(module, family, name, input_amax=input_amax)


def quantize_model(model: nn.Module, config: QuantConfig,
                   weight_steps: dict[str, torch.Tensor] | None = None,
                   input_amax: dict[str, float] | None = None) -> list[QuantizedLayer]:
    """Replace the targeted linears of ``model`` (``nn.Linear`` or, after :func:`apply_transforms`,
    :class:`TransformedLinear`) by :class:`QuantLinear` (integer formats) or :class:`FloatQuantLinear`
    (fp8, nvfp4), in place, with round-to-nearest weight codes.

    Args:
        model: a VGGT.
        config: format and roles.
        weight_steps: optional per-layer per-output-channel steps (learned by reconstruction; integer only).
        input_amax: per-layer max |transformed input| over the calibration data; required for nvfp4 (its
            static activation global scale), ignored otherwise.

    Returns one :class:`QuantizedLayer` per replaced linear, with its weight quantization error
    (relative to the float weight it replaced, i.e. the transformed weight when transforms were applied).
    """
    targets = find_targets(model, config.roles)
    family = config.family
    if family != "int" and weight_steps:
        raise QVGGTError(f"learned weight steps are integer steps; {config.bits} does not use them")
    layers = []
    for target, module in iter_modules(model, targets):
        if isinstance(module, QuantLinear | FloatQuantLinear):
            raise QVGGTError(f"{target.name} is already quantized; build a fresh model to quantize again")
        if not isinstance(module, nn.Linear | TransformedLinear):
            raise QVGGTError(f"{target.name} (role {target.role}) is a {type(module).__name__}, not a linear")
        quantized = quantize_linear(module, config, target.name, (weight_steps or {}).get(target.name),
                                    (input_amax or {}).get(target.name))
        weight = module.weight.detach().float()
        error = float((weight - quantized.dequantized_weight()).norm() / weight.norm().clamp_min(1e-12))
        replace_module(model, target.name, quantized)
        layers.append(QuantizedLayer(target.name, target.role, module.in_features, module.out_features, error))
    logger.info("quantized %d linears to %s", len(layers), config.bits)
    return layers
