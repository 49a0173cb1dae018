"""Fake-quantized modules that replace ``nn.Linear`` in the model (model surgery lives in rtn.py).

:class:`QuantLinear` keeps integer weight codes and per-channel steps (what a deployment stores) and
quantizes its input per token at run time. Its eager forward computes
``(codes_x @ W_dq^T) * step_x + bias``: the per-token step factors out of the GEMM exactly, which is
also the form TensorRT turns into an integer GEMM. During ONNX export it emits one placeholder node,
``qvggt.export::QLinear``, which the exporter expands into standard Q/DQ operators, so the quantization
math has a single definition on the PyTorch side and a single lowering on the ONNX side.
:class:`FloatQuantLinear` is its floating-point sibling (FP8 E4M3 and NVFP4, math in :mod:`.formats`),
exported as a ``qvggt.export::FQLinear`` placeholder. It is a separate class, not a subclass, because
code written for integer codes (the layer-by-layer parity checker, block reconstruction) must not take
FP8/FP4 layers for integer ones.
:class:`TransformedLinear` is the float stage in between: the same online input transform (rotation /
smoothing, see :mod:`.transforms`) with the folded float weight, exact up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.quant import formats as ff
from qvggt_export.quant import functional as qf
from qvggt_export.quant.config import FLOAT_QUANT_FORMATS
from qvggt_export.quant.transforms import transform_input

PLACEHOLDER_DOMAIN = "qvggt.export"
PLACEHOLDER_OP = "QLinear"
FLOAT_PLACEHOLDER_OP = "FQLinear"


class _QLinearPlaceholder(torch.autograd.Function):
    """Carries a quantized linear through the TorchScript exporter as one custom node."""

    @staticmethod
    def forward(ctx, x, codes, step, bias, pre, post, weight_bits, act_bits, rotate, layer):  # noqa: ANN001, ARG004
        # The symbolic node replaces this body in the graph; the tracer only needs an output of the right
        # shape and dtype (the model has no value-dependent control flow). Computing the real value here
        # would run fwht, whose cached stage matrices the tracer then meets again in the next layer's
        # scope and rejects ("unordered_map::at").
        return x.new_zeros(*x.shape[:-1], codes.shape[0])

    @staticmethod
    def symbolic(g, x, codes, step, bias, pre, post, weight_bits, act_bits, rotate, layer):  # noqa: ANN001
        from torch.onnx import symbolic_helper

        out = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", x, codes, step, bias, pre, post,
                   weight_bits_i=weight_bits, act_bits_i=act_bits, rotate_i=rotate, layer_s=layer)
        # Declare the output type/shape so the exporter's shape inference continues past the custom node.
        sizes = symbolic_helper._get_tensor_sizes(x)
        out_features = symbolic_helper._get_tensor_sizes(codes)[0]
        if sizes is not None:
            out.setType(x.type().with_sizes([*sizes[:-1], out_features]))
        return out


def _qlinear_math(x: torch.Tensor, codes: torch.Tensor, step: torch.Tensor, bias: torch.Tensor,
                  act_bits: int) -> torch.Tensor:
    weight = codes.to(x.dtype) * step.to(x.dtype)[:, None]
    x_step = qf.per_token_step(x, act_bits)
    return F.linear(qf.quantize(x, x_step, act_bits), weight) * x_step + bias


class _InputTransform(nn.Module):
    """Optional online input transform ``T(x) = ((x * input_pre) @ H) * input_post`` of a linear."""

    def _init_transform(self, in_features: int) -> None:
        self.in_features = in_features
        self.rotate = False
        self.register_buffer("input_pre", None)
        self.register_buffer("input_post", None)

    def set_transform(self, pre: torch.Tensor | None, post: torch.Tensor | None, rotate: bool) -> None:
        for name, value in (("input_pre", pre), ("input_post", post)):
            if value is not None and value.shape != (self.in_features,):
                raise ValueError(f"{name} must have shape [{self.in_features}], got {tuple(value.shape)}")
            setattr(self, name, None if value is None else value.detach().float().clone())
        self.rotate = bool(rotate)

    def copy_transform_from(self, other: nn.Module) -> None:
        if isinstance(other, _InputTransform):
            self.set_transform(other.input_pre, other.input_post, other.rotate)

    @property
    def has_transform(self) -> bool:
        return self.rotate or self.input_pre is not None or self.input_post is not None

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return transform_input(x, self.input_pre, self.input_post, self.rotate)

    def _transform_repr(self) -> str:
        parts = [name for name, on in (("pre-scale", self.input_pre is not None), ("hadamard", self.rotate),
                                       ("post-scale", self.input_post is not None)) if on]
        return f", input transform: {' -> '.join(parts)}" if parts else ""


class TransformedLinear(_InputTransform):
    """A float linear behind an online input transform: ``y = T(x) W'^T + b`` (equal to the original
    ``x W^T + b`` up to float rounding). The stage between equivalence transforms and quantization."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pre: torch.Tensor | None,
                 post: torch.Tensor | None, rotate: bool) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self._init_transform(weight.shape[1])
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.set_transform(pre, post, rotate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}{self._transform_repr()}"


