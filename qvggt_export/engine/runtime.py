"""Run a built TensorRT / TensorRT-RTX engine on a CUDA GPU with torch tensors in and out.

:class:`QVGGTEngine` loads an engine written by :func:`~qvggt_export.engine.build.build_engine` and runs it::

    from qvggt_export.engine.runtime import QVGGTEngine

    with QVGGTEngine("engines/vggt_w8a8.engine") as engine:
        predictions = engine.infer(images)  # images [S, 3, H, W] or [1, S, 3, H, W], float in [0, 1]
        depth = predictions["depth"]          # the same keys as the PyTorch model's dense outputs

    # A tracking engine (built from track.onnx) also takes the query points, pixel (x, y) in frame 0:
    with QVGGTEngine("out/track.engine") as tracker:
        tracks = tracker.infer(images, query_points)  # query_points [N, 2] or [1, N, 2]
        tracks["track"], tracks["vis"], tracks["conf"]  # [1, S, N, 2], [1, S, N], [1, S, N]

Running an engine needs an NVIDIA GPU and driver (building one with TensorRT-RTX does not). Everything that can
be checked without one is checked first, in this order, and each failure is a :class:`QVGGTError` that says what
was expected: the file exists and is not empty; the backend (from ``<engine>.profile.json`` for ``"auto"``) is
installed; the file's header is an engine header of the installed TensorRT version (TensorRT-RTX's
``get_engine_validity``; full TensorRT reports the same at deserialization); a CUDA GPU is visible; the GPU is one
the engine was compiled for. Then the Hadamard plugin is registered if the engine uses it, the engine is
deserialized and its inputs and outputs are checked. A failed constructor leaves no engine, context or GPU
buffer behind (only the plugin's registration, which is process-wide and idempotent, outlives it).

:func:`check_images_shape` and :func:`check_points_shape` (the input checks of :meth:`QVGGTEngine.infer`) and the
log classification are pure functions, tested without a GPU; so is the binding of a tracking engine's second
input, ``query_points``, on stand-in contexts (``tests/engine/test_track_engine.py``).
:func:`polygraphy_runner` wraps a full-TensorRT engine in Polygraphy's ``TrtRunner`` for the parity checker.

Neither TensorRT nor torch is imported when this module is imported: the engine constructor imports them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from qvggt_export.engine.backend import Backend, cuda_device_count, load_backend
from qvggt_export.engine.build import read_target_sms
from qvggt_export.engine.layout import (
    BATCH_AXIS,
    CHANNEL_AXIS,
    CHANNELS,
    FRAME_AXIS,
    HEIGHT_AXIS,
    IMAGE_RANK,
    POINTS_AXIS,
    POINTS_INPUT,
    POINTS_RANK,
    WIDTH_AXIS,
)
from qvggt_export.engine.trt_logger import ERROR, make_capturing_logger
from qvggt_export.errors import MissingDependencyError, QVGGTError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EngineSpec",
    "QVGGTEngine",
    "TensorSpec",
    "check_images_shape",
    "check_points_shape",
    "polygraphy_runner",
]

logger = logging.getLogger(__name__)
# TensorRT's own messages go to a child logger, as in build.py, so users can silence or raise them separately.
_trt_logger = logging.getLogger(__name__ + ".tensorrt")

_PROFILE_SUFFIX = ".profile.json"
_BUILD_LOG_SUFFIX = ".build.log"
_BUILD_LOG_BACKEND = "# backend: "  # header line of <engine>.build.log written by build_engine

# images [B, S, 3, H, W]; B is 1 (build_engine pins a dynamic batch axis to 1).
# The input layout, shared with the builder's graph check (qvggt_export.engine.layout).
_IMAGE_RANK, _CHANNELS = IMAGE_RANK, CHANNELS
_BATCH_AXIS, _FRAME_AXIS, _CHANNEL_AXIS, _HEIGHT_AXIS, _WIDTH_AXIS = (BATCH_AXIS, FRAME_AXIS, CHANNEL_AXIS,
                                                                      HEIGHT_AXIS, WIDTH_AXIS)
# query_points [B, N, 2] of a tracking engine (track.onnx); B is 1 as for images.
_POINTS_INPUT, _POINTS_RANK, _POINTS_AXIS = POINTS_INPUT, POINTS_RANK, POINTS_AXIS

_ERROR = ERROR  # ILogger severities: qvggt_export.engine.trt_logger
_MAX_RECORDS = 256  # the capture is a ring: an engine that runs for days must not grow it
_MAX_QUOTED = 4


# What TensorRT logs when a file is not an engine at all (or an engine of a format this runtime cannot even
# parse): TensorRT-RTX's header check, and the magic-tag assertion of both flavours.
_MALFORMED_RE = re.compile(r"does not conform to the expected format|magic ?tag", re.IGNORECASE)
# What it logs when the file is an engine of another version. Examples (TensorRT-RTX 1.7, TensorRT 8/10):
#   "The engine has been created with TensorRT-RTX version 1.6.0, but the current runtime is ... 1.7.1"
#   "Version tag does not match. Note: Current Version: 213, Serialized Engine Version: 205"
#   "The engine plan file is not compatible with this version of TensorRT, expecting library version 10.3 got ..."
_VERSION_RE = re.compile(
    r"created with \S+ version|version tag does not match|not compatible with this version|"
    r"expecting library version|rebuild the engine with the same version",
    re.IGNORECASE,
)

# TensorRT-RTX 1.x engine header: magic, then (at byte 16) the engine's length in bytes (observed on 1.7.1).
_RTX_MAGIC = b"vtrt"
_RTX_LENGTH_OFFSET = 16

# TensorRT DataType names -> torch dtype attribute names. FP4/INT4 I/O tensors have no torch dtype.
_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}


# ----------------------------------------------------------------------------------------------------------
# What an engine takes and returns
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One I/O tensor of an engine.

    Attributes:
        name: Tensor name (the ONNX graph's input/output name).
        dtype: TensorRT ``DataType`` name, e.g. ``"FLOAT"``.
        shape: Shape as the engine declares it; ``-1`` marks a dimension set at run time.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class EngineSpec:
    """The inputs and the outputs of a VGGT engine.

    Attributes:
        input: The ``images`` input [1, S, 3, H, W].
        outputs: The outputs in engine order (``pose_enc``, ``depth``, ... as exported; ``track``, ``vis``,
            ``conf`` for a tracking engine).
        frames: ``(min, opt, max)`` frame counts of the optimization profile (all equal for a static S).
        points_input: The ``query_points`` input [1, N, 2] of a tracking engine; ``None`` otherwise.
        points: ``(min, opt, max)`` query-point counts of a tracking engine (all equal for a static N).
    """

    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    frames: tuple[int, int, int]
    points_input: TensorSpec | None = None
    points: tuple[int, int, int] | None = None

    @property
    def resolution(self) -> tuple[int, int]:
        """``(H, W)``, fixed per engine."""
        return self.input.shape[_HEIGHT_AXIS], self.input.shape[_WIDTH_AXIS]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(output.name for output in self.outputs)


def check_images_shape(
    shape: Sequence[int], resolution: tuple[int, int], frames: tuple[int, int] | tuple[int, int, int]
) -> int:
    """Check an image batch against what an engine accepts and return its frame count S.

    Args:
        shape: Shape of the images, ``[S, 3, H, W]`` or ``[1, S, 3, H, W]``.
        resolution: The engine's ``(H, W)``.
        frames: ``(min, max)`` or ``(min, opt, max)`` frame counts of the engine's optimization profile.

    Returns:
        S.

    Raises:
        QVGGTError: Wrong rank, batch, channels or resolution, or S outside the profile's range; the message
            names what the engine accepts.
    """
    shape = tuple(int(d) for d in shape)
    height, width = resolution
    low, high = frames[0], frames[-1]
    expected = f"[S, 3, {height}, {width}] or [1, S, 3, {height}, {width}] with {low} <= S <= {high}"
    if len(shape) == _IMAGE_RANK - 1:
        shape = (1, *shape)
    elif len(shape) != _IMAGE_RANK:
        raise QVGGTError(f"images have shape {list(shape)}; expected {expected}")
    if shape[_BATCH_AXIS] != 1:
        raise QVGGTError(
            f"images have shape {list(shape)}: a batch of {shape[_BATCH_AXIS]} sequences; the engine runs one "
            f"sequence at a time, expected {expected}"
        )
    if shape[_CHANNEL_AXIS] != _CHANNELS:
        raise QVGGTError(f"images have {shape[_CHANNEL_AXIS]} channels (shape {list(shape)}); expected {expected}")
    if (shape[_HEIGHT_AXIS], shape[_WIDTH_AXIS]) != (height, width):
        raise QVGGTError(
            f"images are {shape[_HEIGHT_AXIS]}x{shape[_WIDTH_AXIS]} (H x W) but the engine was built for "
            f"{height}x{width}, its only resolution; preprocess the images to {height}x{width} "
            "(qvggt_export.model.preprocess) or export and build an engine for this resolution"
        )
    count = shape[_FRAME_AXIS]
    _require_in_profile(count, low, high, "frames", "Use that many, or rebuild the engine with a profile whose "
                        f"frames range includes {count}")
    return count


def _require_in_profile(count: int, low: int, high: int, noun: str, remedy: str) -> None:
    if not low <= count <= high:
        allowed = f"exactly {low}" if low == high else f"{low} to {high}"
        unit = noun.split()[-1]
        raise QVGGTError(f"got {count} {noun}; the engine's optimization profile accepts {allowed} {unit}. {remedy}")


def check_points_shape(shape: Sequence[int], points: tuple[int, int] | tuple[int, int, int]) -> int:
    """Check query points against what a tracking engine accepts and return their count N.

    Args:
        shape: Shape of the points, ``[N, 2]`` or ``[1, N, 2]`` (pixel x, y in frame 0).
        points: ``(min, max)`` or ``(min, opt, max)`` point counts of the engine's optimization profile.

    Returns:
        N.

    Raises:
        QVGGTError: Wrong rank, batch or last axis, or N outside the profile's range; the message names what the
            engine accepts.
    """
    shape = tuple(int(d) for d in shape)
    low, high = points[0], points[-1]
    expected = f"[N, 2] or [1, N, 2] (pixel x, y in frame 0) with {low} <= N <= {high}"
    if len(shape) == _POINTS_RANK - 1:
        shape = (1, *shape)
    if len(shape) != _POINTS_RANK or shape[-1] != 2:
        raise QVGGTError(f"query points have shape {list(shape)}; expected {expected}")
    if shape[_BATCH_AXIS] != 1:
        raise QVGGTError(f"query points have shape {list(shape)}: a batch of {shape[_BATCH_AXIS]}; the engine runs "
                         f"one sequence at a time, expected {expected}")
    count = shape[_POINTS_AXIS]
    _require_in_profile(count, low, high, "query points", f"Split them into calls of at most {high}, or rebuild "
                        f"the engine with a profile whose points range includes {count}")
    return count


def _profile_range(engine: Any, tensor: TensorSpec, axis: int) -> tuple[int, int, int]:
    """``(min, opt, max)`` of one axis of an input: from optimization profile 0 when dynamic, else the static size."""
    if all(d >= 0 for d in tensor.shape):
        return (tensor.shape[axis],) * 3
    low, opt, high = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(tensor.name, 0))
    if (low[_BATCH_AXIS], high[_BATCH_AXIS]) != (1, 1):
        raise QVGGTError(
            f"engine input {tensor.name!r} accepts batches of {low[_BATCH_AXIS]} to {high[_BATCH_AXIS]}; "
            "this runtime runs one sequence (batch 1) at a time"
        )
    return (low[axis], opt[axis], high[axis])


def _read_spec(engine: Any, trt: ModuleType) -> EngineSpec:
    """Read and check the I/O tensors of a deserialized engine (TensorRT 10 / TensorRT-RTX tensor API).

    Raises:
        QVGGTError: Not one image input [1|-1, S, 3, H, W] with a static resolution (plus, for a tracking engine,
            ``query_points`` [1|-1, N, 2]), no outputs, or a batch range other than 1.
    """
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        spec = TensorSpec(name, engine.get_tensor_dtype(name).name, shape)
        mode = engine.get_tensor_mode(name)
        if mode == trt.TensorIOMode.INPUT:
            inputs.append(spec)
        elif mode == trt.TensorIOMode.OUTPUT:
            outputs.append(spec)
    points_inputs = [t for t in inputs if t.name == _POINTS_INPUT]
    image_inputs = [t for t in inputs if t.name != _POINTS_INPUT]
    if len(image_inputs) != 1:
        listed = ", ".join(f"{t.name} {list(t.shape)}" for t in inputs) or "none"
        raise QVGGTError(f"the engine has inputs {listed}; a VGGT engine has one, images [1, S, 3, H, W] (a "
                         f"tracking engine also {_POINTS_INPUT} [1, N, 2])")
    (image,) = image_inputs
    shape = image.shape
    expected = "[1, S, 3, H, W] with a fixed H and W"
    if len(shape) != _IMAGE_RANK or shape[_CHANNEL_AXIS] != _CHANNELS:
        raise QVGGTError(f"engine input {image.name!r} has shape {list(shape)}; expected {expected}")
    if shape[_HEIGHT_AXIS] <= 0 or shape[_WIDTH_AXIS] <= 0:
        raise QVGGTError(f"engine input {image.name!r} has a dynamic resolution {list(shape)}; expected {expected}")
    if not outputs:
        raise QVGGTError("the engine has no outputs")

    if shape[_BATCH_AXIS] >= 0 and shape[_BATCH_AXIS] != 1:
        raise QVGGTError(f"engine input {image.name!r} has shape {list(shape)}; expected {expected}")
    frames = _profile_range(engine, image, _FRAME_AXIS)
    if not points_inputs:
        return EngineSpec(input=image, outputs=tuple(outputs), frames=frames)
    (points_input,) = points_inputs
    points_shape = points_input.shape
    if len(points_shape) != _POINTS_RANK or points_shape[-1] != 2 or points_shape[_BATCH_AXIS] not in (-1, 1):
        raise QVGGTError(f"engine input {_POINTS_INPUT!r} has shape {list(points_shape)}; expected [1, N, 2]")
    points = _profile_range(engine, points_input, _POINTS_AXIS)
    return EngineSpec(input=image, outputs=tuple(outputs), frames=frames, points_input=points_input, points=points)


def _torch_dtype(trt_dtype: str) -> torch.dtype:
    import torch

    name = _TORCH_DTYPES.get(trt_dtype)
    if name is None or not hasattr(torch, name):
        raise QVGGTError(f"engine tensors of type {trt_dtype} have no torch equivalent; export with float I/O")
    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------------------
# Checks that need no GPU
# ----------------------------------------------------------------------------------------------------------


def _check_engine_file(path: str | os.PathLike[str]) -> Path:
    engine_file = Path(path)
    if not engine_file.exists():
        raise QVGGTError(f"engine {engine_file} does not exist (build one with qvggt_export.engine.build_engine)")
    if not engine_file.is_file():
        raise QVGGTError(f"engine {engine_file} is not a file")
    if engine_file.stat().st_size == 0:
        raise QVGGTError(f"engine {engine_file} is empty, not a TensorRT engine")
    return engine_file


def _profile_backend(engine_file: Path) -> str | None:
    """The backend recorded in ``<engine>.profile.json`` by build_engine, if that file is there and readable."""
    profile = engine_file.with_name(engine_file.name + _PROFILE_SUFFIX)
    try:
        backend = json.loads(profile.read_text(encoding="utf-8")).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if backend in ("rtx", "trt") else None


def _built_with(engine_file: Path) -> str | None:
    """``"TensorRT-RTX 1.7.1.116"`` from the header of ``<engine>.build.log``, if present."""
    log = engine_file.with_name(engine_file.name + _BUILD_LOG_SUFFIX)
    with contextlib.suppress(OSError, UnicodeDecodeError), open(log, encoding="utf-8") as handle:
        for line in itertools.islice(handle, 16):
            if line.startswith(_BUILD_LOG_BACKEND):
                return line[len(_BUILD_LOG_BACKEND):].strip() or None
    return None


def _uses_plugin(engine_file: Path) -> bool:
    # The plugin's serialized creator name and namespace (qvggt_export.engine.runtimes); scanning an engine does
    # not import the plugin package. Layer names of a plugin-free engine ("Hadamard_64/...") do not match.
    from qvggt_export.engine.runtimes import uses_plugin

    return uses_plugin(engine_file)


def _classify_log(messages: Sequence[str]) -> tuple[str, str] | None:
    """``("malformed" | "version", message)`` for the first TensorRT message that explains a refused engine."""
    for message in messages:
        if _MALFORMED_RE.search(message):
            return "malformed", message
    for message in messages:
        if _VERSION_RE.search(message):
            return "version", message
    return None


def _resolve_backend(engine_file: Path, backend: str) -> Backend:
    if backend != "auto":
        return load_backend(backend)
    recorded = _profile_backend(engine_file)
    # An engine only loads in the flavour that built it; the profile beside it says which one that was.
    return load_backend(recorded if recorded is not None else "auto")


def _device_index(device: int | str | torch.device) -> int:
    """CUDA device ordinal of ``device`` (0, "cuda", "cuda:1", torch.device), checked without touching CUDA."""
    if isinstance(device, bool):
        raise QVGGTError(f"device must be a CUDA device index or name such as 'cuda:0', got {device!r}")
    if isinstance(device, int):
        index = device
    else:
        import torch

        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise QVGGTError(f"device must be a CUDA device index or name such as 'cuda:0', got {device!r}") from exc
        if parsed.type != "cuda":
            raise QVGGTError(f"TensorRT engines run on CUDA devices; got device {device!r}")
        index = parsed.index if parsed.index is not None else 0
    if index < 0:
        raise QVGGTError(f"CUDA device index must be >= 0, got {index}")
    return index


def _no_gpu_error(detail: str) -> QVGGTError:
    return QVGGTError(
        f"running a TensorRT engine needs an NVIDIA GPU with its driver, and {detail}. Building engines works "
        "without one: TensorRT-RTX compiles for named GPU architectures (e.g. profile 'rtx-sm89'); copy the engine "
        "to a machine with a GPU of that architecture to run it"
    )


def _require_gpu(index: int) -> None:
    """Raise unless CUDA device ``index`` is usable through torch."""
    visible = cuda_device_count()
    if visible == 0:
        raise _no_gpu_error("no CUDA GPU is visible here (no NVIDIA driver, no device, or CUDA_VISIBLE_DEVICES "
                            "hides them)")
    import torch

    if not torch.cuda.is_available():
        raise QVGGTError(
            f"the NVIDIA driver sees {visible} GPU(s) but torch {torch.__version__} cannot use CUDA (a CPU-only "
            "build of torch?); install a CUDA build of torch to run engines"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise QVGGTError(f"CUDA device {index} does not exist; {count} device(s) are visible (0..{count - 1})")


def _check_target(engine_file: Path, targets: Sequence[str], gpu_sm: str, gpu_name: str) -> None:
    if targets and gpu_sm not in targets:
        raise QVGGTError(
            f"engine {engine_file} was compiled for {', '.join(targets)} but this GPU ({gpu_name}) is {gpu_sm}; "
            f"rebuild it with a profile whose compute_capabilities include {gpu_sm} (or 'CURRENT' on this machine)"
        )


# ----------------------------------------------------------------------------------------------------------
# TensorRT pieces (created lazily)
# ----------------------------------------------------------------------------------------------------------


def _make_capturing_logger(trt: ModuleType) -> Any:
    """The engine stage's TensorRT logger (:mod:`qvggt_export.engine.trt_logger`), as a bounded ring."""
    return make_capturing_logger(trt, _trt_logger, max_records=_MAX_RECORDS)


