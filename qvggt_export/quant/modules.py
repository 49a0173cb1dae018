"""Fake-quantized modules that replace ``nn.Linear`` in the model (model surgery lives in rtn.py).

:class:`QuantLinear` keeps integer weight codes and per-channel steps (what a deployment stores) and
quantizes its input per token at run time. Its eager forward computes
``(codes_x @ W_dq^T) * step_x + bias``: the per-token step factors out of the GEMM exactly, which is
also the form TensorRT turns into an integer GEMM. During ONNX export it emits one placeholder node,
``qvggt.export::QLinear``, which the exporter expands into standard Q/DQ operators, so the quantization
math has a single definition on the PyTorch side and a single lowering on the ONNX side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvggt_export.quant import functional as qf

PLACEHOLDER_DOMAIN = "qvggt.export"
PLACEHOLDER_OP = "QLinear"


class _QLinearPlaceholder(torch.autograd.Function):
    """Carries a quantized linear through the TorchScript exporter as one custom node."""

    @staticmethod
    def forward(ctx, x, codes, step, bias, weight_bits, act_bits, layer):  # noqa: ANN001, ARG004
        return _qlinear_math(x, codes, step, bias, act_bits)

    @staticmethod
    def symbolic(g, x, codes, step, bias, weight_bits, act_bits, layer):  # noqa: ANN001
        from torch.onnx import symbolic_helper

        out = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", x, codes, step, bias,
                   weight_bits_i=weight_bits, act_bits_i=act_bits, layer_s=layer)
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


class QuantLinear(nn.Module):
    """W{N}A{M} linear: N-bit per-output-channel weights, M-bit per-token dynamic activations.

    Buffers: ``weight_codes`` int8 [out, in] (INT4 codes are stored in int8 and packed at export),
    ``weight_step`` float32 [out], ``bias`` float32 [out].
    """

    def __init__(self, in_features: int, out_features: int, weight_bits: int, act_bits: int, name: str = "") -> None:
        super().__init__()
        qf.qrange(weight_bits)
        qf.qrange(act_bits)
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.name = name
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_step", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int, act_bits: int, name: str = "") -> QuantLinear:
        """Round-to-nearest quantization of a float linear's weight (steps from float64 max)."""
        module = cls(linear.in_features, linear.out_features, weight_bits, act_bits, name)
        weight = linear.weight.detach().to(torch.float64)
        step = qf.per_channel_step(weight, weight_bits)
        module.weight_codes.copy_(qf.quantize(weight, step[:, None], weight_bits).to(torch.int8))
        module.weight_step.copy_(step.to(torch.float32))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_step[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        return _qlinear_math(x, self.weight_codes, self.weight_step, self.bias, self.act_bits)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # TorchScript exporter
            return _QLinearPlaceholder.apply(x, self.weight_codes, self.weight_step, self.bias, self.weight_bits,
                                             self.act_bits, self.name)
        return torch.onnx.ops.symbolic(
            f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", (x, self.weight_codes, self.weight_step, self.bias),
            {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "layer": self.name},
            dtype=x.dtype, shape=[*x.shape[:-1], self.out_features], version=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w{self.weight_bits}a{self.act_bits} per-channel/per-token")
