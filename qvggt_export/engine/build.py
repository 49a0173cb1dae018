"""Build a TensorRT / TensorRT-RTX engine from an exported VGGT ONNX model.

The public entry point is :func:`build_engine`. It checks the ONNX model's ``images`` input
([B, S, 3, H, W]; only the frame axis S may be dynamic, the resolution is fixed per engine) and, in the
tracking graph (``track.onnx``), its ``query_points`` input ([B, N, 2]; the points axis N may be dynamic),
builds with the backend and settings of an :class:`~qvggt_export.engine.profiles.EngineProfile` (one
optimization profile covering every dynamic axis: frames from ``profile.frames``, points from
``profile.points``), and writes three files, each atomically (temporary file in the same directory, fsync,
rename):

* ``<engine>``: the serialized engine;
* ``<engine>.profile.json``: the resolved profile (backend, frame and point ranges as built; ``points`` is
  ``null`` for an engine without ``query_points``), loadable with
  :func:`~qvggt_export.engine.profiles.load_profile` to rebuild the same way;
* ``<engine>.build.log``: the builder's messages (INFO and above) and its per-layer report.

The engine is never deserialized here: that needs a GPU, while TensorRT-RTX builds without one. What the
result reports about the engine (target architectures, layers) is read from the engine bytes and from the
builder's DETAILED log instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from qvggt_export.engine.backend import (
    Backend,
    cuda_device_count,
    ensure_rtx_parser_symlink,
    load_backend,
)
from qvggt_export.engine.layout import (
    BATCH_AXIS,
    CHANNEL_AXIS,
    FRAME_AXIS,
    HEIGHT_AXIS,
    IMAGE_RANK,
    POINTS_AXIS,
    POINTS_INPUT,
    POINTS_RANK,
    WIDTH_AXIS,
)
from qvggt_export.engine.profiles import EngineProfile, FrameRange, PointRange, load_profile
from qvggt_export.engine.targets import check_format_targets
from qvggt_export.engine.trt_logger import ERROR, INFO, INTERNAL_ERROR, VERBOSE, WARNING, make_capturing_logger
from qvggt_export.errors import QVGGTError

__all__ = ["FRAME_AXIS", "POINTS_AXIS", "POINTS_INPUT", "EngineBuildResult", "build_engine"]

logger = logging.getLogger(__name__)
# TensorRT's own messages go to a child logger, so users can silence or raise them separately.
_trt_logger = logging.getLogger(__name__ + ".tensorrt")

# The input layout (qvggt_export.engine.layout, shared with the runtime): images [1, S, 3, H, W], and the
# tracking graph's second input query_points [B, N, 2] pixel (x, y) in frame 0, with its dynamic axis N.
_BATCH_AXIS, _CHANNEL_AXIS, _HEIGHT_AXIS, _WIDTH_AXIS = BATCH_AXIS, CHANNEL_AXIS, HEIGHT_AXIS, WIDTH_AXIS
_IMAGE_RANK, _POINTS_RANK = IMAGE_RANK, POINTS_RANK
# The dynamic axes an optimization profile can be written for, per input role: a dynamic batch axis is pinned
# to 1 (VGGT engines run one sequence at a time); any other dynamic axis is refused, naming input and axis.
_PROFILED_AXES = {"images": {_BATCH_AXIS: "batch", FRAME_AXIS: "frames"},
                  POINTS_INPUT: {_BATCH_AXIS: "batch", POINTS_AXIS: "points"}}

# Nodes from any other domain are plugins to TensorRT (unless they call a local ONNX function, which the
# parser inlines).
_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})
# The TensorRT ONNX parser's own custom ops (e.g. trt::TRT_FP4DynamicQuantize of NVFP4 exports) are imported
# natively, without a plugin creator.
_PARSER_NATIVE_DOMAINS = frozenset({"trt"})
# How many builder/parser errors the exception message quotes; the build log has all of them.
_MAX_QUOTED_ERRORS = 5

# Every repeated call of an ONNX local function (our Hadamard_<d>) makes the parser warn that the body's
# node names exist already; the layers are built correctly (checked in the per-layer report).
_SEVERITY_TAGS = {INTERNAL_ERROR: "F", ERROR: "E", WARNING: "W", INFO: "I", VERBOSE: "V"}

# The DETAILED per-layer report arrives as one VERBOSE record. TensorRT-RTX lists "Name: ..., LayerType: X,"
# per layer; full TensorRT lists "Layer(X): ...".
_LAYER_RECORD_PREFIXES = ("Layers:", "Engine Layer Information")
_RTX_LAYER_RE = re.compile(r"^Name: .*?, LayerType: ([^,]+),", re.MULTILINE)
_TRT_LAYER_RE = re.compile(r"^Layer\(([^)]+)\):", re.MULTILINE)
_DATATYPE_RE = re.compile(r"Datatype: ([A-Za-z0-9]+)")
_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
# TensorRT-RTX writes the architectures it compiled for into the engine in plain text.
_ACCELERATORS_RE = re.compile(rb"accelerators=\{([^}]*)\}")


@dataclass(frozen=True)
class EngineBuildResult:
    """What :func:`build_engine` produced.

    Attributes:
        engine_path: The serialized engine.
        size_bytes: Its size on disk.
        backend: ``"rtx"`` or ``"trt"``.
        backend_version: Version of the TensorRT package that built it.
        target_sms: Architectures recorded in the engine bytes, e.g. ``("SM86", "SM89", "SM120")``; empty
            when the engine does not record them in plain text (full TensorRT engines).
        num_layers: Layers in the engine (after fusion) per the builder's DETAILED report; ``None`` if the
            report was missing.
        layer_types: Layer count per layer type (e.g. ``{"gemm": 96, "kgen": 210}``).
        build_seconds: Wall time of the whole call (ONNX checks, parsing, building, writing).
        log_path: ``<engine>.build.log``.
        profile_path: ``<engine>.profile.json``.
        profile: The resolved profile as written to ``profile_path``.
        input_shape: Shape of the engine's image input as built; -1 marks the dynamic frame axis.
        input_shapes: Shape of every engine input as built (``images``, and ``query_points`` [1, -1, 2] for a
            tracking engine); -1 marks a dynamic axis.
        plugin_ops: Custom-domain ONNX ops (``"domain::op"``) TensorRT had to map to plugins.
        gemm_precisions: GEMM layers per ``"<input type> x <weight type>"`` from the per-layer report, e.g.
            ``{"Int8 x Int8": 32, "Float x Float": 80}``: shows which Q/DQ patterns became integer GEMMs.
        attention: How the ONNX attention (MatMul -> Softmax -> MatMul) was built, from the per-layer report
            (see :func:`attention_report`).
    """

    engine_path: Path
    size_bytes: int
    backend: str
    backend_version: str
    target_sms: tuple[str, ...]
    num_layers: int | None
    layer_types: dict[str, int]
    build_seconds: float
    log_path: Path
    profile_path: Path
    profile: dict[str, Any]
    input_shape: tuple[int, ...]
    plugin_ops: tuple[str, ...] = field(default=())
    gemm_precisions: dict[str, int] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def frames(self) -> tuple[int, int, int]:
        """``(min, opt, max)`` frame counts the engine accepts."""
        frames = self.profile["frames"]
        return (frames["min"], frames["opt"], frames["max"])

    @property
    def points(self) -> tuple[int, int, int] | None:
        """``(min, opt, max)`` query-point counts a tracking engine accepts; ``None`` without ``query_points``."""
        points = self.profile.get("points")
        return None if points is None else (points["min"], points["opt"], points["max"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings), for reports."""
        return {
            "engine_path": str(self.engine_path),
            "size_bytes": self.size_bytes,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "target_sms": list(self.target_sms),
            "num_layers": self.num_layers,
            "layer_types": dict(self.layer_types),
            "build_seconds": self.build_seconds,
            "log_path": str(self.log_path),
            "profile_path": str(self.profile_path),
            "profile": self.profile,
            "input_shape": list(self.input_shape),
            "plugin_ops": list(self.plugin_ops),
            "gemm_precisions": dict(self.gemm_precisions),
            "attention": dict(self.attention),
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
        }


