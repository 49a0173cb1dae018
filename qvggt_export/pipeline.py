"""The whole job, as one API call: model -> calibration data -> quantize -> ONNX -> parity -> engine.

:func:`run_pipeline` validates every input before it writes anything, writes each artifact
atomically, and ends with ``report.json`` (plus ``config.json``, the resolved configuration) in the
output folder. The CLI is a thin layer over this function.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qvggt_export import __version__
from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.io import write_json_atomic
from qvggt_export.rundir import RunFolder

logger = logging.getLogger(__name__)

# Unquantized reference exports: the float model in that precision (float32 graph input and outputs).
FLOAT_FORMATS = ("fp32", "fp16")
ENGINE_LOWERINGS = ("auto", "as-written", "int8-static", "w4a8", "w4a16")
RECON_CHECKPOINT = "reconstruction_checkpoint.safetensors"
DEFAULT_ENGINE_PROFILE = "rtx-default"
# Engine targets per quantization format (DESIGN.md section 3, measured with TensorRT-RTX 1.7.1): FP8 Q/DQ
# compiles from SM89 (Ada) on, NVFP4 from SM100 (Blackwell) on; TensorRT-RTX knows SM120/SM121 of those.
# Integer formats build for every target. "CURRENT" (the build machine's GPU) is checked by the build.
FORMAT_MIN_SM = {"fp8": 89, "nvfp4": 100}
FORMAT_DEFAULT_PROFILES = {"fp8": "rtx-sm89-sm120", "nvfp4": "rtx-sm120"}
# What each format's ONNX and engine carry, for the report.
FORMAT_LOWERING = {
    "int": "opset-21 integer QuantizeLinear/DequantizeLinear: per-channel INT4/INT8 weights, per-token dynamic "
           "activations computed in the graph",
    "fp8": "opset-21 FLOAT8E4M3FN QuantizeLinear/DequantizeLinear: per-channel FP8 weights, per-token dynamic FP8 "
           "activations (unit Q/DQ scale, per-token scale applied after the GEMM)",
    "nvfp4": "opset-23 NVFP4 as TensorRT consumes it: FLOAT4E2M1 weights with FLOAT8E4M3FN block-16 scales "
             "(double DequantizeLinear), activations through trt::TRT_FP4DynamicQuantize (block 16, E4M3 scales, "
             "calibrated global scale) and double DequantizeLinear",
}


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one run needs; written beside the artifacts as ``config.json``.

    Attributes:
        out_dir: output folder (created if missing).
        bits: a quantized format (``"w4a4"``, ``"w6a6"``, ``"w8a8"``, ``"fp8"``, ``"nvfp4"``), or ``"fp32"`` /
            ``"fp16"`` (no quantization: the float reference export in that precision).
        model: preset name (``"tiny"``, ``"tiny-dino"``, ``"vggt-1b"``) or a JSON file with official
            constructor arguments per submodule.
        checkpoint: weights (``model.pt``, ``*.safetensors``, a folder, or a cached HF repo id); ``None``
            keeps the seeded random initialisation (fine for testing the toolchain, not for accuracy).
        method: ``"dsfq"`` (default), ``"rtn"``, ``"smooth"``, ``"rotate"`` or ``"smooth_rotate"`` (paper Tab. 4).
        alpha: smoothing strength (eq. 7).
        recon_iters: block-reconstruction steps per block (0 = off).
        recon_checkpoint: where block reconstruction keeps its progress; ``None`` = inside the run folder (carried
            to the next run of the same configuration, and kept beside ``--out`` by a run that fails).
        calib_data: image folder(s), CO3Dv2 root, video(s) or list file; ``None`` generates pseudo
            multi-view sequences.
        calib_size: calibration sequences selected (the paper: 40).
        calib_pool: candidate sequences drawn before selection (the paper: 400).
        calib_strategy: ``"nfds"`` (noise filter + frame-aware clustering), ``"random"``, ``"filtered"``
            or ``"clustered"``.
        nfds_p, nfds_k: NFDS filter fraction (drop the top p) and K-Means clusters.
        nfds_batch: candidates per forward in the NFDS statistics pass (same statistics at any value; more
            is faster and takes more memory: about 0.8 GB per candidate for VGGT-1B at 518 px, 10 frames).
        nfds_correlation: eq. 12's frame vectors: ``"flattened"`` (the paper's: each frame's patch tokens as one
            ``s x d`` vector) or ``"pooled"`` (mean-pooled frame features, the earlier form).
        skip_bad: skip unreadable calibration files with a warning instead of failing.
        frames: frames per sequence.
        image_size: preprocessing / generation size; ``None`` = the model's ``img_size``.
        preprocess: ``"crop"`` (official default) or ``"pad"`` (square, for fixed-resolution engines).
        seed: seeds data generation and the random initialisation.
        hadamard: ONNX form of the online rotation: ``"function"`` (O(d log d) local function) or
            ``"dense"`` (d x d MatMul).
        engine: build an engine after export.
        export_track: also export the tracking head as ``track.onnx`` (images + query_points -> track, vis,
            conf; the aggregator runs inside it too) and check it against PyTorch in ONNX Runtime.
        engine_hadamard: how the engine runs DSFQ rotations: ``"plugin"`` (the ``qvggt::Hadamard`` TensorRT
            plugin; the engine is built from ``model.plugin.onnx``) or ``"function"`` (TensorRT inlines the
            ONNX function into small GEMMs).
        engine_profile: name of a profile in ``engines/`` or a path to a profile JSON; ``None`` (the default)
            = the format's default: ``rtx-default``, or for fp8 and nvfp4 their own
            (:data:`FORMAT_DEFAULT_PROFILES`: ``rtx-sm89-sm120``, ``rtx-sm120``), since rtx-default also targets
            SM86, which has neither. A profile given explicitly (``rtx-default`` included) must target only
            architectures the format can build for, or the run is refused.
        engine_lowering: how the canonical quantized graph is rewritten for the engine
            (:mod:`qvggt_export.export.lowering`): ``"auto"`` (the per-format default of
            :func:`~qvggt_export.export.lowering.default_lowering`: W4A4 -> ``w4a16``, since TensorRT has no
            4-bit activation math), ``"as-written"``, ``"int8-static"``, ``"w4a8"`` or ``"w4a16"``.
        engine_fp16: also run the unquantized parts of the engine graph (heads, norms, attention) in FP16;
            refused with the ``as-written`` lowering of integer formats (the per-token step floor underflows).
        backend: ``"auto"``, ``"rtx"`` (TensorRT-RTX) or ``"trt"`` (full TensorRT).
        progress: show progress bars.
    """

    out_dir: Path
    bits: str = "w4a4"
    model: str = "tiny"
    checkpoint: str | None = None
    method: str = "dsfq"
    alpha: float = 0.5
    recon_iters: int = 0
    recon_checkpoint: str | None = None
    calib_data: str | None = None
    calib_size: int = 4
    calib_pool: int = 16
    calib_strategy: str = "nfds"
    nfds_p: float = 0.2
    nfds_k: int = 8
    nfds_batch: int = 8
    nfds_correlation: str = "flattened"
    skip_bad: bool = False
    frames: int = 3
    image_size: int | None = None
    preprocess: str = "crop"
    seed: int = 0
    hadamard: str = "function"
    engine: bool = True
    export_track: bool = False
    engine_hadamard: str = "plugin"
    engine_profile: str | None = None
    engine_lowering: str = "auto"
    engine_fp16: bool = False
    backend: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        from qvggt_export.model.preprocess import PREPROCESS_MODES
        from qvggt_export.quant import check_format

        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.bits not in FLOAT_FORMATS:
            object.__setattr__(self, "bits", check_format(self.bits))
            self.quant_config()  # validates method, alpha, recon_iters (refused for fp8 / nvfp4)
        if self.calib_size < 1:
            raise QVGGTError(f"calib_size must be >= 1, got {self.calib_size}")
        if self.calib_pool < self.calib_size:
            raise QVGGTError(f"calib_pool ({self.calib_pool}) must be >= calib_size ({self.calib_size})")
        self.nfds_config()  # validates strategy, p, k
        if self.frames < 1:
            raise QVGGTError(f"frames must be >= 1, got {self.frames}")
        if self.image_size is not None and (self.image_size < 14 or self.image_size % 14):
            raise QVGGTError(f"image_size must be a positive multiple of 14, got {self.image_size}")
        if self.preprocess not in PREPROCESS_MODES:
            raise QVGGTError(f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")
        if self.hadamard not in ("function", "dense"):
            raise QVGGTError(f"hadamard must be 'function' or 'dense', got {self.hadamard!r} (the plugin form "
                             "needs the TensorRT plugin and cannot be checked in ONNX Runtime)")
        if self.engine_hadamard not in ("plugin", "function"):
            raise QVGGTError(f"engine_hadamard must be 'plugin' or 'function', got {self.engine_hadamard!r}")
        if self.backend not in ("auto", "rtx", "trt"):
            raise QVGGTError(f"backend must be auto, rtx or trt, got {self.backend!r}")
        if self.engine_lowering not in ENGINE_LOWERINGS:
            raise QVGGTError(f"engine_lowering must be one of {', '.join(ENGINE_LOWERINGS)}, "
                             f"got {self.engine_lowering!r}")
        if self.engine_lowering not in ("auto", "as-written"):
            wanted = {"int8-static": ("w8a8", "w6a6"), "w4a8": ("w4a4",), "w4a16": ("w4a4",)}[self.engine_lowering]
            if self.bits not in wanted:
                raise QVGGTError(f"engine lowering {self.engine_lowering!r} rewrites {' / '.join(wanted)} graphs, not "
                                 f"{self.bits}; use --engine-lowering auto or as-written")
        if self.engine_fp16 and self.family in ("fp8", "nvfp4"):
            raise QVGGTError(f"engine_fp16 applies to integer and fp32 exports; {self.bits} graphs are already in "
                             "TensorRT's own form")
        if self.engine_fp16 and self.family == "int" and self.resolved_engine_lowering() == "as-written":
            raise QVGGTError("engine_fp16 needs a lowered integer graph (int8-static, w4a8 or w4a16): the "
                             "as-written graph's per-token step floor (1e-8) underflows in FP16")
        if self.engine:
            self.resolved_engine_profile()  # refuses a profile the format cannot build for, before any write

    @property
    def family(self) -> str:
        """``"float"`` (unquantized), ``"int"``, ``"fp8"`` or ``"nvfp4"``."""
        from qvggt_export.quant import format_family

        return "float" if self.bits in FLOAT_FORMATS else format_family(self.bits)

    def resolved_engine_profile(self) -> str:
        """The engine profile this run builds with: ``engine_profile``, or the format's default when it is
        ``None``.

        Raises:
            QVGGTError: the profile cannot be loaded, or targets an architecture the format cannot build for.
        """
        if self.engine_profile is None:
            return FORMAT_DEFAULT_PROFILES.get(self.family, DEFAULT_ENGINE_PROFILE)
        requested = self.engine_profile
        if self.family not in FORMAT_MIN_SM:
            return requested
        from qvggt_export.engine.profiles import load_profile

        profile = load_profile(requested)
        minimum = FORMAT_MIN_SM[self.family]
        bad = [cc for cc in profile.compute_capabilities if cc != "CURRENT" and int(cc[2:]) < minimum]
        if bad:
            raise QVGGTError(
                f"engine profile {profile.name!r} targets {', '.join(bad)}, which cannot run {self.bits} (needs "
                f"SM{minimum} or newer); use --engine-profile {FORMAT_DEFAULT_PROFILES[self.family]}, a profile "
                "without those targets, or --no-engine")
        return requested

    def resolved_engine_lowering(self) -> str:
        """The lowering the engine graph gets: ``engine_lowering``, or the format's default for ``auto``."""
        if self.engine_lowering != "auto":
            return self.engine_lowering
        from qvggt_export.export.lowering import default_lowering

        return default_lowering(self.bits, backend=self.backend)

    def nfds_config(self) -> Any:
        from qvggt_export.calib import NFDSConfig

        return NFDSConfig(strategy=self.calib_strategy, budget=self.calib_size, p=self.nfds_p, k=self.nfds_k,
                          seed=self.seed, batch_size=self.nfds_batch, correlation=self.nfds_correlation)

    def quant_config(self) -> Any:
        from qvggt_export.quant import QuantConfig

        return QuantConfig(bits=self.bits, method=self.method, alpha=self.alpha, seed=self.seed,
                           recon_iters=self.recon_iters)

    @property
    def quantized(self) -> bool:
        return self.bits not in FLOAT_FORMATS

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        logger.info("stage %s ...", name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 3)


def _load_model(config: PipelineConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    from qvggt_export.model import build_vggt, load_checkpoint

    spec: Any = config.model
    if config.model.endswith(".json"):
        path = Path(config.model).expanduser()
        if not path.is_file():
            raise QVGGTError(f"model config file not found: {path}")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise QVGGTError(f"model config {path} is not valid JSON: {exc}") from exc
    model = build_vggt(spec, seed=config.seed)
    info: dict[str, Any] = {"preset": config.model, "name": model.config.name, "spec": spec,
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "checkpoint": config.checkpoint}
    if config.checkpoint:
        load_checkpoint(model, config.checkpoint)
        info["weights"] = "checkpoint"
    else:
        info["weights"] = (f"random init (seed {config.seed}): exercises the toolchain; "
                           "accuracy numbers are not meaningful")
        logger.warning("no --checkpoint: seeded random weights (fine for testing the toolchain, not for accuracy)")
    return model.eval(), info


def _calibration_data(config: PipelineConfig, model: torch.nn.Module, progress: bool
                      ) -> tuple[list[torch.Tensor], dict[str, Any], Any]:
    """Draw a lazy candidate pool, select the calibration set (NFDS by default), load the selection."""
    from qvggt_export.calib import SyntheticSequenceConfig, build_candidate_pool, select_calibration_set

    size = config.image_size or model.config.aggregator.img_size
    patch = model.config.aggregator.patch_size
    if config.calib_data:
        source: Any = config.calib_data
        info: dict[str, Any] = {"kind": "files", "path": str(config.calib_data)}
    else:
        source = SyntheticSequenceConfig(num_sequences=config.calib_pool, frames=config.frames, height=size,
                                         width=size, seed=config.seed)
        info = {"kind": "generated", "generator": "calib.synthetic (scikit-image photos as planes, homographies)"}
    pool = build_candidate_pool(source, config.frames, size, config.preprocess, pool_size=config.calib_pool,
                                seed=config.seed, skip_bad=config.skip_bad, patch_size=patch)
    if len(pool) < config.calib_size:
        raise QVGGTError(f"the calibration source yields {len(pool)} candidate sequences of {config.frames} frames, "
                         f"fewer than --calib-size {config.calib_size}")
    resolutions = sorted(pool.resolutions())
    if len(resolutions) > 1:
        raise QVGGTError(f"calibration sequences have different resolutions after preprocessing {resolutions}; an "
                         "export has one fixed resolution: use --preprocess pad (square) or sources of one aspect "
                         "ratio")
    selection = select_calibration_set(pool, model, config.nfds_config(), progress=progress)
    batches = [sample.unsqueeze(0) for sample in selection.samples()]
    shapes = sorted({tuple(b.shape[-2:]) for b in batches})
    if len(shapes) > 1:
        raise QVGGTError(f"calibration sequences have different resolutions {shapes}; an export has one "
                         "fixed resolution: use --preprocess pad (square) or sources of one aspect ratio")
    info.update(strategy=config.calib_strategy, pool=len(pool), selected=len(batches), frames=config.frames,
                resolution=list(shapes[0]), selection_seconds=round(sum(
                    v for k, v in selection.timing.items() if k in ("statistics_s", "selection_s")), 3),
                kept_after_filter=int(sum(bool(k) for k in selection.kept)), clusters=selection.k_used)
    return batches, info, selection


def _output_errors(float_model: torch.nn.Module, model: torch.nn.Module, batches: list[torch.Tensor],
                   progress: Callable[[Any], Any]) -> dict[str, dict[str, float]]:
    """Quantized-vs-float error per output on the calibration data (relative L2, worst and mean)."""
    from qvggt_export.export.onnx_export import DENSE_OUTPUTS

    errors: dict[str, list[float]] = {}
    with torch.no_grad():
        for images in progress(batches):
            ref, got = float_model(images), model(images)
            for name in DENSE_OUTPUTS:
                if name in ref:
                    num = (got[name] - ref[name]).norm()
                    den = ref[name].norm().clamp_min(1e-30)
                    errors.setdefault(name, []).append(float(num / den))
    return {k: {"rel_l2_mean": sum(v) / len(v), "rel_l2_max": max(v)} for k, v in errors.items()}


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage; returns the report (also written to ``out_dir/report.json``)."""
    from tqdm.auto import tqdm

    def progress(items: Any, **kwargs: Any) -> Any:
        return tqdm(items, disable=not config.progress, leave=False, **kwargs)

    timer = StageTimer()
    started = time.perf_counter()
    report: dict[str, Any] = {"tool": f"qvggt-export {__version__}", "bits": config.bits, "method": config.method
                              if config.quantized else None, "torch": torch.__version__,
                              "python": platform.python_version()}
    if config.quantized:
        report["format"] = {"name": config.bits, "family": config.family, "lowering": FORMAT_LOWERING[config.family]}

    # Inputs first: nothing is written until model, weights and data are known to be good; what needs no model
    # is checked in the first seconds.
    from qvggt_export.preflight import preflight

    preflight(config)
    with timer.stage("load_model"):
        model, report["model"] = _load_model(config)
    if config.export_track and getattr(model, "track_head", None) is None:
        raise QVGGTError(f"--export-track: model {config.model!r} has no tracking head")
    with timer.stage("calibration_data"):
        batches, report["calibration"], selection = _calibration_data(config, model, config.progress)

    # Every stage writes into a staging folder beside --out, which replaces --out only if the run succeeds.
    run = RunFolder(config.out_dir, config.to_dict(), resumable=(RECON_CHECKPOINT,))
    try:
        config = dataclasses.replace(config, out_dir=run.staging)
        out_dir = config.out_dir
        write_json_atomic(out_dir / "config.json", config.to_dict())
        from qvggt_export.calib import write_selection_report

        report["calibration"]["selection_file"] = str(selection.save(out_dir / "calibration_selection.json"))
        report["calibration"]["selection_report"] = {k: str(v) for k, v in write_selection_report(
            selection, out_dir / "calibration").items()}

        float_model = None
        if config.quantized:
            from qvggt_export.quant.calibrate import calibrate

            quant_config = config.quant_config()
            with timer.stage("quantize"):
                float_model = copy.deepcopy(model)
                # Reconstruction checkpoints into the run folder (carried over by RunFolder: rerunning the same
                # command resumes) or where --recon-checkpoint says.
                checkpoint = (Path(config.recon_checkpoint) if config.recon_checkpoint else out_dir / RECON_CHECKPOINT
                              ) if config.recon_iters else None
                result = calibrate(model, quant_config, batches, progress, recon_checkpoint=checkpoint)
                layers = result.layers
                report["quantization"] = {
                    "config": dataclasses.asdict(quant_config),
                    "layers": len(layers),
                    "transformed_layers": result.transformed,
                    "calibration_tokens": result.calibration_tokens,
                    "roles": sorted({layer.role for layer in layers}),
                    "weight_rel_error": {layer.name: round(layer.weight_rel_error, 6) for layer in layers},
                    "reconstruction": result.reconstruction,
                }
                if result.input_amax:
                    report["quantization"]["input_amax"] = {k: round(v, 6) for k, v in result.input_amax.items()}
            from qvggt_export.quant.state import save_quantized

            weights_path, _ = save_quantized(model, out_dir / "quantized_model", report["model"]["spec"], quant_config)
            report["quantization"]["state"] = str(weights_path)
            with timer.stage("quant_error"):
                report["quantization"]["output_error_vs_float"] = _output_errors(float_model, model, batches, progress)

        from qvggt_export.export import export_onnx
        from qvggt_export.export.qdq import opset_for_format

        onnx_path = out_dir / "model.onnx"
        with timer.stage("export_onnx"):
            opset = opset_for_format(config.family if config.quantized else "int")
            precision = "fp32" if config.quantized else config.bits
            exported = export_onnx(model, onnx_path, batches[0], hadamard=config.hadamard, opset=opset,
                                   precision=precision)
        report["onnx"] = {"path": str(onnx_path), "size_bytes": exported.size_bytes, "opset": exported.opset,
                          "nodes": exported.num_nodes, "quantized_linears": exported.num_qlinear,
                          "input_shape": exported.input_shape, "outputs": exported.outputs,
                          "external_data": exported.external_data, "precision": exported.precision}

        with timer.stage("parity"):
            report["parity"] = _parity_stage(config, model, float_model, onnx_path, batches)
        if config.export_track:
            with timer.stage("export_track"):
                report["track"] = _track_stage(config, model, float_model, batches, opset)

        report["engine"] = _build_engine_stage(config, onnx_path, timer, float_model or model, batches)
        if config.export_track:
            report["track"]["engine"] = _track_engine_stage(config, Path(report["track"]["path"]), timer, batches)
        report["timings_s"] = dict(timer.seconds, total=round(time.perf_counter() - started, 3))
        if config.quantized:
            # All calibration work: reading the pool, NFDS, loading the selection (calibration_data) + quantize.
            calibration_s = timer.seconds.get("calibration_data", 0.0) + timer.seconds.get("quantize", 0.0)
            report["calibration"]["selection_share_of_calibration"] = round(
                report["calibration"]["selection_seconds"] / max(calibration_s, 1e-9), 3)
        write_json_atomic(out_dir / "report.json", report)
        return run.commit()
    except BaseException:
        run.abort()
        raise


def _track_stage(config: PipelineConfig, model: torch.nn.Module, float_model: torch.nn.Module | None,
                 batches: list[torch.Tensor], opset: int) -> dict[str, Any]:
    """The optional tracking graph ``track.onnx`` and its ONNX Runtime parity (two frame / point counts that
    differ from the export's example: both axes are dynamic)."""
    from qvggt_export.export.track_export import export_track_onnx

    images = batches[0]
    height, width = images.shape[-2:]
    generator = torch.Generator().manual_seed(config.seed)

    def points(count: int) -> torch.Tensor:
        return torch.rand(images.shape[0], count, 2, generator=generator) * torch.tensor([width - 1, height - 1])

    exported = export_track_onnx(model, config.out_dir / "track.onnx", images, points(8), opset=opset,
                                 hadamard=config.hadamard)
    result: dict[str, Any] = {"path": str(exported.onnx_path), "size_bytes": exported.size_bytes,
                              "outputs": exported.outputs, "iters": exported.iters,
                              "input_shapes": exported.input_shapes}
    if config.family == "nvfp4":
        result["parity"] = {"passed": None, "reason": "ONNX Runtime cannot run NVFP4 graphs (see parity)"}
        return result
    from qvggt_export.parity.track import check_track_parity

    cases = [(images, points(5))]
    if images.shape[1] > 1:
        cases.append((images[:, :1], points(11)))
    result["parity"] = check_track_parity(model, exported.onnx_path, cases,
                                          float_model=float_model if config.quantized else None).to_dict()
    return result


def _parity_stage(config: PipelineConfig, model: torch.nn.Module, float_model: torch.nn.Module | None,
                  onnx_path: Path, batches: list[torch.Tensor]) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch (outputs, then layer by layer); nvfp4, which ONNX Runtime cannot run, gets the
    structural check and the reference evaluator instead (:mod:`qvggt_export.parity.formats`)."""
    from qvggt_export.parity import check_parity
    from qvggt_export.parity.formats import layer_parity, nvfp4_parity

    # Every calibration batch, plus a frame count the export was not traced with (dynamic axis).
    inputs = list(batches)
    if batches[0].shape[1] > 1:
        inputs.append(batches[0][:, :1])
    if config.family == "nvfp4":
        return nvfp4_parity(model, float_model, onnx_path, inputs)
    precision = "fp32" if config.quantized else config.bits
    parity = check_parity(model, onnx_path, inputs, float_model=float_model, precision=precision).to_dict()
    if config.quantized:
        # Layer by layer, each from ONNX Runtime's own input: names the first wrong layer, if any.
        layers = layer_parity(model, onnx_path, batches[0], config.family)
        parity["layers"] = layers
        parity["passed"] = parity["passed"] and layers["first_failing_layer"] is None
    return parity


def _plugin_graph(onnx_path: Path, out_dir: Path, name: str = "model.plugin.onnx") -> tuple[Path, int]:
    """A copy of the graph whose Hadamard function calls are TensorRT plugin nodes, written to ``out_dir / name``.

    External weights stay where they are (the copy references the same ``.data`` file). NVFP4's
    ``trt::TRT_FP4DynamicQuantize`` stays as it is: TensorRT's ONNX parser imports it natively."""
    import onnx

    from qvggt_export.export.hadamard_onnx import retarget_hadamard
    from qvggt_export.io import atomic_write

    proto = onnx.load(str(onnx_path), load_external_data=False)
    count = retarget_hadamard(proto, "plugin")
    if not count:
        return onnx_path, 0
    target = out_dir / name
    atomic_write(target, lambda tmp: onnx.save(proto, tmp))
    return target, count


def _lowered_graph(config: PipelineConfig, onnx_path: Path, lowering: str, reference_model: torch.nn.Module,
                   batches: list[torch.Tensor]) -> tuple[Path, dict[str, Any]]:
    """The graph the engine is built from: the canonical export rewritten for the target (static activation
    scales from the calibration batches, or weight-only INT4), with its accuracy measured in ONNX Runtime
    against the float model on the same batches (in-sample for static scales: the report says so)."""
    import onnx

    from qvggt_export.export.lowering import lower_for_target

    if lowering == "as-written" and not config.engine_fp16:
        return onnx_path, {"target": "as-written", "note": "the canonical graph, unchanged"}
    float_outputs = []
    with torch.no_grad():
        for images in batches:
            outputs = reference_model(images)
            float_outputs.append({k: v.float().numpy() for k, v in outputs.items() if isinstance(v, torch.Tensor)})
    lowered, info = lower_for_target(onnx.load(str(onnx_path)), lowering, calibration_inputs=batches,
                                     float_outputs=float_outputs, float16=config.engine_fp16)
    from qvggt_export.export.onnx_export import save_graph

    path = config.out_dir / "model.lowered.onnx"
    save_graph(lowered, path, check=False)  # the lowering's own ONNX Runtime run has already loaded it
    return path, info.to_dict()


def _build_engine_stage(config: PipelineConfig, onnx_path: Path, timer: StageTimer,
                        reference_model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Lower the canonical graph for the target, swap Hadamard functions for plugin nodes, build the engine.

    Args:
        reference_model: the float model (the lowering's accuracy is measured against it).
        batches: calibration batches (static activation scales of the ``int8-static`` / ``w4a8`` lowerings).
    """
    if not config.engine:
        return {"path": None, "reason": "engine build disabled (--no-engine)"}
    engine_path = config.out_dir / "model.engine"
    profile = config.resolved_engine_profile()
    choice: dict[str, Any] = {"profile_name": profile}
    if config.engine_profile is None and profile != DEFAULT_ENGINE_PROFILE:
        choice["profile_reason"] = (f"{DEFAULT_ENGINE_PROFILE} targets architectures without {config.bits} support; "
                                    f"{profile} is the default for {config.bits}")
    with timer.stage("lower_for_engine"):
        graph, choice["lowering"] = _lowered_graph(config, onnx_path, config.resolved_engine_lowering(),
                                                   reference_model, batches)
    with timer.stage("build_engine"):
        data, graph, plugin_nodes = _engine_from_graph(config, graph, engine_path, profile,
                                                       config.out_dir / "model.plugin.onnx")
    return _engine_report(config, graph, data, plugin_nodes, choice)


def _engine_report(config: PipelineConfig, graph: Path, data: dict[str, Any], plugin_nodes: int,
                   choice: dict[str, Any]) -> dict[str, Any]:
    if "engine_path" not in data:  # not built: {"path": None, "reason": ...}
        return {**data, **choice}
    rotates = config.quantized and config.method in ("rotate", "smooth_rotate", "dsfq")
    hadamard = "plugin" if plugin_nodes else ("function" if rotates else "none")
    return {"path": data.pop("engine_path"), "onnx": str(graph), "hadamard": hadamard,
            "hadamard_plugin_nodes": plugin_nodes, **choice, **data}


def _engine_from_graph(config: PipelineConfig, graph: Path, engine_path: Path, profile: str,
                       plugin_path: Path) -> tuple[dict[str, Any], Path, int]:
    """Build one engine from ``graph`` (Hadamard calls swapped for plugin nodes into ``plugin_path`` first, when
    the run uses the plugin). Returns the build result as a dict, or ``{"path": None, "reason": ...}``, the graph
    the engine was built from, and the number of plugin nodes."""
    from qvggt_export.engine import build_engine

    backend = None if config.backend == "auto" else config.backend
    plugin_nodes = 0
    try:
        if config.engine_hadamard == "plugin":
            graph, plugin_nodes = _plugin_graph(graph, plugin_path.parent, plugin_path.name)
        if plugin_nodes:
            from qvggt_export.plugins import register

            register(config.backend)  # the parser instantiates the plugin through its creator
        result = build_engine(graph, engine_path, profile, backend=backend, format_name=config.bits)
    except MissingDependencyError as exc:
        logger.warning("no engine built: %s", exc)
        return {"path": None, "reason": str(exc)}, graph, plugin_nodes
    except QVGGTError as exc:
        logger.error("engine build failed: %s", exc)
        return {"path": None, "reason": f"build failed: {exc}", "failed": True}, graph, plugin_nodes
    return result.to_dict(), graph, plugin_nodes


def _track_engine_stage(config: PipelineConfig, track_path: Path, timer: StageTimer,
                        batches: list[torch.Tensor]) -> dict[str, Any]:
    """``track.engine`` beside ``model.engine``, from ``track.onnx``: the same profile (targets, frame range; its
    point range for ``query_points``), backend, lowering target and Hadamard form as the main engine.

    Not applied: ``engine_fp16`` (the tracker stays float32, as in the track export and upstream). A static
    lowering (``int8-static``, ``w4a8``) measures its activation ranges with the query points fixed: the
    quantized layers are the aggregator's, whose inputs do not depend on the points (:func:`_lowered_track_graph`).
    """
    if not config.engine:
        return {"path": None, "reason": "engine build disabled (--no-engine)"}
    profile = config.resolved_engine_profile()
    lowering = config.resolved_engine_lowering()
    choice: dict[str, Any] = {"profile_name": profile}
    with timer.stage("lower_track_for_engine"):
        try:
            graph, choice["lowering"] = _lowered_track_graph(config, track_path, lowering, batches)
        except MissingDependencyError as exc:
            return {"path": None, "reason": str(exc), **choice}
    if config.engine_fp16:
        choice["lowering"]["float16_not_applied"] = ("--engine-fp16 is not applied to the track engine: the "
                                                     "tracker stays float32, as in the track export")
    with timer.stage("build_track_engine"):
        data, graph, plugin_nodes = _engine_from_graph(config, graph, config.out_dir / "track.engine", profile,
                                                       config.out_dir / "track.plugin.onnx")
    return _engine_report(config, graph, data, plugin_nodes, choice)


def _lowered_track_graph(config: PipelineConfig, track_path: Path, lowering: str,
                         batches: list[torch.Tensor]) -> tuple[Path, dict[str, Any]]:
    """The track graph rewritten for the engine's target (``track.lowered.onnx``), as the canonical graph is.

    :func:`~qvggt_export.export.lowering.lower_for_target` runs graphs with one ``images`` input; the track
    graph also takes ``query_points``. It is lowered with ``query_points`` held as a constant (seeded points),
    then given its input back: the rewrite only touches the aggregator's quantized layers, whose inputs do not
    depend on the points, so the static scales are those of the canonical graph on the same images, and the
    accuracy it reports (lowered vs exported track graph, ONNX Runtime) is for those fixed points.
    """
    import onnx
    from onnx import numpy_helper

    from qvggt_export.export.lowering import lower_for_target
    from qvggt_export.export.onnx_export import save_graph

    if lowering == "as-written":
        return track_path, {"target": "as-written", "note": "the track graph as exported, unchanged"}
    proto = onnx.load(str(track_path))
    (points_input,) = [i for i in proto.graph.input if i.name == "query_points"]
    height, width = batches[0].shape[-2:]
    generator = torch.Generator().manual_seed(config.seed)
    points = torch.rand(batches[0].shape[0], 16, 2, generator=generator) * torch.tensor([width - 1, height - 1])
    frozen = onnx.ModelProto()
    frozen.CopyFrom(proto)
    kept_inputs = [i for i in frozen.graph.input if i.name != "query_points"]
    del frozen.graph.input[:]
    frozen.graph.input.extend(kept_inputs)
    frozen.graph.initializer.append(numpy_helper.from_array(points.numpy(), "query_points"))
    lowered, info = lower_for_target(frozen, lowering, calibration_inputs=batches)
    # Back to a graph input, in its original place and with its dynamic points axis.
    kept = [init for init in lowered.graph.initializer if init.name != "query_points"]
    del lowered.graph.initializer[:]
    lowered.graph.initializer.extend(kept)
    inputs = {i.name: i for i in lowered.graph.input}
    inputs["query_points"] = points_input
    ordered = [inputs[i.name] for i in proto.graph.input]
    del lowered.graph.input[:]
    lowered.graph.input.extend(ordered)
    path = config.out_dir / "track.lowered.onnx"
    save_graph(lowered, path, full_check=False)
    result = info.to_dict()
    result["accuracy_points"] = int(points.shape[1])
    return path, result
