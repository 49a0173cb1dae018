"""Quantization of VGGT: pure math (:mod:`.functional`), the layer-role registry (:mod:`.roles`),
fake-quant modules (:mod:`.modules`) and the model transforms (:func:`quantize_model`)."""

from qvggt_export.quant.config import SUPPORTED_FORMATS, QuantConfig, parse_bits
from qvggt_export.quant.modules import QuantLinear
from qvggt_export.quant.roles import AGGREGATOR_ROLES, ALL_ROLES, DEFAULT_ROLES, QuantTarget, find_targets
from qvggt_export.quant.rtn import QuantizedLayer, quantize_model

__all__ = [
    "QuantConfig", "SUPPORTED_FORMATS", "parse_bits", "QuantLinear", "QuantTarget", "find_targets", "AGGREGATOR_ROLES",
    "ALL_ROLES", "DEFAULT_ROLES", "QuantizedLayer", "quantize_model",
]
