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

ONNX Runtime's QDQ fusions (``MatMulIntegerToFloat``, ``MatMulNBits`` at accuracy level 4) change the
numerics on CPU (DESIGN.md section 3), so parity sessions disable them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qvggt_export.errors import MissingDependencyError, QVGGTError

logger = logging.getLogger(__name__)

FLOAT_MAX_REL = 1e-5
QUANT_NOISE_RATIO = 2.0


def onnxruntime_session(onnx_path: str | os.PathLike[str], providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime session with parity-safe settings (no integer QDQ fusions)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", "Checking ONNX parity") from exc
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.log_severity_level = 3
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


@dataclass
class ParityReport:
    runtime: str
    inputs: list[list[int]]
    outputs: list[OutputParity] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["outputs"] = {o["name"]: {k: v for k, v in o.items() if k != "name"} for o in data["outputs"]}
        return data


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def check_parity(model: nn.Module, onnx_path: str | os.PathLike[str], inputs: Sequence[torch.Tensor], *,
                 float_model: nn.Module | None = None, providers: Sequence[str] | None = None) -> ParityReport:
    """Run ``model`` (PyTorch) and ``onnx_path`` (ONNX Runtime) on each input and compare every output.

    Args:
        model: the model the graph was exported from (float or fake-quantized), in eval mode.
        onnx_path: the exported graph; its output names must be keys of the model's output dict.
        inputs: image batches [B, S, 3, H, W] at the export's resolution (frame counts may differ).
        float_model: the unquantized model; required when ``model`` is quantized (sets the noise scale).
        providers: ONNX Runtime execution providers (default CPU).

    Returns:
        A :class:`ParityReport`; worst case over inputs, per output.
    """
    if not inputs:
        raise QVGGTError("parity needs at least one input batch")
    session = onnxruntime_session(onnx_path, providers)
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    quantized = float_model is not None
    started = time.perf_counter()
    worst: dict[str, dict[str, float]] = {n: {"max_abs": 0.0, "max_rel": 0.0, "rel_l2": 0.0, "noise": 0.0,
                                               "ratio": -1.0} for n in names}
    for images in inputs:
        feed = {input_name: images.detach().cpu().float().numpy()}
        ort_out = dict(zip(names, session.run(names, feed), strict=True))
        with torch.no_grad():
            torch_out = model(images)
            float_out = float_model(images) if quantized else None
        for name in names:
            if name not in torch_out:
                raise QVGGTError(f"ONNX output {name!r} has no counterpart in the PyTorch outputs")
            ref = torch_out[name].detach().float().cpu().numpy()
            got = ort_out[name]
            if got.shape != ref.shape:
                raise QVGGTError(f"output {name}: ONNX shape {got.shape} vs PyTorch {ref.shape}")
            stats = worst[name]
            diff = np.abs(got - ref)
            max_abs = float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf")
            stats["max_abs"] = max(stats["max_abs"], max_abs)
            stats["max_rel"] = max(stats["max_rel"], max_abs / max(float(np.abs(ref).max()), 1e-30))
            rel = _rel_l2(got, ref)
            stats["rel_l2"] = max(stats["rel_l2"], rel)
            if quantized:
                # Judge each input against its own noise; keep the input closest to failing.
                noise = _rel_l2(ref, float_out[name].detach().float().cpu().numpy())
                tolerance = max(FLOAT_MAX_REL, QUANT_NOISE_RATIO * noise)
                if rel / tolerance >= stats["ratio"]:
                    stats.update(ratio=rel / tolerance, noise=noise, judged_rel_l2=rel)

    report = ParityReport(runtime="onnxruntime " + ",".join(session.get_providers()),
                          inputs=[list(x.shape) for x in inputs])
    for name in names:
        s = worst[name]
        if quantized:
            tolerance = max(FLOAT_MAX_REL, QUANT_NOISE_RATIO * s["noise"])
            passed = s["ratio"] <= 1.0
            criterion = f"rel_l2 <= max({FLOAT_MAX_REL:g}, {QUANT_NOISE_RATIO:g} x quant_noise_rel_l2)"
            noise: float | None = s["noise"]
        else:
            tolerance, passed, noise = FLOAT_MAX_REL, s["max_rel"] <= FLOAT_MAX_REL, None
            criterion = f"max_abs / max|torch| <= {FLOAT_MAX_REL:g}"
        rel_l2 = s["judged_rel_l2"] if quantized else s["rel_l2"]
        report.outputs.append(OutputParity(name, s["max_abs"], s["max_rel"], rel_l2, noise, tolerance,
                                           criterion, bool(passed)))
    report.seconds = time.perf_counter() - started
    logger.info("parity %s: %s", Path(onnx_path).name, "passed" if report.passed else "FAILED")
    return report
