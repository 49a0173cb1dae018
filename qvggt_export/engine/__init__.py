"""Engine stage: build TensorRT / TensorRT-RTX engines from exported ONNX models.

Importing this package does not import TensorRT; :func:`load_backend`, :func:`build_engine` and
:class:`QVGGTEngine` (GPU-only: running an engine needs an NVIDIA GPU) do, when called.

Example::

    from qvggt_export.engine import build_engine

    result = build_engine("vggt_w8a8.onnx", "engines/vggt_w8a8.engine", "rtx-default")
    print(result.target_sms, result.num_layers, result.size_bytes)
"""

from qvggt_export.engine.backend import (
    Backend,
    cuda_compute_capabilities,
    cuda_device_count,
    ensure_rtx_parser_symlink,
    load_backend,
)
from qvggt_export.engine.build import (
    FRAME_AXIS,
    EngineBuildResult,
    attention_report,
    build_engine,
    gemm_precision_report,
)
from qvggt_export.engine.profiles import EngineProfile, FrameRange, list_profiles, load_profile
from qvggt_export.engine.runtime import EngineSpec, QVGGTEngine, check_images_shape, polygraphy_runner
from qvggt_export.engine.targets import FORMAT_MIN_SM, check_format_targets

__all__ = [
    "FORMAT_MIN_SM",
    "FRAME_AXIS",
    "Backend",
    "EngineBuildResult",
    "EngineProfile",
    "EngineSpec",
    "QVGGTEngine",
    "check_images_shape",
    "polygraphy_runner",
    "FrameRange",
    "attention_report",
    "build_engine",
    "check_format_targets",
    "gemm_precision_report",
    "cuda_compute_capabilities",
    "cuda_device_count",
    "ensure_rtx_parser_symlink",
    "list_profiles",
    "load_backend",
    "load_profile",
]
