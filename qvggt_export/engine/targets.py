"""Which GPU architectures each quantization format can be compiled for (no TensorRT needed).

The minimum compute capability of each format is the ``min_sm`` column of the format registry
(:mod:`qvggt_export.formats`); the table below explains it.

:func:`check_format_targets` is called before a build so that a format/architecture mismatch is a clear
error up front instead of a builder failure deep in TensorRT's log (or, worse, an engine that builds and
then has no kernel on the user's GPU). The table follows what the tensor cores support and what
TensorRT-RTX 1.7.1 was measured to build here (DESIGN.md section 3):

==========  =================  ==============================================================================
format      architectures      why
==========  =================  ==============================================================================
fp32, fp16  SM75 and newer     every architecture TensorRT-RTX targets
w8a8, w6a6  SM75 and newer     INT8 tensor cores since Turing (W6A6 runs in INT8 containers)
w4a4        SM75 and newer     lowered to INT4 weight-only or INT8 (no 4-bit activation math in TensorRT)
fp8         SM89 and newer     FP8 tensor cores: Ada (SM89), Hopper (SM90), Blackwell (SM100+); TensorRT-RTX
                               builds FP8 Q/DQ for SM89 and SM120, not for SM86
mxfp8       SM89 and newer     TensorRT-RTX 1.7.1 builds MXFP8 (FP8 block-32 dynamic quantize) for SM89+
nvfp4       SM100 and newer    FP4 tensor cores are Blackwell-only (SM100/SM103 data centre, SM120/SM121 RTX
                               and DGX Spark); TensorRT-RTX 1.7.1 builds NVFP4 only for SM120/SM121
==========  =================  ==============================================================================

``CURRENT`` (the build machine's GPU) is resolved through the CUDA driver when a GPU is visible; without one
the check cannot know the architecture and leaves it to the builder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from qvggt_export.engine.backend import cuda_compute_capabilities
from qvggt_export.errors import QVGGTError
from qvggt_export.formats import FORMATS

__all__ = ["check_format_targets", "sm_number"]

_SM_RE = re.compile(r"^SM(\d)(\d{1,2})$")


def sm_number(name: str) -> int:
    """``"SM89"`` -> 89, ``"SM120"`` -> 120 (major * 10 + minor).

    Raises:
        QVGGTError: Not an ``SM<major><minor>`` name.
    """
    match = _SM_RE.match(name.strip().upper()) if isinstance(name, str) else None
    if match is None:
        raise QVGGTError(f"compute capability {name!r} is not an 'SM<major><minor>' name such as 'SM89' or 'SM120'")
    return int(match.group(1) + match.group(2))


def check_format_targets(format_name: str, sms: Iterable[str]) -> tuple[str, ...]:
    """Raise unless every architecture in ``sms`` can run ``format_name``.

    Args:
        format_name: ``"fp32"``, ``"fp16"``, ``"w8a8"``, ``"w6a6"``, ``"w4a4"``, ``"fp8"``, ``"mxfp8"`` or
            ``"nvfp4"``.
        sms: Target compute capabilities as in a build profile (``"SM89"``, ``"SM120"``, or ``"CURRENT"``).

    Returns:
        The architectures checked (``CURRENT`` replaced by the visible GPUs' architectures; left out when no
        GPU is visible, since then nothing can be checked).

    Raises:
        QVGGTError: Unknown format, malformed or empty target list, or a target the format cannot run on; the
            message names the format, the refused targets and the architectures that can run it.
    """
    if format_name not in FORMATS:
        raise QVGGTError(f"unknown format {format_name!r}; expected one of {', '.join(FORMATS)}")
    spec = FORMATS[format_name]
    if isinstance(sms, str):
        raise QVGGTError(f"target compute capabilities must be a list such as ['SM89'], got the string {sms!r}")
    given = list(sms)
    if not given:
        raise QVGGTError(f"no target compute capabilities given for format {format_name!r}")
    names: list[str] = []
    resolved: list[str] = []
    for value in given:
        name = value.strip().upper() if isinstance(value, str) else value
        names.append(name)
        if name == "CURRENT":
            resolved += cuda_compute_capabilities()[:1]  # device 0 builds; nothing to check without a GPU
        else:
            sm_number(value)  # raises naming the value as given
            resolved.append(name)
    minimum = spec.min_sm
    refused = [name for name in resolved if sm_number(name) < minimum]
    if refused:
        via_current = " (the GPU of this machine, from 'CURRENT')" if "CURRENT" in names else ""
        hint = spec.target_hint or f"target SM{minimum} or newer"
        raise QVGGTError(
            f"format {format_name!r} cannot target {', '.join(refused)}{via_current}: it needs compute capability "
            f"SM{minimum} or newer; {hint}"
        )
    return tuple(resolved)
