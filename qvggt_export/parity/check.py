"""``qvggt-export check``: an exported graph against the PyTorch model it came from, as one API call.

:func:`check_export` takes an export folder written by ``qvggt-export`` (``config.json``, ``report.json``,
``model.onnx`` and, for quantized formats, ``quantized_model.{json,safetensors}``) or explicit paths,
rebuilds the PyTorch model (the fake-quant model from its saved state, the float model from its preset or
config, seed and checkpoint), and runs both on the same inputs through Polygraphy's ``Comparator``:
the PyTorch model in :func:`~qvggt_export.parity.runners.torch_runner`, the graph in Polygraphy's
``OnnxrtRunner`` (ONNX Runtime CPU, integer QDQ fusions off), and a TensorRT / TensorRT-RTX engine when
one is given (GPU only: that path has **not run** in this project's CI).

Per output it reports ``max_abs``, ``max_rel``, ``rel_l2`` and ``cosine`` (worst input), for ``pose_enc``
also the camera rotation / translation-direction / field-of-view differences in degrees, and judges it by
the criterion of :func:`~qvggt_export.parity.compare.tolerance_for`:

* float32 graph: ``max_abs / max|torch| <= 1e-5``, judged by Polygraphy's ``CompareFunc.simple`` with a
  per-output absolute tolerance ``1e-5 x max|torch|`` and ``check_error_stat="max"``;
* float16 graph (vs the float32 model): ``rel_l2 <= max(2^-11, 2 x fp16_noise)``, the noise being a float16
  copy of the PyTorch model's relative L2 distance from the float32 model on the same input;
* quantized graph: ``rel_l2 <= max(1e-5, 2 x quant_noise)``, the noise being the fake-quant model's own
  relative L2 distance from the float model on the same input. Quantization *steps* are not an honest
  unit at the outputs of a deep network (rounding ties compound); they are at each quantized layer, so
  quantized graphs are also checked layer by layer (:func:`~qvggt_export.parity.formats.layer_parity`:
  activation codes within 1 step (integer steps, or E4M3 steps for fp8), at most 0.1 % of them flipped,
  layer output within 1e-3), which names the first diverging layer.

nvfp4 graphs, which ONNX Runtime 1.32 cannot run (no ``trt::TRT_FP4DynamicQuantize`` kernel, no CPU
FLOAT4E2M1 Q/DQ), run in ONNX's NumPy reference evaluator instead
(:func:`~qvggt_export.parity.runners.reference_runner`, runtime ``onnx-reference``; slow, keep inputs small),
judged by the quantized criterion and layer by layer in that evaluator
(:func:`~qvggt_export.parity.formats.nvfp4_layer_parity`), and are always checked structurally
(:func:`~qvggt_export.parity.formats.nvfp4_structure`: decoded codes and scales equal PyTorch's, node chain);
the report says so (``method``, ``onnxruntime.reason``) and names the first failing layer of either check.

The JSON report is written atomically (default ``<export folder>/check.json``). Nothing else is written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.export.qdq import LAYER_MAP_KEY
from qvggt_export.formats import format_names, get_format
from qvggt_export.io import write_json_atomic
from qvggt_export.parity.driver import compare_runs
from qvggt_export.parity.formats import NVFP4_METHOD, NVFP4_REASON, NVFP4_RUNTIME, layer_parity, nvfp4_structure
from qvggt_export.quant.config import format_family

logger = logging.getLogger(__name__)

_OUTPUT_UNITS = "outputs: relative to the output's scale (see each criterion)"
_UNITS = {
    "int": f"{_OUTPUT_UNITS}; layers: activation codes in quantization steps (max delta 1 step, <= 0.1 % "
           "flipped), transform and output relative L2",
    "fp8": f"{_OUTPUT_UNITS}; layers: activation codes in E4M3 steps (distance of the bit patterns: max 1 step, "
           "<= 0.1 % flipped), transform and output relative L2",
    "nvfp4": f"{_OUTPUT_UNITS}; structure: exact equality of decoded FP4 codes, E4M3 block scales and global "
             "scales, and the node chain; layers (reference evaluator): dequantized activations differing in "
             "<= 0.1 % of elements, transform and output relative L2",
}
LOCALIZE_MODES = ("always", "on-failure", "never")
REPORT_NAME = "check.json"


@dataclass(frozen=True)
class CheckConfig:
    """What to check, and on which inputs.

    Attributes:
        export_dir: a folder written by ``qvggt-export`` (fills in every other path and the model).
        onnx: the graph (default ``export_dir/model.onnx``).
        quantized: the saved fake-quant model, ``quantized_model.json`` (default: the export folder's).
        bits: the graph's format (``fp32``, ``fp16`` or a quantized format such as ``w4a4``); default: the
            export folder's. Checked against the graph and the saved model.
        model: preset name or JSON file of the float model (default: the export folder's).
        checkpoint: float weights for ``model`` (default: the export folder's; none = seeded random init).
        seed: seed of the random initialisation (default: the export folder's, else 0).
        images: a folder of images, used as one sequence (default: generated pseudo multi-view sequences).
        preprocess: ``crop`` or ``pad`` for ``images`` (the official loader's modes).
        frames: frame counts of the generated sequences (default: the export's frame count, and 1).
        input_seed: seed of the generated sequences.
        engine: a TensorRT / TensorRT-RTX engine to compare as well (needs a CUDA GPU).
        runtime: the runtime the engine is meant for (a key of :data:`qvggt_export.engine.runtimes.RUNTIMES`, e.g.
            ``triton-tensorrt``); a pairing that cannot work is refused before anything runs.
        localize: layer-by-layer check of quantized graphs: ``always``, ``on-failure`` or ``never``.
        report: where the JSON goes (default ``export_dir/check.json``, else ``<onnx>.check.json``).
    """

    export_dir: Path | None = None
    onnx: Path | None = None
    quantized: Path | None = None
    bits: str | None = None
    model: str | None = None
    checkpoint: str | None = None
    seed: int | None = None
    images: Path | None = None
    preprocess: str = "crop"
    frames: tuple[int, ...] | None = None
    input_seed: int = 1
    engine: Path | None = None
    runtime: str | None = None
    localize: str = "always"
    report: Path | None = None

    def __post_init__(self) -> None:
        for name in ("export_dir", "onnx", "quantized", "images", "engine", "report"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.export_dir is None and self.onnx is None:
            raise QVGGTError("give an export folder or an ONNX file to check")
        if self.runtime is not None:
            from qvggt_export.engine.runtimes import RUNTIMES

            if self.engine is None:
                raise QVGGTError("--runtime names the runtime an engine is meant for; give the engine with --engine")
            if self.runtime not in RUNTIMES:
                raise QVGGTError(f"unknown runtime {self.runtime!r}; known: {', '.join(RUNTIMES)}")
        if self.localize not in LOCALIZE_MODES:
            raise QVGGTError(f"localize must be one of {LOCALIZE_MODES}, got {self.localize!r}")
        if self.frames is not None:
            frames = tuple(int(f) for f in self.frames)
            if not frames or min(frames) < 1:
                raise QVGGTError(f"frame counts must be >= 1, got {list(self.frames)}")
            object.__setattr__(self, "frames", frames)
        from qvggt_export.model.preprocess import PREPROCESS_MODES

        if self.preprocess not in PREPROCESS_MODES:
            raise QVGGTError(f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")


@dataclass
class _Resolved:
    onnx: Path
    bits: str
    model: Any
    checkpoint: str | None
    seed: int
    quantized: Path | None
    frames: int
    report: Path
    source: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QVGGTError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise QVGGTError(f"{what} {path} is not a JSON object")
    return data


def _graph_kind(proto: onnx.ModelProto) -> str:
    """``quantized`` (the exporter's layer map), ``fp16`` (float16 weights) or ``fp32``."""
    if any(p.key == LAYER_MAP_KEY for p in proto.metadata_props):
        return "quantized"
    types = [i.data_type for i in proto.graph.initializer]
    return "fp16" if types.count(onnx.TensorProto.FLOAT16) > types.count(onnx.TensorProto.FLOAT) else "fp32"


def _resolve(config: CheckConfig) -> _Resolved:
    folder_config: dict[str, Any] = {}
    folder_report: dict[str, Any] = {}
    folder = config.export_dir
    if folder is not None:
        if not folder.is_dir():
            raise QVGGTError(f"export folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise QVGGTError(f"{folder} is not a qvggt-export output folder (no config.json); pass --onnx and "
                             "--model / --quantized to check other files")
        from qvggt_export.rundir import verify_run_folder

        verify_run_folder(folder)  # every artifact from one run (run.json), or a one-line refusal
        folder_config = _read_json(folder / "config.json", "run configuration")
        if (folder / "report.json").is_file():
            folder_report = _read_json(folder / "report.json", "run report")
    onnx_path = config.onnx or (folder / "model.onnx" if folder else None)
    assert onnx_path is not None  # CheckConfig requires one of the two
    if not onnx_path.is_file():
        raise QVGGTError(f"ONNX file not found: {onnx_path}")
    bits = config.bits or folder_config.get("bits")
    if bits is None:
        raise QVGGTError("--bits is required without an export folder (fp32, fp16 or a quantized format)")
    quantized_format = bits not in format_names(quantized=False)
    if quantized_format:
        format_family(bits)  # a clear error for an unknown format
    quantized = config.quantized
    if quantized is None and quantized_format and folder is not None:
        quantized = folder / "quantized_model.json"
    if quantized is not None:
        quantized = quantized.with_suffix(".json")
        if not quantized_format:
            raise QVGGTError(f"bits {bits} is a float format, but a quantized model was given ({quantized})")
        if not quantized.is_file():
            raise QVGGTError(f"quantized model not found: {quantized}")
    elif quantized_format:
        raise QVGGTError(f"bits {bits} needs the fake-quant PyTorch model (--quantized quantized_model.json); "
                         "only a float model was given")
    model = config.model or (folder_report.get("model") or {}).get("spec") or folder_config.get("model")
    if model is None:
        raise QVGGTError("--model is required without an export folder (a preset name or a JSON config)")
    checkpoint = config.checkpoint if config.checkpoint is not None else folder_config.get("checkpoint")
    seed = config.seed if config.seed is not None else int(folder_config.get("seed", 0))
    frames = int(folder_config.get("frames", 2))
    report = config.report or (folder / REPORT_NAME if folder else onnx_path.with_suffix(".check.json"))
    return _Resolved(onnx_path, bits, model, checkpoint, seed, quantized, frames, report,
                     {"export_dir": str(folder) if folder else None})


def _float_model(spec: Any, checkpoint: str | None, seed: int) -> nn.Module:
    from qvggt_export.model import load_model

    return load_model(spec, checkpoint, seed=seed)


def _input_geometry(proto: onnx.ModelProto) -> tuple[str, int, int]:
    if len(proto.graph.input) != 1:
        raise QVGGTError(f"expected one graph input (images), found {[i.name for i in proto.graph.input]}")
    graph_input = proto.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != 5 or not dims[3].dim_value or not dims[4].dim_value:
        raise QVGGTError(f"graph input {graph_input.name!r} is not [B, S, 3, H, W] with a fixed resolution")
    return graph_input.name, dims[3].dim_value, dims[4].dim_value


def _inputs(config: CheckConfig, resolved: _Resolved, height: int, width: int, patch: int
            ) -> tuple[list[torch.Tensor], list[str]]:
    if config.images is not None:
        from qvggt_export.model.preprocess import load_and_preprocess_images

        folder = config.images
        if not folder.is_dir():
            raise QVGGTError(f"image folder not found: {folder}")
        from qvggt_export.calib.folders import IMAGE_SUFFIXES

        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise QVGGTError(f"no images (.png/.jpg/...) in {folder}")
        images = load_and_preprocess_images(paths, config.preprocess, target_size=width, patch_size=patch)
        if tuple(images.shape[-2:]) != (height, width):
            raise QVGGTError(f"the images of {folder} preprocess ({config.preprocess}) to "
                             f"{tuple(images.shape[-2:])}, but the graph takes {(height, width)}: use "
                             "--preprocess pad for square exports, or images of the export's aspect ratio")
        return [images.unsqueeze(0)], [f"{folder} ({len(paths)} frames, {config.preprocess})"]
    from qvggt_export.calib import SyntheticSequenceConfig
    from qvggt_export.calib.synthetic import generate_sequences

    counts = config.frames or tuple(dict.fromkeys((resolved.frames, 1)))
    batches, labels = [], []
    for count in counts:
        sequence = generate_sequences(SyntheticSequenceConfig(num_sequences=1, frames=count, height=height,
                                                              width=width, seed=config.input_seed + count))[0]
        batches.append(sequence.unsqueeze(0))
        labels.append(f"generated sequence, {count} frames, seed {config.input_seed + count}")
    return batches, labels


def check_export(config: CheckConfig) -> dict[str, Any]:
    """Check an export against its PyTorch model; returns the report (also written to ``config.report``).

    The report's ``passed`` is true when every output of every runtime meets its criterion on every input and,
    for quantized graphs, no layer fails the layer-by-layer check. Bad input raises :class:`QVGGTError`
    before any report is written.
    """
    from qvggt_export.parity.runners import engine_runner, onnxrt_runner, reference_runner, torch_runner

    started = time.perf_counter()
    if config.runtime is not None and config.engine is not None:
        from qvggt_export.engine.runtimes import check_runtime, engine_kind

        check_runtime(engine_kind(config.engine), config.runtime, config.engine)
    resolved = _resolve(config)
    import importlib.util

    if importlib.util.find_spec("polygraphy") is None:  # before any model is built
        raise MissingDependencyError("polygraphy", "cpu", "qvggt-export check")
    proto = onnx.load(str(resolved.onnx), load_external_data=False)
    kind_of_graph = _graph_kind(proto)
    quantized = resolved.bits not in format_names(quantized=False)
    expected = "quantized" if quantized else resolved.bits
    if kind_of_graph != expected:
        raise QVGGTError(f"bits {resolved.bits} does not match the graph {resolved.onnx}, which is a "
                         f"{kind_of_graph} export")
    input_name, height, width = _input_geometry(proto)
    output_names = [o.name for o in proto.graph.output]
    del proto

    float_model = _float_model(resolved.model, resolved.checkpoint, resolved.seed)
    if quantized:
        from qvggt_export.quant.state import load_quantized

        model, quant_config = load_quantized(resolved.quantized)
        if quant_config.bits != resolved.bits:
            raise QVGGTError(f"bits {resolved.bits} does not match the saved model {resolved.quantized}, which is "
                             f"{quant_config.bits}")
    else:
        model = float_model
    patch = model.config.aggregator.patch_size
    inputs, labels = _inputs(config, resolved, height, width, patch)

    family = format_family(resolved.bits) if quantized else None
    # nvfp4: ONNX Runtime has no kernels for it, so ONNX's reference evaluator runs the graph instead.
    on_onnxruntime = get_format(resolved.bits).onnxruntime
    graph_runtime = "onnxruntime" if on_onnxruntime else "onnx-reference"
    runners = [torch_runner(model, output_names, name="pytorch"),
               onnxrt_runner(resolved.onnx, name=graph_runtime) if on_onnxruntime
               else reference_runner(resolved.onnx, name=graph_runtime)]
    if config.engine is not None:
        runners.append(engine_runner(config.engine, name="engine"))
    if quantized:
        runners.append(torch_runner(float_model, output_names, name="pytorch-noise"))
    elif resolved.bits == "fp16":
        from qvggt_export.parity.compare import half_precision_model

        runners.append(torch_runner(half_precision_model(float_model), output_names, name="pytorch-noise"))
    kind = "quantized" if quantized else resolved.bits
    runtimes = compare_runs(runners, inputs, kind, labels, input_names=(input_name,))
    if family == "nvfp4":
        runtimes[graph_runtime]["runtime"] = NVFP4_RUNTIME
    else:
        runtimes[graph_runtime]["providers"] = ["CPUExecutionProvider"]
    if "engine" in runtimes:
        runtimes["engine"]["path"] = str(config.engine)

    passed = all(r["passed"] for r in runtimes.values())
    extra: dict[str, Any] = {}
    layers: dict[str, Any] = {"checked": False}
    if not quantized:
        layers["reason"] = "float graph: no quantized layers to check"
    else:
        structure_failing = None
        if family == "nvfp4":
            # Always: with no ONNX Runtime run, the exact structure is half of what is checked.
            structure = nvfp4_structure(model, resolved.onnx)
            structure_failing = structure.pop("first_failing_layer")
            extra = {"method": NVFP4_METHOD, "onnxruntime": {"ran": False, "reason": NVFP4_REASON},
                     "structure": structure}
            passed = passed and structure["passed"]
        if config.localize == "never" or (config.localize == "on-failure" and passed):
            layers["reason"] = f"localize={config.localize}"
        else:
            check = layer_parity(model, resolved.onnx, inputs[0], family)
            layers = {"checked": True, "input": labels[0], **check}
            passed = passed and check["first_failing_layer"] is None
        if family == "nvfp4":  # the first layer the teacher-forced check fails, else the first the structure names
            layers["first_failing_layer"] = layers.get("first_failing_layer") or structure_failing

    report = {
        "passed": passed, "bits": resolved.bits, "onnx": str(resolved.onnx), **resolved.source,
        "quantized_model": str(resolved.quantized) if resolved.quantized else None,
        "model": resolved.model, "checkpoint": resolved.checkpoint, "seed": resolved.seed,
        "reference": "PyTorch fake-quant model" if quantized else "PyTorch float32 model",
        "inputs": [{"shape": list(x.shape), "source": label} for x, label in zip(inputs, labels, strict=True)],
        "runtimes": runtimes, "layers": layers,
        "first_failing_layer": layers.get("first_failing_layer"),
        "units": _UNITS.get(family or "", _UNITS["int"]), **extra,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if resolved.bits == "fp16":
        from qvggt_export.parity.compare import ort_fp16_fallback_ops

        report["onnxruntime_fp32_fallback_ops"] = ort_fp16_fallback_ops(resolved.onnx)
    write_json_atomic(resolved.report, report)
    report["report_path"] = str(resolved.report)
    logger.info("check %s: %s", resolved.onnx, "passed" if passed else "FAILED")
    return report


def summarize(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for a report (the CLI prints them)."""
    lines = [f"check {report['onnx']} ({report['bits']}) vs {report['reference']}"]
    for runtime, data in report["runtimes"].items():
        for name, out in data["outputs"].items():
            extra = ""
            if "pose" in out:
                extra = (f"  rot {out['pose']['rotation_deg_max']:.2e} deg  "
                         f"transl {out['pose']['translation_deg_max']:.2e} deg")
            lines.append(f"{runtime:11s} {name:18s} max_abs {out['max_abs']:.2e}  rel_l2 {out['rel_l2']:.2e}  "
                         f"cos {out['cosine']:.6f}  {out['judged_metric']} tol {out['tolerance']:.2e}  "
                         f"{'ok' if out['passed'] else 'FAILED'}{extra}")
    if "structure" in report:
        structure = report["structure"]
        lines.append(f"structure   {structure['layers']} nvfp4 layers: "
                     f"{'ok' if structure['passed'] else 'FAILED: ' + '; '.join(structure['failures'][:3])}")
        lines.append(f"note        ONNX Runtime not run: {report['onnxruntime']['reason'].split(': ')[0]}; "
                     f"checked by {report['method']}")
    layers = report["layers"]
    if layers.get("checked"):
        worst = max((entry["output_rel"] for entry in layers["layers"]), default=0.0)
        lines.append(f"layers      {len(layers['layers'])} quantized layers (teacher-forced): worst output rel_l2 "
                     f"{worst:.1e}, first failing: {layers['first_failing_layer'] or 'none'}")
    lines.append(f"report: {report['report_path']}")
    return lines



@dataclass
class ExportModels:
    """The PyTorch models of an export folder, rebuilt as :func:`check_export` rebuilds them."""

    float_model: nn.Module
    model: nn.Module  # the fake-quant model (the float model itself for fp32 / fp16 exports)
    bits: str
    onnx: Path
    config: dict[str, Any]
    quantized: Path | None


def load_export_models(export_dir: str | Path) -> ExportModels:
    """Float and fake-quant PyTorch models of an export folder (``config.json`` + ``quantized_model.*``).

    Raises:
        QVGGTError: not an export folder, or a file of it is missing or malformed (named).
    """
    folder = Path(export_dir)
    resolved = _resolve(CheckConfig(export_dir=folder))
    folder_config = _read_json(folder / "config.json", "run configuration")
    float_model = _float_model(resolved.model, resolved.checkpoint, resolved.seed)
    model = float_model
    if resolved.quantized is not None:
        from qvggt_export.quant.state import load_quantized

        model, _ = load_quantized(resolved.quantized)
        model.eval()
    return ExportModels(float_model, model, resolved.bits, resolved.onnx, folder_config, resolved.quantized)
