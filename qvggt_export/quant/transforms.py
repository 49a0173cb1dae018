"""Pure math of the equivalence transforms (rotation and smoothing) of a linear ``y = x W^T + b``.

An input transform is ``T(x) = ((x * pre) @ H) * post`` over the last axis, with ``H`` the normalised
Hadamard matrix (when ``rotate``), ``pre`` a per-channel vector (random signs, possibly times
smoothing factors) and ``post`` a per-channel vector (DSFQ's ``1 / c``). The matching weight is
``W' = ((W / pre) @ H) / post``, so that ``T(x) W'^T = x W^T`` exactly in real arithmetic (H is
orthonormal). Folding happens in float64 and is cast back once.

The method variants of the paper's ablation (Tab. 4) are choices of ``pre``, ``rotate`` and ``post``:

========================  ==========================  =======  ==================
variant                    pre                         rotate   post
========================  ==========================  =======  ==================
``rtn`` (Base)             -                           no       -
``smooth`` (Scale)         ``1 / c(X, W)``             no       -
``rotate`` (Rotation)      ``v``                       yes      -
``smooth_rotate``          ``v / c(X, W)``             yes      -
``dsfq`` (Rotate+Scale)    ``v``                       yes      ``1 / c(XR, WR)``
========================  ==========================  =======  ==================

``v`` are random signs, ``R = diag(v) H`` and ``c`` the SmoothQuant factors of eq. 7,
``c_i = max|X_i|^a / max|W_i|^(1-a)``, computed on the raw (Scale) or rotated (DSFQ) operands.
"""

from __future__ import annotations

import torch

from qvggt_export.quant.hadamard import fwht

# Keeps smoothing factors finite when a channel is (nearly) silent in the calibration data or the weight.
MIN_ABSMAX = 1e-5
SMOOTHING_RANGE = (1e-4, 1e4)


def transform_input(x: torch.Tensor, pre: torch.Tensor | None, post: torch.Tensor | None, rotate: bool
                    ) -> torch.Tensor:
    """``T(x) = ((x * pre) @ H) * post`` over the last axis (each factor optional)."""
    if rotate:
        return fwht(x, signs=pre, post_scale=post)
    if pre is not None:
        x = x * pre
    if post is not None:
        x = x * post
    return x


def fold_weight(weight: torch.Tensor, pre: torch.Tensor | None, post: torch.Tensor | None, rotate: bool
                ) -> torch.Tensor:
    """The weight ``W' = ((W / pre) @ H) / post`` that keeps ``T(x) W'^T == x W^T``; float64 math."""
    folded = weight.detach().to(torch.float64)
    if pre is not None:
        folded = folded / pre.to(torch.float64)
    if rotate:
        folded = fwht(folded)
    if post is not None:
        folded = folded / post.to(torch.float64)
    return folded.to(weight.dtype)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant factors ``c = max|X|^alpha / max|W|^(1 - alpha)`` per input channel (eq. 7).

    Dividing the activation channel by ``c`` and multiplying the weight column by ``c`` balances their
    ranges; ``alpha`` moves difficulty from activations (1.0) to weights (0.0).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    act = act_absmax.to(torch.float64).clamp_min(MIN_ABSMAX)
    wgt = weight_absmax.to(torch.float64).clamp_min(MIN_ABSMAX)
    return (act.pow(alpha) / wgt.pow(1.0 - alpha)).clamp(*SMOOTHING_RANGE)


def weight_column_absmax(weight: torch.Tensor, pre: torch.Tensor | None = None, rotate: bool = False
                         ) -> torch.Tensor:
    """``max_k |W'_{k,i}|`` per input channel of ``W' = (W / pre) @ H`` (the operand smoothing sees)."""
    return fold_weight(weight.to(torch.float64), pre, None, rotate).abs().amax(dim=0)