def _quote(lines: Sequence[str]) -> str:
    return ("\nTensorRT says:\n  " + "\n  ".join(lines[:_MAX_QUOTED])) if lines else ""


def _not_an_engine(engine_file: Path, be: Backend, message: str, recorded: str | None) -> QVGGTError:
    hint = ""
    if recorded is None and be.name == "rtx":
        hint = " If it is a full TensorRT engine, load it with backend='trt'."
    return QVGGTError(
        f"{engine_file} is not a {be.display_name} {be.version} engine: its header is not in the format this "
        f"runtime reads (not an engine file, an engine of another TensorRT flavour, or of a distant version).{hint}"
        + _quote([message])
    )


def _version_mismatch(engine_file: Path, be: Backend, message: str) -> QVGGTError:
    built = _built_with(engine_file)
    built_version = built.split()[-1] if built else None
    if built_version is None or built_version == be.version:
        # No build log, or one that predates the engine file (copied or rebuilt elsewhere): do not guess.
        by, install = "by another version", f"pip install '{be.package}==<that version>'"
    else:
        by, install = f"by {built} (per its build log)", f"pip install '{be.package}=={built_version}'"
    return QVGGTError(
        f"{engine_file} was built {by} and the installed {be.display_name} is {be.version}: an engine loads only in "
        f"the {be.display_name} version that built it. Rebuild it here with build_engine, or install that version "
        f"({install})." + _quote([message])
    )


