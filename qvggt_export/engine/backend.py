"""TensorRT backends: full TensorRT (GPU hosts) and TensorRT-RTX (builds without a GPU).

Both packages expose the same Python API shape (``Builder``, ``OnnxParser``, ``IBuilderConfig``...), so the
build code is written once against a :class:`Backend`, which carries the imported module and answers the
questions where the two differ:

* TensorRT-RTX compiles for a list of GPU architectures chosen at build time
  (``config.set_compute_capability(ComputeCapability.SM89, i)``) and needs no GPU to do so.
* Full TensorRT builds for the GPU it runs on; portability across GPUs is its *hardware compatibility
  level* (e.g. ``AMPERE_PLUS``). It needs a CUDA GPU to build.

Nothing here imports TensorRT at module import time: :func:`load_backend` does, on request.

This module also works around a packaging bug of the ``tensorrt-rtx`` 1.7 wheel
(:func:`ensure_rtx_parser_symlink`).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from qvggt_export.errors import MissingDependencyError, QVGGTError

__all__ = [
    "BACKEND_NAMES",
    "REMOVED_PRECISION_FLAGS",
    "Backend",
    "cuda_compute_capabilities",
    "cuda_device_count",
    "ensure_rtx_parser_symlink",
    "load_backend",
]

logger = logging.getLogger(__name__)

#: Names accepted by :func:`load_backend` and by the ``backend`` field of a build profile.
BACKEND_NAMES = ("auto", "rtx", "trt")

# name -> (import name, pip distribution, extra of qvggt-export, display name)
_PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "rtx": ("tensorrt_rtx", "tensorrt-rtx", "rtx", "TensorRT-RTX"),
    "trt": ("tensorrt", "tensorrt", "trt", "TensorRT"),
}

# The ONNX parser of the tensorrt-rtx 1.7 wheel dlopen()s this name when it creates a plugin, but the wheel
# ships only the versioned file; see ensure_rtx_parser_symlink.
_RTX_LIB_UNVERSIONED = "libtensorrt_rtx.so"
_RTX_LIB_VERSIONED = "libtensorrt_rtx.so.1"
_RTX_PARSER_LIB = "libtensorrt_onnxparser_rtx.so.1"

# Full TensorRT's first major version without weak typing. The builder flags it removed with it are listed in
# REMOVED_PRECISION_FLAGS; nothing in this package may reference them (tests/engine/test_trt11.py checks).
_TRT_STRONGLY_TYPED_ONLY_MAJOR = 11

#: ``trt.BuilderFlag`` members that TensorRT 11 removed (precisions now come from the strongly typed graph).
REMOVED_PRECISION_FLAGS = (
    "FP16", "BF16", "INT8", "FP8", "INT4", "FP4",
    "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "STRICT_TYPES",
)


@dataclass(frozen=True)
class Backend:
    """An imported TensorRT flavour and what it can do.

    Attributes:
        name: ``"rtx"`` (TensorRT-RTX) or ``"trt"`` (full TensorRT).
        trt: The imported Python module (``tensorrt_rtx`` or ``tensorrt``).
        version: The module's ``__version__``.
    """

    name: str
    trt: ModuleType = field(repr=False, compare=False)
    version: str

    @property
    def display_name(self) -> str:
        """Human-readable product name, e.g. ``"TensorRT-RTX"``."""
        return _PACKAGES[self.name][3]

    @property
    def package(self) -> str:
        """The pip distribution that provides this backend."""
        return _PACKAGES[self.name][1]

    @property
    def supports_compute_capabilities(self) -> bool:
        """Whether engines can target GPU architectures other than the build machine's.

        True for TensorRT-RTX; full TensorRT (10.x) has no such API and builds for the current GPU.
        """
        return hasattr(self.trt, "ComputeCapability") and hasattr(self.trt.IBuilderConfig, "set_compute_capability")

    def compute_capability_names(self) -> tuple[str, ...]:
        """Compute-capability names this backend can target, e.g. ``("CURRENT", "SM75", ..., "SM121")``.

        ``NONE`` is left out (it is the "unset" value, not a target). Empty when the backend has no
        compute-capability API (full TensorRT), where only the build machine's GPU can be targeted.
        """
        if not self.supports_compute_capabilities:
            return ()
        return tuple(name for name in self.trt.ComputeCapability.__members__ if name != "NONE")

    def compute_capability(self, name: str) -> object:
        """The ``ComputeCapability`` enum member for ``name``.

        Raises:
            QVGGTError: The backend cannot target compute capabilities, or does not know ``name``.
        """
        known = self.compute_capability_names()
        if not known:
            raise QVGGTError(
                f"{self.display_name} {self.version} builds only for the GPU it runs on and cannot target "
                f"{name!r}; use compute_capabilities ['CURRENT'] (optionally with a hardware_compatibility_level) "
                "or build with the 'rtx' backend"
            )
        if name not in known:
            raise QVGGTError(
                f"compute capability {name!r} is not supported by {self.display_name} {self.version}; "
                f"expected one of {', '.join(known)}"
            )
        return self.trt.ComputeCapability.__members__[name]

    def hardware_compatibility_levels(self) -> tuple[str, ...]:
        """Names of ``HardwareCompatibilityLevel`` members (empty if the enum does not exist)."""
        enum = getattr(self.trt, "HardwareCompatibilityLevel", None)
        return tuple(enum.__members__) if enum is not None else ()

    def hardware_compatibility_level(self, name: str) -> object:
        """The ``HardwareCompatibilityLevel`` enum member for ``name``.

        Raises:
            QVGGTError: ``name`` is not a level of this backend.
        """
        known = self.hardware_compatibility_levels()
        if name not in known:
            raise QVGGTError(
                f"hardware compatibility level {name!r} is not supported by {self.display_name} {self.version}; "
                f"expected one of {', '.join(known) or '(none: this version has no such setting)'}"
            )
        return self.trt.HardwareCompatibilityLevel.__members__[name]

    @property
    def honours_hardware_compatibility(self) -> bool:
        """Whether ``hardware_compatibility_level`` has an effect (TensorRT-RTX logs it as unsupported)."""
        return self.name == "trt"

    @property
    def supports_timing_cache(self) -> bool:
        """Whether a timing cache speeds up rebuilds (TensorRT-RTX 1.2+ made timing-cache calls no-ops)."""
        return self.name == "trt" and hasattr(self.trt.IBuilderConfig, "create_timing_cache")

    @property
    def needs_gpu_to_build(self) -> bool:
        """Full TensorRT measures tactics on the GPU while building; TensorRT-RTX compiles ahead of time."""
        return self.name == "trt"

    @property
    def supports_weak_typing(self) -> bool:
        """Whether this version can still build a weakly typed network (full TensorRT before 11.0).

        TensorRT 11 builds strongly typed networks only (the precision builder flags are gone); TensorRT-RTX
        keeps the creation flag, so weak typing is left to it as before.
        """
        if "STRONGLY_TYPED" not in self.trt.NetworkDefinitionCreationFlag.__members__:
            return False
        return not (self.name == "trt" and _major_version(self.version) >= _TRT_STRONGLY_TYPED_ONLY_MAJOR)

    def network_flags(self, strongly_typed: bool) -> int:
        """The ``create_network`` flags for a network that is (or is not) strongly typed.

        Strong typing makes the ONNX graph's own Q/DQ and cast nodes decide every precision, which is what a
        quantized export means; TensorRT 11 removed the alternative (precision builder flags), so FP16 comes
        from the graph (:func:`qvggt_export.engine.lowering.to_float16`) on every backend and version.

        Raises:
            QVGGTError: A weakly typed network was asked for on a version that builds strongly typed only.
        """
        if not strongly_typed and not self.supports_weak_typing:
            raise QVGGTError(
                f"{self.display_name} {self.version} builds strongly typed networks only (TensorRT 11 removed weak "
                "typing and its precision builder flags); set \"strongly_typed\": true in the build profile"
            )
        flag_enum = self.trt.NetworkDefinitionCreationFlag
        if strongly_typed and "STRONGLY_TYPED" in flag_enum.__members__:
            return 1 << int(flag_enum.STRONGLY_TYPED)
        # Either weak typing was asked for, or the version has no flag because every network is strongly typed.
        return 0


def _major_version(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def load_backend(name: str = "auto") -> Backend:
    """Import a TensorRT flavour.

    ``"auto"`` picks TensorRT-RTX when it is installed, because it builds engines with or without a GPU
    (and for several GPU architectures at once), and falls back to full TensorRT otherwise. Ask for
    ``"trt"`` explicitly for server GPUs TensorRT-RTX does not target (e.g. Hopper).

    Args:
        name: ``"auto"``, ``"rtx"`` (package ``tensorrt-rtx``) or ``"trt"`` (package ``tensorrt``).

    Returns:
        The loaded backend.

    Raises:
        QVGGTError: ``name`` is not a backend name, or the package is installed but fails to load.
        MissingDependencyError: The requested package (for ``"auto"``: neither package) is installed.
    """
    if name not in BACKEND_NAMES:
        raise QVGGTError(f"unknown TensorRT backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        for candidate in ("rtx", "trt"):
            if importlib.util.find_spec(_PACKAGES[candidate][0]) is not None:
                return load_backend(candidate)
        raise MissingDependencyError("tensorrt-rtx", "rtx", "Building TensorRT engines")

    module_name, package, extra, display = _PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module_name:
            # The package is there but one of its own dependencies is not: not an install-hint situation.
            raise QVGGTError(f"{display} ({package}) is installed but failed to import: {exc}") from exc
        raise MissingDependencyError(package, extra, f"The '{name}' engine backend ({display})") from exc
    except (ImportError, OSError) as exc:
        # Typically a shared library of the wheel that cannot be loaded (wrong CUDA/glibc).
        raise QVGGTError(f"{display} ({package}) is installed but failed to load: {exc}") from exc
    version = str(getattr(module, "__version__", "unknown"))
    logger.debug("loaded %s %s from %s", display, version, getattr(module, "__file__", "?"))
    return Backend(name=name, trt=module, version=version)


def _libcuda() -> ctypes.CDLL | None:
    names = ("nvcuda.dll",) if sys.platform.startswith("win") else ("libcuda.so.1", "libcuda.so")
    for lib_name in names:
        try:
            return ctypes.CDLL(lib_name)
        except OSError:
            continue
    return None


def cuda_device_count() -> int:
    """Number of CUDA GPUs visible to this process, asked of the driver (no CUDA toolkit or torch needed).

    Returns:
        0 when there is no driver, the driver finds no device, or ``CUDA_VISIBLE_DEVICES`` hides them all.
    """
    lib = _libcuda()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    # cuInit fails with CUDA_ERROR_NO_DEVICE (100) on a machine with a driver but no usable GPU.
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_compute_capabilities() -> list[str]:
    """Compute capabilities of the visible GPUs as TensorRT-RTX spells them (``"SM89"``); empty without one."""
    lib = _libcuda()
    if lib is None or cuda_device_count() == 0:
        return []
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR in cuda.h.
    attr_major, attr_minor = 75, 76
    found: list[str] = []
    for ordinal in range(cuda_device_count()):
        device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            continue
        if lib.cuDeviceGetAttribute(ctypes.byref(major), attr_major, device) != 0:
            continue
        if lib.cuDeviceGetAttribute(ctypes.byref(minor), attr_minor, device) != 0:
            continue
        found.append(f"SM{major.value}{minor.value}")
    return found


def _rtx_libs_dir() -> Path | None:
    # find_spec locates the package without executing its __init__ (which dlopens ~230 MB of libraries).
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_rtx_parser_symlink(fix: bool = True, libs_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Make sure the TensorRT-RTX ONNX parser can create plugins, fixing the wheel if allowed.

    The ``tensorrt-rtx`` 1.7 wheel ships ``libtensorrt_rtx.so.1`` but its ONNX parser ``dlopen()``s
    ``libtensorrt_rtx.so`` when it instantiates a plugin (any ONNX node TensorRT maps to a registered plugin
    creator, such as the Hadamard op). The failed load aborts the whole process with SIGABRT, which Python
    cannot catch. A relative symlink ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` beside the parser
    library cures it, also when created after TensorRT-RTX was imported (the name is searched at
    plugin-creation time). Adding a directory to ``LD_LIBRARY_PATH`` from inside the process does not help:
    the dynamic loader reads it once at process start.

    Creating the symlink is idempotent and changes nothing else: the link points at the library the
    process has already loaded.

    Args:
        fix: Create the symlink when it is missing. With ``False`` a missing link raises instead.
        libs_dir: The directory holding the wheel's libraries. Defaults to the installed
            ``tensorrt_rtx_libs`` package; tests pass a temporary directory.

    Returns:
        The path of the (existing or new) ``libtensorrt_rtx.so``, or ``None`` when there is nothing to do:
        not Linux, no ``tensorrt_rtx_libs`` wheel (e.g. a tarball install, which ships the unversioned
        name), or a directory without the parser library.

    Raises:
        QVGGTError: The link is missing and ``fix`` is false, or it cannot be created (read-only
            site-packages); the message gives the exact ``ln -s`` command to run.
    """
    if not sys.platform.startswith("linux"):
        return None
    directory = Path(libs_dir) if libs_dir is not None else _rtx_libs_dir()
    if directory is None or not (directory / _RTX_PARSER_LIB).exists():
        return None
    target = directory / _RTX_LIB_VERSIONED
    link = directory / _RTX_LIB_UNVERSIONED
    if not target.exists():
        # A layout we do not know; the parser will find (or not find) the library on its own terms.
        logger.debug("%s not found next to %s; leaving the TensorRT-RTX libraries alone", target, _RTX_PARSER_LIB)
        return None
    if link.exists():  # follows symlinks: a dangling link counts as missing and is replaced below
        return link

    command = f"ln -sf {_RTX_LIB_VERSIONED} {link}"
    explanation = (
        f"The TensorRT-RTX ONNX parser needs {link} to create plugins (the tensorrt-rtx wheel ships only "
        f"{_RTX_LIB_VERSIONED}; without the link the process aborts while parsing a model with a plugin node)."
    )
    if not fix:
        raise QVGGTError(f"{explanation} Create it with:\n    {command}")
    # Create under a temporary name, then rename over the final one: concurrent builds racing to fix the
    # same install both succeed, and a dangling link is replaced in the same step.
    tmp_link = directory / f".{_RTX_LIB_UNVERSIONED}.{os.getpid()}.tmp"
    try:
        if tmp_link.is_symlink():
            tmp_link.unlink()
        os.symlink(_RTX_LIB_VERSIONED, tmp_link)
        os.replace(tmp_link, link)
    except OSError as exc:
        if tmp_link.is_symlink():
            tmp_link.unlink(missing_ok=True)
        raise QVGGTError(
            f"{explanation} It could not be created automatically ({exc.strerror or exc}). Run, with the "
            f"permissions of the Python installation:\n    {command}\nor put a directory holding that link on "
            "LD_LIBRARY_PATH before starting Python."
        ) from exc
    logger.info("created %s -> %s (works around the tensorrt-rtx wheel's missing library name)", link, target.name)
    return link
