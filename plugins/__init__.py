"""The Hadamard op's TensorRT plugin and CUDA kernel (installed as ``qvggt_export.plugins``; DESIGN.md section 4).

* :func:`register` registers the Python ``IPluginV3`` creator ``qvggt::Hadamard`` (version 1) with
  TensorRT-RTX or full TensorRT. Call it before building an engine from an ONNX model exported with
  ``hadamard="plugin"``, and before deserializing such an engine.
* ``csrc/hadamard_kernel.cu``: the fused fast Walsh-Hadamard CUDA kernel and its C launcher (see
  ``plugins/README.md`` for what is verified where).

Importing this package imports neither TensorRT nor torch.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from qvggt_export.plugins.hadamard_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = ["CSRC_DIR", "PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "is_registered", "register"]

logger = logging.getLogger(__name__)

#: Directory of the CUDA sources (``hadamard_kernel.cu``, ``hadamard_kernel.h``).
CSRC_DIR = Path(__file__).resolve().parent / "csrc"

# backend name -> the creator registered with that backend's registry. TensorRT holds only a pointer to a
# Python creator: this reference keeps it alive for the life of the process.
_CREATORS: dict[str, Any] = {}
_LOCK = threading.Lock()


def register(backend: str = "auto") -> str:
    """Register the ``qvggt::Hadamard`` plugin creator (version ``"1"``) with a TensorRT flavour's plugin registry.

    Idempotent: later calls for the same backend return at once; a creator of that identity registered by
    someone else (e.g. a C++ plugin library loaded earlier) is left in place.

    Args:
        backend: ``"auto"`` (TensorRT-RTX if installed, else TensorRT), ``"rtx"`` or ``"trt"``, as in
            :func:`qvggt_export.engine.backend.load_backend`.

    Returns:
        The backend registered with: ``"rtx"`` or ``"trt"``.

    Raises:
        MissingDependencyError: The requested TensorRT package (for ``"auto"``: either) is not installed.
        QVGGTError: Unknown backend name, a package that fails to load, or a registry that refuses the creator.
    """
    from qvggt_export.engine.backend import load_backend
    from qvggt_export.errors import QVGGTError
    from qvggt_export.plugins.hadamard_plugin import plugin_classes

    be = load_backend(backend)
    with _LOCK:
        if be.name in _CREATORS:
            return be.name
        registry = be.trt.get_plugin_registry()
        if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:
            logger.info("a %s::%s v%s creator is already registered with %s; keeping it",
                        PLUGIN_NAMESPACE, PLUGIN_NAME, PLUGIN_VERSION, be.display_name)
            _CREATORS[be.name] = None
            return be.name
        _, creator_class = plugin_classes(be.trt)
        creator = creator_class()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise QVGGTError(f"{be.display_name} {be.version} refused the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                             f"v{PLUGIN_VERSION} plugin creator (see the TensorRT log)")
        _CREATORS[be.name] = creator
        logger.debug("registered %s::%s v%s with %s %s", PLUGIN_NAMESPACE, PLUGIN_NAME, PLUGIN_VERSION,
                     be.display_name, be.version)
    return be.name


def is_registered(backend: str = "auto") -> bool:
    """Whether a ``qvggt::Hadamard`` v1 creator (ours or another) is in the backend's plugin registry."""
    from qvggt_export.engine.backend import load_backend

    be = load_backend(backend)
    return be.trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None