@dataclass(frozen=True)
class _OnnxSummary:
    """What the ONNX file declares, read without TensorRT and without external data."""

    dims: tuple[int | None, ...]  # images dims; None marks a dynamic one
    plugin_ops: tuple[str, ...]
    plugins: tuple[tuple[str, str, str], ...] = ()  # (name, version, namespace) the parser will look up
    points_dims: tuple[int | None, ...] | None = None  # query_points dims, None without that input


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    profile: EngineProfile | str | os.PathLike[str] = "rtx-default",
    *,
    backend: str | None = None,
    input_name: str = "images",
    format_name: str | None = None,
) -> EngineBuildResult:
    """Build a TensorRT / TensorRT-RTX engine from an ONNX model (not in place: writes new files).

    Every dynamic input axis gets an optimization profile: the frame axis (axis 1 of ``images``
    [B, S, 3, H, W]) the profile's frame range and, in a tracking graph, the points axis (axis 1 of
    ``query_points`` [B, N, 2]) the profile's point range. A static frame or point count is used as is (with a
    warning if the profile asks for another range); a dynamic batch axis is pinned to 1. Any other dynamic
    axis, or another input with one, is refused before anything is written. Models with custom-domain nodes
    (plugins such as the Hadamard op) need their plugin creators registered before the call.

    Besides ``engine_path`` it writes ``<engine>.profile.json`` (the resolved profile) and
    ``<engine>.build.log``. A build that fails leaves no engine behind: an engine from an earlier build at
    ``engine_path`` (and its ``.profile.json``) is removed, so an engine file is always the product of the
    log beside it. Errors found before the builder starts (bad paths, profiles, input shapes) touch no file.

    Args:
        onnx_path: The ONNX model; external data files are read from its directory.
        engine_path: Where to write the engine; parent directories are created.
        profile: A shipped profile name (see :func:`~qvggt_export.engine.profiles.list_profiles`), a JSON
            path, or an :class:`~qvggt_export.engine.profiles.EngineProfile`.
        backend: Overrides the profile's backend (``"auto"``, ``"rtx"``, ``"trt"``).
        input_name: Name of the image input.
        format_name: The quantization format the ONNX holds (``"w8a8"``, ``"fp8"``, ``"nvfp4"``...); when given,
            the profile's target architectures are checked against it first
            (:func:`~qvggt_export.engine.targets.check_format_targets`).

    Returns:
        Sizes, targets and layer statistics of the engine, and where its files are.

    Raises:
        QVGGTError: Unusable ONNX, profile or input (a dynamic axis no profile range covers names the input and
            the axis; a dynamic points axis with a profile whose ``points`` is null); unknown compute
            capability, or one ``format_name`` cannot
            target; a plugin node whose creator is not registered; a GPU is needed but absent; the parser or
            builder rejects the model (the message quotes its first errors).
        MissingDependencyError: The backend's package is not installed.
    """
    started = time.perf_counter()
    resolved = load_profile(profile)
    onnx_file = Path(onnx_path)
    engine_file = Path(engine_path)
    summary = _inspect_onnx(onnx_file, input_name)
    if engine_file.is_dir():
        raise QVGGTError(f"engine path {engine_file} is a directory; give a file name such as model.engine")
    if engine_file.exists() and engine_file.resolve() == onnx_file.resolve():
        raise QVGGTError(f"engine path {engine_file} is the ONNX model itself")
    frames = _resolve_frames(summary.dims, resolved.frames, input_name, resolved.name)
    points = _resolve_points(summary.points_dims, resolved.points, resolved.name)
    if format_name is not None:
        check_format_targets(format_name, resolved.compute_capabilities)

    be = load_backend(backend if backend is not None else resolved.backend)
    targets = _resolve_targets(be, resolved)
    hardware_level = None
    if resolved.hardware_compatibility_level is not None:
        if be.honours_hardware_compatibility:
            hardware_level = be.hardware_compatibility_level(resolved.hardware_compatibility_level)
        else:
            logger.warning(
                "profile %r sets hardware_compatibility_level=%s, which %s ignores; its engines run on the "
                "compute_capabilities they were built for",
                resolved.name, resolved.hardware_compatibility_level, be.display_name,
            )
    if summary.plugin_ops and be.name == "rtx":
        # Without the link the RTX parser aborts the process (uncatchable) when it creates the plugin.
        ensure_rtx_parser_symlink()
    _check_plugins_registered(be, summary.plugins, onnx_file)

    final = replace(resolved, backend=be.name, frames=frames, points=points)
    engine_file.parent.mkdir(parents=True, exist_ok=True)
    log_path = engine_file.with_name(engine_file.name + ".build.log")
    profile_path = engine_file.with_name(engine_file.name + ".profile.json")
    cache_path = _timing_cache_path(final, engine_file)
    capture = _make_capturing_logger(be.trt)
    header = {
        "onnx": str(onnx_file.resolve()),
        "engine": str(engine_file.resolve()),
        "backend": f"{be.display_name} {be.version}",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": final.to_dict(),
    }
    logger.info(
        "building %s engine %s from %s (profile %s, targets %s, frames %s, points %s)",
        be.display_name, engine_file, onnx_file, final.name, ",".join(final.compute_capabilities),
        "/".join(map(str, frames.as_tuple())), "-" if points is None else "/".join(map(str, points.as_tuple())),
    )

    try:
        serialized, input_shapes, timing_cache = _build_serialized(
            be, capture, onnx_file, input_name, final, targets, hardware_level, cache_path
        )
        _write_atomic(profile_path, final.to_json().encode("utf-8"))
        _write_atomic(engine_file, memoryview(serialized).cast("B"))
        del serialized  # the engine can be GBs; release it before the read-back below
        if timing_cache is not None and cache_path is not None:
            _write_atomic(cache_path, memoryview(timing_cache.serialize()).cast("B"))
    except (QVGGTError, OSError) as exc:
        _discard_outputs(engine_file, profile_path)
        message = str(exc) if isinstance(exc, QVGGTError) else f"could not write the engine files: {exc}"
        _write_log_quietly(log_path, header, capture.records, f"FAILED: {message}")
        raise QVGGTError(f"{message}\nbuild log: {log_path}") from exc

    size_bytes = engine_file.stat().st_size
    target_sms = read_target_sms(engine_file)
    num_layers, layer_types = _layer_report(capture.records)
    report = _layer_record(capture.records)
    gemm_precisions = gemm_precision_report(report) if report else {}
    attention = attention_report(report) if report else {}
    build_seconds = time.perf_counter() - started
    outcome = (
        f"built in {build_seconds:.2f} s: {size_bytes} bytes, targets {' '.join(target_sms) or '(not recorded)'}, "
        f"{num_layers if num_layers is not None else 'unknown'} layers"
    )
    _write_log_quietly(log_path, header, capture.records, outcome)
    logger.info("%s %s", engine_file, outcome)
    return EngineBuildResult(
        engine_path=engine_file,
        size_bytes=size_bytes,
        backend=be.name,
        backend_version=be.version,
        target_sms=target_sms,
        num_layers=num_layers,
        layer_types=layer_types,
        build_seconds=build_seconds,
        log_path=log_path,
        profile_path=profile_path,
        profile=final.to_dict(),
        input_shape=input_shapes[input_name],
        plugin_ops=summary.plugin_ops,
        gemm_precisions=gemm_precisions,
        attention=attention,
        input_shapes=input_shapes,
    )


