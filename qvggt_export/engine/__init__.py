"""Engine stage: build TensorRT / TensorRT-RTX engines from exported ONNX models.

Importing this package does not import TensorRT; :func:`load_backend`, :func:`build_engine` and
:class:`QVGGTEngine` (GPU-only: running an engine needs an NVIDIA GPU) do, when called.

Example::

    from qvggt_export.engine import build_engine

    result = build_engine("vggt_w8a8.onnx", "engines/vggt_w8a8.engine", "rtx-default", format_name="w8a8")
    print(result.target_sms, result.num_layers, result.size_bytes, result.gemm_precisions, result.attention)

:func:`build_engine` builds a graph as given; :func:`build_engine_for_target` takes the *canonical* export and an
:class:`EngineTarget` and does the runtime-specific work first: the per-target lowering
(:mod:`qvggt_export.engine.lowering`) and the Hadamard plugin form (:mod:`qvggt_export.engine.hadamard`).

What TensorRT-RTX 1.7.1 makes of the exported graph (measured here without a GPU, from the builder's DETAILED
per-layer report; ``benchmarks/results/engine_sizes.md`` has the numbers):

* **Attention.** The exporter writes VGGT's attention as MatMul -> Mul -> Softmax -> MatMul (opset 21; no ONNX
  ``Attention`` op). In FP32 (the float parts of every quantized graph as exported) TensorRT-RTX keeps it
  unfused: two gemm layers around a generated ``kgen`` softmax kernel. In FP16 (a float graph through
  :func:`qvggt_export.engine.lowering.to_float16`, or a lowering with ``float16=True``) each attention becomes one
  fused ``_gemm_mha_v2`` kernel. The ONNX ``Attention`` op (opset 23) parses; it builds in FP16 (the same
  ``_gemm_mha_v2`` kernel) and fails in FP32 ("Attention operation was not supported by a dedicated kernel").
  :attr:`EngineBuildResult.attention` reports the counts for every build.
* **Quantized GEMMs** (:attr:`EngineBuildResult.gemm_precisions`): W8A8 / W6A6 as written (per-token step
  applied after the GEMM) and ``int8-static`` both become ``Int8 x Int8`` gemm layers; ``w4a8`` too, with the
  INT4 weights unpacked to INT8 by a kernel before the GEMM; ``w4a16`` and W4A4 as written dequantize the INT4
  weights in a kernel (``CastMulCast``) and run a float GEMM. So INT4 weights save engine bytes, but no fused
  INT4 GEMM was seen; whether one is chosen on a GPU for blocked INT4 weights is not verifiable here.
* **Format / architecture checks**: :func:`check_format_targets` (e.g. nvfp4 needs SM100+, fp8 SM89+), also run
  by ``build_engine(..., format_name=...)``. Plugin nodes whose creator is not registered are refused before
  parsing; truncated TensorRT-RTX engine files are refused by :class:`QVGGTEngine` before any GPU work.
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
    POINTS_AXIS,
    POINTS_INPUT,
    EngineBuildResult,
    attention_report,
    build_engine,
    gemm_precision_report,
)
from qvggt_export.engine.profiles import EngineProfile, FrameRange, PointRange, list_profiles, load_profile
from qvggt_export.engine.runtime import (
    EngineSpec,
    QVGGTEngine,
    check_images_shape,
    check_points_shape,
    polygraphy_runner,
)
from qvggt_export.engine.stage import EngineTarget, build_engine_for_target
from qvggt_export.engine.targets import check_format_targets

__all__ = [
    "FRAME_AXIS",
    "POINTS_AXIS",
    "POINTS_INPUT",
    "Backend",
    "EngineBuildResult",
    "EngineProfile",
    "EngineSpec",
    "EngineTarget",
    "QVGGTEngine",
    "check_images_shape",
    "check_points_shape",
    "polygraphy_runner",
    "FrameRange",
    "PointRange",
    "attention_report",
    "build_engine",
    "build_engine_for_target",
    "check_format_targets",
    "gemm_precision_report",
    "cuda_compute_capabilities",
    "cuda_device_count",
    "ensure_rtx_parser_symlink",
    "list_profiles",
    "load_backend",
    "load_profile",
]
