"""Parity of an exported track graph (:func:`~qvggt_export.export.track_export.export_track_onnx`) against the
PyTorch model: ONNX Runtime (CPU, parity-safe settings) vs ``model(images, query_points)``.

Criteria, per output, worst case over the inputs:

* **Float graph**: ``max_abs <= max(ABS_TOL[name], 2 x float32_noise)``. ``ABS_TOL`` are the official-fixture
  tolerances (2e-2 px for ``track``, 2e-3 for ``vis`` / ``conf``: tracks are iterative grid sampling, far
  more sensitive than the dense outputs). ``float32_noise`` is ``max|torch_fp32 - torch_fp64|`` on the same
  input: two correct float32 implementations of an iterative tracker disagree by about its own float32
  rounding noise, so where the tracker amplifies rounding beyond the fixed tolerance, the noise sets the bar.
  Measured on ``tiny``: with the fixtures' weights the noise is ~3e-3 px (the fixed 2e-2 px governs); with
  the seeded random weights of ``build_vggt("tiny")`` the tracker is chaotic (float32 noise 0.2-0.3 px, and
  PyTorch's own fused vs unfused attention paths differ by up to 0.6 px), so the noise governs there.
* **Quantized graph**: the criterion of :func:`qvggt_export.parity.compare.tolerance_for` (``"quantized"``):
  ``rel_l2 <= max(1e-5, 2 x quant_noise)`` with ``quant_noise`` the relative L2 distance of the fake-quant
  model from the float model on the same input.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.parity.compare import TRACK_ABS_TOL, OutputsReport, onnxruntime_session
from qvggt_export.quant.modules import FloatQuantLinear, QuantLinear

logger = logging.getLogger(__name__)

ABS_TOL = TRACK_ABS_TOL  # the tolerances live with every other one, in parity.compare.tolerance_for

TrackCase = tuple[torch.Tensor, torch.Tensor]
TRACK_INPUTS = ("images", "query_points")  # the track graph's inputs, in export order


@dataclass
class TrackOutputParity:
    name: str
    max_abs: float
    max_rel: float
    rel_l2: float
    noise: float | None  # of the judged case: float32 max_abs (float graphs) or quant rel_l2 (quantized)
    noise_metric: str
    tolerance: float
    criterion: str
    passed: bool
    cosine: float


@dataclass
class TrackParityReport(OutputsReport):
    runtime: str
    cases: list[dict[str, list[int]]]
    outputs: list[TrackOutputParity] = field(default_factory=list)
    seconds: float = 0.0


def check_track_parity(model: nn.Module, onnx_path: str | os.PathLike[str], cases: Sequence[TrackCase], *,
                       float_model: nn.Module | None = None, float64_noise: bool = True,
                       providers: Sequence[str] | None = None) -> TrackParityReport:
    """Run ``model`` and the track graph on each ``(images, query_points)`` case and compare every output, through
    the parity driver of the canonical graph (:func:`qvggt_export.parity.driver.compare_runs`: Polygraphy's
    comparator, tolerances of :func:`~qvggt_export.parity.compare.tolerance_for`).

    Args:
        model: the model the graph was exported from (float or fake-quantized), in eval mode.
        onnx_path: the exported track graph.
        cases: ``(images [B, S, 3, H, W], query_points [B, N, 2])`` at the export's resolution and batch;
            frame and point counts may differ from the export's example and between cases.
        float_model: the unquantized model; required when ``model`` is quantized (sets the noise scale).
        float64_noise: float graphs only: measure the float32 noise with a float64 copy of ``model`` (a
            second model in memory). ``False`` judges against the fixed :data:`ABS_TOL` alone.
        providers: ONNX Runtime execution providers (default CPU).

    Returns:
        A :class:`TrackParityReport`: per output, the metrics of the case closest to failing (largest judged
        metric / tolerance), ``passed`` when every case passed; ``to_dict()`` has the layout of the canonical
        graph's parity report (``outputs`` keyed by name, ``passed``).
    """
    if not cases:
        raise QVGGTError("track parity needs at least one (images, query_points) case")
    quantized = float_model is not None
    if not quantized and any(isinstance(m, QuantLinear | FloatQuantLinear) for m in model.modules()):
        raise QVGGTError("the model has quantized layers: pass its unquantized float_model (the noise scale of "
                         "the quantized criterion)")
    for images, points in cases:
        if images.dim() != 5 or points.dim() != 3 or points.shape[-1] != 2:
            raise QVGGTError(f"a case must be (images [B, S, 3, H, W], query_points [B, N, 2]), got "
                             f"{tuple(images.shape)}, {tuple(points.shape)}")
    from qvggt_export.parity.driver import compare_runs
    from qvggt_export.parity.runners import onnxrt_runner, torch_runner

    session = onnxruntime_session(onnx_path, providers)  # loads the graph: fails early
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    if inputs != list(TRACK_INPUTS):
        raise QVGGTError(f"{onnx_path} is not a track graph: its inputs are {inputs}, expected images, query_points")
    runners = [torch_runner(model, names, input_names=TRACK_INPUTS), onnxrt_runner(onnx_path, session=session)]
    if quantized:
        runners.append(torch_runner(float_model, names, "pytorch-noise", input_names=TRACK_INPUTS))
    elif float64_noise:
        runners.append(torch_runner(copy.deepcopy(model).double().eval(), names, "pytorch-noise",
                                    input_names=TRACK_INPUTS, dtype="float64"))
    labels = [f"case {index}: images {list(x.shape)}, query_points {list(p.shape)}"
              for index, (x, p) in enumerate(cases)]
    started = time.perf_counter()
    try:
        outputs = compare_runs(runners, [(x.float(), p.float()) for x, p in cases],
                               "quantized" if quantized else "track", labels,
                               input_names=TRACK_INPUTS)["onnxruntime"]["outputs"]
    except QVGGTError:
        raise
    except Exception as exc:  # ONNX Runtime and Polygraphy raise their own types; a wrong shape is the user's input
        raise QVGGTError(f"track parity failed on {onnx_path} ({'; '.join(labels)}): {exc}") from exc
    report = TrackParityReport(runtime="onnxruntime " + ",".join(session.get_providers()),
                               cases=[{"images": list(x.shape), "query_points": list(p.shape)} for x, p in cases])
    metric = "quant_rel_l2" if quantized else "float32_max_abs"
    for name in names:
        o = outputs[name]
        report.outputs.append(TrackOutputParity(name, o["max_abs"], o["max_rel"], o["rel_l2"], o["noise"], metric,
                                                o["tolerance"], o["criterion"], bool(o["passed"]), o["cosine"]))
    report.seconds = time.perf_counter() - started
    logger.info("track parity %s: %s", Path(onnx_path).name, "passed" if report.passed else "FAILED")
    return report
