"""``qvggt-export serve-repo``: a Triton Inference Server model repository from an export folder.

Per export it writes up to two models, in Triton's layout (``<model>/config.pbtxt``, ``<model>/1/<file>``):

* ``<name>_onnx`` (``platform: "onnxruntime_onnx"``, CPU instances): ``model.onnx``, the CPU fallback, always.
* ``<name>_trt`` for the engine, in the form its runtimes allow (:mod:`qvggt_export.engine.runtimes`):

  - a full-TensorRT, plugin-free engine: ``platform: "tensorrt_plan"`` (``1/model.plan``), loaded by Triton's
    TensorRT backend; Triton's TensorRT version must be the one that built it;
  - any other engine (the Python Hadamard plugin, or TensorRT-RTX, which Triton's TensorRT backend cannot load):
    ``backend: "python"`` with ``1/model.py``, which runs the engine with
    :class:`~qvggt_export.engine.runtime.QVGGTEngine` (the plugin registered first) and needs ``qvggt-export``
    installed in Triton's Python environment.

Every model takes ``images`` ``[1, -1, 3, H, W]`` FP32 with ``max_batch_size: 0`` (the frame axis is the
dynamic one; the engine profile's range is recorded under ``parameters``) and returns the export's outputs with
their dynamic axes as ``-1``. Nothing here needs Triton or TensorRT; ``tests/serve/test_triton_repo.py`` parses
every ``config.pbtxt`` with Triton's own protobuf schema. Loading the repository in Triton has **not been run**
in this project (no GPU, no Triton server here).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvggt_export.engine.runtimes import RUNTIMES, check_runtime, engine_kind, loadable_by
from qvggt_export.errors import QVGGTError
from qvggt_export.io import ensure_writable_dir

__all__ = ["ENGINE_MODELS", "TritonRepoConfig", "write_model_repository"]

logger = logging.getLogger(__name__)

ENGINE_MODELS = ("auto", "tensorrt", "python", "none")
_VERSION = "1"
_ENGINE_SIDECARS = (".profile.json", ".build.log")

# The Python backend model: a thin adapter from Triton's request objects to QVGGTEngine. It imports nothing
# from Triton at module level except the backend utilities, which exist only inside Triton's Python stub.
MODEL_PY = '''\
"""Triton Python-backend model written by qvggt-export serve-repo: runs model.engine with QVGGTEngine.

