"""Which runtimes can load an engine: one table, read by the pipeline's report, ``check`` and ``serve-repo``.

An engine is loadable by a runtime when two facts about it agree with the runtime (no TensorRT needed to decide):

* **flavour**: an engine loads only in the TensorRT flavour that built it. Full TensorRT engines (``backend
  "trt"``) load in TensorRT's runtimes (``trtexec``, Triton's ``tensorrt_plan`` backend, the C++ ``nvinfer``
  API, the Python ``tensorrt`` package); TensorRT-RTX engines (``"rtx"``) only in TensorRT-RTX's (its C++ API,
  its Python package). Within a flavour the TensorRT version must match as well (checked at load time by
  :class:`~qvggt_export.engine.runtime.QVGGTEngine`; Triton's container pins one TensorRT version).
* **Hadamard plugin**: the ``qvggt::Hadamard`` plugin is a Python ``IPluginV3``
  (:func:`qvggt_export.plugins.register`). Only a Python process that registers it can deserialize an engine
  holding plugin layers; ``trtexec``, Triton's TensorRT backend and C++ applications cannot (they load compiled
  plugin libraries, and this project ships none). The plugin-free ("function") form inlines the rotation as
  small GEMMs that every runtime of the flavour loads.

==================  ======================  ================  ============================================
runtime             flavour                 plugin engines    what it is
==================  ======================  ================  ============================================
python              trt, rtx                yes               QVGGTEngine / Polygraphy (registers plugin)
triton-python       trt, rtx                yes               Triton Python backend model (serve-repo)
serve               trt, rtx                yes               ``qvggt-export serve`` (QVGGTEngine)
triton-tensorrt     trt                     no                Triton ``tensorrt_plan`` backend
trtexec             trt                     no                TensorRT's ``trtexec``
cpp                 trt                     no                TensorRT C++ API (``nvinfer``)
rtx-cpp             rtx                     no                TensorRT-RTX C++ API
==================  ======================  ================  ============================================

:func:`default_engine_hadamard` picks the engine's Hadamard form per build flavour: plugin-free for full
TensorRT (server / Triton targets, where trtexec, Triton's TensorRT backend and C++ must load the engine), the
plugin for TensorRT-RTX (edge / desktop Python applications).
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from qvggt_export.errors import QVGGTError

__all__ = ["RUNTIMES", "EngineKind", "RuntimeInfo", "build_flavour", "check_runtime", "default_engine_hadamard",
           "engine_kind", "loadable_by", "uses_plugin"]


@dataclass(frozen=True)
class RuntimeInfo:
    """One runtime that can load engines.

    Attributes:
        flavours: Engine flavours it loads (``"trt"``: full TensorRT, ``"rtx"``: TensorRT-RTX).
        plugin: Whether it can register the Python Hadamard plugin (and so load engines holding it).
        description: What it is, for messages.
    """

    flavours: frozenset[str]
    plugin: bool
    description: str


RUNTIMES: dict[str, RuntimeInfo] = {
    "python": RuntimeInfo(frozenset({"trt", "rtx"}), True,
                          "Python: qvggt_export.engine.runtime.QVGGTEngine or Polygraphy (registers the plugin)"),
    "triton-python": RuntimeInfo(frozenset({"trt", "rtx"}), True,
                                 "Triton's Python backend with the model.py qvggt-export serve-repo writes"),
    "serve": RuntimeInfo(frozenset({"trt", "rtx"}), True, "qvggt-export serve (QVGGTEngine)"),
    "triton-tensorrt": RuntimeInfo(frozenset({"trt"}), False, "Triton's TensorRT backend (platform tensorrt_plan)"),
    "trtexec": RuntimeInfo(frozenset({"trt"}), False, "TensorRT's trtexec"),
    "cpp": RuntimeInfo(frozenset({"trt"}), False, "a C++ application on TensorRT's nvinfer runtime"),
    "rtx-cpp": RuntimeInfo(frozenset({"rtx"}), False, "a C++ application on the TensorRT-RTX runtime"),
}

_FLAVOUR_NAMES = {"trt": "full TensorRT", "rtx": "TensorRT-RTX"}
# A plugin layer serializes the creator's name and namespace as NUL-terminated strings (TensorRT-RTX 1.7.1: 32
# of each in a plugin engine of tiny, none in its plugin-free twin, whose layer names say "Hadamard_64/...").
_PLUGIN_MARKERS = (b"Hadamard\x00", b"qvggt\x00")
_PROFILE_SUFFIX = ".profile.json"


@dataclass(frozen=True)
class EngineKind:
    """What decides who can load an engine: its flavour (``"trt"`` / ``"rtx"``) and whether it holds the plugin."""

    flavour: str
    plugin: bool

    def describe(self) -> str:
        return f"a {_FLAVOUR_NAMES[self.flavour]} engine {'with' if self.plugin else 'without'} the Hadamard plugin"


def _check_flavour(flavour: str) -> None:
    if flavour not in _FLAVOUR_NAMES:
        raise QVGGTError(f"engine flavour must be 'trt' or 'rtx', got {flavour!r}")


def loadable_by(flavour: str, plugin: bool) -> list[str]:
    """The runtimes (keys of :data:`RUNTIMES`) that can load an engine of this flavour, with or without plugin."""
    _check_flavour(flavour)
    return [name for name, info in RUNTIMES.items() if flavour in info.flavours and (info.plugin or not plugin)]


def check_runtime(kind: EngineKind, runtime: str, engine: str | os.PathLike[str] = "the engine") -> None:
    """Raise a one-line :class:`QVGGTError` when ``runtime`` cannot load an engine of ``kind``."""
    if runtime not in RUNTIMES:
        raise QVGGTError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    info = RUNTIMES[runtime]
    problems, remedies = [], []
    if kind.flavour not in info.flavours:
        loads = " / ".join(_FLAVOUR_NAMES[f] for f in sorted(info.flavours))
        problems.append(f"it loads only {loads} engines")
        remedies.append(f"--backend {next(iter(info.flavours))}")
    if kind.plugin and not info.plugin:
        problems.append("it cannot load the Python Hadamard plugin")
        remedies.append("--engine-hadamard function")
    if problems:
        raise QVGGTError(f"{engine} is {kind.describe()}, which {runtime} ({info.description}) cannot load: "
                         f"{' and '.join(problems)}; rebuild with {' '.join(remedies)}")


def build_flavour(backend: str, profile_backend: str = "auto") -> str:
    """The flavour a build will use: ``backend`` unless ``"auto"``, else the profile's, else what
    :func:`~qvggt_export.engine.backend.load_backend` picks for ``"auto"`` (TensorRT-RTX when installed)."""
    for choice in (backend, profile_backend):
        if choice in _FLAVOUR_NAMES:
            return choice
    import importlib.util

    return "rtx" if importlib.util.find_spec("tensorrt_rtx") is not None else "trt"


def default_engine_hadamard(flavour: str) -> str:
    """The engine's Hadamard form for a build flavour: ``"function"`` (plugin-free) for full TensorRT, whose
    engines go to trtexec / Triton / C++; ``"plugin"`` for TensorRT-RTX (Python applications on RTX GPUs)."""
    _check_flavour(flavour)
    return "function" if flavour == "trt" else "plugin"


def uses_plugin(engine: str | os.PathLike[str]) -> bool:
    """Whether a serialized engine holds ``qvggt::Hadamard`` plugin layers (a byte scan; no TensorRT needed)."""
    # mmap: VGGT-1B engines are GBs; searching the mapped pages copies nothing.
    with open(engine, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return all(view.find(marker) >= 0 for marker in _PLUGIN_MARKERS)


def engine_kind(engine: str | os.PathLike[str]) -> EngineKind:
    """Read an engine's flavour (from ``<engine>.profile.json``, else its header) and whether it holds the plugin.

    Raises:
        QVGGTError: The file is missing or empty, or its flavour cannot be told.
    """
    path = Path(engine)
    if not path.is_file() or path.stat().st_size == 0:
        raise QVGGTError(f"engine {path} does not exist or is empty")
    flavour = None
    profile = path.with_name(path.name + _PROFILE_SUFFIX)
    if profile.is_file():
        try:
            flavour = json.loads(profile.read_text(encoding="utf-8")).get("backend")
        except (OSError, ValueError, AttributeError):
            flavour = None
    if flavour not in _FLAVOUR_NAMES:
        # TensorRT-RTX 1.x engines start with "vtrt" (observed on 1.7.1); full TensorRT's do not.
        with open(path, "rb") as handle:
            flavour = "rtx" if handle.read(4) == b"vtrt" else None
    plugin = uses_plugin(path)
    if flavour is None:
        raise QVGGTError(f"cannot tell whether {path} is a full TensorRT or a TensorRT-RTX engine: no "
                         f"{profile.name} beside it (written by build_engine)")
    return EngineKind(flavour, plugin)