def _validity_flags(trt: ModuleType, diagnostics: int) -> list[str]:
    enum = getattr(trt, "EngineInvalidityDiagnostics", None)
    if enum is None:
        return []
    return [name for name, member in enum.__members__.items() if diagnostics & int(member)]


def _create_runtime(be: Backend, capture: Any) -> Any:
    try:
        runtime = be.trt.Runtime(capture)
    except (RuntimeError, TypeError) as exc:
        raise QVGGTError(f"could not create a {be.display_name} runtime: {exc}" + _quote(capture.since(0, _ERROR))
                         ) from exc
    if runtime is None:
        raise QVGGTError(f"could not create a {be.display_name} runtime" + _quote(capture.since(0, _ERROR)))
    return runtime


def _check_header(engine_file: Path, be: Backend, runtime: Any, capture: Any, recorded: str | None) -> tuple[Any, int]:
    """TensorRT-RTX's header check (no GPU needed): raise for a non-engine or another version's engine.

    Returns:
        ``(EngineValidity, diagnostics bit mask)``, for the checks that need the GPU. Without a GPU the state is
        INVALID with no diagnostics (the check cannot read the GPU's properties).
    """
    header_size = int(getattr(runtime, "engine_header_size", 0) or 4096)
    with open(engine_file, "rb") as handle:
        header = handle.read(header_size)
    mark = capture.count
    state, diagnostics = runtime.get_engine_validity(header)
    flags = _validity_flags(be.trt, int(diagnostics))
    verdict = _classify_log(capture.since(mark))
    if "MALFORMED_ENGINE" in flags or (verdict is not None and verdict[0] == "malformed"):
        raise _not_an_engine(engine_file, be, verdict[1] if verdict else "malformed engine header", recorded)
    if "VERSION_MISMATCH" in flags or (verdict is not None and verdict[0] == "version"):
        raise _version_mismatch(engine_file, be, verdict[1] if verdict else "engine version mismatch")
    return state, int(diagnostics)


