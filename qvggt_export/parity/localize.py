"""Layer-by-layer parity: which quantized layer of an exported graph disagrees with PyTorch, and by how much.

End-to-end outputs cannot say *where* a graph goes wrong, and in a deep quantized network they cannot
even separate a bug from compounding rounding ties. This checker exposes every quantized layer's
tensors in the ONNX graph (their names are recorded by the exporter in the model's metadata), runs
ONNX Runtime once, and re-computes each layer in PyTorch **from ONNX Runtime's own input to that
layer** (teacher forcing), so every layer is judged on its own:

* ``transform_rel``: the online rotation / smoothing, relative L2 (float math: expected ~1e-7);
* ``code_flips``, ``code_max_delta``: activation codes that differ, and by how many quantization steps.
  A correct layer differs only at rounding ties: at most 1 step, in a tiny fraction of codes;
* ``output_rel``: the layer output, relative L2. A wrong weight scale or layout is an O(1) error.

A layer passes when ``transform_rel <= 1e-4``, ``code_max_delta <= 1``, at most 0.1 % of codes flipped,
and ``output_rel <= 1e-3``; the report names the first layer (in execution order) that does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.export.qdq import LAYER_MAP_KEY
from qvggt_export.parity.compare import onnxruntime_session
from qvggt_export.quant import functional as qf
from qvggt_export.quant.modules import QuantLinear

TRANSFORM_REL_TOL = 1e-4
MAX_CODE_DELTA = 1
MAX_FLIP_FRACTION = 1e-3
OUTPUT_REL_TOL = 1e-3


@dataclass
class LayerCheck:
    name: str
    transform_rel: float
    code_flips: int
    code_count: int
    code_max_delta: int
    output_rel: float
    passed: bool


@dataclass
class LocalizationReport:
    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def first_failing(self) -> str | None:
        return next((layer.name for layer in self.layers if not layer.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return {"first_failing_layer": self.first_failing, "criteria": {
            "transform_rel": TRANSFORM_REL_TOL, "code_max_delta": MAX_CODE_DELTA,
            "flip_fraction": MAX_FLIP_FRACTION, "output_rel": OUTPUT_REL_TOL},
            "layers": [asdict(layer) for layer in self.layers]}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


@contextlib.contextmanager
def _with_layer_outputs(onnx_path: Path, names: list[str]) -> Iterator[Path]:
    """A temporary copy of the graph that also outputs ``names``; external data is left where it is.

    A graph with external data is copied into its own folder (a hidden temporary name, removed afterwards):
    ONNX Runtime (1.32) refuses external data outside the model's folder, symlinks included.
    """
    proto = onnx.load(str(onnx_path), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    with tempfile.TemporaryDirectory() as folder:
        fd, name = tempfile.mkstemp(prefix=f".{onnx_path.stem}.layers-", suffix=".onnx",
                                    dir=onnx_path.parent if external else folder)
        os.close(fd)
        try:
            onnx.save(proto, name)
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def localize_divergence(model: nn.Module, onnx_path: str | os.PathLike[str], images: torch.Tensor
                        ) -> LocalizationReport:
    """Check every quantized layer of ``onnx_path`` against ``model`` on one input batch.

    Args:
        model: the fake-quantized PyTorch model the graph was exported from.
        onnx_path: the exported graph (with the exporter's layer map in its metadata).
        images: [B, S, 3, H, W] at the export's resolution.
    """
    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    layer_map, modules = matched_layers(proto, onnx_path, model, lambda m: isinstance(m, QuantLinear), "QuantLinear")
    values = layer_values(onnx_path, layer_map, images)
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: order.append(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    report = LocalizationReport()
    with torch.no_grad():
        for name in dict.fromkeys(order):
            if name not in layer_map:
                continue
            module, tensors = modules[name], layer_map[name]
            raw = torch.from_numpy(values[tensors["input"]])
            transformed_ort = values[tensors["transformed"]]
            transform_rel = _rel(module.transform(raw).numpy(), transformed_ort)
            x = torch.from_numpy(transformed_ort)
            step = qf.per_token_step(x, module.act_bits)
            codes_pt = qf.quantize(x, step, module.act_bits).numpy()
            delta = np.abs(codes_pt - values[tensors["codes"]])
            weight = module.weight_codes.float() * module.weight_step[:, None]
            output_pt = (torch.from_numpy(codes_pt) @ weight.T * step + module.bias).numpy()
            output_rel = _rel(values[tensors["output"]], output_pt)
            flips, count = int((delta > 0).sum()), int(delta.size)
            max_delta = int(delta.max()) if delta.size else 0
            passed = (transform_rel <= TRANSFORM_REL_TOL and max_delta <= MAX_CODE_DELTA
                      and flips <= MAX_FLIP_FRACTION * count and output_rel <= OUTPUT_REL_TOL)
            report.layers.append(LayerCheck(name, transform_rel, flips, count, max_delta, output_rel, passed))
    return report


def layer_values(onnx_path: Path, layer_map: dict[str, dict[str, str]], images: torch.Tensor) -> dict[str, np.ndarray]:
    """Every graph output and every tensor named in ``layer_map``, from one ONNX Runtime run on ``images``."""
    wanted = sorted({t for entry in layer_map.values() for t in entry.values()})
    with _with_layer_outputs(onnx_path, wanted) as copy:
        session = onnxruntime_session(copy)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {session.get_inputs()[0].name: images.float().numpy()}),
                        strict=True))


def matched_layers(proto: onnx.ModelProto, onnx_path: Path, model: nn.Module, is_layer: Callable[[nn.Module], bool],
                   kind: str) -> tuple[dict[str, dict[str, str]], dict[str, nn.Module]]:
    """The graph's quantized-layer map (metadata written by the exporter) and, for each of its layers, the
    model's module of that name, which must satisfy ``is_layer`` (``kind`` names it in the error).

    Raises:
        QVGGTError: the graph has no layer map, or a mapped layer is not a ``kind`` module of the model.
    """
    meta = {p.key: p.value for p in proto.metadata_props}
    if LAYER_MAP_KEY not in meta:
        raise QVGGTError(f"{onnx_path} has no quantized-layer map: export it with qvggt-export to check its layers")
    layer_map: dict[str, dict[str, str]] = json.loads(meta[LAYER_MAP_KEY])
    modules = {name: m for name, m in model.named_modules() if is_layer(m)}
    missing = sorted(set(layer_map) - set(modules))
    if missing:
        raise QVGGTError(f"the graph's quantized layers {missing[:5]} are not {kind} modules of the model")
    return layer_map, modules
