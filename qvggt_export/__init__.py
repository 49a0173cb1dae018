"""qvggt-export: post-training quantization (QuantVGGT) and ONNX / TensorRT export of VGGT.

Stages (one module each): :mod:`qvggt_export.model` (VGGT), :mod:`qvggt_export.calib` (data),
:mod:`qvggt_export.quant` (quantization), :mod:`qvggt_export.export` (ONNX), :mod:`qvggt_export.parity`
(ONNX Runtime vs PyTorch), :mod:`qvggt_export.engine` (TensorRT / TensorRT-RTX), and
:func:`qvggt_export.pipeline.run_pipeline` running them all. Importing this package imports no GPU or
TensorRT module.
"""

__version__ = "0.1.0"

import logging as _logging

# A library never configures logging; this only keeps Python's last-resort handler from printing
# messages (e.g. TensorRT's) that an application did not ask to see.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