def _check_rtx_length(engine_file: Path) -> None:
    """Refuse a truncated (or padded) TensorRT-RTX engine before anything is deserialized.

    The header check reads only the first bytes, so a half-copied engine passes it and would fail (or crash)
    deep inside deserialization. A TensorRT-RTX 1.x engine starts with the magic ``vtrt`` and records its
    own length as a little-endian uint64 at byte 16 (observed on 1.7.1; files with another magic, such as
    full TensorRT's, are not checked here).
    """
    with open(engine_file, "rb") as handle:
        head = handle.read(_RTX_LENGTH_OFFSET + 8)
    if len(head) < _RTX_LENGTH_OFFSET + 8 or head[:4] != _RTX_MAGIC:
        return
    recorded = int.from_bytes(head[_RTX_LENGTH_OFFSET:_RTX_LENGTH_OFFSET + 8], "little")
    actual = engine_file.stat().st_size
    if recorded != actual:
        what = "truncated" if actual < recorded else "longer than its header says (trailing bytes)"
        raise QVGGTError(
            f"{engine_file} is {what}: its header records {recorded} bytes but the file has {actual}. The copy is "
            "incomplete or corrupt; copy it again or rebuild it with build_engine"
        )


@dataclass
class _Bindings:
    """Device buffers for one frame count (and point count, for a tracking engine); their addresses stay fixed
    while the engine holds them.

    ``context`` is the engine's shared execution context, or (manual CUDA graphs) one dedicated to this frame
    count: a captured graph bakes in the shapes, addresses and host-side state of the context it was captured
    from, so replaying it after that context was set to another shape would be wrong.
    """

    frames: int
    input: torch.Tensor
    outputs: dict[str, torch.Tensor]
    context: Any
    dedicated: bool = False
    points: int | None = None  # query points of a tracking engine
    points_input: torch.Tensor | None = None
    graph: Any = None  # torch.cuda.CUDAGraph captured for this frame count (manual CUDA graphs only)
    capture_failed: bool = False

    @property
    def key(self) -> int | tuple[int, int]:
        """S, or (S, N) for a tracking engine: what the engine keys its buffers by."""
        return self.frames if self.points is None else (self.frames, self.points)


