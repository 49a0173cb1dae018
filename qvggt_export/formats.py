"""The format registry: one row per number format, read by every stage (quant, export, parity, engine, CLI).

A format is one :class:`FormatSpec` in :data:`FORMATS`; adding one means adding its row here plus its math
(fake quant in :mod:`qvggt_export.quant`, Q/DQ lowering in :mod:`qvggt_export.export.qdq`). This module
imports nothing but the error type, so any stage (and ``qvggt-export --help``) can read it without pulling
in torch, ONNX or TensorRT.

Minimum compute capabilities follow what the tensor cores support and what TensorRT-RTX 1.7.1 was measured
to build here (DESIGN.md section 3): INT8 tensor cores since Turing (SM75), FP8 since Ada (SM89; TensorRT-RTX
builds FP8 Q/DQ for SM89 and SM120, not SM86), FP4 on Blackwell only (SM100/SM103 data centre, SM120/SM121
RTX; TensorRT-RTX 1.7.1 builds NVFP4 for SM120/SM121 only). W4A4 builds everywhere because its engine graph
is lowered (TensorRT has no 4-bit activation math): see :mod:`qvggt_export.engine.lowering`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from qvggt_export.errors import QVGGTError

__all__ = [
    "DEFAULT_ENGINE_PROFILE",
    "ENGINE_LOWERINGS",
    "FORMATS",
    "FormatSpec",
    "format_names",
    "get_format",
]

#: The build profile every format uses unless its row names another (``engines/rtx-default.json``).
DEFAULT_ENGINE_PROFILE = "rtx-default"
#: Every engine lowering target (:func:`qvggt_export.engine.lowering.lower_for_target`), plus ``auto``.
ENGINE_LOWERINGS = ("auto", "as-written", "int8-static", "w4a8", "w4a16")


@dataclass(frozen=True)
class FormatSpec:
    """One number format.

    Attributes:
        name: The ``--bits`` spelling (``"w4a4"``, ``"fp8"``, ``"fp32"``).
        family: ``"float"`` (unquantized reference exports), ``"int"`` (integer Q/DQ), or the float
            quantization format's own family (``"fp8"``, ``"nvfp4"``, ``"mxfp8"``).
        weight_bits, act_bits: Bits of weights and activations (nominal storage bits for the floating-point
            formats); ``None`` for the float references.
        opset: Default-domain ONNX opset of the exported graph.
        min_sm: Lowest compute capability (major * 10 + minor) an engine of this format can target.
        default_profile: Build profile used when the run leaves ``--engine-profile`` at ``rtx-default``.
        lowerings: Default engine lowering per backend (``"rtx"``, ``"trt"``).
        allowed_lowerings: Every lowering target the canonical graph of this format accepts.
        onnxruntime: Whether ONNX Runtime (CPU) can execute the exported graph (parity runs there).
        exported: Whether qvggt-export quantizes and exports this format (``False``: known to the engine
            target check only, e.g. ``mxfp8``).
        onnx_form: What the ONNX graph carries, one sentence for ``report.json``; ``None`` for float exports.
        target_hint: What to do when a target architecture is refused.
    """

    name: str
    family: str
    weight_bits: int | None
    act_bits: int | None
    opset: int
    min_sm: int
    default_profile: str = DEFAULT_ENGINE_PROFILE
    lowerings: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({"rtx": "as-written",
                                                                                   "trt": "as-written"}))
    allowed_lowerings: tuple[str, ...] = ("as-written",)
    onnxruntime: bool = True
    exported: bool = True
    onnx_form: str | None = None
    target_hint: str | None = None

    @property
    def quantized(self) -> bool:
        """Whether the format quantizes anything (every family but ``float``)."""
        return self.family != "float"

    @property
    def integer(self) -> bool:
        return self.family == "int"

    def default_lowering(self, backend: str = "rtx") -> str:
        """The engine lowering of this format on ``backend`` (``"auto"`` counts as ``"rtx"``, the backend
        ``auto`` picks when it is installed)."""
        if backend not in ("auto", "rtx", "trt"):
            raise QVGGTError(f"unknown backend {backend!r}; expected auto, rtx or trt")
        return self.lowerings["trt" if backend == "trt" else "rtx"]


_INT_FORM = ("opset-21 integer QuantizeLinear/DequantizeLinear: per-channel INT4/INT8 weights, per-token dynamic "
             "activations computed in the graph")
_W8_LOWERINGS = MappingProxyType({"rtx": "as-written", "trt": "int8-static"})
_W4_LOWERINGS = MappingProxyType({"rtx": "w4a16", "trt": "w4a16"})

FORMATS: Mapping[str, FormatSpec] = MappingProxyType({spec.name: spec for spec in (
    FormatSpec("w8a8", "int", 8, 8, opset=21, min_sm=75, lowerings=_W8_LOWERINGS,
               allowed_lowerings=("as-written", "int8-static"), onnx_form=_INT_FORM),
    FormatSpec("w6a6", "int", 6, 6, opset=21, min_sm=75, lowerings=_W8_LOWERINGS,
               allowed_lowerings=("as-written", "int8-static"), onnx_form=_INT_FORM),
    FormatSpec("w4a4", "int", 4, 4, opset=21, min_sm=75, lowerings=_W4_LOWERINGS,
               allowed_lowerings=("as-written", "w4a8", "w4a16"), onnx_form=_INT_FORM),
    FormatSpec("fp8", "fp8", 8, 8, opset=21, min_sm=89, default_profile="rtx-sm89-sm120",
               onnx_form="opset-21 FLOAT8E4M3FN QuantizeLinear/DequantizeLinear: per-channel FP8 weights, per-token "
                         "dynamic FP8 activations (unit Q/DQ scale, per-token scale applied after the GEMM)",
               target_hint="use w8a8 there, or target SM89 (Ada), SM90 (Hopper) or SM120 (Blackwell)"),
    FormatSpec("nvfp4", "nvfp4", 4, 4, opset=23, min_sm=100, default_profile="rtx-sm120", onnxruntime=False,
               onnx_form="opset-23 NVFP4 as TensorRT consumes it: FLOAT4E2M1 weights with FLOAT8E4M3FN block-16 "
                         "scales (double DequantizeLinear), activations through trt::TRT_FP4DynamicQuantize (block "
                         "16, E4M3 scales, calibrated global scale) and double DequantizeLinear",
               target_hint="use w4a4 (INT4 weights) or fp8 there, or target SM120/SM121 (Blackwell RTX) or SM100"),
    # Unquantized reference exports: the float model in that precision (float32 graph input and outputs).
    FormatSpec("fp32", "float", None, None, opset=21, min_sm=75),
    FormatSpec("fp16", "float", None, None, opset=21, min_sm=75),
    # TensorRT-RTX 1.7.1 builds MXFP8 (FP8 block-32 dynamic quantize) for SM89+; not produced here.
    FormatSpec("mxfp8", "mxfp8", 8, 8, opset=23, min_sm=89, exported=False,
               target_hint="use w8a8 there, or target SM89 or newer"),
)})


def format_names(*, quantized: bool | None = None, family: str | None = None,
                 exported: bool = True) -> tuple[str, ...]:
    """Names of the formats matching the filters, in table order (``exported=False``: every row)."""
    return tuple(spec.name for spec in FORMATS.values()
                 if (not exported or spec.exported)
                 and (quantized is None or spec.quantized == quantized)
                 and (family is None or spec.family == family))


def get_format(name: str, *, exported: bool = True) -> FormatSpec:
    """The row of format ``name`` (case and surrounding spaces ignored).

    Raises:
        QVGGTError: ``name`` is not in the table (or not exported, with ``exported=True``).
    """
    key = str(name).strip().lower()
    spec = FORMATS.get(key)
    if spec is None or (exported and not spec.exported):
        raise QVGGTError(f"unknown format {name!r}; supported: {', '.join(format_names(exported=exported))}")
    return spec