# ----------------------------------------------------------------------------------------------------------
# Checks before the builder runs (no TensorRT needed)
# ----------------------------------------------------------------------------------------------------------


def _inspect_onnx(path: Path, input_name: str) -> _OnnxSummary:
    if not path.exists():
        raise QVGGTError(f"ONNX model {path} does not exist")
    if not path.is_file():
        raise QVGGTError(f"ONNX model {path} is not a file")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        # The graph structure is all we need; weights in external data (GBs for VGGT-1B) stay on disk.
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, UnicodeDecodeError, OSError) as exc:
        raise QVGGTError(f"{path} is not a readable ONNX model: {exc}") from exc
    # Arbitrary bytes sometimes decode as an (empty) protobuf message; every real model has a graph and opsets.
    if not model.HasField("graph") or not model.opset_import:
        raise QVGGTError(f"{path} is not an ONNX model (no graph or opset imports found)")

    initializers = {init.name for init in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in initializers}
    if input_name not in inputs:
        listed = ", ".join(f"{name} {_format_dims(_dims(vi))}" for name, vi in inputs.items()) or "(none)"
        raise QVGGTError(f"{path} has no input named {input_name!r}; its inputs are: {listed}")
    image_input = inputs[input_name]
    if not image_input.type.HasField("tensor_type") or not image_input.type.tensor_type.HasField("shape"):
        raise QVGGTError(f"input {input_name!r} of {path} has no tensor shape; expected [1, S, 3, H, W]")
    dims = _dims(image_input)
    expected = "[1, S, 3, H, W] (S frames; H, W fixed per engine)"
    if len(dims) != _IMAGE_RANK:
        raise QVGGTError(f"input {input_name!r} of {path} has shape {_format_dims(dims)}; expected {expected}")
    if dims[_CHANNEL_AXIS] != 3:
        raise QVGGTError(
            f"input {input_name!r} of {path} has {dims[_CHANNEL_AXIS] or 'a dynamic number of'} channels "
            f"(shape {_format_dims(dims)}); expected {expected}"
        )
    if dims[_HEIGHT_AXIS] is None or dims[_WIDTH_AXIS] is None:
        raise QVGGTError(
            f"input {input_name!r} of {path} has a dynamic resolution {_format_dims(dims)}; an engine has one "
            "fixed resolution: export the ONNX with static H and W (only the frame axis may be dynamic)"
        )
    points_dims = _dims(inputs[POINTS_INPUT]) if POINTS_INPUT in inputs else None
    if points_dims is not None:
        _check_points_input(path, inputs[POINTS_INPUT], points_dims, dims[_BATCH_AXIS])
    for name, value_info in inputs.items():
        role = "images" if name == input_name else name
        for axis, dim in enumerate(_dims(value_info)):
            if dim is None and axis not in _PROFILED_AXES.get(role, {}):
                raise QVGGTError(_unprofiled_axis(path, name, axis, _dims(value_info), input_name))
    return _OnnxSummary(dims=dims, plugin_ops=_plugin_ops(model), plugins=_plugin_identities(model),
                        points_dims=points_dims)


