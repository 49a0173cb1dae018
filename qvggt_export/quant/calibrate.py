"""The quantization stage as one call: statistics -> transforms -> (block reconstruction) -> quantize.

NVFP4 adds one step after the transforms: a float pass over the calibration batches that records each
target's max |transformed input|, which fixes the static activation global scale TensorRT needs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.methods import get_method
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.dsfq import apply_transforms, check_rotatable, collect_channel_stats
from qvggt_export.quant.modules import TransformedLinear
from qvggt_export.quant.roles import QuantTarget, calibration_forward, find_targets, iter_modules
from qvggt_export.quant.rtn import QuantizedLayer, quantize_model

logger = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    layers: list[QuantizedLayer]
    transformed: int
    calibration_tokens: int = 0
    reconstruction: dict[str, dict[str, float]] = field(default_factory=dict)
    input_amax: dict[str, float] = field(default_factory=dict)
    # --method auto: settings, per-method layer counts and each block's measured errors and choice
    # (qvggt_export.quant.select.MethodChooser.summary); empty for the single methods.
    method_selection: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def collect_input_amax(model: nn.Module, targets: Sequence[QuantTarget], batches: Sequence[torch.Tensor],
                       progress: Callable[[Iterable], Iterable] = lambda x: x) -> dict[str, float]:
    """Max |input after the layer's own input transform| of each target over ``batches`` (float pass).

    Raises:
        QVGGTError: no batches, or a non-finite activation (naming the layer).
    """
    if len(batches) == 0:
        raise QVGGTError("collecting activation ranges needs calibration data, but the calibration set is empty")
    amax: dict[str, float] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if isinstance(module, TransformedLinear):
                x = module.transform(x)
            value = float(x.abs().amax())
            if not torch.isfinite(torch.tensor(value)):
                raise QVGGTError(f"non-finite activation (NaN/Inf) entering {name}; check the inputs and weights")
            amax[name] = max(amax.get(name, 0.0), value)
        return hook

    forward = calibration_forward(model, targets)  # only what reaches the targets runs
    handles = [module.register_forward_pre_hook(make_hook(t.name)) for t, module in iter_modules(model, targets)]
    try:
        for images in progress(batches):
            forward(images)
    finally:
        for handle in handles:
            handle.remove()
    return amax


def calibrate(model: nn.Module, config: QuantConfig, batches: Sequence[torch.Tensor] = (),
              progress: Callable[[Iterable], Iterable] = lambda x: x,
              recon_checkpoint: str | Path | None = None,
              statistics_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
              ) -> CalibrationResult:
    """Quantize ``model`` in place with ``config``.

    Args:
        model: a float VGGT (eval mode).
        config: format, method (``rtn``/``smooth``/``rotate``/``smooth_rotate``/``dsfq``, or ``auto``: chosen per
            block by measured error, :mod:`qvggt_export.quant.select`), roles, alpha, seed, reconstruction settings.
        batches: calibration images, each [B, S, 3, H, W] in [0, 1]; required by the smoothing methods and
            by reconstruction.
        progress: wraps long loops (e.g. a tqdm factory).
        recon_checkpoint: where block reconstruction saves its learned parameters after each block; an
            interrupted run given the same file resumes after the last finished block.
        statistics_context: a factory of the context the statistics-only float pass runs in (e.g. CUDA autocast
            to bf16, :func:`qvggt_export.device.autocast`); reconstruction and quantization never run in it.
    """
    targets = find_targets(model, config.roles)
    candidates = [get_method(name) for name in config.candidate_methods]
    if not config.is_auto and candidates[0].rotates:  # (auto skips a rotation where it cannot apply)
        check_rotatable(targets, model)
    stats = None
    tokens = 0
    if config.needs_calibration:
        if len(batches) == 0:
            raise QVGGTError(f"method {config.method} needs calibration data, but the calibration set is empty")
        raw = any(spec.statistics == "raw" for spec in candidates)
        rotated = any(spec.statistics == "rotated" for spec in candidates)
        if raw or rotated:
            with statistics_context() if statistics_context is not None else contextlib.nullcontext():
                stats = collect_channel_stats(model, targets, batches, config.seed, raw=raw, rotated=rotated,
                                              progress=progress)
            tokens = next(iter(stats.values())).tokens
    weight_steps = None
    recon_report: dict[str, dict[str, float]] = {}
    selection: dict[str, Any] = {}
    if config.is_auto:
        from qvggt_export.quant.reconstruct import reconstruct_blocks
        from qvggt_export.quant.select import MethodChooser, aggregator_token_layout

        # One walk over the blocks: each is chosen on the quantized chain's inputs, then learned (recon_iters > 0).
        chooser = MethodChooser(model, config, stats, aggregator_token_layout(model, batches))
        weight_steps, recon_report = reconstruct_blocks(model, targets, config, batches, progress,
                                                        checkpoint=recon_checkpoint, chooser=chooser)
        transformed = chooser.transformed
        selection = chooser.summary()
    else:
        transformed = apply_transforms(model, targets, config.method, stats, config.alpha, config.seed)
        if config.recon_iters > 0:
            from qvggt_export.quant.reconstruct import reconstruct_blocks

            weight_steps, recon_report = reconstruct_blocks(model, targets, config, batches, progress,
                                                            checkpoint=recon_checkpoint)
    input_amax: dict[str, float] = {}
    if config.family == "nvfp4":
        input_amax = collect_input_amax(model, targets, batches, progress)
        zero = sorted(name for name, value in input_amax.items() if value <= 0)
        if zero:
            raise QVGGTError(f"the calibration data never activates {zero[:3]} (max |input| = 0): no NVFP4 "
                             "activation scale can be set; use other calibration data")
    layers = quantize_model(model, config, weight_steps, input_amax)
    return CalibrationResult(layers, transformed, tokens, recon_report, input_amax, selection)