def _graph_context(engine: Any, trt: ModuleType, scratch: torch.Tensor | None, device: torch.device,
                   stream: torch.cuda.Stream) -> tuple[Any, torch.Tensor | None]:
    """An execution context for one frame count's CUDA graph, and the activation memory it uses.

    All such contexts share one activation buffer (``USER_MANAGED``): their executions are serialised on the
    engine's stream, so one buffer of the engine's maximum size serves every frame count.
    """
    import torch

    strategies = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategies is None or not hasattr(engine, "device_memory_size_v2"):
        return engine.create_execution_context(), scratch
    context = engine.create_execution_context(strategies.USER_MANAGED)
    if context is None:
        return None, scratch
    size = int(engine.device_memory_size_v2)
    if scratch is None or scratch.numel() < size:
        with torch.cuda.stream(stream):  # torch's allocator aligns to 512 bytes; TensorRT asks for 256
            scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    context.set_device_memory(scratch.data_ptr(), size)
    return context, scratch


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------


class QVGGTEngine:
    """A deserialized VGGT engine on one CUDA GPU, run with torch tensors.

    The engine takes ``images`` [1, S, 3, H, W] (float in [0, 1]; ImageNet normalisation is inside the graph)
    and returns the exported dense outputs (``pose_enc``, ``depth``, ``depth_conf``, ``world_points``,
    ``world_points_conf``, as the model's heads provide), keyed as in the PyTorch model's output dict. A tracking
    engine (built from ``track.onnx``) also takes ``query_points`` [1, N, 2] and returns ``track``, ``vis`` and
    ``conf``.

    Device buffers are allocated once per frame count S (per (S, N) for a tracking engine) and reused (fixed
    addresses, which CUDA graphs need). Without ``cuda_graph`` only the buffers of the latest shape are kept;
    with it, those of every shape seen.

    Not thread-safe to share between threads beyond the internal lock, which serialises :meth:`infer` calls.

    Args:
        path: The engine file (``<engine>.profile.json`` beside it, if present, names the backend that built it).
        backend: ``"auto"`` (the one recorded beside the engine, else TensorRT-RTX if installed, else TensorRT),
            ``"rtx"`` or ``"trt"``. An engine loads only in the flavour and version that built it.
        device: CUDA device: index, ``"cuda:N"`` or ``torch.device``.
        cuda_graph: Replay each frame count's (tracking engines: each (S, N)'s) execution as a CUDA graph.
            TensorRT-RTX captures and replays natively (``CudaGraphStrategy.WHOLE_GRAPH_CAPTURE``); with full
            TensorRT the first call per S runs
            normally and is then captured with ``torch.cuda.CUDAGraph`` (skipped, with a warning, if TensorRT
            reports the context not capturable).

    Raises:
        QVGGTError: Missing or empty file; not an engine; an engine of another TensorRT version; no CUDA GPU
            (or a CPU-only torch); a GPU the engine was not compiled for; deserialization failure (the message
            quotes TensorRT); unexpected inputs.
        MissingDependencyError: The backend's package is not installed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: str = "auto",
        device: int | str | torch.device = 0,
        *,
        cuda_graph: bool = False,
    ) -> None:
        self._closed = True  # until the end of __init__, so that close() of a half-built object does nothing
        engine_file = _check_engine_file(path)
        index = _device_index(device)
        be = _resolve_backend(engine_file, backend)
        trt = be.trt
        recorded = _profile_backend(engine_file)
        capture = _make_capturing_logger(trt)

        # 1. The header, on any machine (TensorRT-RTX reads it without a GPU).
        runtime = None
        validity: tuple[Any, int] | None = None
        if hasattr(trt.Runtime, "get_engine_validity"):
            runtime = _create_runtime(be, capture)
            validity = _check_header(engine_file, be, runtime, capture, recorded)
        if be.name == "rtx":
            _check_rtx_length(engine_file)

        # 2. The GPU.
        _require_gpu(index)
        import torch

        torch_device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(torch_device)
        gpu_name = torch.cuda.get_device_name(torch_device)
        if be.name == "rtx":
            _check_target(engine_file, read_target_sms(engine_file), f"SM{major}{minor}", gpu_name)
        if validity is not None:
            state, diagnostics = validity
            if state == trt.EngineValidity.INVALID:
                flags = _validity_flags(trt, diagnostics)
                raise QVGGTError(
                    f"{be.display_name} {be.version} cannot run {engine_file} on {gpu_name} (SM{major}{minor}): "
                    f"{', '.join(flags) or 'engine reported invalid'}. UNSUPPORTED_CC: rebuild for this GPU; "
                    "OLD_CUDA_DRIVER/OLD_CUDA_RUNTIME: update the driver/CUDA; INSUFFICIENT_GPU_MEMORY: free memory "
                    "or use a smaller engine" + _quote(capture.since(0, _ERROR))
                )
            if state == trt.EngineValidity.SUBOPTIMAL:
                logger.warning("%s reports %s as suboptimal on %s (%s)", be.display_name, engine_file, gpu_name,
                               ", ".join(_validity_flags(trt, diagnostics)) or "no detail")

        # 3. Plugins, then the engine itself.
        if _uses_plugin(engine_file):
            from qvggt_export.plugins import register

            register(be.name)  # the engine stores the plugin's identity only; its creator must be registered
        if runtime is None:
            runtime = _create_runtime(be, capture)
        mark = capture.count
        with torch.cuda.device(torch_device):
            engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
            if engine is None:
                lines = capture.since(mark)
                verdict = _classify_log(lines)
                if verdict is not None and verdict[0] == "malformed":
                    raise _not_an_engine(engine_file, be, verdict[1], recorded)
                if verdict is not None:
                    raise _version_mismatch(engine_file, be, verdict[1])
                raise QVGGTError(f"{be.display_name} {be.version} could not deserialize {engine_file}"
                                 + _quote(capture.since(mark, _ERROR) or lines))
            spec = _read_spec(engine, trt)
            for tensor in (spec.input, *((spec.points_input,) if spec.points_input else ()), *spec.outputs):
                _torch_dtype(tensor.dtype)  # fail now, not at the first call
            stream = torch.cuda.Stream(device=torch_device)
            native_graph = cuda_graph and hasattr(trt, "CudaGraphStrategy") and hasattr(engine, "create_runtime_config")
            manual_graph = cuda_graph and not native_graph
            scratch = None
            mark = capture.count
            if native_graph:
                # TensorRT-RTX captures per shape itself, after its JIT has specialised the kernels for it.
                runtime_config = engine.create_runtime_config()
                runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                context = engine.create_execution_context(runtime_config)
            elif manual_graph:
                context, scratch = _graph_context(engine, trt, None, torch_device, stream)
            else:
                context = engine.create_execution_context()
            if context is None:
                raise QVGGTError(f"{be.display_name} could not create an execution context for {engine_file} on "
                                 f"{gpu_name}" + _quote(capture.since(mark, _ERROR)))

        self._path = engine_file
        self._backend = be
        self._capture = capture
        self._runtime = runtime
        self._engine = engine
        self._context = context
        self._spec = spec
        self._device = torch_device
        self._stream = stream
        self._cuda_graph = cuda_graph
        self._manual_graph = manual_graph
        self._scratch = scratch  # activation memory shared by the per-frame-count contexts (manual graphs)
        self._spare_context = context if manual_graph else None  # the first frame count's dedicated context
        self._bindings: dict[int, _Bindings] = {}
        self._active: int | tuple[int, int] | None = None  # the shape key whose shapes and addresses the context holds
        self._lock = threading.Lock()
        self._closed = False
        logger.info("loaded %s engine %s on %s (%s): frames %s, resolution %sx%s, outputs %s", be.display_name,
                    engine_file, torch_device, gpu_name, "/".join(map(str, spec.frames)), *spec.resolution,
                    ", ".join(spec.output_names))

    # -- properties --------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def backend(self) -> str:
        """``"rtx"`` or ``"trt"``."""
        return self._backend.name

    @property
    def backend_version(self) -> str:
        return self._backend.version

    @property
    def spec(self) -> EngineSpec:
        return self._spec

    @property
    def input_name(self) -> str:
        return self._spec.input.name

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._spec.output_names

    @property
    def frames(self) -> tuple[int, int, int]:
        """``(min, opt, max)`` frame counts the engine accepts."""
        return self._spec.frames

    @property
    def points(self) -> tuple[int, int, int] | None:
        """``(min, opt, max)`` query-point counts of a tracking engine; ``None`` for an engine without them."""
        return self._spec.points

    @property
    def resolution(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self._spec.resolution

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def stream(self) -> torch.cuda.Stream:
        """The CUDA stream the engine runs on (the caller's stream waits for it after each call)."""
        return self._stream

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._device}"
        return f"QVGGTEngine({str(self._path)!r}, backend={self._backend.name!r}, {state})"

    # -- running -----------------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, query_points: torch.Tensor | None = None, *,
                 copy: bool = True) -> dict[str, torch.Tensor]:
        return self.infer(images, query_points, copy=copy)

    def infer(self, images: torch.Tensor, query_points: torch.Tensor | None = None, *,
              copy: bool = True) -> dict[str, torch.Tensor]:
        """Run the engine on one sequence.

        Ordered like ordinary torch work: the engine's stream waits for the caller's current stream before
        reading ``images``, and the caller's stream waits for the engine before it can read the results; the
        host does not block.

        Args:
            images: ``[S, 3, H, W]`` or ``[1, S, 3, H, W]`` floating-point images in [0, 1], on the CPU or any
                CUDA device; converted to the engine's input dtype.
            query_points: For a tracking engine (and only for one): ``[N, 2]`` or ``[1, N, 2]`` floating-point
                pixel coordinates (x, y) in frame 0, on the CPU or any CUDA device.
            copy: Return fresh tensors (default). With ``False`` the engine's own output buffers are returned:
                no copy, but the next call with the same S (and N) overwrites them.

        Returns:
            Output name -> CUDA tensor on the engine's device, shapes with batch 1 as the model's (e.g.
            ``depth`` [1, S, H, W, 1]).

        Raises:
            QVGGTError: Not a floating-point tensor, a shape the engine does not accept (the message gives the
                allowed frame or point range and resolution), query points missing for a tracking engine or given
                to another engine, the engine is closed, or TensorRT fails to enqueue.
        """
        import torch

        if not isinstance(images, torch.Tensor):
            raise QVGGTError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise QVGGTError(
                f"images have dtype {images.dtype}; expected floating point in [0, 1] (divide uint8 images by 255)"
            )
        frames = check_images_shape(tuple(images.shape), self.resolution, self.frames)
        key: int | tuple[int, int] = frames
        if self._spec.points is None:
            if query_points is not None:
                raise QVGGTError(f"engine {self._path} has no {_POINTS_INPUT} input (not a tracking engine); call "
                                 "infer(images) without query points, or load the track.engine built beside it")
        else:
            if query_points is None:
                raise QVGGTError(f"engine {self._path} is a tracking engine: infer(images, query_points) needs the "
                                 "query points [N, 2] or [1, N, 2], pixel (x, y) in frame 0")
            if not isinstance(query_points, torch.Tensor) or not query_points.is_floating_point():
                found = query_points.dtype if isinstance(query_points, torch.Tensor) else type(query_points).__name__
                raise QVGGTError(f"query points must be a floating-point torch.Tensor (pixel x, y), got {found}")
            key = (frames, check_points_shape(tuple(query_points.shape), self._spec.points))
        with self._lock:
            if self._closed:
                raise QVGGTError(f"engine {self._path} is closed")
            with torch.cuda.device(self._device):
                caller = torch.cuda.current_stream(self._device)
                bindings = self._bindings_for(key)
                sources = [(images, bindings.input)]
                if query_points is not None and bindings.points_input is not None:
                    sources.append((query_points, bindings.points_input))
                # Peer copies (ordered by torch) for tensors on another GPU than the engine's.
                sources = [(x.to(self._device) if x.is_cuda and x.device != self._device else x, buffer)
                           for x, buffer in sources]
                self._stream.wait_stream(caller)
                for source, _ in sources:
                    if source.is_cuda:
                        source.record_stream(self._stream)  # the caller may free it before our copy has run
                with torch.cuda.stream(self._stream):
                    for source, buffer in sources:
                        buffer.copy_(source.reshape(buffer.shape), non_blocking=True)
                    self._run(bindings)
                caller.wait_stream(self._stream)
                if not copy:
                    return dict(bindings.outputs)
                return {name: tensor.clone() for name, tensor in bindings.outputs.items()}

    def _bindings_for(self, key: int | tuple[int, int]) -> _Bindings:
        """The buffers of one shape key: S, or (S, N) for a tracking engine."""
        import torch

        found = self._bindings.get(key)
        if found is not None:
            return found
        frames, points = key if isinstance(key, tuple) else (key, None)
        if not self._cuda_graph:
            self._bindings.clear()  # keep one shape's buffers
            self._active = None
        spec = self._spec
        if self._manual_graph:
            context, dedicated = self._spare_context, True
            self._spare_context = None
            if context is None:
                mark = self._capture.count
                context, self._scratch = _graph_context(self._engine, self._backend.trt, self._scratch, self._device,
                                                        self._stream)
                if context is None:
                    raise QVGGTError(f"{self._backend.display_name} could not create an execution context for "
                                     f"shape key {key}" + _quote(self._capture.since(mark, _ERROR)))
        else:
            context, dedicated = self._context, False
            self._active = None  # the shared context's shape changes below: rebind before the next run
        shape = list(spec.input.shape)
        shape[_BATCH_AXIS], shape[_FRAME_AXIS] = 1, frames
        shapes = {spec.input.name: shape}
        if spec.points_input is not None and points is not None:
            shapes[spec.points_input.name] = [1, points, 2]
        for name, dims in shapes.items():
            mark = self._capture.count
            if not context.set_input_shape(name, dims):
                raise QVGGTError(f"{self._backend.display_name} refused input shape {dims} for {name!r}"
                                 + _quote(self._capture.since(mark, _ERROR)))
        # Allocated on the engine's stream: when these buffers are dropped, only work ordered after the engine's
        # can reuse their memory.
        with torch.cuda.stream(self._stream):
            image_buffer = torch.empty(shape, dtype=_torch_dtype(spec.input.dtype), device=self._device)
            points_buffer = None
            if spec.points_input is not None and points is not None:
                points_buffer = torch.empty(shapes[spec.points_input.name], dtype=_torch_dtype(spec.points_input.dtype),
                                            device=self._device)
            outputs = {}
            for output in spec.outputs:
                dims = tuple(int(d) for d in context.get_tensor_shape(output.name))
                if any(d < 0 for d in dims):
                    raise QVGGTError(f"output {output.name!r} has a data-dependent shape {list(dims)}, which this "
                                     "runtime does not support")
                outputs[output.name] = torch.empty(dims, dtype=_torch_dtype(output.dtype), device=self._device)
        bindings = _Bindings(frames=frames, input=image_buffer, outputs=outputs, context=context, dedicated=dedicated,
                             points=points, points_input=points_buffer)
        if dedicated:
            self._bind_addresses(bindings)
        self._bindings[key] = bindings
        return bindings

    def _bind_addresses(self, bindings: _Bindings) -> None:
        context = bindings.context
        context.set_tensor_address(self._spec.input.name, bindings.input.data_ptr())
        if bindings.points_input is not None and self._spec.points_input is not None:
            context.set_tensor_address(self._spec.points_input.name, bindings.points_input.data_ptr())
        for name, tensor in bindings.outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())

    def _activate(self, bindings: _Bindings) -> None:
        """Point the shared context at this shape key's shapes and buffers (dedicated contexts stay bound)."""
        if bindings.dedicated or self._active == bindings.key:
            return
        shapes = {self._spec.input.name: tuple(bindings.input.shape)}
        if bindings.points_input is not None and self._spec.points_input is not None:
            shapes[self._spec.points_input.name] = tuple(bindings.points_input.shape)
        for name, shape in shapes.items():
            if not bindings.context.set_input_shape(name, shape):
                raise QVGGTError(f"{self._backend.display_name} refused input shape {list(shape)} for {name!r}")
        self._bind_addresses(bindings)
        self._active = bindings.key

    def _execute(self, context: Any) -> None:
        mark = self._capture.count
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise QVGGTError(f"{self._backend.display_name} failed to run {self._path}"
                             + _quote(self._capture.since(mark, _ERROR)))

    def _run(self, bindings: _Bindings) -> None:
        """Enqueue one execution on the engine's stream (the current stream when called)."""
        if bindings.graph is not None:
            bindings.graph.replay()
            return
        self._activate(bindings)
        self._execute(bindings.context)
        if self._manual_graph and not bindings.capture_failed:
            # Captured after a normal run: TensorRT needs one enqueue after a shape change before capture.
            bindings.graph = self._capture_graph(bindings.context)
            bindings.capture_failed = bindings.graph is None

    def _capture_graph(self, context: Any) -> Any:
        import torch

        capturable = getattr(context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self._stream.cuda_stream):
            logger.warning("%s reports this execution context is not stream-capturable; running without CUDA graphs",
                           self._backend.display_name)
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls TensorRT makes from other threads must not invalidate the capture.
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._execute(context)
        except (RuntimeError, QVGGTError) as exc:
            logger.warning("CUDA graph capture failed (%s); running without CUDA graphs for this frame count", exc)
            return None
        return graph

    # -- lifetime ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the context, engine and device buffers (after the engine's queued work has finished)."""
        if getattr(self, "_closed", True):
            return
        with self._lock:
            self._closed = True
            self._stream.synchronize()
            # Context before engine before runtime: each refers to the next.
            self._bindings.clear()  # buffers, graphs and per-frame-count contexts
            self._spare_context = None
            self._context = None
            self._scratch = None
            self._engine = None
            self._runtime = None

    def __enter__(self) -> QVGGTEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Polygraphy
