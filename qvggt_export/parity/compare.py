"""Parity of an exported ONNX graph against the PyTorch model it came from (ONNX Runtime, CPU).

Tolerances, per output:

* **Float export**: ``max|onnx - torch| / max|torch| <= 1e-5``. Both sides compute the same float
  math; only summation order differs.
* **Quantized export**: ``||onnx - torch||_2 / ||torch||_2 <= max(1e-5, 2 x quant_noise)``, where
  ``quant_noise`` is the relative L2 distance of the PyTorch fake-quant model from the float model
  on the same input. Rounding ties (``x / step`` within float noise of ``k + 0.5``) flip single codes
  between runtimes, and in a deep network these flips compound: two correct implementations can
  disagree by up to ~sqrt(2) x the quantization noise in the worst case. A wrong scale, a transposed
  weight or a missing quantizer shows up as an error of the order of the signal itself, tens to
  thousands of times the noise (W4A4: ~20x, W8A8: ~1000x), so the check still catches real bugs.
  Layer-by-layer localisation is the job of the layer-wise checker.
* **Float16 export vs the float32 PyTorch model**: ``||onnx - torch||_2 / ||torch||_2 <= max(2^-11,
  2 x fp16_noise)``, ``fp16_noise`` being the relative L2 distance of a float16 copy of the PyTorch model from
  the float32 model on the same input: the same reasoning as for quantization, with float16 rounding as the
  noise (two correct float16 implementations round differently, and the floor is float16's unit roundoff,
  since the outputs themselves are float16 values). Observed on the tiny presets: ONNX Runtime's error is
  0.5-1.2 x the PyTorch float16 noise (1.5e-4 to 1.8e-3). ONNX Runtime's CPU provider lacks
  float16 kernels for many operators (see :func:`ort_fp16_fallback_ops`); it inserts casts and runs those
  in float32, so CPU parity measures the float16 *storage* of weights and activations between such
  operators, not float16 arithmetic everywhere (TensorRT's float16 kernels are a GPU-only check).

ONNX Runtime's QDQ fusions (``MatMulIntegerToFloat``, ``MatMulNBits`` at accuracy level 4) change the
numerics on CPU (DESIGN.md section 3), so parity sessions disable them.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.formats import format_names
from qvggt_export.onnxrt import parity_session_options

logger = logging.getLogger(__name__)

FLOAT_MAX_REL = 1e-5
NOISE_RATIO = 2.0
QUANT_NOISE_RATIO = NOISE_RATIO  # kept for callers of the original name
FP16_REL_FLOOR = 2.0**-11  # float16's unit roundoff: the outputs themselves are rounded to float16
PRECISIONS = format_names(quantized=False)  # the unquantized exports of the format registry
# Float track graphs (qvggt_export.parity.track): the official fixtures' absolute tolerances per output.
TRACK_ABS_TOL = {"track": 2e-2, "vis": 2e-3, "conf": 2e-3}


def tolerance_for(kind: str, noise: float | None = None, name: str | None = None) -> tuple[str, float, str]:
    """The criterion of one output: ``(metric, tolerance, description)``; passes when ``metric <= tolerance``.
    Every parity check (main job, ``qvggt-export check``, the tracking graph) takes its tolerances from here.

    ``kind`` is ``"fp32"``, ``"fp16"`` (a float16 graph against the float32 model; ``noise`` = relative L2 of the
    PyTorch float16 model vs float32 on that input), ``"quantized"`` (a Q/DQ graph against the fake-quant
    model; ``noise`` = relative L2 of fake-quant vs float on that input) or ``"track"`` (output ``name`` of a
    float track graph; ``noise`` = max|float32 - float64| of the PyTorch tracker on that input, or ``None`` to
    judge by the fixed tolerance alone).
    """
    if kind == "track":
        fixed = TRACK_ABS_TOL.get(name or "", TRACK_ABS_TOL["vis"])
        if noise is None:
            return "max_abs", fixed, f"max_abs <= {fixed:g}"
        return ("max_abs", max(fixed, NOISE_RATIO * noise),
                f"max_abs <= max({fixed:g}, {NOISE_RATIO:g} x float32_noise_max_abs)")
    if kind == "fp32":
        return "max_rel", FLOAT_MAX_REL, f"max_abs / max|torch| <= {FLOAT_MAX_REL:g}"
    if kind in ("fp16", "quantized") and noise is None:
        raise QVGGTError(f"the {kind} criterion needs the noise scale (PyTorch at that precision vs float32)")
    if kind == "fp16":
        return ("rel_l2", max(FP16_REL_FLOOR, NOISE_RATIO * noise),
                f"rel_l2 <= max({FP16_REL_FLOOR:.2g}, {NOISE_RATIO:g} x fp16_noise_rel_l2)")
    if kind == "quantized":
        return ("rel_l2", max(FLOAT_MAX_REL, NOISE_RATIO * noise),
                f"rel_l2 <= max({FLOAT_MAX_REL:g}, {NOISE_RATIO:g} x quant_noise_rel_l2)")
    raise QVGGTError(f"unknown parity kind {kind!r} (expected fp32, fp16 or quantized)")


def half_precision_model(model: nn.Module) -> nn.Module:
    """A float16 copy of a float model that takes float32 images (the PyTorch side of a float16 export)."""
    return _HalfPrecision(copy.deepcopy(model).half()).eval()


class _HalfPrecision(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(images.half())


def ort_fp16_fallback_ops(onnx_path: str | os.PathLike[str]) -> dict[str, int]:
    """Operators of a float16 graph that ONNX Runtime's CPU provider runs in float32 (it has no float16
    kernel for them and inserts ``Cast`` nodes around them), with their counts.

    Found by letting ONNX Runtime write its optimised graph (basic optimisations only, so no fusion
    renames the nodes) and following the casts it inserted: a node counts when an input it reads was
    widened to float32 by ONNX Runtime (shape-only nodes reading such a tensor count too).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", "Listing ONNX Runtime's float16 fallbacks") from exc
    import tempfile

    import onnx

    original = {n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    # Tensors ORT widened to float32: outputs of its inserted Casts, and (propagating in the graph's
    # topological order) outputs of nodes that consume them, until a Cast narrows them again.
    widened: set[str] = set()
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if node.name not in original and to == onnx.TensorProto.FLOAT:
                widened.update(node.output)
        elif any(i in widened for i in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            widened.update(node.output)
    return dict(sorted(counts.items()))


def onnxruntime_session(onnx_path: str | os.PathLike[str], providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime session with parity-safe settings (no integer QDQ fusions)."""
    ort, options = parity_session_options()
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise QVGGTError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc


@dataclass
class OutputParity:
    name: str
    max_abs: float
    max_rel: float
    rel_l2: float
    quant_noise_rel_l2: float | None
    tolerance: float
    criterion: str
    passed: bool
    cosine: float | None = None


class OutputsReport:
    """Shared behaviour of the parity reports: passed when every output passed; ``to_dict`` keys the outputs by
    name."""

    outputs: list[Any]

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["outputs"] = {o["name"]: {k: v for k, v in o.items() if k != "name"} for o in data["outputs"]}
        return data


@dataclass
class ParityReport(OutputsReport):
    runtime: str
    inputs: list[list[int]]
    outputs: list[OutputParity] = field(default_factory=list)
    seconds: float = 0.0


def check_parity(model: nn.Module, onnx_path: str | os.PathLike[str], inputs: Sequence[torch.Tensor], *,
                 float_model: nn.Module | None = None, providers: Sequence[str] | None = None,
                 precision: str = "fp32") -> ParityReport:
    """Run ``model`` (PyTorch) and ``onnx_path`` (ONNX Runtime) on each input and compare every output, through
    the parity driver shared with ``qvggt-export check`` (:func:`qvggt_export.parity.driver.compare_runs`:
    Polygraphy's comparator, tolerances of :func:`tolerance_for`).

    Args:
        model: the model the graph was exported from (float or fake-quantized), in eval mode.
        onnx_path: the exported graph; its output names must be keys of the model's output dict.
        inputs: image batches [B, S, 3, H, W] at the export's resolution (frame counts may differ).
        float_model: the unquantized model; required when ``model`` is quantized (sets the noise scale).
        providers: ONNX Runtime execution providers (default CPU).
        precision: the float graph's precision (``"fp32"`` or ``"fp16"``, as given to ``export_onnx``), which
            sets its criterion; ignored for quantized graphs. ``model`` stays the float32 model.

    Returns:
        A :class:`ParityReport`: per output, the metrics of the input closest to failing (largest metric /
        tolerance); ``passed`` when every input passed.
    """
    if not inputs:
        raise QVGGTError("parity needs at least one input batch")
    if precision not in PRECISIONS:
        raise QVGGTError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    import onnx

    from qvggt_export.parity.driver import compare_runs
    from qvggt_export.parity.runners import onnxrt_runner, torch_runner

    providers = list(providers or ["CPUExecutionProvider"])
    graph_runner = onnxrt_runner(onnx_path, providers, name="onnxruntime")  # loads the graph: fails early
    proto = onnx.load(str(onnx_path), load_external_data=False)
    names = [o.name for o in proto.graph.output]
    input_name = proto.graph.input[0].name
    del proto
    quantized = float_model is not None
    # Graphs judged against a noise scale: quantized (fake-quant vs float) and float16 (PyTorch float16 vs float32).
    noise_model = float_model if quantized else (half_precision_model(model) if precision == "fp16" else None)
    kind = "quantized" if quantized else precision
    started = time.perf_counter()
    runners = [torch_runner(model, names), graph_runner]
    if noise_model is not None:
        runners.append(torch_runner(noise_model, names, name="pytorch-noise"))
    labels = [f"input {index}: {list(images.shape)}" for index, images in enumerate(inputs)]
    outputs = compare_runs(runners, inputs, kind, labels, input_names=(input_name,))["onnxruntime"]["outputs"]
    report = ParityReport(runtime="onnxruntime " + ",".join(providers), inputs=[list(x.shape) for x in inputs])
    for name in names:
        o = outputs[name]
        report.outputs.append(OutputParity(name, o["max_abs"], o["max_rel"], o["rel_l2"], o["noise_rel_l2"],
                                           o["tolerance"], o["criterion"], bool(o["passed"]), o["cosine"]))
    report.seconds = time.perf_counter() - started
    logger.info("parity %s: %s", Path(onnx_path).name, "passed" if report.passed else "FAILED")
    return report