def _check_points_input(path: Path, value_info: Any, dims: tuple[int | None, ...], image_batch: int | None) -> None:
    expected = "[1, N, 2] (pixel x, y in frame 0; N query points)"
    if not value_info.type.HasField("tensor_type") or not value_info.type.tensor_type.HasField("shape"):
        raise QVGGTError(f"input {POINTS_INPUT!r} of {path} has no tensor shape; expected {expected}")
    if len(dims) != _POINTS_RANK or dims[-1] != 2:
        raise QVGGTError(f"input {POINTS_INPUT!r} of {path} has shape {_format_dims(dims)}; expected {expected}")
    batch = dims[_BATCH_AXIS]
    if batch is not None and image_batch is not None and batch != image_batch:
        raise QVGGTError(f"input {POINTS_INPUT!r} of {path} has batch {batch} but images have batch {image_batch}")


def _unprofiled_axis(path: Path | str, name: str, axis: int, dims: tuple[int | None, ...], input_name: str) -> str:
    known = (f"axis {FRAME_AXIS} (frames) of {input_name!r}, axis {POINTS_AXIS} (points) of {POINTS_INPUT!r} "
             "and a batch axis 0 (pinned to 1)")
    return (f"{path}: input {name!r} has a dynamic axis {axis} (shape {_format_dims(dims)}) that no build-profile "
            f"range covers; an engine built here can have only these dynamic axes: {known}. Export the graph "
            "with that axis static. No engine was built.")