class QuantLinear(_InputTransform):
    """W{N}A{M} linear: N-bit per-output-channel weights, M-bit per-token dynamic activations, behind an
    optional online input transform (rotation / smoothing).

    Buffers: ``weight_codes`` int8 [out, in] (INT4 codes are stored in int8 and packed at export),
    ``weight_step`` float32 [out], ``bias`` float32 [out], optional ``input_pre`` / ``input_post`` [in].
    """

    def __init__(self, in_features: int, out_features: int, weight_bits: int, act_bits: int, name: str = "") -> None:
        super().__init__()
        qf.qrange(weight_bits)
        qf.qrange(act_bits)
        self._init_transform(in_features)
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.name = name
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_step", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Module, weight_bits: int, act_bits: int, name: str = "",
                    weight_step: torch.Tensor | None = None) -> QuantLinear:
        """Round-to-nearest quantization of a float (or transformed) linear's weight.

        Args:
            linear: ``nn.Linear`` or :class:`TransformedLinear` (its transform is kept).
            weight_bits, act_bits: bit widths.
            name: dotted module path, carried into the exported graph.
            weight_step: per-output-channel steps [out] (e.g. learned); default ``max|W_row| / qmax``
                computed in float64.
        """
        module = cls(linear.in_features, linear.out_features, weight_bits, act_bits, name)
        weight = linear.weight.detach().to(torch.float64)
        step = qf.per_channel_step(weight, weight_bits) if weight_step is None else weight_step.detach().double()
        module.weight_codes.copy_(qf.quantize(weight, step[:, None], weight_bits).to(torch.int8))
        module.weight_step.copy_(step.to(torch.float32))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        module.copy_transform_from(linear)
        return module.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_step[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        return _qlinear_math(self.transform(x), self.weight_codes, self.weight_step, self.bias, self.act_bits)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(self.in_features, dtype=x.dtype, device=x.device)
        pre = ones if self.input_pre is None else self.input_pre
        post = ones if self.input_post is None else self.input_post
        if torch.jit.is_tracing():  # TorchScript exporter
            return _QLinearPlaceholder.apply(x, self.weight_codes, self.weight_step, self.bias, pre, post,
                                             self.weight_bits, self.act_bits, int(self.rotate), self.name)
        return torch.onnx.ops.symbolic(
            f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", (x, self.weight_codes, self.weight_step, self.bias, pre, post),
            {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "rotate": int(self.rotate),
             "layer": self.name},
            dtype=x.dtype, shape=[*x.shape[:-1], self.out_features], version=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w{self.weight_bits}a{self.act_bits} per-channel/per-token{self._transform_repr()}")


# ---------------------------------------------------------------------------------------------------------------------
# Floating-point formats: FP8 E4M3 and NVFP4


def _e4m3_bits(x: torch.Tensor) -> torch.Tensor:
    """E4M3 values (already on the grid) -> their uint8 bit patterns (how they are stored and exported)."""
    return x.to(torch.float8_e4m3fn).view(torch.uint8)


def _e4m3_values(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float8_e4m3fn).float()


class _FQLinearPlaceholder(torch.autograd.Function):
    """Carries a floating-point quantized linear through the TorchScript exporter as one custom node.

    Inputs: ``x, codes (uint8 E4M3 bits) [out, in], weight_scale, block_scale (uint8 E4M3 bits),
    input_global_scale [1], bias, pre, post``. For fp8 ``weight_scale`` is per output channel [out] and
    ``block_scale`` is empty; for nvfp4 ``weight_scale`` is the global scale [1], ``block_scale``
    [out, in / 16], and the codes are E2M1 values stored as E4M3 (every E2M1 value is an E4M3 value).
    """

    @staticmethod
    def forward(ctx, x, codes, weight_scale, block_scale, input_global, bias, pre, post, fmt, rotate,  # noqa: ANN001, ARG004
                layer):  # noqa: ANN001, ARG004
        return x.new_zeros(*x.shape[:-1], codes.shape[0])  # see _QLinearPlaceholder.forward

    @staticmethod
    def symbolic(g, x, codes, weight_scale, block_scale, input_global, bias, pre, post, fmt, rotate,  # noqa: ANN001
                 layer):  # noqa: ANN001
        from torch.onnx import symbolic_helper

        out = g.op(f"{PLACEHOLDER_DOMAIN}::{FLOAT_PLACEHOLDER_OP}", x, codes, weight_scale, block_scale, input_global,
                   bias, pre, post, format_s=fmt, rotate_i=rotate, layer_s=layer)
        sizes = symbolic_helper._get_tensor_sizes(x)
        out_features = symbolic_helper._get_tensor_sizes(codes)[0]
        if sizes is not None:
            out.setType(x.type().with_sizes([*sizes[:-1], out_features]))
        return out


class FloatQuantLinear(_InputTransform):
    """FP8 or NVFP4 linear behind an optional online input transform (rotation / smoothing).

    * ``fp8``: weights E4M3 with one fp32 scale per output channel (``amax_row / 448``); activations E4M3
      with a dynamic per-token scale (``amax_token / 448``). As for INT8, the per-token scale factors out
      of the GEMM exactly: ``y = (e4m3(x / s_x) @ W_dq^T) * s_x + b``.
    * ``nvfp4``: weights and activations E2M1 in blocks of 16 consecutive input channels (the GEMM's
      reduction axis), each block with an E4M3 scale, each tensor with an fp32 global scale. The weight
      global scale is ``amax(W) / (6 * 448)``; the activation block scales are dynamic (per token and
      block, at run time) and its global scale is static: ``calibration amax / (6 * 448)``, because
      TensorRT takes it as a build-time constant. ``y = x_dq @ W_dq^T + b`` (block scales run along the
      reduction axis, so nothing factors out of the GEMM).

    Buffers: ``weight_codes`` uint8 [out, in] (E4M3 bit patterns of the codes), ``weight_scale`` float32
    ([out] for fp8, [1] global for nvfp4), ``weight_block_scale`` uint8 [out, in / 16] (nvfp4; empty for
    fp8), ``input_global_scale`` float32 [1] (nvfp4; 1 for fp8), ``bias`` float32 [out], optional
    ``input_pre`` / ``input_post`` [in].
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, name: str = "") -> None:
        super().__init__()
        if fmt not in FLOAT_QUANT_FORMATS:
            raise QVGGTError(f"FloatQuantLinear format must be one of {FLOAT_QUANT_FORMATS}, got {fmt!r}")
        if fmt == "nvfp4" and in_features % ff.NVFP4_BLOCK_SIZE:
            # TensorRT's FP4 layers need whole blocks along the reduction axis.
            raise QVGGTError(f"{name or 'layer'}: nvfp4 needs in_features divisible by {ff.NVFP4_BLOCK_SIZE}, "
                             f"got {in_features}")
        self._init_transform(in_features)
        self.out_features = out_features
        self.format = fmt
        self.name = name
        blocks = in_features // ff.NVFP4_BLOCK_SIZE if fmt == "nvfp4" else 0
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features if fmt == "fp8" else 1))
        self.register_buffer("weight_block_scale", torch.zeros(out_features, blocks, dtype=torch.uint8))
        self.register_buffer("input_global_scale", torch.ones(1))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str, name: str = "",
                    input_amax: float | torch.Tensor | None = None) -> FloatQuantLinear:
        """Round-to-nearest quantization of a float (or transformed) linear's weight.

        Args:
            linear: ``nn.Linear`` or :class:`TransformedLinear` (its transform is kept).
            fmt: ``"fp8"`` or ``"nvfp4"``.
            name: dotted module path, carried into the exported graph.
            input_amax: nvfp4 only (required): max |input| after the layer's input transform over the
                calibration data; sets the static activation global scale ``amax / (6 * 448)``.
        """
        module = cls(linear.in_features, linear.out_features, fmt, name)
        weight = linear.weight.detach().float()
        if fmt == "fp8":
            scale = ff.fp8_e4m3_scale(weight, "token")  # per row = per output channel
            module.weight_codes.copy_(ff.quantize_fp8(weight, scale).view(torch.uint8))
            module.weight_scale.copy_(scale.squeeze(1))
        else:
            if input_amax is None:
                raise QVGGTError(f"{name or 'layer'}: nvfp4 needs the calibrated input amax for its activation "
                                 "global scale")
            amax = float(input_amax)
            if not amax > 0 or not torch.isfinite(torch.tensor(amax)):
                raise QVGGTError(f"{name or 'layer'}: calibrated input amax must be finite and > 0, got {amax}")
            codes, block_scale, g = ff.quantize_nvfp4(weight, ff.NVFP4_BLOCK_SIZE)
            module.weight_codes.copy_(_e4m3_bits(codes))
            module.weight_block_scale.copy_(_e4m3_bits(block_scale))
            module.weight_scale.fill_(float(g))
            module.input_global_scale.fill_(amax / (ff.FP4_E2M1_MAX * ff.FP8_E4M3_MAX))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        module.copy_transform_from(linear)
        return module.to(linear.weight.device)

    def weight_code_values(self) -> torch.Tensor:
        """The weight codes as fp32 values (E4M3 for fp8, E2M1 for nvfp4) [out, in]."""
        return _e4m3_values(self.weight_codes)

    def block_scale_values(self) -> torch.Tensor:
        return _e4m3_values(self.weight_block_scale)

    def dequantized_weight(self) -> torch.Tensor:
        codes = self.weight_code_values()
        if self.format == "fp8":
            return codes * self.weight_scale[:, None]
        return ff.dequantize_nvfp4(codes, self.block_scale_values(), self.weight_scale[0])

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized activation (after the input transform) as the GEMM sees it; for fp8 this is
        ``codes * s_x``. The eager forward does not use it for fp8 (the scale is applied after the GEMM)."""
        if self.format == "fp8":
            return ff.fake_quantize_fp8(x, granularity="token")
        return ff.fake_quantize_nvfp4(x, ff.NVFP4_BLOCK_SIZE, self.input_global_scale[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        x = self.transform(x)
        if self.format == "fp8":
            scale = ff.fp8_e4m3_scale(x, "token")
            codes = ff.quantize_fp8(x, scale).to(x.dtype)
            weight = self.weight_code_values().to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            return F.linear(codes, weight) * scale.to(x.dtype) + self.bias
        return F.linear(self.quantize_input(x), self.dequantized_weight().to(x.dtype), self.bias)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(self.in_features, dtype=x.dtype, device=x.device)
        pre = ones if self.input_pre is None else self.input_pre
        post = ones if self.input_post is None else self.input_post
        inputs = (x, self.weight_codes, self.weight_scale, self.weight_block_scale, self.input_global_scale,
                  self.bias, pre, post)
        if torch.jit.is_tracing():  # TorchScript exporter
            return _FQLinearPlaceholder.apply(*inputs, self.format, int(self.rotate), self.name)
        return torch.onnx.ops.symbolic(
            f"{PLACEHOLDER_DOMAIN}::{FLOAT_PLACEHOLDER_OP}", inputs,
            {"format": self.format, "rotate": int(self.rotate), "layer": self.name},
            dtype=x.dtype, shape=[*x.shape[:-1], self.out_features], version=1)

    def extra_repr(self) -> str:
        granularity = ("per-channel weights / per-token activations" if self.format == "fp8"
                       else f"block {ff.NVFP4_BLOCK_SIZE}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.format} "
                f"{granularity}{self._transform_repr()}")
