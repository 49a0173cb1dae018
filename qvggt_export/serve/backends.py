"""What answers the requests: a TensorRT engine, an ONNX Runtime session or the PyTorch model.

Each backend has a :class:`~qvggt_export.serve.protocol.ModelSignature` (what it takes and returns), a
``platform`` name as Triton reports it, ``infer(images) -> {output: array}`` (images ``[1, S, 3, H, W]`` float32,
already checked against the signature) and ``close()``. ``infer`` may be called from several worker threads at
once; each backend either runs calls concurrently (ONNX Runtime's ``run`` is thread-safe) or serialises them
(the engine and the PyTorch model hold a lock), so the server's ``max_concurrency`` is an upper bound.

* :class:`EngineBackend`: :class:`~qvggt_export.engine.runtime.QVGGTEngine` on a CUDA GPU (GPU only: **not run**
  in this project's CI). Frames per request: the engine's optimization profile.
* :class:`OnnxRuntimeBackend`: the export's ``model.onnx`` on ONNX Runtime (CPU by default), with the parity
  settings of DESIGN.md section 3 (integer QDQ fusions off), so it answers as ``qvggt-export check`` measured.
* :class:`TorchBackend`: the float PyTorch model the export came from (its ``config.json``: preset, checkpoint,
  seed); a reference, not the quantized model.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.serve.protocol import ModelSignature, TensorMetadata, signature_from_onnx_io

__all__ = ["RUNTIMES", "EngineBackend", "InferenceBackend", "OnnxRuntimeBackend", "TorchBackend", "open_backend"]

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "tensorrt", "onnxruntime", "pytorch")
_ENGINE_DATATYPES = {"FLOAT": "FP32", "HALF": "FP16"}


class InferenceBackend(Protocol):
    signature: ModelSignature
    platform: str
    source: Path

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def _onnx_io(onnx_path: Path) -> tuple[str, list[Any], list[tuple[str, list[Any]]]]:
    """``(input name, input dims, [(output name, dims)])`` of a graph, without loading its weights."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends for a file that is not a model
        raise QVGGTError(f"cannot read ONNX model {onnx_path}: {exc}") from exc

    def dims(value: Any) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                for d in value.type.tensor_type.shape.dim]

    if len(graph.input) != 1:
        raise QVGGTError(f"{onnx_path} has inputs {[i.name for i in graph.input]}; the server serves graphs with one "
                         "input, images [1, S, 3, H, W] (a tracking graph, track.onnx, is not served)")
    (image,) = graph.input
    elem_type = image.type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        raise QVGGTError(f"{onnx_path} takes {image.name!r} as {onnx.TensorProto.DataType.Name(elem_type)}; the server "
                         "serves float32 inputs")
    return image.name, dims(image), [(o.name, dims(o)) for o in graph.output]


