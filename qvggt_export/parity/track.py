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

import numpy as np
import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.parity.compare import TRACK_ABS_TOL, OutputsReport, onnxruntime_session, tolerance_for
from qvggt_export.parity.metrics import cosine
from qvggt_export.parity.metrics import rel_l2 as _rel_l2
from qvggt_export.quant.modules import FloatQuantLinear, QuantLinear

logger = logging.getLogger(__name__)

ABS_TOL = TRACK_ABS_TOL  # the tolerances live with every other one, in parity.compare.tolerance_for

TrackCase = tuple[torch.Tensor, torch.Tensor]


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


def _run_torch(model: nn.Module, images: torch.Tensor, points: torch.Tensor, names: Sequence[str]
               ) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(images, query_points=points)
    missing = [n for n in names if n not in out]
    if missing:
        raise QVGGTError(f"ONNX outputs {missing} have no counterpart in the PyTorch outputs")
    return {n: out[n].detach().double().cpu().numpy() for n in names}


def check_track_parity(model: nn.Module, onnx_path: str | os.PathLike[str], cases: Sequence[TrackCase], *,
                       float_model: nn.Module | None = None, float64_noise: bool = True,
                       providers: Sequence[str] | None = None) -> TrackParityReport:
    """Run ``model`` and the track graph on each ``(images, query_points)`` case and compare every output.

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
        A :class:`TrackParityReport`: per output the worst case over ``cases``; ``to_dict()`` has the layout
        of the canonical graph's parity report (``outputs`` keyed by name, ``passed``).
    """
    if not cases:
        raise QVGGTError("track parity needs at least one (images, query_points) case")
    quantized = float_model is not None
    if not quantized and any(isinstance(m, QuantLinear | FloatQuantLinear) for m in model.modules()):
        raise QVGGTError("the model has quantized layers: pass its unquantized float_model (the noise scale of "
                         "the quantized criterion)")
    session = onnxruntime_session(onnx_path, providers)
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    if inputs != ["images", "query_points"]:
        raise QVGGTError(f"{onnx_path} is not a track graph: its inputs are {inputs}, expected images, query_points")
    reference = float_model if quantized else (copy.deepcopy(model).double().eval() if float64_noise else None)
    started = time.perf_counter()
    worst = {n: {"max_abs": 0.0, "max_rel": 0.0, "rel_l2": 0.0, "cosine": 1.0, "ratio": -1.0, "noise": 0.0,
                 "judged": 0.0} for n in names}
    for images, points in cases:
        if images.dim() != 5 or points.dim() != 3 or points.shape[-1] != 2:
            raise QVGGTError(f"a case must be (images [B, S, 3, H, W], query_points [B, N, 2]), got "
                             f"{tuple(images.shape)}, {tuple(points.shape)}")
        feed = {"images": images.detach().cpu().float().numpy(), "query_points": points.detach().cpu().float().numpy()}
        try:
            got_all = dict(zip(names, session.run(names, feed), strict=True))
        except Exception as exc:  # ORT raises its own types; a wrong shape is the user's input
            raise QVGGTError(f"ONNX Runtime failed on images {tuple(images.shape)}, query points "
                             f"{tuple(points.shape)}: {exc}") from exc
        want_all = _run_torch(model, images.float(), points.float(), names)
        if reference is None:
            noise_all = None
        elif quantized:
            noise_all = _run_torch(reference, images.float(), points.float(), names)
        else:
            noise_all = _run_torch(reference, images.double(), points.double(), names)
        for name in names:
            got, want = got_all[name].astype(np.float64), want_all[name]
            if got.shape != want.shape:
                raise QVGGTError(f"output {name}: ONNX shape {got.shape} vs PyTorch {want.shape}")
            s = worst[name]
            diff = np.abs(got - want)
            max_abs = float(diff.max()) if np.isfinite(diff).all() else float("inf")
            rel = _rel_l2(got, want) if np.isfinite(got).all() else float("inf")
            s["max_abs"] = max(s["max_abs"], max_abs)
            s["max_rel"] = max(s["max_rel"], max_abs / max(float(np.abs(want).max()), 1e-30))
            s["rel_l2"] = max(s["rel_l2"], rel)
            s["cosine"] = min(s["cosine"], cosine(got, want))
            # Judge each case against its own noise; keep the case closest to failing.
            if quantized:
                noise = _rel_l2(noise_all[name], want)
                tolerance, judged = tolerance_for("quantized", noise)[1], rel
            else:
                # The fp64 model's own outputs vs the float32 model: the noise is on the float32 side.
                noise = float(np.abs(noise_all[name] - want).max()) if noise_all is not None else 0.0
                tolerance = tolerance_for("track", noise if noise_all is not None else None, name)[1]
                judged = max_abs
            if judged / tolerance >= s["ratio"]:
                s.update(ratio=judged / tolerance, noise=noise, judged=judged)

    report = TrackParityReport(runtime="onnxruntime " + ",".join(session.get_providers()),
                               cases=[{"images": list(x.shape), "query_points": list(p.shape)} for x, p in cases])
    for name in names:
        s = worst[name]
        if quantized:
            _, tolerance, criterion = tolerance_for("quantized", s["noise"])
            rel_l2 = s["judged"]
        else:
            _, tolerance, criterion = tolerance_for("track", s["noise"] if float64_noise else None, name)
            rel_l2 = s["rel_l2"]
        noise = s["noise"] if quantized or float64_noise else None
        metric = "quant_rel_l2" if quantized else "float32_max_abs"
        report.outputs.append(TrackOutputParity(name, s["max_abs"], s["max_rel"], rel_l2, noise, metric, tolerance,
                                                criterion, bool(s["ratio"] <= 1.0), s["cosine"]))
    report.seconds = time.perf_counter() - started
    logger.info("track parity %s: %s", Path(onnx_path).name, "passed" if report.passed else "FAILED")
    return report
