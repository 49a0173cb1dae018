"""Parity checks: an exported graph against the PyTorch model it came from."""

from qvggt_export.parity.check import CheckConfig, check_export
from qvggt_export.parity.compare import OutputParity, ParityReport, check_parity, onnxruntime_session
from qvggt_export.parity.formats import (
    fp8_layer_parity,
    layer_parity,
    nvfp4_expected,
    nvfp4_layer_parity,
    nvfp4_parity,
    nvfp4_structure,
    reference_parity,
)
from qvggt_export.parity.localize import LayerCheck, LocalizationReport, localize_divergence
from qvggt_export.parity.track import TrackParityReport, check_track_parity

__all__ = ["check_export", "CheckConfig", "check_parity", "onnxruntime_session", "ParityReport", "OutputParity",
           "localize_divergence", "LocalizationReport", "LayerCheck", "layer_parity", "fp8_layer_parity",
           "nvfp4_layer_parity", "nvfp4_parity", "nvfp4_structure", "nvfp4_expected", "reference_parity",
           "check_track_parity", "TrackParityReport"]