class OnnxRuntimeBackend:
    """An ONNX graph on ONNX Runtime.

    Args:
        onnx_path: The graph (``model.onnx`` of an export folder).
        max_frames: Frames per request, at most.
        providers: ONNX Runtime execution providers (default CPU).
        threads: Intra-op threads per run (0 = ONNX Runtime's default).
        exact: ``False`` (default): every ONNX Runtime optimisation on, so the Q/DQ export runs as integer kernels
            (``MatMulIntegerToFloat`` for W8A8, ``MatMulNBits`` for 4-bit weights: 1.50x FP32's speed for W8A8
            DSFQ on the CPU, ``benchmarks/results/ort_cpu.md``); ``True``: the parity checker's settings (QDQ fusions
            off), the exact arithmetic ``qvggt-export check`` measures.
    """

    platform = "onnxruntime_onnx"

    def __init__(self, onnx_path: str | Path, max_frames: int, providers: list[str] | None = None,
                 threads: int = 0, exact: bool = False) -> None:
        from qvggt_export.engine.ort_cpu import cpu_session_options
        from qvggt_export.parity.compare import parity_session_options

        self.exact = exact
        self.source = Path(onnx_path)
        if not self.source.is_file():
            raise QVGGTError(f"ONNX model not found: {self.source}")
        input_name, input_dims, outputs = _onnx_io(self.source)
        self.signature = signature_from_onnx_io(input_name, input_dims, outputs, (1, max_frames))
        if exact:
            ort, options = parity_session_options("Serving with ONNX Runtime")
            options.intra_op_num_threads = threads
        else:
            ort, options = cpu_session_options(threads=threads or None)
        try:
            self._session = ort.InferenceSession(str(self.source), options,
                                                 providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise QVGGTError(f"ONNX Runtime cannot load {self.source}: {exc}") from exc

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        names = list(self.signature.output_names)
        values = self._session.run(names, {self.signature.input.name: images})
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        self._session = None


class EngineBackend:
    """A TensorRT / TensorRT-RTX engine through :class:`~qvggt_export.engine.runtime.QVGGTEngine` (GPU only).

    Args:
        engine_path: The engine (``model.engine``); its Hadamard plugin, if any, is registered by the runtime.
        device: CUDA device, e.g. ``"cuda:0"``.
        max_frames: Lower the engine profile's frame limit (``None``: the profile's).
    """

    platform = "tensorrt_plan"

    def __init__(self, engine_path: str | Path, device: str = "cuda:0", max_frames: int | None = None) -> None:
        from qvggt_export.engine.runtime import QVGGTEngine

        self.source = Path(engine_path)
        self._engine = QVGGTEngine(self.source, device=device)
        spec = self._engine.spec
        if spec.points_input is not None:
            self._engine.close()
            raise QVGGTError(f"{self.source} is a tracking engine (inputs images and query_points); the server serves "
                             "the dense engine, model.engine")
        low, _, high = spec.frames
        if max_frames is not None:
            if max_frames < low:
                self._engine.close()
                raise QVGGTError(f"max_frames {max_frames} is below the engine profile's minimum of {low} frames")
            high = min(high, max_frames)

        def datatype(name: str, dtype: str) -> str:
            if dtype not in _ENGINE_DATATYPES:
                raise QVGGTError(f"engine tensor {name!r} is {dtype}; the server sends float32 or float16 tensors")
            return _ENGINE_DATATYPES[dtype]

        height, width = spec.resolution
        self.signature = ModelSignature(
            input=TensorMetadata(spec.input.name, datatype(spec.input.name, spec.input.dtype),
                                 (1, -1, 3, height, width)),
            outputs=tuple(TensorMetadata(o.name, datatype(o.name, o.dtype), o.shape) for o in spec.outputs),
            frames=(low, high))
        if self.signature.input.datatype != "FP32":
            self._engine.close()
            raise QVGGTError(f"{self.source} takes {spec.input.dtype} images; the server serves float32 inputs")

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        outputs = self._engine.infer(torch.from_numpy(images))  # copies: another request may reuse the buffers
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def close(self) -> None:
        self._engine.close()


class TorchBackend:
    """The float PyTorch model an export folder came from (``config.json``: model, checkpoint, seed).

    Args:
        export_dir: A ``qvggt-export`` output folder (its ``model.onnx`` gives the served resolution and outputs).
        max_frames: Frames per request, at most.
        device: ``"cpu"`` or a CUDA device.
    """

    platform = "pytorch_libtorch"

    def __init__(self, export_dir: str | Path, max_frames: int, device: str = "cpu") -> None:
        import torch

        from qvggt_export.model import build_vggt, load_checkpoint

        folder = Path(export_dir)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise QVGGTError(f"the pytorch runtime serves the model of an export folder; {folder} has no config.json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise QVGGTError(f"cannot read {config_path}: {exc}") from exc
        self.source = folder
        input_name, input_dims, outputs = _onnx_io(folder / "model.onnx")
        self.signature = signature_from_onnx_io(input_name, input_dims, outputs, (1, max_frames))
        model = build_vggt(config.get("model", "tiny"), seed=int(config.get("seed", 0)))
        if config.get("checkpoint"):
            load_checkpoint(model, config["checkpoint"])
        try:
            self._device = torch.device(device)
        except RuntimeError as exc:
            raise QVGGTError(f"device must be 'cpu' or a CUDA device such as 'cuda:0', got {device!r}") from exc
        self._model = model.to(self._device).eval()
        self._lock = threading.Lock()  # one forward at a time: a second would only compete for the same cores

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with self._lock, torch.inference_mode():
            predictions = self._model(torch.from_numpy(images).to(self._device))
        return {name: np.ascontiguousarray(predictions[name].float().cpu().numpy())
                for name in self.signature.output_names}

    def close(self) -> None:
        self._model = None


def _auto_runtime(source: Path) -> str:
    if source.suffix in (".engine", ".plan"):
        return "tensorrt"
    if source.suffix == ".onnx":
        return "onnxruntime"
    from qvggt_export.engine.backend import cuda_device_count

    if (source / "model.engine").is_file() and cuda_device_count() > 0:
        return "tensorrt"
    return "onnxruntime"


def open_backend(source: str | Path, runtime: str = "auto", *, max_frames: int | None = None, device: str | None = None,
                 threads: int = 0, ort_exact: bool = False) -> InferenceBackend:
    """Load what the server runs.

    Args:
        source: An export folder, an ``.onnx`` graph or an ``.engine`` file.
        runtime: ``"tensorrt"``, ``"onnxruntime"``, ``"pytorch"`` or ``"auto"`` (an engine file: tensorrt; an ONNX
            file: onnxruntime; a folder: its ``model.engine`` when a CUDA GPU is visible, else its ``model.onnx``).
        max_frames: Frames per request, at most (an engine: at most its profile's; others: default 32).
        device: ``"cuda:N"`` for engines (default ``cuda:0``), ``"cpu"`` or ``"cuda:N"`` for pytorch.
        threads: ONNX Runtime intra-op threads (0 = its default).
        ort_exact: ONNX Runtime with the parity checker's settings instead of its integer kernels
            (:class:`OnnxRuntimeBackend`).

    Raises:
        QVGGTError: Missing files, a runtime that cannot load the source, or a missing optional dependency.
    """
    source = Path(source)
    if not source.exists():
        raise QVGGTError(f"nothing to serve at {source}: give an export folder, an .onnx file or an .engine file")
    if runtime not in RUNTIMES:
        raise QVGGTError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    chosen = _auto_runtime(source) if runtime == "auto" else runtime
    frames = max_frames if max_frames is not None else 32
    logger.info("serving %s with %s", source, chosen)
    if chosen == "tensorrt":
        engine = source / "model.engine" if source.is_dir() else source
        return EngineBackend(engine, device=device or "cuda:0", max_frames=max_frames)
    if chosen == "onnxruntime":
        graph = source / "model.onnx" if source.is_dir() else source
        try:
            return OnnxRuntimeBackend(graph, frames, threads=threads, exact=ort_exact)
        except ModuleNotFoundError as exc:
            raise MissingDependencyError("onnxruntime", "cpu", "Serving with ONNX Runtime") from exc
    if not source.is_dir():
        raise QVGGTError(f"the pytorch runtime serves an export folder (config.json, model.onnx), not {source}")
    return TorchBackend(source, frames, device=device or "cpu")
