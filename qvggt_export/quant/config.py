"""Typed quantization settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from qvggt_export.errors import QVGGTError
from qvggt_export.formats import format_names, get_format
from qvggt_export.methods import AUTO, AUTO_CRITERIA, AUTO_GRANULARITIES, METHODS, check_method, get_method
from qvggt_export.quant.roles import ALL_ROLES, DEFAULT_ROLES

# Derived from the format and method registries (qvggt_export.formats, qvggt_export.methods), the one place
# that defines them; kept as names here for the callers that import them from qvggt_export.quant.
INT_FORMATS = format_names(family="int")
FLOAT_QUANT_FORMATS = tuple(name for name in format_names(quantized=True) if name not in INT_FORMATS)
SUPPORTED_FORMATS = format_names(quantized=True)


def check_format(spec: str) -> str:
    """The normalised format name (``"W4A4"`` -> ``"w4a4"``, ``"FP8"`` -> ``"fp8"``).

    Raises:
        QVGGTError: ``spec`` is not in :data:`SUPPORTED_FORMATS`.
    """
    name = str(spec).strip().lower()
    if name not in SUPPORTED_FORMATS:
        raise QVGGTError(f"unsupported format {spec!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
    return name


def format_family(spec: str) -> str:
    """``"int"`` for the integer formats, else the float format's own name (``"fp8"``, ``"nvfp4"``)."""
    return get_format(check_format(spec)).family