Needs qvggt-export (with torch and TensorRT or TensorRT-RTX) in Triton's Python environment and a GPU the
engine was built for. The Hadamard plugin, when the engine holds it, is registered before deserialization.
"""

import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from qvggt_export.engine.runtime import QVGGTEngine
from qvggt_export.errors import QVGGTError
from qvggt_export.plugins import register


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        folder = Path(args["model_repository"]) / args["model_version"]
        device = "cuda:" + str(args.get("model_instance_device_id", 0) or 0)
        backend = config.get("parameters", {}).get("engine_backend", {}).get("string_value", "auto")
        if config.get("parameters", {}).get("hadamard_plugin", {}).get("string_value") == "true":
            register(backend)
        self.engine = QVGGTEngine(folder / "model.engine", device=device, backend=backend)

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            try:
                outputs = self.engine.infer(torch.from_numpy(images))
            except QVGGTError as exc:  # wrong frame count, resolution, ...: the message says what is expected
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            tensors = [pb_utils.Tensor(name, outputs[name].cpu().numpy()) for name in self.output_names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        self.engine.close()
'''


@dataclass(frozen=True)
class TritonRepoConfig:
    """What to write.

    Attributes:
        export_dir: A ``qvggt-export`` output folder (``model.onnx``; ``model.engine`` when built).
        repo_dir: The model repository (created; other models in it are left alone).
        name: Model name prefix (``<name>_onnx``, ``<name>_trt``).
        engine_model: ``auto`` (tensorrt_plan when the engine allows it, else python), ``tensorrt`` (refused with
            the reason when the engine cannot load in Triton's TensorRT backend), ``python``, or ``none``.
        gpu_instances: Instances per GPU of the engine model.
        cpu_instances: CPU instances of the ONNX Runtime model.
        overwrite: Replace models of the same name already in the repository.
    """

    export_dir: Path
    repo_dir: Path
    name: str = "vggt"
    engine_model: str = "auto"
    gpu_instances: int = 1
    cpu_instances: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "export_dir", Path(self.export_dir))
        object.__setattr__(self, "repo_dir", Path(self.repo_dir))
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise QVGGTError(f"model name must be letters, digits, '-' or '_', got {self.name!r}")
        if self.engine_model not in ENGINE_MODELS:
            raise QVGGTError(f"engine model must be one of {', '.join(ENGINE_MODELS)}, got {self.engine_model!r}")
        if self.gpu_instances < 1 or self.cpu_instances < 1:
            raise QVGGTError("instance counts must be >= 1")


def _onnx_signature(onnx_path: Path) -> tuple[tuple[str, list[int]], list[tuple[str, list[int]]]]:
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends for a file that is not a model
        raise QVGGTError(f"cannot read ONNX model {onnx_path}: {exc}") from exc
    if len(graph.input) != 1:
        raise QVGGTError(f"{onnx_path} has inputs {[i.name for i in graph.input]}; expected one, images")

    def dims(value: Any) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                for d in value.type.tensor_type.shape.dim]

    image = graph.input[0]
    shape = dims(image)
    if len(shape) != 5 or shape[3] < 1 or shape[4] < 1:
        raise QVGGTError(f"{onnx_path}: input {image.name!r} has shape {shape}; expected [1, S, 3, H, W]")
    return (image.name, [1, -1, *shape[2:]]), [(o.name, dims(o)) for o in graph.output]


def _tensor_block(kind: str, tensors: list[tuple[str, list[int]]]) -> str:
    entries = []
    for name, dims in tensors:
        shape = ", ".join(map(str, dims))
        entries.append(f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ {shape} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _config_text(name: str, header: str, image: tuple[str, list[int]], outputs: list[tuple[str, list[int]]],
                 instance_kind: str, count: int, parameters: dict[str, str]) -> str:
    lines = [f'name: "{name}"', header, "max_batch_size: 0", ""]
    text = "\n".join(lines) + _tensor_block("input", [image]) + _tensor_block("output", outputs)
    text += f"instance_group [\n  {{\n    count: {count}\n    kind: {instance_kind}\n  }}\n]\n"
    for key, value in parameters.items():
        text += f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
    return text


def _engine_form(config: TritonRepoConfig, engine: Path) -> tuple[str | None, str]:
    """``("tensorrt" | "python" | None, why)`` for the engine model."""
    if config.engine_model == "none":
        return None, "engine model not requested (--engine-model none)"
    if not engine.is_file():
        if config.engine_model != "auto":
            raise QVGGTError(f"--engine-model {config.engine_model}: {engine} does not exist (the export built no "
                             "engine)")
        return None, f"no engine in {config.export_dir}"
    kind = engine_kind(engine)
    if config.engine_model == "tensorrt":
        check_runtime(kind, "triton-tensorrt", engine)  # one-line refusal with the reason
        return "tensorrt", "requested; plugin-free full TensorRT engine"
    if config.engine_model == "python":
        return "python", "requested"
    if "triton-tensorrt" in loadable_by(kind.flavour, kind.plugin):
        return "tensorrt", f"{kind.describe()}: Triton's TensorRT backend loads it"
    return "python", (f"{kind.describe()}: Triton's TensorRT backend cannot load it "
                      f"({RUNTIMES['triton-tensorrt'].description} loads plugin-free full TensorRT engines only)")


def _copy_onnx(onnx_path: Path, folder: Path) -> None:
    """``model.onnx`` and any external-data files it names (they keep their relative names)."""
    import onnx

    shutil.copy2(onnx_path, folder / "model.onnx")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    locations = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    for location in locations:
        shutil.copy2(onnx_path.parent / location, folder / location)


def write_model_repository(config: TritonRepoConfig) -> dict[str, Any]:
    """Write the models; returns a summary ``{"repository", "models": [{"name", "kind", "files", "why"}]}``.

    Each model is written into a temporary folder inside the repository and renamed into place, so a failure
    leaves no half-written model.

    Raises:
        QVGGTError: Not an export folder, an existing model without ``overwrite``, or an engine model the engine
            cannot be (e.g. ``tensorrt`` for a plugin or TensorRT-RTX engine).
    """
    export = config.export_dir
    onnx_path = export / "model.onnx"
    if not onnx_path.is_file():
        raise QVGGTError(f"{export} is not a qvggt-export output folder (no model.onnx)")
    engine = export / "model.engine"
    form, why = _engine_form(config, engine)
    image, outputs = _onnx_signature(onnx_path)
    frames = {"frames_min": "1", "frames_max": "32"}
    plugin = False
    if form is not None:
        kind = engine_kind(engine)
        plugin = kind.plugin
        profile = engine.with_name(engine.name + ".profile.json")
        if profile.is_file():
            ranges = json.loads(profile.read_text()).get("frames", {})
            frames = {"frames_min": str(ranges.get("min", 1)), "frames_max": str(ranges.get("max", 1))}
    models = [(f"{config.name}_onnx", "onnxruntime", "CPU fallback (ONNX Runtime)")]
    if form is not None:
        models.append((f"{config.name}_trt", form, why))
    repo = ensure_writable_dir(config.repo_dir)
    for name, _, _ in models:
        if (repo / name).exists() and not config.overwrite:
            raise QVGGTError(f"{repo / name} exists; remove it, pass --overwrite, or choose another --name")

    summary: list[dict[str, Any]] = []
    for name, kind_name, reason in models:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
        try:
            version = staging / _VERSION
            version.mkdir()
            if kind_name == "onnxruntime":
                _copy_onnx(onnx_path, version)
                header = 'platform: "onnxruntime_onnx"'
                text = _config_text(name, header, image, outputs, "KIND_CPU", config.cpu_instances,
                                    {"frames_min": "1", "frames_max": frames["frames_max"]})
            elif kind_name == "tensorrt":
                shutil.copy2(engine, version / "model.plan")
                text = _config_text(name, 'platform: "tensorrt_plan"', image, outputs, "KIND_GPU",
                                    config.gpu_instances, frames)
            else:
                shutil.copy2(engine, version / "model.engine")
                for suffix in _ENGINE_SIDECARS:  # the runtime reads the flavour from the profile
                    sidecar = engine.with_name(engine.name + suffix)
                    if sidecar.is_file():
                        shutil.copy2(sidecar, version / ("model.engine" + suffix))
                (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
                backend = engine_kind(engine).flavour
                text = _config_text(name, 'backend: "python"', image, outputs, "KIND_GPU", config.gpu_instances,
                                    {**frames, "engine_backend": backend, "hadamard_plugin": str(plugin).lower()})
            (staging / "config.pbtxt").write_text(text, encoding="utf-8")
            final = repo / name
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        files = sorted(str(p.relative_to(repo)) for p in final.rglob("*") if p.is_file())
        summary.append({"name": name, "kind": kind_name, "files": files, "why": reason})
        logger.info("wrote Triton model %s (%s)", name, kind_name)
    return {"repository": str(repo), "models": summary}
