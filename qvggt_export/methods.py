"""The method registry: one row per transform before quantization (paper Tab. 4), read by every stage.

A method is one :class:`MethodSpec` in :data:`METHODS`: what it rotates and smooths, in which space, and
which calibration statistics it needs. The surgery (:mod:`qvggt_export.quant.dsfq`), the calibration driver
(:mod:`qvggt_export.quant.calibrate`), block reconstruction (:mod:`qvggt_export.quant.reconstruct`), the
pipeline report and the CLI read these rows instead of spelling method names out. :data:`AUTO` is not a row:
it picks one of the rows per block (or per layer) by measured error (:mod:`qvggt_export.quant.select`). Like
:mod:`qvggt_export.formats`, this module imports no torch, so the CLI can build its parser without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from qvggt_export.errors import QVGGTError

__all__ = ["AUTO", "AUTO_CRITERIA", "AUTO_GRANULARITIES", "METHODS", "MethodSpec", "check_method", "get_method",
           "method_choices", "method_names"]


@dataclass(frozen=True)
class MethodSpec:
    """One transform before quantization.

    Attributes:
        name: The ``--method`` spelling.
        label: The paper's name (Tab. 4; the column label of the ablation tables).
        rotates: Applies the random Hadamard rotation ``(x * signs) @ H``.
        smoothing: Where its SmoothQuant-style factors act: ``"pre"`` (before the rotation, or with no
            rotation), ``"post"`` (in the rotated space: DSFQ), or ``None`` (no smoothing). Block
            reconstruction learns the factors in this same space.
        statistics: Which per-channel input maxima it needs from the float model: ``"raw"`` (before any
            transform), ``"rotated"`` (after the rotation), or ``None``.
    """

    name: str
    label: str
    rotates: bool
    smoothing: str | None
    statistics: str | None

    @property
    def smooths(self) -> bool:
        return self.smoothing is not None

    @property
    def needs_calibration(self) -> bool:
        """Whether its transform is computed from calibration statistics."""
        return self.statistics is not None

    @property
    def reconstruction_space(self) -> str | None:
        """Where block reconstruction learns a smoothing factor: ``"pre"`` / ``"post"`` of
        :class:`~qvggt_export.quant.modules.TransformedLinear`, or ``None`` (weight steps only). ``smooth``
        has no rotation, so its ``pre`` factor is learned as ``post`` (the same place without a rotation)."""
        if self.smoothing is None:
            return None
        return "pre" if self.rotates and self.smoothing == "pre" else "post"


METHODS: Mapping[str, MethodSpec] = MappingProxyType({spec.name: spec for spec in (
    MethodSpec("rtn", "Base", rotates=False, smoothing=None, statistics=None),
    MethodSpec("smooth", "Scale", rotates=False, smoothing="pre", statistics="raw"),
    MethodSpec("rotate", "Rotation", rotates=True, smoothing=None, statistics=None),
    MethodSpec("smooth_rotate", "Scale-Rot", rotates=True, smoothing="pre", statistics="raw"),
    MethodSpec("dsfq", "DSFQ", rotates=True, smoothing="post", statistics="rotated"),
)})


# ``--method auto``: per block (or per layer), the row among its candidates whose quantized block output is
# closest to the float block output on the calibration set (qvggt_export.quant.select).
AUTO = "auto"
AUTO_GRANULARITIES = ("block", "layer")
# How auto compares candidates: "quantized" (round-to-nearest block error, then reconstruction learns the winner)
# or "reconstructed" (each candidate is learned, the lowest learned block error wins: costs one learning per
# candidate and block).
AUTO_CRITERIA = ("quantized", "reconstructed")


def method_names() -> tuple[str, ...]:
    """The registry's transforms (what ``auto`` chooses among)."""
    return tuple(METHODS)


def method_choices() -> tuple[str, ...]:
    """Every ``--method`` spelling: the transforms, then ``auto``."""
    return (*METHODS, AUTO)


def check_method(name: str) -> str:
    """``name`` if it is a transform or ``auto``.

    Raises:
        QVGGTError: anything else, naming the choices.
    """
    if name != AUTO and name not in METHODS:
        raise QVGGTError(f"unknown quantization method {name!r}; available: {', '.join(method_choices())}")
    return name


def get_method(name: str) -> MethodSpec:
    """The row of method ``name``.

    Raises:
        QVGGTError: unknown method.
    """
    spec = METHODS.get(name)
    if spec is None:
        raise QVGGTError(f"unknown quantization method {name!r}; available: {', '.join(METHODS)}")
    return spec
