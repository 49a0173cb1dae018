"""Parity checks: an exported graph against the PyTorch model it came from."""

from qvggt_export.parity.compare import OutputParity, ParityReport, check_parity, onnxruntime_session

__all__ = ["check_parity", "onnxruntime_session", "ParityReport", "OutputParity"]
