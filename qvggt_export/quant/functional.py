"""Pure quantization math: tensors in, tensors out (no modules, no layer names).

The symmetric quantizer of the paper (eq. 3): ``q = clamp(round(x / D), -2^(N-1), 2^(N-1) - 1)`` with
``D = max|x| / (2^(N-1) - 1)``; weights get one ``D`` per output channel, activations one per token,
computed at run time from the token itself (dynamic). ``torch.round`` rounds half to even, exactly as
ONNX ``QuantizeLinear`` does, so the exported graph reproduces these codes bit for bit.

Beyond the paper's two granularities this module offers per-tensor, per-channel on any axis and
per-block steps (:func:`compute_step`), an asymmetric zero-point quantizer for weights
(:func:`asymmetric_params`), and straight-through versions for learning the step
(:func:`round_ste`, :func:`fake_quantize_ste`). New validation raises :class:`QVGGTError`;
:func:`qrange` keeps raising ``ValueError`` for an unsupported bit width.
"""

from __future__ import annotations

from typing import Literal

import torch

from qvggt_export.errors import QVGGTError

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


# ---------------------------------------------------------------------------------------------------------------------
# Granularities. Every step returned by compute_step broadcasts against x, so quantize/fake_quantize take it directly.

Granularity = Literal["tensor", "channel", "token", "block"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "token", "block")


def _check_granularity(x: torch.Tensor, granularity: str, axis: int | None, block_size: int | None) -> int | None:
    """Validate the options; return the normalised channel axis (``None`` unless per-channel)."""
    if granularity not in GRANULARITIES:
        raise QVGGTError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "block":
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise QVGGTError(f"per-block quantization needs a positive integer block_size, got {block_size!r}")
    elif block_size is not None:
        raise QVGGTError(f"block_size is only used with granularity='block', got it with {granularity!r}")
    if x.dim() == 0 and granularity != "tensor":
        raise QVGGTError(f"granularity {granularity!r} needs a tensor with at least one axis, got a scalar")
    if granularity == "channel":
        axis = 0 if axis is None else axis
        if not -x.dim() <= axis < x.dim():
            raise QVGGTError(f"channel axis {axis} is out of range for a tensor of shape {list(x.shape)}")
        return axis % x.dim()
    if axis is not None and not (granularity == "token" and axis in (-1, x.dim() - 1)):
        raise QVGGTError(f"axis is only used with granularity='channel' (per-token is always the last axis), "
                         f"got axis={axis} with {granularity!r}")
    return None


