"""Quantization of VGGT: pure math (:mod:`.functional`), the layer-role registry (:mod:`.roles`),
fake-quant modules (:mod:`.modules`) and the model transforms (:func:`quantize_model`)."""

from qvggt_export.quant.config import (
    FLOAT_QUANT_FORMATS,
    INT_FORMATS,
    SUPPORTED_FORMATS,
    QuantConfig,
    check_format,
    format_family,
    parse_bits,
)
from qvggt_export.quant.modules import FloatQuantLinear, QuantLinear
from qvggt_export.quant.roles import AGGREGATOR_ROLES, ALL_ROLES, DEFAULT_ROLES, QuantTarget, find_targets
from qvggt_export.quant.rtn import QuantizedLayer, quantize_model

__all__ = [
    "QuantConfig", "SUPPORTED_FORMATS", "INT_FORMATS", "FLOAT_QUANT_FORMATS", "check_format", "format_family",
    "parse_bits", "QuantLinear", "FloatQuantLinear", "QuantTarget", "find_targets", "AGGREGATOR_ROLES",
    "ALL_ROLES", "DEFAULT_ROLES", "QuantizedLayer", "quantize_model",
]
