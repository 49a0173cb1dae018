"""Polygraphy runners for the parity checker: PyTorch (CPU), ONNX Runtime, and TensorRT engines (GPU only).

Polygraphy's ``Comparator.run`` drives every runner over the same feed dicts (``{"images": [1, S, 3, H, W]
float32}``) and ``Comparator.compare_accuracy`` judges pairs of runs with a compare function. Polygraphy's own
``PytRunner`` moves inputs to CUDA, so the PyTorch side is :class:`TorchRunner` here (CPU or any device the
model is on). ONNX Runtime runs through Polygraphy's ``OnnxrtRunner`` with the parity session of
:func:`~qvggt_export.parity.compare.onnxruntime_session` (integer QDQ fusions off).

Engines: full-TensorRT engines run through Polygraphy's ``TrtRunner``
(:func:`qvggt_export.engine.runtime.polygraphy_runner`); TensorRT-RTX engines, which Polygraphy does not
drive, through :class:`EngineRunner` over :class:`qvggt_export.engine.runtime.QVGGTEngine`. Both need a CUDA
GPU. **They have not run in this project's CI** (no GPU there); the code path is written against the same
APIs as the engine runtime and stops with a clear error without a GPU.

nvfp4 graphs, which ONNX Runtime cannot run, go through :func:`reference_runner` (ONNX's NumPy reference
evaluator) instead.

Polygraphy is imported when a runner is made, not when this module is imported.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from qvggt_export.errors import MissingDependencyError, QVGGTError

INPUT_NAME = "images"
EXTRA_INPUT_SHAPES = {"query_points": (None, None, 2)}  # the track graph's second input [B, N, 2]


def _polygraphy() -> Any:
    try:
        import polygraphy.backend.base as base
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("polygraphy", "cpu", "The parity checker's runners") from exc
    return base


def _base_runner() -> type:
    return _polygraphy().BaseRunner


def torch_runner(model: Any, output_names: list[str], name: str = "pytorch", *,
                 input_names: tuple[str, ...] = (INPUT_NAME,), dtype: str = "float32") -> Any:
    """A Polygraphy runner over a VGGT (float or fake-quantized): the named inputs in (the first positional, the
    others by keyword: ``images``, or ``images`` and ``query_points`` for the track graph's model), the named
    outputs out. ``dtype="float64"``: inputs and outputs in float64 (a float64 copy of the model measuring the
    float32 rounding noise of the tracker)."""
    import numpy as np
    import torch

    base = _base_runner()
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]

    class TorchRunner(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(name=name, prefix="pytorch-runner")

        def activate_impl(self) -> None:
            model.eval()

        def get_input_metadata_impl(self) -> Any:
            from polygraphy.common import TensorMetadata

            # The feeds are float32 whatever the model's dtype (Polygraphy checks them against this).
            metadata = TensorMetadata().add(input_names[0], np.float32, (None, None, 3, None, None))
            for extra in input_names[1:]:
                metadata.add(extra, np.float32, EXTRA_INPUT_SHAPES.get(extra))
            return metadata

        def infer_impl(self, feed_dict: dict[str, Any]) -> OrderedDict[str, Any]:
            device = next(model.parameters()).device
            tensors = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])).to(device, torch_dtype)
                       for n in input_names]
            started = time.perf_counter()
            with torch.no_grad():
                predictions = model(tensors[0], **dict(zip(input_names[1:], tensors[1:], strict=True)))
            self.inference_time = time.perf_counter() - started
            missing = [n for n in output_names if n not in predictions]
            if missing:
                raise QVGGTError(f"ONNX output(s) {missing} have no counterpart in the PyTorch outputs")
            # contiguous: Polygraphy's comparator views outputs in place (permuted heads' outputs are not)
            return OrderedDict((n, np.ascontiguousarray(predictions[n].detach().to(torch_dtype).cpu().numpy()))
                               for n in output_names)

        def deactivate_impl(self) -> None:
            pass

    return TorchRunner()


def onnxrt_runner(onnx_path: str | os.PathLike[str], providers: list[str] | None = None,
                  name: str = "onnxruntime", session: Any = None) -> Any:
    """Polygraphy's ``OnnxrtRunner`` over the parity-safe ONNX Runtime session (``session``: one already made by
    :func:`~qvggt_export.parity.compare.onnxruntime_session`)."""
    _polygraphy()
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from qvggt_export.parity.compare import onnxruntime_session

    if session is None:
        session = onnxruntime_session(onnx_path, providers)  # loads now: a bad graph fails before any run
    return OnnxrtRunner(session, name=name)


def reference_runner(onnx_path: str | os.PathLike[str], name: str = "onnx-reference") -> Any:
    """A runner over ONNX's NumPy reference evaluator with our ``trt::TRT_FP4DynamicQuantize``
    (:func:`~qvggt_export.export.qdq.reference_evaluator`): it runs nvfp4 graphs, which ONNX Runtime cannot.
    It is ONNX's executable specification plus our reading of TensorRT's documented FP4 quantize, not TensorRT;
    slow (pure NumPy), so meant for small checks."""
    import numpy as np

    from qvggt_export.export.qdq import reference_evaluator

    try:
        evaluator = reference_evaluator(str(onnx_path))  # loads now: a bad graph fails before any run
    except QVGGTError:
        raise
    except Exception as exc:  # onnx.reference raises plain Python errors for graphs it cannot load
        raise QVGGTError(f"ONNX's reference evaluator cannot load {onnx_path}: {exc}") from exc
    base = _base_runner()

    class ReferenceRunner(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(name=name, prefix="reference-runner")

        def activate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> Any:
            from polygraphy.common import TensorMetadata

            return TensorMetadata().add(evaluator.input_names[0], np.float32, (1, None, 3, None, None))

        def infer_impl(self, feed_dict: dict[str, Any]) -> OrderedDict[str, Any]:
            input_name = evaluator.input_names[0]
            started = time.perf_counter()
            values = evaluator.run(None, {input_name: np.ascontiguousarray(feed_dict[input_name])})
            self.inference_time = time.perf_counter() - started
            return OrderedDict((n, np.ascontiguousarray(v, dtype=np.float32))
                               for n, v in zip(evaluator.output_names, values, strict=True))

        def deactivate_impl(self) -> None:
            pass

    return ReferenceRunner()


def engine_runner(engine_path: str | os.PathLike[str], name: str = "engine") -> Any:
    """A runner for a TensorRT or TensorRT-RTX engine (GPU only; never run in this project's CI).

    Full-TensorRT engines use Polygraphy's ``TrtRunner``; TensorRT-RTX engines (which Polygraphy does not
    drive) use :class:`~qvggt_export.engine.runtime.QVGGTEngine`. Without a GPU the engine runtime raises a
    :class:`QVGGTError` before touching TensorRT.
    """
    path = Path(engine_path)
    if not path.is_file():
        raise QVGGTError(f"engine not found: {path}")
    from qvggt_export.engine import runtime

    try:
        return runtime.polygraphy_runner(path, name=name)
    except MissingDependencyError:
        pass  # no full TensorRT / Polygraphy TRT backend here: try the TensorRT-RTX runtime below
    except QVGGTError as exc:
        if "TensorRT-RTX" not in str(exc):
            raise
    import numpy as np
    import torch

    base = _base_runner()

    class EngineRunner(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(name=name, prefix="engine-runner")
            self.engine: Any = None

        def activate_impl(self) -> None:
            self.engine = runtime.QVGGTEngine(path)  # checks the GPU and the engine's targets first

        def get_input_metadata_impl(self) -> Any:
            from polygraphy.common import TensorMetadata

            return TensorMetadata().add(INPUT_NAME, np.float32, (1, None, 3, None, None))

        def infer_impl(self, feed_dict: dict[str, Any]) -> OrderedDict[str, Any]:
            images = torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT_NAME]))
            started = time.perf_counter()
            outputs = self.engine.infer(images)
            self.inference_time = time.perf_counter() - started
            return OrderedDict((k, np.ascontiguousarray(v.detach().float().cpu().numpy())) for k, v in outputs.items())

        def deactivate_impl(self) -> None:
            self.engine = None

    return EngineRunner()
