"""ONNX Runtime on the CPU: the session that runs the canonical Q/DQ graph as integer kernels.

No rewrite of the graph is needed: with its default graph optimisations (``ORT_ENABLE_ALL``) ONNX Runtime
1.32's QDQ fusions turn the canonical export's quantized linears (:mod:`qvggt_export.export.qdq`) into its
integer CPU kernels by themselves (``benchmarks/results/ort_cpu.md``, profiler):

* 8-bit activations (W8A8, W6A6): ``QuantizeLinear(scale 1) -> DequantizeLinear -> MatMul`` with a
  ``DequantizeLinear`` int8 weight becomes ``MatMulIntegerToFloat`` (int8 x int8 GEMM, int32 accumulation,
  scaled to float in the kernel); the per-token step is applied after it, as written.
* 4-bit weights (W4A4): the INT4 weight ``DequantizeLinear -> MatMul`` becomes ``MatMulNBits`` (4-bit
  weights unpacked in the kernel); the 4-bit activations stay fake-quantized (ONNX Runtime has no 4-bit
  activation GEMM). ``accuracy_level=4`` lets ``MatMulNBits`` quantize its activations to int8 per block
  (faster; no longer bit-faithful to the canonical graph: its error is in the benchmark).

A hand-written lowering to explicit ``com.microsoft`` ops (``MatMulIntegerToFloat`` nodes in the graph) was
measured and dropped: it matched the canonical graph's outputs but ran 4.5x slower than the canonical graph
with ONNX Runtime's own fusion (0.70 s against 3.12 s per run; cause not investigated).

The parity stage keeps these fusions off (:func:`qvggt_export.onnxrt.parity_session_options`) to compare
the graph as written; serving wants them on: use :func:`onnxruntime_cpu_session`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qvggt_export.errors import MissingDependencyError, QVGGTError

__all__ = ["MATMULNBITS_ACCURACY_LEVELS", "cpu_session_options", "onnxruntime_cpu_session"]

#: ``MatMulNBits`` compute types: 0 = unset (float32 here), 1 = fp32, 2 = fp16, 3 = bf16, 4 = int8.
MATMULNBITS_ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def cpu_session_options(accuracy_level: int | None = None, threads: int | None = None) -> tuple[Any, Any]:
    """``(onnxruntime, SessionOptions)`` for serving on the CPU: every graph optimisation on (integer QDQ
    fusions included).

    Args:
        accuracy_level: ``MatMulNBits``' compute type for the fused 4-bit-weight GEMMs (``None``: ONNX
            Runtime's default); 4 = int8 activation blocks, the fastest.
        threads: Intra-op threads (``None``: ONNX Runtime's default, one per core).

    Raises:
        QVGGTError: An unknown accuracy level or a thread count < 1.
        MissingDependencyError: ONNX Runtime is not installed.
    """
    if accuracy_level is not None and accuracy_level not in MATMULNBITS_ACCURACY_LEVELS:
        raise QVGGTError(f"accuracy_level must be one of {MATMULNBITS_ACCURACY_LEVELS}, got {accuracy_level!r}")
    if threads is not None and threads < 1:
        raise QVGGTError(f"threads must be >= 1, got {threads}")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", "Running ONNX graphs on the CPU") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort, options


def onnxruntime_cpu_session(onnx_path: str | os.PathLike[str], *, accuracy_level: int | None = None,
                            threads: int | None = None, optimized_model_path: str | os.PathLike[str] | None = None
                            ) -> Any:
    """An ONNX Runtime CPU session on an exported graph (canonical Q/DQ or float), integer fusions on.

    Args:
        onnx_path: ``model.onnx`` (external data beside it is found by ONNX Runtime).
        accuracy_level: See :func:`cpu_session_options`.
        threads: See :func:`cpu_session_options`.
        optimized_model_path: Also write the optimised graph there (to see which kernels were fused).

    Raises:
        QVGGTError: ``onnx_path`` does not exist or ONNX Runtime cannot load it.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise QVGGTError(f"{path}: no such ONNX file")
    ort, options = cpu_session_options(accuracy_level, threads)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise QVGGTError(f"{path}: ONNX Runtime could not load it: {str(exc).splitlines()[0]}") from exc
