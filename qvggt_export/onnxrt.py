"""ONNX Runtime session settings shared by the parity stage and the engine stage's lowering measurement.

A stage-neutral module (no torch, no TensorRT): :mod:`qvggt_export.parity` and :mod:`qvggt_export.engine` both
read it, so neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

from qvggt_export.errors import MissingDependencyError

__all__ = ["parity_session_options"]


def parity_session_options(purpose: str = "Checking ONNX parity") -> tuple[Any, Any]:
    """``(onnxruntime, SessionOptions)`` with the parity settings of DESIGN.md section 3: ORT's integer QDQ
    fusions change the numerics on the CPU, so they are off. ``purpose`` names the work in the error raised
    when ONNX Runtime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", purpose) from exc
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.log_severity_level = 3
    return ort, options
