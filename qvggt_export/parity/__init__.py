"""Parity checks: an exported graph against the PyTorch model it came from."""

from qvggt_export.parity.check import CheckConfig, check_export
from qvggt_export.parity.compare import OutputParity, ParityReport, check_parity, onnxruntime_session
from qvggt_export.parity.localize import LayerCheck, LocalizationReport, localize_divergence

__all__ = ["check_export", "CheckConfig", "check_parity", "onnxruntime_session", "ParityReport", "OutputParity",
           "localize_divergence", "LocalizationReport", "LayerCheck"]
