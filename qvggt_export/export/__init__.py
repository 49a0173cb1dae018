"""ONNX export: the canonical graph (float or Q/DQ) of a VGGT."""

from qvggt_export.export.onnx_export import DENSE_OUTPUTS, OPSET, ExportResult, export_onnx
from qvggt_export.export.track_export import TrackExportResult, export_track_onnx

__all__ = ["export_onnx", "ExportResult", "DENSE_OUTPUTS", "OPSET", "export_track_onnx", "TrackExportResult"]
