"""Floating-point fake quantization: FP8 E4M3 and NVFP4 (FP4 E2M1, block 16, FP8 block scales).

These are the formats TensorRT quantizes activations to besides INT8 (DESIGN.md section 3: ``fp8`` on
Ada/Hopper/Blackwell, ``nvfp4`` on Blackwell); the paper itself is integer-only. Pure math, tensors in,
tensors out. Arithmetic runs in fp32 (fp64 for fp64 inputs) and results come back in the input dtype.

* **FP8 E4M3** (``float8_e4m3fn``: no infinities, max 448, smallest subnormal 2^-9):
  ``x_hat = e4m3(clamp(x / s, -448, 448)) * s`` with ``s = amax / 448`` per tensor or per token.
  The cast is PyTorch's round-to-nearest-even; values are clamped first (saturating, as TensorRT's
  Q/DQ does) because ``e4m3fn`` has no infinity to overflow to.
* **NVFP4**: FP4 E2M1 values ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with sign, one scale per 16 consecutive
  elements of the last axis, the scale itself stored in E4M3, and a global fp32 scale:
  ``s_b = e4m3(amax_b / (6 * g))``, ``x_hat = fp4(x / (s_b * g)) * s_b * g``, ``g = amax / (6 * 448)``
  by default so that every ``s_b`` fits E4M3's range. A partial last block is allowed here (zero
  padded for its amax); TensorRT's FP4 layers need ``d % 16 == 0``, which the exporter checks.
"""

from __future__ import annotations

from typing import Literal

import torch

from qvggt_export.errors import QVGGTError

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP4_E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_BLOCK_SIZE = 16
# Floor for scales computed from an all-zero tensor/token/block: keeps 0 / s finite (and equal to 0).
_TINY = torch.finfo(torch.float32).tiny


def _work(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise QVGGTError(f"floating-point fake quantization needs a floating-point tensor, got {x.dtype}")
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# FP8 E4M3


def round_to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (ties to even), saturating at +-448, in ``x``'s dtype."""
    w = _work(x)
    return w.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def fp8_e4m3_scale(x: torch.Tensor, granularity: Literal["tensor", "token"] = "tensor") -> torch.Tensor:
    """Dynamic FP8 scale ``amax / 448``: 0-dim per tensor, ``[..., 1]`` per token (last axis).

    Args:
        x: Tensor to quantize.
        granularity: ``"tensor"`` or ``"token"``.

    Returns:
        fp32 (fp64 for fp64 input) scale broadcastable against ``x``.

    Raises:
        QVGGTError: Unknown granularity or non-float input.
    """
    w = _work(x).abs()
    if granularity == "tensor":
        amax = w.amax()
    elif granularity == "token":
        if x.dim() == 0:
            raise QVGGTError("per-token FP8 scaling needs a tensor with at least one axis")
        amax = w.amax(dim=-1, keepdim=True)
    else:
        raise QVGGTError(f"FP8 scaling granularity must be 'tensor' or 'token', got {granularity!r}")
    return (amax / FP8_E4M3_MAX).clamp_min(_TINY)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``float8_e4m3fn`` codes of ``x / scale`` (saturated to +-448), as for an FP8 QuantizeLinear."""
    return (_work(x) / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float | None = None,
                      granularity: Literal["tensor", "token"] = "tensor") -> torch.Tensor:
    """FP8 E4M3 quantize-dequantize.

    Args:
        x: Tensor to quantize.
        scale: Static scale broadcastable against ``x``; ``None`` computes the dynamic
            :func:`fp8_e4m3_scale` of ``x`` with ``granularity``.
        granularity: Used only when ``scale`` is ``None``.

    Returns:
        ``e4m3(x / scale) * scale`` in ``x``'s dtype.

    Raises:
        QVGGTError: As :func:`fp8_e4m3_scale`.
    """
    if scale is None:
        scale = fp8_e4m3_scale(x, granularity)
    work = _work(x)
    return (quantize_fp8(work, scale).to(work.dtype) * scale).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# FP4 E2M1 and NVFP4


def round_to_fp4_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (ties to even mantissa), saturating at +-6, in ``x``'s dtype.

    The grid has spacing 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]. Within each segment the
    values are integer multiples of the spacing, and the even multiples are exactly the even-mantissa
    values (0, 1, 2, 4), so ``round(|x| / spacing) * spacing`` with ``torch.round`` (half to even)
    is round-to-nearest-even on the E2M1 grid; ties on a segment edge (1.75, 3.5) land on the edge.
    """
    w = _work(x)
    mag = w.abs().clamp_max(FP4_E2M1_MAX)
    spacing = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(w.dtype)
    return (torch.sign(w) * torch.round(mag / spacing) * spacing).to(x.dtype)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., d] -> [..., ceil(d / B), B]``, zero-padding a partial last block (neutral for amax)."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise QVGGTError(f"block_size must be a positive integer, got {block_size!r}")
    if x.dim() == 0:
        raise QVGGTError("block quantization needs a tensor with at least one axis")
    d = x.shape[-1]
    pad = -d % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (d + pad) // block_size, block_size)


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor fp32 scale ``g = amax / (6 * 448)``: puts the largest block scale at E4M3's max."""
    return (_work(x).abs().amax() / (FP4_E2M1_MAX * FP8_E4M3_MAX)).clamp_min(_TINY)


