"""Activation statistics for the report's "what the transforms did" plots (the paper's Fig. 3 on the user's model).

:func:`activation_report_data` captures the inputs of a few quantized linears with forward pre-hooks on the
*float* model over one calibration batch, and describes each at three stages: the raw input, after the
rotation (``x diag(v) H``), and after rotation + smoothing (the full input transform). Where the saved model
rotates (``rotate``, ``smooth_rotate``, ``dsfq``), the stages use its saved transform; otherwise (``rtn``,
``smooth``) they show what DSFQ would do, computed here with the layer's seeded signs and the smoothing
factors of eq. 7 from the rotated statistics (the plots say which). Kept small: per stage a histogram of the
values and the per-channel max |x| (channel saliency); saved to ``report_data.npz`` so that
``qvggt-export report`` can redraw without a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qvggt_export.io import atomic_write

DATA_NAME = "report_data.npz"
STAGES = ("raw input", "after rotation", "after rotation + smoothing")
HISTOGRAM_BINS = 81


def _outlier_ratio(absmax: torch.Tensor) -> float:
    return float(absmax.max() / absmax.median().clamp_min(1e-12))


def _choose_layers(inputs: dict[str, torch.Tensor], count: int) -> list[str]:
    """The ``count`` layers whose inputs have the strongest channel outliers (max / median of per-channel max)."""
    ratios = {name: _outlier_ratio(x.abs().amax(0)) for name, x in inputs.items()}
    return sorted(ratios, key=ratios.get, reverse=True)[:count]


@torch.no_grad()
def activation_report_data(float_model: nn.Module, quantized_model: nn.Module, images: torch.Tensor,
                           seed: int, alpha: float, layers: Sequence[str] | None = None, count: int = 3,
                           max_tokens: int = 4096) -> dict[str, Any]:
    """Histograms and channel saliency of chosen layer inputs at the three :data:`STAGES`.

    Args:
        float_model: the float model (its linears have the quantized model's layer names).
        quantized_model: the quantized model (its saved transforms).
        images: one calibration batch [1, S, 3, H, W].
        seed, alpha: the run's seed (the layers' Hadamard signs) and smoothing strength, for layers whose saved
            model does not rotate.
        layers: layer names to show (default: the ``count`` with the strongest outliers).
        max_tokens: tokens kept per layer (a seeded subsample; the statistics are descriptive).
    """
    from qvggt_export.quant.dsfq import layer_signs
    from qvggt_export.quant.hadamard import fwht, hadamard_factors
    from qvggt_export.quant.transforms import smoothing_scales, transform_input, weight_column_absmax

    quantized = {name: module for name, module in quantized_model.named_modules() if hasattr(module, "rotate")
                 and hasattr(module, "input_pre")}
    linears = {name: module for name, module in float_model.named_modules()
               if isinstance(module, nn.Linear) and name in quantized}
    if layers is not None:
        linears = {name: linears[name] for name in layers if name in linears}
    captured: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)

    def hook(name: str):  # noqa: ANN202
        def capture(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if x.shape[0] > max_tokens:
                x = x[torch.randperm(x.shape[0], generator=generator)[:max_tokens]]
            captured.setdefault(name, x)  # first call only: a module may run more than once per forward
        return capture

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        float_model(images)
    finally:
        for handle in handles:
            handle.remove()
    chosen = list(layers) if layers is not None else _choose_layers(captured, count)
    result: dict[str, Any] = {"layers": [], "stages": list(STAGES)}
    arrays: dict[str, np.ndarray] = {}
    for index, name in enumerate(n for n in chosen if n in captured):
        x, module = captured[name], quantized[name]
        try:
            hadamard_factors(x.shape[-1])
        except Exception:  # noqa: BLE001 - a width fwht cannot rotate: nothing to show for this layer
            continue
        if module.rotate:
            source = "saved transform"
            rotated = transform_input(x, module.input_pre, None, True)
            smoothed = transform_input(x, module.input_pre, module.input_post, True)
        else:
            source = "DSFQ computed for illustration (the saved model does not rotate)"
            signs = layer_signs(name, x.shape[-1], seed)
            rotated = fwht(x, signs=signs)
            weight = linears[name].weight.detach().float()
            scales = smoothing_scales(rotated.abs().amax(0), weight_column_absmax(weight, signs, rotate=True), alpha)
            smoothed = rotated / scales
        stages = {}
        for stage_index, values in enumerate((x, rotated, smoothed)):
            absmax = values.abs().amax(0)
            limit = float(values.abs().max().clamp_min(1e-12))
            counts, edges = np.histogram(values.numpy().reshape(-1), bins=HISTOGRAM_BINS, range=(-limit, limit))
            arrays[f"l{index}_s{stage_index}_hist"] = counts.astype(np.int64)
            arrays[f"l{index}_s{stage_index}_edges"] = edges.astype(np.float32)
            arrays[f"l{index}_s{stage_index}_absmax"] = absmax.numpy().astype(np.float32)
            flat = values.reshape(-1).double()
            kurtosis = float(((flat - flat.mean()) ** 4).mean() / flat.var().clamp_min(1e-30) ** 2)
            stages[STAGES[stage_index]] = {"max_abs": limit, "outlier_ratio": _outlier_ratio(absmax),
                                           "kurtosis": kurtosis}
        result["layers"].append({"name": name, "index": index, "tokens": int(x.shape[0]), "channels": int(x.shape[1]),
                                 "source": source, "stages": stages})
    result["arrays"] = arrays
    return result


def save_report_data(data: dict[str, Any], out_dir: str | Path) -> Path:
    """``report_data.npz``: the arrays plus the description as a JSON string (atomic)."""
    arrays = dict(data["arrays"])
    arrays["meta"] = np.array(json.dumps({k: v for k, v in data.items() if k != "arrays"}))
    path = Path(out_dir) / DATA_NAME

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    return atomic_write(path, write)


def load_report_data(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / DATA_NAME
    if not path.is_file():
        return None
    with np.load(path) as npz:
        data = json.loads(str(npz["meta"]))
        data["arrays"] = {k: npz[k] for k in npz.files if k != "meta"}
    return data