def parse_bits(spec: str) -> tuple[int, int]:
    """``"w4a4"`` -> ``(4, 4)``; integer formats only (the floating-point formats have no bit-width pair
    that integer code paths could use); raises :class:`QVGGTError` for anything else."""
    spec = spec.strip().lower()
    if spec not in INT_FORMATS:
        hint = (f" ({spec} is a floating-point format: see format_family)" if spec in FLOAT_QUANT_FORMATS else "")
        raise QVGGTError(f"unsupported format {spec!r} for an integer bit-width pair{hint}; integer formats: "
                         f"{', '.join(INT_FORMATS)}")
    row = get_format(spec)
    return row.weight_bits, row.act_bits


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize VGGT.

    Attributes:
        bits: format name. ``"w8a8"``/``"w6a6"``/``"w4a4"``: N-bit per-output-channel weights, N-bit per-token
            dynamic activations (symmetric, eq. 3 of the paper). ``"fp8"``: FP8 E4M3 weights with one scale
            per output channel, FP8 E4M3 per-token dynamic activations. ``"nvfp4"``: FP4 E2M1 weights and
            activations in blocks of 16 input channels with E4M3 block scales (dynamic for activations) and
            one fp32 global scale per tensor (static for activations, from the calibration maximum).
        method: the transform before quantization (paper Tab. 4): ``"rtn"`` (Base: none), ``"smooth"``
            (SmoothQuant scales), ``"rotate"`` (random Hadamard), ``"smooth_rotate"`` (scale, then rotate),
            ``"dsfq"`` (rotate, then scale in the rotated space), or ``"auto"``: per block (or per layer) the
            one of ``auto_methods`` whose quantized block output is closest to the float block's on the
            calibration set (:mod:`qvggt_export.quant.select`), then block reconstruction as usual.
        auto_methods: the candidates of ``"auto"`` (default: every transform).
        auto_granularity: ``"block"`` (one method per transformer block) or ``"layer"`` (then each linear of
            the block may switch to another candidate when that lowers the block's output error).
        auto_criterion: ``"quantized"`` (compare candidates by their round-to-nearest block error, then learn the
            winner) or ``"reconstructed"`` (learn every candidate, keep the lowest learned block error; needs
            ``recon_iters > 0`` and costs one learning per candidate and block).
        roles: layer roles to quantize (see :mod:`qvggt_export.quant.roles`); default the 192
            aggregator linears of VGGT-1B (qkv, proj, fc1, fc2 of frame and global blocks).
        alpha: smoothing strength (eq. 7), 0.5 in the paper.
        seed: seeds the random Hadamard signs.
        recon_iters: block-reconstruction steps per block (0 = none; integer formats only).
        lr_smooth, lr_step: learning rates of the smoothing factors and the weight steps (paper: 5e-3, 5e-2).
    """

    bits: str = "w4a4"
    method: str = "dsfq"
    auto_methods: tuple[str, ...] = tuple(METHODS)
    auto_granularity: str = "block"
    auto_criterion: str = "quantized"
    roles: tuple[str, ...] = field(default=DEFAULT_ROLES)
    alpha: float = 0.5
    seed: int = 0
    recon_iters: int = 0
    lr_smooth: float = 5e-3
    lr_step: float = 5e-2

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_format(self.bits))
        check_method(self.method)  # raises naming the known methods
        object.__setattr__(self, "auto_methods", tuple(self.auto_methods))
        unknown_candidates = [m for m in self.auto_methods if m not in METHODS]
        if unknown_candidates or not self.auto_methods or len(set(self.auto_methods)) != len(self.auto_methods):
            raise QVGGTError(f"auto_methods must be distinct names among {', '.join(METHODS)}, got "
                             f"{list(self.auto_methods)}")
        if self.auto_granularity not in AUTO_GRANULARITIES:
            raise QVGGTError(f"auto_granularity must be one of {', '.join(AUTO_GRANULARITIES)}, got "
                             f"{self.auto_granularity!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise QVGGTError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.auto_criterion not in AUTO_CRITERIA:
            raise QVGGTError(f"auto_criterion must be one of {', '.join(AUTO_CRITERIA)}, got {self.auto_criterion!r}")
        if self.auto_criterion == "reconstructed" and self.method == AUTO and self.recon_iters <= 0:
            raise QVGGTError("auto_criterion 'reconstructed' compares candidates after block reconstruction: it needs "
                             "recon_iters > 0")
        if self.recon_iters < 0:
            raise QVGGTError(f"recon_iters must be >= 0, got {self.recon_iters}")
        if self.recon_iters > 0 and self.family != "int":
            # reconstruct.py learns integer steps through an integer STE; it has no FP8/FP4 counterpart.
            raise QVGGTError(f"block reconstruction (recon_iters={self.recon_iters}) supports the integer formats "
                             f"{', '.join(INT_FORMATS)} only, not {self.bits}; use recon_iters=0")
        if self.lr_smooth <= 0 or self.lr_step <= 0:
            raise QVGGTError(f"learning rates must be > 0, got {self.lr_smooth}, {self.lr_step}")
        unknown = [r for r in self.roles if r not in ALL_ROLES]
        if unknown or not self.roles:
            raise QVGGTError(f"roles must be a non-empty subset of {list(ALL_ROLES)}, got {list(self.roles)}")

    @property
    def family(self) -> str:
        """``"int"``, ``"fp8"`` or ``"nvfp4"``."""
        return format_family(self.bits)

    @property
    def needs_calibration(self) -> bool:
        # NVFP4's activation global scale is static (TensorRT takes it as a build-time constant): calibrated.
        # auto measures every candidate on the calibration data.
        return (self.is_auto or get_method(self.method).needs_calibration or self.recon_iters > 0
                or self.family == "nvfp4")

    @property
    def is_auto(self) -> bool:
        return self.method == AUTO

    @property
    def candidate_methods(self) -> tuple[str, ...]:
        """The transforms this config may apply: ``auto_methods`` for ``auto``, else the one method."""
        return self.auto_methods if self.is_auto else (self.method,)

    @property
    def weight_bits(self) -> int:
        """Weight bits (nominal storage bits for the floating-point formats: 8 for fp8, 4 for nvfp4)."""
        return get_format(self.bits).weight_bits

    @property
    def act_bits(self) -> int:
        """Activation bits (nominal for the floating-point formats)."""
        return get_format(self.bits).act_bits
