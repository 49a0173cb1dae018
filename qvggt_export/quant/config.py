"""Typed quantization settings, validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qvggt_export.errors import QVGGTError
from qvggt_export.quant.roles import ALL_ROLES, DEFAULT_ROLES

# Formats implemented end to end (fake-quant, ONNX Q/DQ, engine build); W6A6 uses INT8 containers clipped to
# the 6-bit range. The beyond-paper FP8/NVFP4/W4A16 formats are planned (DESIGN.md section 3) and refused
# with a clear error.
SUPPORTED_FORMATS = ("w8a8", "w6a6", "w4a4")
METHODS = ("rtn", "smooth", "rotate", "smooth_rotate", "dsfq")
CALIBRATED_METHODS = ("smooth", "smooth_rotate", "dsfq")


def parse_bits(spec: str) -> tuple[int, int]:
    """``"w4a4"`` -> ``(4, 4)``; raises :class:`QVGGTError` for anything not in :data:`SUPPORTED_FORMATS`."""
    spec = spec.strip().lower()
    match = re.fullmatch(r"w(\d+)a(\d+)", spec)
    if spec not in SUPPORTED_FORMATS or match is None:
        raise QVGGTError(f"unsupported format {spec!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize VGGT.

    Attributes:
        bits: format name, e.g. ``"w4a4"``: N-bit per-output-channel weights, N-bit per-token dynamic
            activations (symmetric, eq. 3 of the paper).
        method: the transform before quantization (paper Tab. 4): ``"rtn"`` (Base: none), ``"smooth"``
            (SmoothQuant scales), ``"rotate"`` (random Hadamard), ``"smooth_rotate"`` (scale, then rotate)
            or ``"dsfq"`` (rotate, then scale in the rotated space).
        roles: layer roles to quantize (see :mod:`qvggt_export.quant.roles`); default the 192
            aggregator linears of VGGT-1B (qkv, proj, fc1, fc2 of frame and global blocks).
        alpha: smoothing strength (eq. 7), 0.5 in the paper.
        seed: seeds the random Hadamard signs.
        recon_iters: block-reconstruction steps per block (0 = none).
        lr_smooth, lr_step: learning rates of the smoothing factors and the weight steps (paper: 5e-3, 5e-2).
    """

    bits: str = "w4a4"
    method: str = "dsfq"
    roles: tuple[str, ...] = field(default=DEFAULT_ROLES)
    alpha: float = 0.5
    seed: int = 0
    recon_iters: int = 0
    lr_smooth: float = 5e-3
    lr_step: float = 5e-2

    def __post_init__(self) -> None:
        parse_bits(self.bits)
        if self.method not in METHODS:
            raise QVGGTError(f"unknown quantization method {self.method!r}; available: {', '.join(METHODS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise QVGGTError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.recon_iters < 0:
            raise QVGGTError(f"recon_iters must be >= 0, got {self.recon_iters}")
        if self.lr_smooth <= 0 or self.lr_step <= 0:
            raise QVGGTError(f"learning rates must be > 0, got {self.lr_smooth}, {self.lr_step}")
        unknown = [r for r in self.roles if r not in ALL_ROLES]
        if unknown or not self.roles:
            raise QVGGTError(f"roles must be a non-empty subset of {list(ALL_ROLES)}, got {list(self.roles)}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED_METHODS or self.recon_iters > 0

    @property
    def weight_bits(self) -> int:
        return parse_bits(self.bits)[0]

    @property
    def act_bits(self) -> int:
        return parse_bits(self.bits)[1]
