"""Saving and reloading a quantized VGGT exactly: one safetensors file plus a JSON description.

The safetensors file holds the whole state dict (integer weight codes, steps, transform vectors and
every float weight that stayed float). The JSON holds what rebuilds the structure: the model spec given
to :func:`~qvggt_export.model.build_vggt` (a preset name or an official-layout config dict), the
resolved quantization config, and per quantized layer its format (bit widths, or ``"fp8"`` / ``"nvfp4"``)
and transform flags. Both files
are written atomically (temp file, then rename), the weights first, so a JSON never points at a
missing or half-written weight file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.io import atomic_write, write_json_atomic
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.modules import FloatQuantLinear, QuantLinear
from qvggt_export.quant.roles import replace_module

FORMAT_VERSION = 1


def save_quantized(model: nn.Module, path: str | os.PathLike[str], model_spec: str | dict[str, Any],
                   config: QuantConfig) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns both paths."""
    from safetensors.torch import save_file

    base = Path(path)
    weights, meta = base.with_suffix(".safetensors"), base.with_suffix(".json")
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear | FloatQuantLinear):
            continue
        kind = ({"weight_bits": m.weight_bits, "act_bits": m.act_bits} if isinstance(m, QuantLinear)
                else {"format": m.format})
        layers[name] = {**kind, "rotate": m.rotate, "pre": m.input_pre is not None, "post": m.input_post is not None,
                        "in_features": m.in_features, "out_features": m.out_features}
    if not layers:
        raise QVGGTError("the model has no quantized layers to save")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    description = {"format": "qvggt-export quantized model", "version": FORMAT_VERSION, "model": model_spec,
                   "quantization": dataclasses.asdict(config), "layers": layers, "weights": weights.name}
    atomic_write(weights, lambda tmp: save_file(state, tmp))
    write_json_atomic(meta, description)
    return weights, meta


def load_quantized(path: str | os.PathLike[str]) -> tuple[nn.Module, QuantConfig]:
    """Rebuild a model saved by :func:`save_quantized` (``path`` = the JSON or the shared stem)."""
    from safetensors.torch import load_file

    from qvggt_export.model import build_vggt, load_checkpoint

    meta = Path(path).with_suffix(".json")
    if not meta.is_file():
        raise QVGGTError(f"quantized model description not found: {meta}")
    try:
        description = json.loads(meta.read_text())
        version = description["version"]
        layers = description["layers"]
        quant = description["quantization"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise QVGGTError(f"{meta} is not a qvggt-export quantized model description: {exc}") from exc
    if version != FORMAT_VERSION:
        raise QVGGTError(f"{meta}: format version {version} is not supported (expected {FORMAT_VERSION})")
    config = QuantConfig(**{**quant, "roles": tuple(quant["roles"])})
    model = build_vggt(description["model"], device="meta")
    for name, spec in layers.items():
        try:
            if "format" in spec:
                layer: QuantLinear | FloatQuantLinear = FloatQuantLinear(
                    spec["in_features"], spec["out_features"], spec["format"], name)
            else:
                layer = QuantLinear(spec["in_features"], spec["out_features"], spec["weight_bits"], spec["act_bits"],
                                    name)
        except (KeyError, TypeError, ValueError) as exc:
            raise QVGGTError(f"{meta}: layer {name} has an invalid description {spec}: {exc}") from exc
        layer.rotate = bool(spec["rotate"])
        for key, flag in (("input_pre", "pre"), ("input_post", "post")):
            if spec[flag]:
                setattr(layer, key, layer.bias.new_ones(spec["in_features"]))
        replace_module(model, name, layer.to("meta"))
    weights = meta.parent / description.get("weights", meta.with_suffix(".safetensors").name)
    if not weights.is_file():
        raise QVGGTError(f"quantized weights not found: {weights}")
    state = load_file(str(weights))
    load_checkpoint(model, state)
    return model.eval(), config
