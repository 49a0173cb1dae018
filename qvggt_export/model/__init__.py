"""A clean reimplementation of VGGT whose parameter names match the official checkpoint.

>>> from qvggt_export.model import build_vggt, load_checkpoint
>>> model = build_vggt("tiny")                      # or "vggt-1b", or an official-layout config dict
>>> load_checkpoint(model, "model.pt")              # official model.pt or .safetensors, strict keys
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qvggt_export.model.config import VGGTConfig
    from qvggt_export.model.vggt import VGGT

# Public names, imported from their module on first use (PEP 562): importing qvggt_export.model.config (the
# presets, read by ``qvggt-export --help``) must not import torch.
_LAZY = {
    "find_hf_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "load_state_dict_file": "checkpoint",
    **{name: "config" for name in ("AggregatorConfig", "CameraHeadConfig", "DinoConfig", "DPTHeadConfig",
                                   "TrackerConfig", "TrackHeadConfig", "VGGTConfig", "config_from_dict",
                                   "preset_names", "resolve_config", "PlantedOutliers")},
    "plant_outliers": "outliers",
    "load_and_preprocess_images": "preprocess", "preprocess_image": "preprocess",
    "VGGT": "vggt",
}

__all__ = [
    "VGGT", "VGGTConfig", "AggregatorConfig", "DinoConfig", "CameraHeadConfig", "DPTHeadConfig", "TrackHeadConfig",
    "TrackerConfig", "build_vggt", "config_from_dict", "preset_names", "resolve_config", "load_checkpoint",
    "load_state_dict_file", "find_hf_checkpoint", "load_and_preprocess_images", "preprocess_image",
    "PlantedOutliers", "plant_outliers", "load_model", "read_model_spec",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def build_vggt(config: str | Mapping[str, Any] | VGGTConfig = "tiny", *, device: str | torch.device | None = None,
               seed: int | None = 0) -> VGGT:
    """Build a VGGT in eval mode from a preset name, an official-layout config dict or a :class:`VGGTConfig`.

    Args:
        config: ``"vggt-1b"``, ``"tiny"``, ``"tiny-dino"``, ``"tiny-outliers"`` (see :func:`preset_names`),
            a dict of official constructor arguments per submodule (a fixture's ``model`` section), or a
            config object.
        device: where to allocate parameters; ``"meta"`` builds the structure without memory.
        seed: seeds the random initialisation so that a weight-less build is reproducible; ``None``
            leaves the global RNG alone.
    """
    import torch

    from qvggt_export.model.config import resolve_config
    from qvggt_export.model.outliers import plant_outliers
    from qvggt_export.model.vggt import VGGT

    resolved = resolve_config(config)
    generator_state = None
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = VGGT(resolved)
        if resolved.planted_outliers is not None and not any(p.is_meta for p in model.parameters()):
            plant_outliers(model, resolved.planted_outliers)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    return model.eval()



def read_model_spec(spec: str | Mapping[str, Any]) -> str | Mapping[str, Any]:
    """A preset name as given, or the contents of a JSON file of official constructor arguments (``*.json``).

    Raises:
        QVGGTError: the JSON file is missing or not valid JSON.
    """
    import json
    from pathlib import Path

    from qvggt_export.errors import QVGGTError

    if not (isinstance(spec, str) and spec.endswith(".json")):
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise QVGGTError(f"model config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QVGGTError(f"model config {path} is not valid JSON: {exc}") from exc


def load_model(spec: str | Mapping[str, Any] | VGGTConfig = "tiny", checkpoint: str | None = None, *,
               seed: int | None = 0) -> VGGT:
    """The float VGGT of a run: :func:`build_vggt` from a preset, a JSON file (:func:`read_model_spec`), an
    official-layout dict or a config, then the weights of ``checkpoint`` if given (:func:`load_checkpoint`;
    ``None`` keeps the seeded random initialisation). In eval mode. The pipeline and ``qvggt-export check``
    both load their models through it."""
    from qvggt_export.model.checkpoint import load_checkpoint

    model = build_vggt(read_model_spec(spec) if isinstance(spec, str) else spec, seed=seed)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()
