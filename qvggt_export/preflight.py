"""Checks that need no model: run first, so a bad run is refused in the first seconds, not after NFDS.

:func:`preflight` refuses an unusable ``--out``, ``--frames`` outside the engine profile's frame range, a
checkpoint that is missing, empty or not a safe checkpoint, and a calibration source that is missing or
unreadable. It writes nothing and never builds the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from qvggt_export.errors import QVGGTError
from qvggt_export.rundir import validate_output_folder

if TYPE_CHECKING:
    from qvggt_export.pipeline import PipelineConfig


def check_frames_in_profile(config: PipelineConfig) -> None:
    """``--frames`` must be a frame count the engine will accept (the exported graph is traced with it and the
    engine reserves memory for the profile's range); refused with the knobs that fix it."""
    if not config.engine:
        return
    from qvggt_export.engine.profiles import load_profile

    profile = load_profile(config.resolved_engine_profile())
    frames = profile.frames
    if not frames.min <= config.frames <= frames.max:
        raise QVGGTError(f"--frames {config.frames} is outside engine profile {profile.name!r}'s frame range "
                         f"{frames.min}..{frames.max}; use --frames {frames.min}..{frames.max}, an --engine-profile "
                         "JSON with a wider \"frames\" range, or --no-engine")


def check_calibration_source(source: str) -> None:
    """Every path of ``--calib-data`` (a path, or a list file's lines are checked later) exists and is readable."""
    path = Path(source).expanduser()
    if not path.exists():
        raise QVGGTError(f"calibration data not found: {path}")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise QVGGTError(f"calibration data {path} is not readable (permissions)")
    if path.is_file() and path.stat().st_size == 0:
        raise QVGGTError(f"calibration data {path} is an empty file (0 bytes)")


def preflight(config: PipelineConfig) -> None:
    """All model-free checks of a run (see the module notes); raises :class:`QVGGTError` on the first failure."""
    validate_output_folder(config.out_dir)
    check_frames_in_profile(config)
    if config.checkpoint:
        from qvggt_export.model.checkpoint import checkpoint_kind

        checkpoint_kind(config.checkpoint)  # exists, not empty, safetensors or torch zip (no legacy pickle)
    if config.calib_data:
        check_calibration_source(config.calib_data)
