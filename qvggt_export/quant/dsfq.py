"""DSFQ model surgery: calibration statistics, then rotation / smoothing transforms of every target linear.

:func:`apply_transforms` replaces each targeted ``nn.Linear`` by a :class:`TransformedLinear` whose
float output equals the original up to float rounding (the transforms are exact equivalences);
:func:`~qvggt_export.quant.rtn.quantize_model` then quantizes those. Statistics come from one float
forward pass over the calibration batches with hooks on the target linears; because every transform
preserves its layer's output, statistics of the float model are the statistics every layer sees.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.methods import METHODS
from qvggt_export.quant.hadamard import fwht, hadamard_factors, is_rotatable, random_signs
from qvggt_export.quant.modules import TransformedLinear
from qvggt_export.quant.roles import QuantTarget, calibration_forward, iter_modules, replace_module
from qvggt_export.quant.transforms import fold_weight, smoothing_scales, weight_column_absmax

logger = logging.getLogger(__name__)

TRANSFORM_METHODS = tuple(METHODS)  # the method registry's names (qvggt_export.methods)


@dataclass
class ChannelStats:
    """Per-input-channel max |x| of one linear's input over the calibration data (raw and rotated)."""

    raw_absmax: torch.Tensor | None = None
    rotated_absmax: torch.Tensor | None = None
    tokens: int = 0


def layer_signs(name: str, size: int, seed: int) -> torch.Tensor:
    """The random +-1 signs of one layer: seeded by the run seed and the layer's name (stable across runs
    and independent of which other layers are quantized)."""
    return random_signs(size, seed=(seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def check_rotatable(targets: Sequence[QuantTarget], model: nn.Module) -> None:
    for target, module in iter_modules(model, targets):
        try:
            hadamard_factors(module.in_features)
        except QVGGTError as exc:
            raise QVGGTError(f"{target.name}: cannot rotate its {module.in_features} input channels: {exc}") from exc


@torch.no_grad()
def collect_channel_stats(model: nn.Module, targets: Sequence[QuantTarget], batches: Iterable[torch.Tensor],
                          seed: int, raw: bool, rotated: bool,
                          progress: Callable[[Iterable], Iterable] = lambda x: x) -> dict[str, ChannelStats]:
    """Run the float model over ``batches`` and record each target's input channel maxima.

    Raises:
        QVGGTError: no batches, or a non-finite activation (naming the layer and batch).
    """
    stats = {t.name: ChannelStats() for t in targets}
    batch_index = 0

    def make_hook(name: str, in_features: int) -> Callable:
        # (A width with no Hadamard matrix gets no rotated statistics: --method auto then leaves rotations out
        # for that layer; the single rotating methods refuse such a model before this pass.)
        signs = layer_signs(name, in_features, seed) if rotated and is_rotatable(in_features) else None

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if not torch.isfinite(x).all():
                raise QVGGTError(f"non-finite activation (NaN/Inf) entering {name} on calibration batch "
                                 f"{batch_index}; check the input images and the checkpoint")
            entry = stats[name]
            entry.tokens += x.shape[0]
            if raw:
                value = x.abs().amax(dim=0)
                entry.raw_absmax = value if entry.raw_absmax is None else torch.maximum(entry.raw_absmax, value)
            if signs is not None:
                value = fwht(x, signs=signs.to(x.device)).abs().amax(dim=0)
                entry.rotated_absmax = (value if entry.rotated_absmax is None
                                        else torch.maximum(entry.rotated_absmax, value))
        return hook

    forward = calibration_forward(model, targets)  # only what reaches the targets runs
    handles = [module.register_forward_pre_hook(make_hook(t.name, module.in_features))
               for t, module in iter_modules(model, targets)]
    try:
        for batch_index, images in enumerate(progress(batches)):  # noqa: B007 (read by the hook)
            forward(images)
    finally:
        for handle in handles:
            handle.remove()
    if not stats or next(iter(stats.values())).tokens == 0:
        raise QVGGTError("calibration produced no statistics: the calibration set is empty")
    return stats


def transform_linear(name: str, module: nn.Module, method: str, entry: ChannelStats | None, alpha: float = 0.5,
                     seed: int = 0) -> nn.Module:
    """The float layer of ``method`` for one target ``nn.Linear`` called ``name``: a :class:`TransformedLinear`
    (exact equivalence), or ``module`` itself for ``rtn``. ``entry``: its calibration statistics (methods that
    smooth need them)."""
    spec = METHODS.get(method)
    if spec is None:
        raise QVGGTError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if not spec.rotates and not spec.smooths:
        return module
    if not isinstance(module, nn.Linear):
        raise QVGGTError(f"{name} is a {type(module).__name__}; transforms apply to float nn.Linear")
    if spec.needs_calibration and entry is None:
        raise QVGGTError(f"method {method} needs calibration statistics for {name}")
    weight = module.weight.detach()
    rotate = spec.rotates
    signs = layer_signs(name, module.in_features, seed).to(weight.device, torch.float64) if rotate else None
    pre = signs
    post = None
    if spec.statistics == "raw":
        c = smoothing_scales(entry.raw_absmax, weight.abs().amax(dim=0), alpha)
        pre = 1.0 / c if signs is None else signs / c
    elif spec.statistics == "rotated":
        # DSFQ: smoothing in the rotated space, from the rotated weight's column maxima (not the raw
        # weight's, which the published code uses by mistake).
        c = smoothing_scales(entry.rotated_absmax, weight_column_absmax(weight, signs, rotate=True), alpha)
        post = 1.0 / c
    folded = fold_weight(weight, pre, post, rotate)
    transformed = TransformedLinear(folded, module.bias, None if pre is None else pre.float(),
                                    None if post is None else post.float(), rotate)
    return transformed.to(weight.device)


def apply_transforms(model: nn.Module, targets: Sequence[QuantTarget], method: str | Mapping[str, str],
                     stats: dict[str, ChannelStats] | None, alpha: float = 0.5, seed: int = 0) -> int:
    """Replace each target ``nn.Linear`` by the :class:`TransformedLinear` of ``method`` (in place).

    Args:
        method: one method for every target, or target name -> method (what ``auto`` chose).

    Returns the number of transformed layers (0 for ``rtn``).
    """
    per_target = (dict.fromkeys((t.name for t in targets), method) if isinstance(method, str) else dict(method))
    for name in set(per_target.values()):
        if name not in METHODS:
            raise QVGGTError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    rotating = [t for t in targets if METHODS[per_target[t.name]].rotates]
    if rotating:
        check_rotatable(rotating, model)
    count = 0
    for target, module in iter_modules(model, targets):
        layer = transform_linear(target.name, module, per_target[target.name], (stats or {}).get(target.name), alpha,
                                 seed)
        if layer is not module:
            replace_module(model, target.name, layer)
            count += 1
    logger.info("applied %s transforms to %d linears", method if isinstance(method, str) else "per-layer", count)
    return count
