"""Named TensorRT / TensorRT-RTX build profiles: the JSON files of the top-level ``engines/`` folder (data only,
installed as the package ``qvggt_export.engine.profile_data``) and the code that reads and checks them.

A profile says *how* to build an engine from an exported ONNX model: which backend, which GPU
architectures, the ranges of the dynamic axes (the frame axis of ``images``; the points axis of
``query_points`` in the tracking graph ``track.onnx``), and builder settings. The resolution (H, W) is not
part of it: it is fixed per engine and read from the ONNX input.

Schema (every key except ``name`` is optional; unknown keys are errors)::

    {
      "name": "rtx-default",                  # [A-Za-z0-9][A-Za-z0-9._-]*
      "description": "free text",
      "backend": "rtx",                       # "auto" | "rtx" | "trt"
      "compute_capabilities": ["SM86", "SM89", "SM120"],   # or ["CURRENT"] (the build machine's GPU)
      "frames": {"min": 1, "opt": 8, "max": 32},           # 1 <= min <= opt <= max
      "points": {"min": 1, "opt": 256, "max": 4096},       # query points of track.onnx; same rule, or null
      "workspace_mib": null,                  # positive int, or null for the backend's default
      "strongly_typed": true,
      "timing_cache": null,                   # path; relative paths resolve against the engine's directory
      "builder_optimization_level": null,     # 0..5, or null for the backend's default (3)
      "hardware_compatibility_level": null    # full TensorRT only, e.g. "AMPERE_PLUS"
    }

Profiles shipped here: ``rtx-default`` (Ampere, Ada and Blackwell RTX GPUs in one engine, buildable
without a GPU), ``rtx-sm89`` (Ada only: the paper's RTX 4090, smaller engine) and ``trt-server`` (full
TensorRT on the build machine's GPU, e.g. an H100).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from qvggt_export.errors import QVGGTError

# Where the shipped profiles are: engines/ in the repository, mapped to this package name (pyproject.toml).
PROFILE_DATA = "qvggt_export.engine.profile_data"

__all__ = ["EngineProfile", "FrameRange", "PointRange", "list_profiles", "load_profile"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# "CURRENT" or an SM number; whether the chosen backend knows it is checked at build time, by the backend.
_CC_RE = re.compile(r"^(CURRENT|SM[0-9]{2,3})$")
_BACKENDS = ("auto", "rtx", "trt")
_MAX_OPT_LEVEL = 5


@dataclass(frozen=True)
class FrameRange:
    """Range of the dynamic frame axis (axis 1 of ``images`` [B, S, 3, H, W]) an engine accepts.

    Attributes:
        min: Fewest frames the engine accepts.
        opt: Frame count TensorRT tunes kernels for.
        max: Most frames the engine accepts; activation memory is reserved for it.
    """

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        _check_range("frames", self.min, self.opt, self.max)

    @classmethod
    def static(cls, frames: int) -> FrameRange:
        """A range admitting exactly ``frames`` frames."""
        return cls(frames, frames, frames)

    def as_tuple(self) -> tuple[int, int, int]:
        """``(min, opt, max)``."""
        return (self.min, self.opt, self.max)


@dataclass(frozen=True)
class PointRange:
    """Range of the dynamic points axis (axis 1 of ``query_points`` [B, N, 2]) a tracking engine accepts.

    Only the tracking graph (``track.onnx``) has this input; engines of the canonical graph ignore the range.
    The defaults cover a sparse set of tracks (1) to a dense 64 x 64 grid (4096), tuned for 256. TensorRT
    reserves activation memory for ``max`` points at ``frames.max`` frames: the tracker's correlation volumes
    grow with frames x points, so lower ``max`` when the engine's memory matters more than the range.

    Attributes:
        min: Fewest query points the engine accepts.
        opt: Point count TensorRT tunes kernels for.
        max: Most query points the engine accepts.
    """

    min: int = 1
    opt: int = 256
    max: int = 4096

    def __post_init__(self) -> None:
        _check_range("points", self.min, self.opt, self.max)

    @classmethod
    def static(cls, points: int) -> PointRange:
        """A range admitting exactly ``points`` query points."""
        return cls(points, points, points)

    def as_tuple(self) -> tuple[int, int, int]:
        """``(min, opt, max)``."""
        return (self.min, self.opt, self.max)


def _check_range(label: str, low: object, opt: object, high: object) -> None:
    for key, value in (("min", low), ("opt", opt), ("max", high)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise QVGGTError(f"{label}.{key} must be an integer, got {value!r}")
    if not 1 <= low <= opt <= high:  # type: ignore[operator]
        raise QVGGTError(f"{label} must satisfy 1 <= min <= opt <= max, got min={low}, opt={opt}, max={high}")


@dataclass(frozen=True)
class EngineProfile:
    """How to build an engine; validated on construction.

    Attributes:
        name: Profile name (file stem for shipped profiles).
        description: Free text.
        backend: ``"auto"`` (TensorRT-RTX if installed, else TensorRT), ``"rtx"`` or ``"trt"``.
        compute_capabilities: GPU architectures the engine runs on, e.g. ``("SM86", "SM89", "SM120")``.
            ``("CURRENT",)`` means the build machine's GPU (needs one). Only TensorRT-RTX can target
            other architectures; full TensorRT accepts only ``CURRENT``.
        frames: Range of the dynamic frame axis (a dict {min, opt, max} is converted); ignored, with a
            warning, for an ONNX whose frame axis is static.
        points: Range of the dynamic points axis of ``query_points`` (tracking graphs; a dict is converted);
            ignored, with a warning, when that axis is static. ``None`` (JSON ``null``) says "no points axis":
            a resolved profile of an engine without ``query_points`` records it so, and building a graph with a
            dynamic points axis from such a profile is refused.
        workspace_mib: Builder workspace limit in MiB, ``None`` for the backend's default.
        strongly_typed: Let the ONNX graph's Q/DQ and casts decide all precisions (what a quantized
            export means); weak typing leans on precision flags that TensorRT 11 removed.
        timing_cache: Timing-cache file, loaded if present and updated after a build (full TensorRT;
            TensorRT-RTX ignores timing caches). Relative paths resolve against the engine's directory.
        builder_optimization_level: 0 (fast build) .. 5 (slow build, maybe faster engine); ``None`` = 3.
        hardware_compatibility_level: Full TensorRT's portability setting (e.g. ``"AMPERE_PLUS"``); ignored
            by TensorRT-RTX, whose portability is ``compute_capabilities``.
    """

    name: str
    description: str = ""
    backend: str = "auto"
    compute_capabilities: tuple[str, ...] = ("CURRENT",)
    frames: FrameRange = field(default_factory=FrameRange)
    points: PointRange | None = field(default_factory=PointRange)
    workspace_mib: int | None = None
    strongly_typed: bool = True
    timing_cache: str | None = None
    builder_optimization_level: int | None = None
    hardware_compatibility_level: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise QVGGTError(
                f"profile name must match {_NAME_RE.pattern} (letters, digits, '.', '_', '-'), got {self.name!r}"
            )
        where = f"profile {self.name!r}"
        if not isinstance(self.description, str):
            raise QVGGTError(f"{where}: description must be a string, got {self.description!r}")
        if self.backend not in _BACKENDS:
            raise QVGGTError(f"{where}: backend must be one of {', '.join(_BACKENDS)}, got {self.backend!r}")

        ccs = self.compute_capabilities
        if isinstance(ccs, str) or not isinstance(ccs, (list, tuple)):
            raise QVGGTError(f"{where}: compute_capabilities must be a list of names like 'SM89', got {ccs!r}")
        normalized = []
        for cc in ccs:
            if not isinstance(cc, str) or not _CC_RE.match(cc.strip().upper()):
                raise QVGGTError(
                    f"{where}: compute capability {cc!r} is not 'CURRENT' or an 'SM<major><minor>' name like 'SM89'"
                )
            normalized.append(cc.strip().upper())
        if not normalized:
            raise QVGGTError(f"{where}: compute_capabilities is empty; give at least one (or 'CURRENT')")
        duplicates = sorted({cc for cc in normalized if normalized.count(cc) > 1})
        if duplicates:
            raise QVGGTError(f"{where}: compute_capabilities lists {', '.join(duplicates)} more than once")
        if "CURRENT" in normalized and len(normalized) > 1:
            raise QVGGTError(f"{where}: 'CURRENT' cannot be combined with explicit compute capabilities")
        object.__setattr__(self, "compute_capabilities", tuple(normalized))

        if isinstance(self.frames, dict):
            object.__setattr__(self, "frames", _frames_from_dict(self.frames, where))
        elif not isinstance(self.frames, FrameRange):
            raise QVGGTError(f"{where}: frames must be an object {{min, opt, max}}, got {self.frames!r}")
        if isinstance(self.points, dict):
            object.__setattr__(self, "points", _points_from_dict(self.points, where))
        elif self.points is not None and not isinstance(self.points, PointRange):
            raise QVGGTError(f"{where}: points must be an object {{min, opt, max}} or null, got {self.points!r}")

        if self.workspace_mib is not None and (
            isinstance(self.workspace_mib, bool) or not isinstance(self.workspace_mib, int) or self.workspace_mib <= 0
        ):
            raise QVGGTError(f"{where}: workspace_mib must be a positive integer or null, got {self.workspace_mib!r}")
        if not isinstance(self.strongly_typed, bool):
            raise QVGGTError(f"{where}: strongly_typed must be true or false, got {self.strongly_typed!r}")
        if self.timing_cache is not None and (not isinstance(self.timing_cache, str) or not self.timing_cache):
            raise QVGGTError(f"{where}: timing_cache must be a non-empty path or null, got {self.timing_cache!r}")
        level = self.builder_optimization_level
        if level is not None and (
            isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= _MAX_OPT_LEVEL
        ):
            raise QVGGTError(
                f"{where}: builder_optimization_level must be an integer 0..{_MAX_OPT_LEVEL} or null, got {level!r}"
            )
        hcl = self.hardware_compatibility_level
        if hcl is not None:
            if not isinstance(hcl, str) or not hcl.strip():
                raise QVGGTError(f"{where}: hardware_compatibility_level must be a name or null, got {hcl!r}")
            object.__setattr__(self, "hardware_compatibility_level", hcl.strip().upper())

    @property
    def targets_current_gpu(self) -> bool:
        """Whether the engine is built for the build machine's own GPU."""
        return self.compute_capabilities == ("CURRENT",)

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data (the schema :func:`load_profile` reads)."""
        data = asdict(self)
        data["compute_capabilities"] = list(self.compute_capabilities)
        return data

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "profile", default_name: str | None = None
    ) -> EngineProfile:
        """Build a profile from parsed JSON, rejecting unknown keys.

        Args:
            data: The parsed JSON object.
            source: Where it came from, for error messages.
            default_name: Name to use when ``data`` has no ``name`` (e.g. the file stem).

        Raises:
            QVGGTError: Not an object, unknown keys, or invalid values.
        """
        if not isinstance(data, dict):
            raise QVGGTError(f"{source}: a build profile must be a JSON object, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise QVGGTError(f"{source}: unknown profile key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        kwargs = dict(data)
        if "name" not in kwargs:
            if default_name is None:
                raise QVGGTError(f"{source}: the profile has no 'name'")
            kwargs["name"] = default_name
        if "compute_capabilities" in kwargs and isinstance(kwargs["compute_capabilities"], list):
            kwargs["compute_capabilities"] = tuple(kwargs["compute_capabilities"])
        try:
            return cls(**kwargs)
        except QVGGTError as exc:
            raise QVGGTError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        """The profile as indented JSON text (ends with a newline)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _range_keys(data: dict[str, Any], where: str, label: str) -> None:
    unknown = sorted(set(data) - {"min", "opt", "max"})
    missing = sorted({"min", "opt", "max"} - set(data))
    if unknown or missing:
        raise QVGGTError(
            f"{where}: {label} must have exactly the keys min, opt, max"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )


def _frames_from_dict(data: dict[str, Any], where: str) -> FrameRange:
    _range_keys(data, where, "frames")
    try:
        return FrameRange(min=data["min"], opt=data["opt"], max=data["max"])
    except QVGGTError as exc:
        raise QVGGTError(f"{where}: {exc}") from None


def _points_from_dict(data: dict[str, Any], where: str) -> PointRange:
    _range_keys(data, where, "points")
    try:
        return PointRange(min=data["min"], opt=data["opt"], max=data["max"])
    except QVGGTError as exc:
        raise QVGGTError(f"{where}: {exc}") from None


def list_profiles() -> list[str]:
    """Names of the profiles shipped with the package, sorted."""
    return sorted(
        entry.name[: -len(".json")] for entry in resources.files(PROFILE_DATA).iterdir() if entry.name.endswith(".json")
    )


def load_profile(name_or_path: str | os.PathLike[str] | EngineProfile) -> EngineProfile:
    """Load a build profile by shipped name (``"rtx-default"``) or from a JSON file.

    A string that names an existing file, or ends in ``.json``, is read as a path; anything else is looked
    up among :func:`list_profiles`. An :class:`EngineProfile` is returned unchanged.

    Raises:
        QVGGTError: Unknown name, missing or unreadable file, invalid JSON or invalid profile.
    """
    if isinstance(name_or_path, EngineProfile):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise QVGGTError(f"a build profile is a name, a JSON path or an EngineProfile, got {name_or_path!r}")
    text_form = os.fspath(name_or_path)
    path = Path(text_form)
    if isinstance(name_or_path, os.PathLike) or path.is_file() or text_form.endswith(".json"):
        if not path.is_file():
            raise QVGGTError(f"build profile file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise QVGGTError(f"cannot read build profile {path}: {exc}") from exc
        return _parse(text, source=str(path), default_name=path.name.split(".")[0])

    resource = resources.files(PROFILE_DATA) / f"{text_form}.json"
    if not _NAME_RE.match(text_form) or not resource.is_file():
        available = ", ".join(list_profiles()) or "(none)"
        raise QVGGTError(f"unknown build profile {text_form!r}; shipped profiles: {available}, or give a JSON path")
    return _parse(resource.read_text(encoding="utf-8"), source=f"shipped profile {text_form!r}", default_name=text_form)


def _parse(text: str, *, source: str, default_name: str) -> EngineProfile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QVGGTError(f"{source}: not valid JSON ({exc})") from exc
    return EngineProfile.from_dict(data, source=source, default_name=default_name)