def quantize_nvfp4(x: torch.Tensor, block_size: int = NVFP4_BLOCK_SIZE,
                   global_scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 codes and scales of ``x`` along its last axis.

    Args:
        x: ``[..., d]`` floating tensor.
        block_size: Elements per block scale (16 for NVFP4).
        global_scale: Static fp32 global scale ``g``; ``None`` computes :func:`nvfp4_global_scale`
            of ``x`` (dynamic). ``1.0`` means no global scale (block scales then saturate at 448
            and underflow below 2^-9, as E4M3 does).

    Returns:
        ``(codes, block_scales, global_scale)``: ``codes`` ``[..., d]`` on the signed E2M1 grid (in
        fp32/fp64), ``block_scales`` ``[..., ceil(d / B)]`` E4M3 values (in fp32/fp64), and ``g`` as
        a 0-dim tensor. ``x_hat = codes * block_scales (per block) * g``. A block whose scale
        underflows to 0 has all-zero codes.

    Raises:
        QVGGTError: Non-float input, scalar input or bad ``block_size``.
    """
    work = _work(x)
    g = nvfp4_global_scale(work) if global_scale is None else torch.as_tensor(global_scale, dtype=work.dtype)
    blocks = _blocks(work, block_size)
    block_scale = (blocks.abs().amax(dim=-1, keepdim=True) / (FP4_E2M1_MAX * g)).clamp_max(FP8_E4M3_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn).to(work.dtype)
    # A zero scale (all-zero block, or underflow) must give zero codes, not 0/0.
    safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    codes = torch.where(block_scale > 0, round_to_fp4_e2m1(blocks / (safe * g)), torch.zeros_like(blocks))
    d = x.shape[-1]
    return codes.flatten(-2)[..., :d], block_scale.squeeze(-1), g.to(work.dtype)


def dequantize_nvfp4(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     block_size: int = NVFP4_BLOCK_SIZE) -> torch.Tensor:
    """``codes * (block_scale * global_scale)`` with each block scale repeated over its block.

    The two scales are multiplied first, as the exported graph does (a DequantizeLinear of the E4M3 block
    scales by the global scale, then a blocked DequantizeLinear of the codes), so both round alike.
    """
    d = codes.shape[-1]
    expanded = block_scales.repeat_interleave(block_size, dim=-1)[..., :d]
    return codes * (expanded * global_scale)


def fake_quantize_nvfp4(x: torch.Tensor, block_size: int = NVFP4_BLOCK_SIZE,
                        global_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize along the last axis (see :func:`quantize_nvfp4`), in ``x``'s dtype."""
    codes, block_scales, g = quantize_nvfp4(x, block_size, global_scale)
    return dequantize_nvfp4(codes, block_scales, g, block_size).to(x.dtype)