# ----------------------------------------------------------------------------------------------------------


def polygraphy_runner(path: str | os.PathLike[str], *, name: str | None = None) -> Any:
    """Polygraphy ``TrtRunner`` for a full-TensorRT engine, e.g. for Polygraphy's ``Comparator``.

    The parity checker can compare the engine with ONNX Runtime on the same ONNX like this::

        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, CompareFunc

        runners = [polygraphy_runner("vggt.engine"), OnnxrtRunner(SessionFromOnnx("vggt.onnx"))]
        results = Comparator.run(runners, data_loader=[{"images": images_numpy}])  # [1, S, 3, H, W] float32
        Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol={"depth": 1e-2}))

    Polygraphy drives the ``tensorrt`` package only; TensorRT-RTX engines run with :class:`QVGGTEngine`. The
    Hadamard plugin is registered with TensorRT here when the engine uses it (the runner deserializes the
    engine when activated).

    Args:
        path: The engine file.
        name: Runner name in Polygraphy's reports; defaults to the file name.

    Raises:
        QVGGTError: Missing or empty file, or an engine that ``<engine>.profile.json`` says TensorRT-RTX built.
        MissingDependencyError: Polygraphy or TensorRT is not installed (extra ``trt``).
    """
    engine_file = _check_engine_file(path)
    try:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("polygraphy", "trt", "Running engines through Polygraphy") from exc
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingDependencyError("tensorrt", "trt", "Running engines through Polygraphy")
    if _profile_backend(engine_file) == "rtx":
        raise QVGGTError(
            f"{engine_file} is a TensorRT-RTX engine (per its {_PROFILE_SUFFIX}); Polygraphy runs full TensorRT "
            "engines only. Run it with qvggt_export.engine.runtime.QVGGTEngine"
        )
    if _uses_plugin(engine_file):
        from qvggt_export.plugins import register

        register("trt")
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_file))), name=name or engine_file.name)
