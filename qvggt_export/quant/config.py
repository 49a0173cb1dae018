"""Typed quantization settings, validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qvggt_export.errors import QVGGTError
from qvggt_export.quant.roles import ALL_ROLES, DEFAULT_ROLES

# Formats this version implements end to end (fake-quant, ONNX Q/DQ, engine build). The paper's W6A6 and
# the beyond-paper FP8/NVFP4/W4A16 formats are planned (DESIGN.md section 3) and refused with a clear error.
SUPPORTED_FORMATS = ("w8a8", "w4a4")
METHODS = ("rtn",)


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
        method: ``"rtn"`` (round to nearest, no smoothing or rotation: the paper's "Base").
        roles: layer roles to quantize (see :mod:`qvggt_export.quant.roles`); default the 192
            aggregator linears of VGGT-1B (qkv, proj, fc1, fc2 of frame and global blocks).
    """

    bits: str = "w4a4"
    method: str = "rtn"
    roles: tuple[str, ...] = field(default=DEFAULT_ROLES)

    def __post_init__(self) -> None:
        parse_bits(self.bits)
        if self.method not in METHODS:
            raise QVGGTError(f"unknown quantization method {self.method!r}; available: {', '.join(METHODS)}")
        unknown = [r for r in self.roles if r not in ALL_ROLES]
        if unknown or not self.roles:
            raise QVGGTError(f"roles must be a non-empty subset of {list(ALL_ROLES)}, got {list(self.roles)}")

    @property
    def weight_bits(self) -> int:
        return parse_bits(self.bits)[0]

    @property
    def act_bits(self) -> int:
        return parse_bits(self.bits)[1]