def _to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., d] -> [..., ceil(d / B), B]``, zero-padding a partial last block.

    Zero padding is neutral for every reduction used here (``|x|`` max, and min/max that already
    include 0), so a partial block's statistics come from its real elements only.
    """
    d = x.shape[-1]
    pad = -d % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (d + pad) // block_size, block_size)


def expand_block_steps(steps: torch.Tensor, block_size: int, size: int) -> torch.Tensor:
    """Broadcast compact per-block values ``[..., ceil(size / B)]`` to ``[..., size]`` (one per element)."""
    return steps.repeat_interleave(block_size, dim=-1)[..., :size]


def _reduce(x: torch.Tensor, op: str, granularity: str, axis: int | None, block_size: int | None) -> torch.Tensor:
    """Reduce ``x`` with ``op`` ('amax' or 'amin') per group, keeping a shape that broadcasts against ``x``."""
    axis = _check_granularity(x, granularity, axis, block_size)
    reduce = torch.amax if op == "amax" else torch.amin
    if granularity == "tensor":
        return reduce(x)
    if granularity == "token":
        return reduce(x, dim=-1, keepdim=True)
    if granularity == "channel":
        dims = [i for i in range(x.dim()) if i != axis]
        return reduce(x, dim=dims, keepdim=True) if dims else x
    compact = reduce(_to_blocks(x, block_size), dim=-1)  # type: ignore[arg-type]  # validated above
    return expand_block_steps(compact, block_size, x.shape[-1])  # type: ignore[arg-type]


def compute_step(x: torch.Tensor, bits: int, granularity: Granularity = "token", axis: int | None = None,
                 block_size: int | None = None) -> torch.Tensor:
    """Symmetric step ``D = max|x| / (2^(N-1) - 1)`` (paper eq. 3) per group, from ``x`` itself.

    Computed from the tensor at hand this is the *dynamic* step (the paper's per-token activations);
    a *static* step is one computed once at calibration (e.g. :func:`symmetric_step` of a running
    absmax) and passed to :func:`quantize`/:func:`fake_quantize` as is.

    Granularities (the result always broadcasts against ``x``):

    * ``"tensor"``: one step, a 0-dim tensor.
    * ``"channel"``: one step per index of ``axis`` (default 0, the output channel of an
      ``[out, in]`` weight), shape 1 on every other axis (``[out, 1]`` for a weight).
    * ``"token"``: one step per vector along the last axis, shape ``[..., 1]``.
    * ``"block"``: one step per ``block_size`` consecutive elements of the last axis, repeated over
      the block so the shape is ``x``'s; the last block may be partial and gets the step of its own
      elements (ONNX opset-21 blocked quantization: ``ceil(d / B)`` scales). :func:`block_steps`
      returns the compact ``[..., ceil(d / B)]`` form for export.

    Args:
        x: Tensor to quantize.
        bits: Code width N in 2..8.
        granularity: One of :data:`GRANULARITIES`.
        axis: Channel axis for ``"channel"`` (any axis, negative allowed); otherwise ``None``.
        block_size: Block length for ``"block"``; otherwise ``None``.

    Returns:
        Step tensor, floored at :data:`MIN_STEP`, broadcastable against ``x``.

    Raises:
        QVGGTError: Unknown granularity, or ``axis``/``block_size`` missing, out of range or misplaced.
        ValueError: ``bits`` outside 2..8 (from :func:`qrange`).
    """
    return symmetric_step(_reduce(x.abs(), "amax", granularity, axis, block_size), bits)


def block_steps(x: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Compact per-block symmetric steps ``[..., ceil(d / B)]`` along the last axis (see :func:`compute_step`)."""
    _check_granularity(x, "block", None, block_size)
    return symmetric_step(_to_blocks(x.abs(), block_size).amax(dim=-1), bits)


def fake_quantize_dynamic(x: torch.Tensor, bits: int, granularity: Granularity = "token", axis: int | None = None,
                          block_size: int | None = None) -> torch.Tensor:
    """:func:`fake_quantize` with the dynamic step :func:`compute_step` of ``x`` itself."""
    return fake_quantize(x, compute_step(x, bits, granularity, axis, block_size), bits)


# ---------------------------------------------------------------------------------------------------------------------
# Asymmetric (zero-point) quantization, for weights. Not in the paper (eq. 3 is symmetric); offered because an
# unsigned code with an integer zero point spends no level on an unused half of a skewed weight row.


def uqrange(bits: int) -> tuple[int, int]:
    """Unsigned code range ``(0, 2^N - 1)`` used by the asymmetric quantizer."""
    qrange(bits)  # same validation as the symmetric range
    return 0, 2**bits - 1


def asymmetric_params(x: torch.Tensor, bits: int, granularity: Granularity = "channel", axis: int | None = None,
                      block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max step and integer zero point: ``s = (hi - lo) / (2^N - 1)``, ``z = round(-lo / s)``.

    ``lo = min(min(x), 0)`` and ``hi = max(max(x), 0)`` per group, so 0 is always in range and is
    represented exactly (code ``z``); ``lo`` and ``hi`` fall inside the code range and come back
    within ``s / 2``. ``z`` is an integer in ``[0, 2^N - 1]`` stored as a float tensor, like the codes.

    Args:
        x: Tensor to quantize, usually an ``[out, in]`` weight.
        bits: Code width N in 2..8.
        granularity: As in :func:`compute_step` (default per output channel).
        axis: As in :func:`compute_step`.
        block_size: As in :func:`compute_step`.

    Returns:
        ``(step, zero_point)``, both broadcastable against ``x``.

    Raises:
        QVGGTError: As :func:`compute_step`.
        ValueError: ``bits`` outside 2..8.
    """
    _, qmax = uqrange(bits)
    lo = _reduce(x, "amin", granularity, axis, block_size).clamp_max(0)
    hi = _reduce(x, "amax", granularity, axis, block_size).clamp_min(0)
    step = ((hi - lo) / qmax).clamp_min(MIN_STEP)
    zero_point = torch.round(-lo / step).clamp(0, qmax)
    return step, zero_point


def quantize_asymmetric(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``clamp(round(x / s) + z, 0, 2^N - 1)`` (ONNX QuantizeLinear with a uint zero point)."""
    qmin, qmax = uqrange(bits)
    return (torch.round(x / step) + zero_point).clamp(qmin, qmax)


def dequantize_asymmetric(codes: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s``."""
    return (codes - zero_point) * step


def fake_quantize_asymmetric(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric quantize then dequantize."""
    return dequantize_asymmetric(quantize_asymmetric(x, step, zero_point, bits), step, zero_point)


# ---------------------------------------------------------------------------------------------------------------------
# Straight-through estimators, for calibration that learns the step (DSFQ step 4: D learnable).


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` (half to even) forward, identity backward.

    ``x + (round(x) - x).detach()`` is bit-exact: ``round(x) - x`` is exact in floating point (the
    operands are within 0.5 of each other, Sterbenz), and so is adding it back.
    """
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake quantization with gradients to ``x`` and to a learnable ``step`` (LSQ, Esser et al. 2020).

    Forward equals :func:`fake_quantize` bit for bit (clamping to integer bounds commutes with
    rounding). Backward, with ``v = x / step``:

    * ``d/dx = 1`` where ``qmin <= v <= qmax``, else 0 (straight-through inside the clamp range);
    * ``d/dstep = round(v) - v`` inside the range, ``qmin`` or ``qmax`` outside (LSQ's step gradient,
      without its optional gradient scale), summed over the elements sharing a step.

    Args:
        x: Tensor to quantize.
        step: Step broadcastable against ``x``; may require grad.
        bits: Code width N in 2..8.

    Returns:
        ``clamp(round(x / step), qmin, qmax) * step`` with the gradients above.
    """
    qmin, qmax = qrange(bits)
    # Clamp before rounding (LSQ order): the clamp mask then sees v itself, not its rounded value.
    return round_ste(torch.clamp(x / step, qmin, qmax)) * step