def _dims(value_info: Any) -> tuple[int | None, ...]:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim)


def _format_dims(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _plugin_ops(model: Any) -> tuple[str, ...]:
    local_functions = {(function.domain, function.name) for function in model.functions}
    found: set[str] = set()

    def visit(nodes: Any) -> None:
        for node in nodes:
            if node.domain not in _STANDARD_DOMAINS and (node.domain, node.op_type) not in local_functions:
                found.add(f"{node.domain}::{node.op_type}")
            for attribute in node.attribute:  # If/Loop/Scan bodies
                if attribute.HasField("g"):
                    visit(attribute.g.node)
                for subgraph in attribute.graphs:
                    visit(subgraph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return tuple(sorted(found))


def _plugin_identities(model: Any) -> tuple[tuple[str, str, str], ...]:
    """(name, version, namespace) of every plugin node, as the ONNX parser looks them up: the op type, the
    ``plugin_version`` attribute (default "1") and ``plugin_namespace`` (default: the node's domain)."""
    local_functions = {(function.domain, function.name) for function in model.functions}
    found: set[tuple[str, str, str]] = set()
    for nodes in [model.graph.node, *(function.node for function in model.functions)]:
        for node in nodes:
            if (node.domain in _STANDARD_DOMAINS or node.domain in _PARSER_NATIVE_DOMAINS
                    or (node.domain, node.op_type) in local_functions):
                continue
            attrs = {a.name: a.s.decode("utf-8", "replace") for a in node.attribute if a.type == a.STRING}
            found.add((node.op_type, attrs.get("plugin_version", "1"), attrs.get("plugin_namespace", node.domain)))
    return tuple(sorted(found))


def _check_plugins_registered(be: Backend, plugins: tuple[tuple[str, str, str], ...], onnx_file: Path) -> None:
    """Refuse before parsing when a plugin node has no creator (the parser would fail on it mid-parse)."""
    if not plugins:
        return
    registry = be.trt.get_plugin_registry()
    missing = [(name, version, namespace) for name, version, namespace in plugins
               if registry.get_creator(name, version, namespace) is None]
    if not missing:
        return
    listed = ", ".join(f"{namespace}::{name} v{version}" for name, version, namespace in missing)
    ours = any((name, namespace) == ("Hadamard", "qvggt") for name, _, namespace in missing)
    hint = ("call qvggt_export.plugins.register() (the Hadamard plugin) before build_engine, or build from the "
            "graph with Hadamard functions instead of plugin nodes (--engine-hadamard function)" if ours else
            "load the plugin library or register its creator (same name, version and namespace) before building")
    raise QVGGTError(f"{onnx_file} uses plugin(s) {listed} that are not registered with {be.display_name} "
                     f"{be.version}; {hint}. No engine was built.")


def _resolve_frames(dims: tuple[int | None, ...], wanted: FrameRange, input_name: str, profile_name: str) -> FrameRange:
    static_frames = dims[FRAME_AXIS]
    if static_frames is None:
        return wanted
    fixed = FrameRange.static(static_frames)
    if wanted != fixed:
        logger.warning(
            "input %r has a static frame count of %d; profile %r frames min/opt/max %s do not apply (export the "
            "ONNX with a dynamic frame axis to get a frame range)",
            input_name, static_frames, profile_name, "/".join(map(str, wanted.as_tuple())),
        )
    return fixed


def _resolve_points(dims: tuple[int | None, ...] | None, wanted: PointRange | None,
                    profile_name: str) -> PointRange | None:
    """The point range as built: ``None`` without ``query_points``; the static count when the axis is static."""
    if dims is None:
        return None
    static_points = dims[POINTS_AXIS]
    if static_points is None:
        if wanted is None:
            raise QVGGTError(
                f"input {POINTS_INPUT!r} has a dynamic points axis but profile {profile_name!r} has no points range "
                "(points: null, as in the resolved profile of an engine without query points); give the profile "
                '"points": {"min": ..., "opt": ..., "max": ...}. No engine was built.'
            )
        return wanted
    fixed = PointRange.static(static_points)
    if wanted is not None and wanted != fixed:
        logger.warning(
            "input %r has a static point count of %d; profile %r points min/opt/max %s do not apply (export the "
            "ONNX with a dynamic points axis to get a point range)",
            POINTS_INPUT, static_points, profile_name, "/".join(map(str, wanted.as_tuple())),
        )
    return fixed


def _resolve_targets(be: Backend, profile: EngineProfile) -> list[Any]:
    """ComputeCapability members to set on the config (empty: the backend builds for the current GPU)."""
    if profile.targets_current_gpu:
        if cuda_device_count() == 0:
            known = ", ".join(name for name in be.compute_capability_names() if name != "CURRENT")
            alternative = (
                f"name the target architectures instead, e.g. compute_capabilities ['SM89'] ({be.display_name} "
                f"knows {known})" if known else "build on a GPU host, or use an rtx profile such as 'rtx-default'"
            )
            raise QVGGTError(
                f"profile {profile.name!r} targets compute capability CURRENT (the build machine's GPU), but no "
                f"CUDA GPU is visible here; {alternative}"
            )
        return [be.compute_capability("CURRENT")] if be.supports_compute_capabilities else []
    targets = [be.compute_capability(name) for name in profile.compute_capabilities]
    if be.needs_gpu_to_build and cuda_device_count() == 0:
        raise QVGGTError(
            f"{be.display_name} needs a CUDA GPU to build engines and none is visible here; use the 'rtx' "
            "backend (e.g. profile 'rtx-default') to build without a GPU"
        )
    return targets


def _timing_cache_path(profile: EngineProfile, engine_file: Path) -> Path | None:
    if profile.timing_cache is None:
        return None
    path = Path(profile.timing_cache).expanduser()
    # Relative to the engine, not the working directory: the cache then lives with the engines it served.
    return path if path.is_absolute() else engine_file.parent / path


# ----------------------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------------------


def _make_capturing_logger(trt: ModuleType) -> Any:
    """The engine stage's TensorRT logger (:mod:`qvggt_export.engine.trt_logger`), keeping the per-layer report."""
    return make_capturing_logger(trt, _trt_logger, keep_prefixes=_LAYER_RECORD_PREFIXES)


def _build_serialized(
    be: Backend,
    capture: Any,
    onnx_file: Path,
    input_name: str,
    profile: EngineProfile,
    targets: list[Any],
    hardware_level: Any,
    cache_path: Path | None,
) -> tuple[Any, dict[str, tuple[int, ...]], Any]:
    trt = be.trt
    try:
        builder = trt.Builder(capture)
    except (RuntimeError, TypeError) as exc:
        raise QVGGTError(f"could not create a {be.display_name} builder: {exc}{_errors_suffix(capture)}") from exc
    if builder is None:  # some versions return a null builder when CUDA cannot be initialised
        raise QVGGTError(f"could not create a {be.display_name} builder{_errors_suffix(capture)}")
    network = builder.create_network(be.network_flags(profile.strongly_typed))
    parser = trt.OnnxParser(network, capture)
    # parse_from_file (not parse(bytes)) so that external data next to the model resolves.
    if not parser.parse_from_file(str(onnx_file)):
        errors = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise QVGGTError(
            f"{be.display_name} {be.version} could not parse {onnx_file}:\n  "
            + "\n  ".join(errors[:_MAX_QUOTED_ERRORS] or _error_lines(capture) or ["(no error reported)"])
        )

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if input_name not in inputs:
        # The parser drops inputs nothing reads.
        raise QVGGTError(f"the parsed network has no input {input_name!r} (is it used?); inputs: {', '.join(inputs)}")
    shapes = {name: tuple(int(d) for d in tensor.shape) for name, tensor in inputs.items()}
    # The parser's view can differ from the ONNX declaration (e.g. a dim_param it resolved); check it again.
    ranges: dict[str, tuple[int, int, int]] = {"batch": (1, 1, 1), "frames": profile.frames.as_tuple()}
    if profile.points is not None:
        ranges["points"] = profile.points.as_tuple()
    profile_shapes = {}
    for name, shape in shapes.items():
        axes = _PROFILED_AXES.get("images" if name == input_name else name, {})
        dynamic = [axis for axis, dim in enumerate(shape) if dim < 0]
        unknown = [axis for axis in dynamic if axes.get(axis) not in ranges]
        if unknown:
            dims = tuple(None if d < 0 else d for d in shape)
            raise QVGGTError(_unprofiled_axis(onnx_file, name, unknown[0], dims, input_name))
        if dynamic:  # (min, opt, max) shapes: each dynamic axis from its range, static axes as they are
            profile_shapes[name] = [tuple(ranges[axes[axis]][k] if dim < 0 else dim for axis, dim in enumerate(shape))
                                    for k in range(3)]

    config = builder.create_builder_config()
    if profile_shapes:
        # TensorRT needs one optimization profile covering every dynamic input dimension.
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            optimization_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization_profile)
    # DETAILED makes the builder log its per-layer report, the only layer view available without a GPU.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if profile.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
    if targets:
        config.num_compute_capabilities = len(targets)
        for index, target in enumerate(targets):
            config.set_compute_capability(target, index)
    if profile.builder_optimization_level is not None:
        config.builder_optimization_level = profile.builder_optimization_level
    if hardware_level is not None:
        config.hardware_compatibility_level = hardware_level
    timing_cache = None
    if cache_path is not None:
        if be.supports_timing_cache:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            timing_cache = config.create_timing_cache(blob)
            config.set_timing_cache(timing_cache, False)  # False: refuse a cache from another GPU/version
            logger.debug("timing cache %s (%d bytes loaded)", cache_path, len(blob))
        else:
            logger.warning("timing_cache %s ignored: %s does not use timing caches", cache_path, be.display_name)

    try:
        serialized = builder.build_serialized_network(network, config)
    except (RuntimeError, TypeError) as exc:
        raise QVGGTError(f"{be.display_name} failed to build the engine: {exc}{_errors_suffix(capture)}") from exc
    if serialized is None:
        errors = _error_lines(capture)
        hint = ""
        if any("cudaError" in line or "CUDA driver" in line for line in errors):
            hint = (
                "\n(The builder needed a working CUDA GPU/driver. Without one, build with TensorRT-RTX for named "
                "compute capabilities, e.g. profile 'rtx-default'.)"
            )
        raise QVGGTError(
            f"{be.display_name} {be.version} failed to build an engine from {onnx_file}:\n  "
            + "\n  ".join(errors[:_MAX_QUOTED_ERRORS] or ["(no error reported)"])
            + hint
        )
    return serialized, shapes, timing_cache


def _format_parser_error(error: Any) -> str:
    def call(name: str) -> Any:
        method = getattr(error, name, None)
        return method() if callable(method) else None

    node, node_name, operator, desc = call("node"), call("node_name"), call("node_operator"), call("desc")
    where = []
    if node is not None and node >= 0:
        where.append(f"node {node}")
    if operator:
        where.append(str(operator))
    if node_name:
        where.append(repr(node_name))
    return f"{' '.join(where)}: {desc}" if where else str(desc)


def _error_lines(capture: Any) -> list[str]:
    return [msg for level, msg in capture.records if level <= ERROR]


def _errors_suffix(capture: Any) -> str:
    errors = _error_lines(capture)
    return (":\n  " + "\n  ".join(errors[:_MAX_QUOTED_ERRORS])) if errors else ""


# ----------------------------------------------------------------------------------------------------------
# Reading the result back
# ----------------------------------------------------------------------------------------------------------


def read_target_sms(engine_file: Path) -> tuple[str, ...]:
    """Architectures a TensorRT-RTX engine was compiled for (``("SM89",)``); empty when not recorded."""
    # mmap instead of read(): VGGT-1B engines are GBs; the regex scans pages without copying them.
    with open(engine_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        match = _ACCELERATORS_RE.search(view)
        # Copy the group while the map is open: a match object only references the mapped pages.
        listed = bytes(match.group(1)) if match is not None else b""
    return tuple(token.decode("ascii", "replace").upper() for token in listed.split())


def _layer_record(records: list[tuple[int, str]]) -> str | None:
    return next((msg for _level, msg in records if msg.startswith(_LAYER_RECORD_PREFIXES)), None)


def _rtx_layers(report: str) -> list[dict[str, Any]]:
    """TensorRT-RTX's per-layer report as ``{"name", "type", "datatypes", "onnx"}`` per layer (one line each)."""
    layers = []
    for line in report.splitlines():
        match = _RTX_LAYER_RE.match(line)
        if match is None:
            continue
        layers.append({
            "name": line[len("Name: "):match.start(1) - len(", LayerType: ")],
            "type": match.group(1).strip(),
            "datatypes": _DATATYPE_RE.findall(line.split("Outputs:")[0]),  # inputs then constants
            "onnx": _ONNX_LAYER_RE.findall(line),
        })
    return layers


def gemm_precision_report(report: str) -> dict[str, int]:
    """GEMM layers per ``"<activation type> x <weight type>"`` in a TensorRT-RTX per-layer report.

    The first two tensors of a gemm layer (inputs, then constants) are its operands; INT8 Q/DQ that fused
    shows as ``"Int8 x Int8"``. Empty for full TensorRT's report format (not parsed).
    """
    counts: Counter[str] = Counter()
    for layer in _rtx_layers(report):
        if layer["type"] == "gemm" and len(layer["datatypes"]) >= 2:
            counts[f"{layer['datatypes'][0]} x {layer['datatypes'][1]}"] += 1
    return dict(sorted(counts.items()))


def attention_report(report: str) -> dict[str, Any]:
    """How TensorRT-RTX built attention, from its per-layer report.

    A fused multi-head-attention kernel shows up as a layer named ``_gemm_mha_v2...`` (QK^T, softmax and PV
    in one kernel). An attention left unfused keeps its ONNX Softmax in a layer of its own type (``kgen``:
    a generated reduction kernel between two separate gemm layers). Measured with TensorRT-RTX 1.7.1: the
    exported MatMul -> Softmax -> MatMul pattern fuses in FP16 and stays unfused in FP32 (the float parts of
    a quantized VGGT graph are FP32 unless lowered with ``float16=True``).

    Returns:
        ``{"fused_mha_layers": n, "unfused_softmax_layers": k, "unfused_softmax_layer_types": {type: count}}``
        (unfused Softmax layers are recognised by the ONNX node name the exporter gives them); empty for
        full TensorRT's report format (not parsed).
    """
    layers = _rtx_layers(report)
    if not layers:
        return {}
    mha = [layer for layer in layers if "_mha" in layer["name"].lower()]
    softmax = [layer for layer in layers if "_mha" not in layer["name"].lower()
               and any("Softmax" in name for name in layer["onnx"])]
    return {"fused_mha_layers": len(mha), "unfused_softmax_layers": len(softmax),
            "unfused_softmax_layer_types": dict(Counter(layer["type"] for layer in softmax))}


def _layer_report(records: list[tuple[int, str]]) -> tuple[int | None, dict[str, int]]:
    for _level, msg in records:
        if msg.startswith(_LAYER_RECORD_PREFIXES):
            types = _RTX_LAYER_RE.findall(msg) or _TRT_LAYER_RE.findall(msg)
            counts = Counter(layer_type.strip() for layer_type in types)
            return len(types), dict(sorted(counts.items()))
    return None, {}


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` so that readers see the old file or the complete new one, never a partial one
    (:func:`qvggt_export.io.atomic_write`), then fsync the folder so that the rename survives a crash."""
    from qvggt_export.io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable on POSIX; Windows cannot open directories, and there it is best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard_outputs(engine_file: Path, profile_path: Path) -> None:
    for path in (engine_file, profile_path):
        if path.is_file():
            logger.warning("removing %s: the build failed and a stale file must not pass for its output", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _log_text(header: dict[str, Any], records: list[tuple[int, str]], outcome: str) -> str:
    lines = ["# qvggt-export engine build log"]
    lines += [f"# {key}: {json.dumps(value) if isinstance(value, dict) else value}" for key, value in header.items()]
    lines.append(f"# result: {outcome}")
    lines += [f"[{_SEVERITY_TAGS.get(level, '?')}] {msg}" for level, msg in records]
    return "\n".join(lines) + "\n"


def _write_log_quietly(log_path: Path, header: dict[str, Any], records: list[tuple[int, str]], outcome: str) -> None:
    # The log is a by-product: failing to write it must neither hide a build error nor fail a good build.
    try:
        _write_atomic(log_path, _log_text(header, records, outcome).encode("utf-8"))
    except OSError as exc:
        logger.warning("could not write build log %s: %s", log_path, exc)
