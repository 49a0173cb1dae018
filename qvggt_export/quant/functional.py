"""Pure quantization math: tensors in, tensors out (no modules, no layer names).

The symmetric quantizer of the paper (eq. 3): ``q = clamp(round(x / D), -2^(N-1), 2^(N-1) - 1)`` with
``D = max|x| / (2^(N-1) - 1)``; weights get one ``D`` per output channel, activations one per token,
computed at run time from the token itself (dynamic). ``torch.round`` rounds half to even, exactly as
ONNX ``QuantizeLinear`` does, so the exported graph reproduces these codes bit for bit.
"""

from __future__ import annotations

import torch

# Smallest step allowed: an all-zero token or channel would otherwise divide by zero. The same constant
# is written into the exported graph (Max(step, eps)) so both sides agree.
MIN_STEP = 1e-8
SUPPORTED_BITS = range(2, 9)


def qrange(bits: int) -> tuple[int, int]:
    """Integer range ``(-2^(N-1), 2^(N-1) - 1)`` of an N-bit signed code."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"integer quantization supports 2..8 bits, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def symmetric_step(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Step ``D = max|x| / (2^(N-1) - 1)``, floored at :data:`MIN_STEP`."""
    return (absmax / qrange(bits)[1]).clamp_min(MIN_STEP)


def per_channel_step(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """One step per output channel (row) of a ``[out, in]`` weight -> ``[out]``."""
    return symmetric_step(weight.abs().amax(dim=1), bits)


def per_token_step(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One step per token (last axis reduced) -> ``[..., 1]``, computed from ``x`` itself (dynamic)."""
    return symmetric_step(x.abs().amax(dim=-1, keepdim=True), bits)


def quantize(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` (as a float tensor): ``clamp(round(x / step), qmin, qmax)``."""
    qmin, qmax = qrange(bits)
    return torch.round(x / step).clamp(qmin, qmax)


def fake_quantize(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize: the value the integer kernel effectively sees."""
    return quantize(x, step, bits) * step
