"""The whole job, as one API call: model -> calibration data -> quantize -> ONNX -> parity -> engine.

:func:`run_pipeline` validates every input before it writes anything, writes each artifact
atomically, and ends with ``report.json`` (plus ``config.json``, the resolved configuration) in the
output folder. The CLI is a thin layer over this function.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qvggt_export import __version__
from qvggt_export.errors import QVGGTError
from qvggt_export.formats import DEFAULT_ENGINE_PROFILE, ENGINE_LOWERINGS, format_names, get_format
from qvggt_export.io import write_json_atomic
from qvggt_export.methods import METHODS
from qvggt_export.rundir import RunFolder

logger = logging.getLogger(__name__)

# Formats, their engine targets, default profiles and lowerings: the format registry (qvggt_export.formats).
# FLOAT_FORMATS (the unquantized reference exports fp32 / fp16) is derived from it for existing callers.
FLOAT_FORMATS = format_names(quantized=False)
RECON_CHECKPOINT = "reconstruction_checkpoint.safetensors"


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
        method: ``"dsfq"`` (default), ``"rtn"``, ``"smooth"``, ``"rotate"`` or ``"smooth_rotate"`` (paper Tab. 4), or
            ``"auto"``: per block, the one of ``auto_methods`` with the lowest measured block-output error on the
            calibration set (:mod:`qvggt_export.quant.select`; the report records every choice and error).
        auto_methods: the candidates of ``auto`` (default: all five).
        auto_granularity: ``"block"`` (one method per block, default) or ``"layer"`` (then per linear).
        auto_criterion: ``"quantized"`` (round-to-nearest block error, default) or ``"reconstructed"`` (every
            candidate learned with ``recon_iters`` steps, the lowest learned error wins).
        alpha: smoothing strength (eq. 7).
        recon_iters: block-reconstruction steps per block (0 = off).
        quantize_scope: which linears are quantized (:data:`qvggt_export.quant.roles.QUANTIZE_SCOPES`):
            ``"aggregator"`` (the paper's frame / global linears; default), ``"backbone"`` (+ the DINOv2
            patch-embed encoder), ``"all"`` (+ the camera head's trunk). Block lists a model lacks are skipped.
        calib_data: image folder(s), CO3Dv2 root, video(s) or list file; ``None`` generates pseudo
            multi-view sequences.
        calib_size: calibration sequences selected (the paper: 40).
        calib_pool: candidate sequences drawn before selection (the paper: 400).
        calib_strategy: ``"nfds"`` (noise filter + frame-aware clustering), ``"random"``, ``"filtered"``
            or ``"clustered"``.
        nfds_p, nfds_k: NFDS filter fraction (drop the top p) and K-Means clusters.
        nfds_batch: candidates per forward in the NFDS statistics pass (same statistics at any value; more
            is faster and takes more memory: about 0.8 GB per candidate for VGGT-1B at 518 px, 10 frames).
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
            ONNX function into small GEMMs, plugin-free) or ``"auto"``: function for full TensorRT, plugin for
            TensorRT-RTX (:func:`~qvggt_export.engine.runtimes.default_engine_hadamard`).
        engine_profile: name of a profile in ``engines/`` or a path to a profile JSON; ``None`` (the default)
            = the format's default (the format registry's ``default_profile``: ``rtx-default``, or ``rtx-sm89-sm120``
            for fp8 and ``rtx-sm120`` for nvfp4, since rtx-default also targets SM86, which has neither). A profile
            given explicitly (``rtx-default`` included) must target only architectures the format can build for,
            or the run is refused.
        engine_lowering: how the canonical quantized graph is rewritten for the engine
            (:mod:`qvggt_export.engine.lowering`): ``"auto"`` (the per-format default of
            :func:`~qvggt_export.engine.lowering.default_lowering`: W4A4 -> ``w4a16``, since TensorRT has no
            4-bit activation math), ``"as-written"``, ``"int8-static"``, ``"w4a8"`` or ``"w4a16"``.
        engine_fp16: also run the unquantized parts of the engine graph (heads, norms, attention) in FP16;
            refused with the ``as-written`` lowering of integer formats (the per-token step floor underflows).
        backend: ``"auto"``, ``"rtx"`` (TensorRT-RTX) or ``"trt"`` (full TensorRT).
        progress: show progress bars.
        recon_checkpoint: where block reconstruction keeps its progress; ``None`` = inside the run folder (carried
            to the next run of the same configuration, and kept beside ``--out`` by a run that fails).
        nfds_correlation: eq. 12's frame vectors: ``"flattened"`` (the paper's: each frame's patch tokens as one
            ``s x d`` vector) or ``"pooled"`` (mean-pooled frame features, the earlier form).
        device: where calibration runs (:mod:`qvggt_export.device`): ``"auto"`` (CUDA when PyTorch sees a GPU),
            ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Export and parity always run on the CPU.
        calib_dtype: precision of the statistics-only float passes (NFDS, DSFQ channel maxima): ``"fp32"``
            (default, exact), or ``"bf16"`` / ``"fp16"`` autocast on CUDA (less memory and time; the selection and
            the smoothing factors can change: ``benchmarks/results/gpu_check.md`` measures by how much).
    """

    out_dir: Path
    bits: str = "w4a4"
    model: str = "tiny"
    checkpoint: str | None = None
    method: str = "dsfq"
    auto_methods: tuple[str, ...] = tuple(METHODS)
    auto_granularity: str = "block"
    auto_criterion: str = "quantized"
    alpha: float = 0.5
    recon_iters: int = 0
    quantize_scope: str = "aggregator"
    calib_data: str | None = None
    calib_size: int = 4
    calib_pool: int = 16
    calib_strategy: str = "nfds"
    nfds_p: float = 0.2
    nfds_k: int = 8
    nfds_batch: int = 8
    skip_bad: bool = False
    frames: int = 3
    image_size: int | None = None
    preprocess: str = "crop"
    seed: int = 0
    hadamard: str = "function"
    engine: bool = True
    export_track: bool = False
    engine_hadamard: str = "auto"
    engine_profile: str | None = None
    engine_lowering: str = "auto"
    engine_fp16: bool = False
    backend: str = "auto"
    progress: bool = True
    device: str = "auto"
    calib_dtype: str = "fp32"
    recon_checkpoint: str | None = None
    nfds_correlation: str = "flattened"

    def __post_init__(self) -> None:
        from qvggt_export.device import CALIB_DTYPES, check_device_spec
        from qvggt_export.model.preprocess import PREPROCESS_MODES
        from qvggt_export.quant import check_format

        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "auto_methods", tuple(self.auto_methods))  # a list from config.json
        check_device_spec(self.device)
        if self.calib_dtype not in CALIB_DTYPES:
            raise QVGGTError(f"calib_dtype must be one of {', '.join(CALIB_DTYPES)}, got {self.calib_dtype!r}")
        if self.calib_dtype != "fp32" and self.device == "cpu":
            raise QVGGTError(f"calib_dtype {self.calib_dtype} applies to CUDA runs; the CPU calibrates in fp32")

        from qvggt_export.quant.roles import check_scope

        check_scope(self.quantize_scope)
        if self.quantize_scope == "all" and self.bits in ("fp8", "nvfp4"):
            # The camera trunk runs once per refinement iteration; the float-format Q/DQ writer emits one call.
            raise QVGGTError(f"--quantize-scope all quantizes the camera trunk, which runs in a loop; {self.bits} "
                             "exports support one call per layer: use an integer format or --quantize-scope backbone")
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
        if self.engine_hadamard not in ("auto", "plugin", "function"):
            raise QVGGTError(f"engine_hadamard must be 'auto', 'plugin' or 'function', got {self.engine_hadamard!r}")
        if self.backend not in ("auto", "rtx", "trt"):
            raise QVGGTError(f"backend must be auto, rtx or trt, got {self.backend!r}")
        if self.engine_lowering not in ENGINE_LOWERINGS:
            raise QVGGTError(f"engine_lowering must be one of {', '.join(ENGINE_LOWERINGS)}, "
                             f"got {self.engine_lowering!r}")
        if self.engine_lowering not in ("auto", "as-written"):
            wanted = [name for name in format_names() if self.engine_lowering in get_format(name).allowed_lowerings]
            if self.bits not in wanted:
                raise QVGGTError(f"engine lowering {self.engine_lowering!r} rewrites {' / '.join(wanted)} graphs, not "
                                 f"{self.bits}; use --engine-lowering auto or as-written")
        if self.engine_fp16 and self.quantized and self.family != "int":
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
        return get_format(self.bits).family

    def resolved_engine_profile(self) -> str:
        """The engine profile this run builds with: ``engine_profile``, or the format's default when it is
        ``None``.

        Raises:
            QVGGTError: the profile cannot be loaded, or targets an architecture the format cannot build for.
        """
        spec = get_format(self.bits)
        if self.engine_profile is None:
            return spec.default_profile
        requested = self.engine_profile
        if spec.default_profile == DEFAULT_ENGINE_PROFILE:  # builds for every target
            return requested
        from qvggt_export.engine.profiles import load_profile

        profile = load_profile(requested)
        minimum = spec.min_sm
        bad = [cc for cc in profile.compute_capabilities if cc != "CURRENT" and int(cc[2:]) < minimum]
        if bad:
            raise QVGGTError(
                f"engine profile {profile.name!r} targets {', '.join(bad)}, which cannot run {self.bits} (needs "
                f"SM{minimum} or newer); use --engine-profile {spec.default_profile}, a profile "
                "without those targets, or --no-engine")
        return requested

    def resolved_engine_hadamard(self) -> str:
        """``engine_hadamard``, or for ``auto`` the build flavour's default (qvggt_export.engine.runtimes):
        plugin-free for full TensorRT (trtexec / Triton / C++ load it), the plugin for TensorRT-RTX."""
        if self.engine_hadamard != "auto":
            return self.engine_hadamard
        from qvggt_export.engine.profiles import load_profile
        from qvggt_export.engine.runtimes import build_flavour, default_engine_hadamard

        profile_backend = load_profile(self.resolved_engine_profile()).backend
        return default_engine_hadamard(build_flavour(self.backend, profile_backend))

    def resolved_engine_lowering(self) -> str:
        """The lowering the engine graph gets: ``engine_lowering``, or the format's default for ``auto``."""
        if self.engine_lowering != "auto":
            return self.engine_lowering
        return get_format(self.bits).default_lowering(self.backend)

    def nfds_config(self) -> Any:
        from qvggt_export.calib import NFDSConfig

        return NFDSConfig(strategy=self.calib_strategy, budget=self.calib_size, p=self.nfds_p, k=self.nfds_k,
                          seed=self.seed, batch_size=self.nfds_batch, correlation=self.nfds_correlation)

    def quant_config(self, model: torch.nn.Module | None = None) -> Any:
        """The :class:`~qvggt_export.quant.QuantConfig`; with ``model``, its roles are ``quantize_scope``'s
        roles that this model has (:func:`~qvggt_export.quant.roles.scope_roles`)."""
        from qvggt_export.quant import QuantConfig
        from qvggt_export.quant.roles import scope_roles

        return QuantConfig(bits=self.bits, method=self.method, alpha=self.alpha, seed=self.seed,
                           recon_iters=self.recon_iters, roles=scope_roles(self.quantize_scope, model),
                           auto_methods=self.auto_methods, auto_granularity=self.auto_granularity,
                           auto_criterion=self.auto_criterion)

    @property
    def quantized(self) -> bool:
        return self.bits not in FLOAT_FORMATS

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["auto_methods"] = list(self.auto_methods)  # as JSON / TOML hold it
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
    from qvggt_export.model import load_model, read_model_spec

    spec: Any = read_model_spec(config.model)
    model = load_model(spec, config.checkpoint, seed=config.seed)
    info: dict[str, Any] = {"preset": config.model, "name": model.config.name, "spec": spec,
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "checkpoint": config.checkpoint}
    if config.checkpoint:
        info["weights"] = "checkpoint"
    else:
        info["weights"] = (f"random init (seed {config.seed}): exercises the toolchain; "
                           "accuracy numbers are not meaningful")
        logger.warning("no --checkpoint: seeded random weights (fine for testing the toolchain, not for accuracy)")
    return model, info


def _calibration_data(config: PipelineConfig, model: torch.nn.Module, progress: bool, device: torch.device
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
    from qvggt_export.device import autocast, out_of_memory_guard

    with out_of_memory_guard("NFDS statistics", device, "--frames, --nfds-batch or --calib-dtype bf16"), \
            autocast(device, config.calib_dtype):
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
    """Quantized-vs-float error per output on the calibration data (relative L2, worst and mean), on the quantized
    model's device (the float model visits it for the pass and goes back to where it was)."""
    from qvggt_export.export.onnx_export import DENSE_OUTPUTS

    device = next(model.parameters()).device
    home = next(float_model.parameters()).device
    errors: dict[str, list[float]] = {}
    float_model.to(device)
    with torch.no_grad():
        for images in progress(batches):
            images = images.to(device)
            ref, got = float_model(images), model(images)
            for name in DENSE_OUTPUTS:
                if name in ref:
                    num = (got[name] - ref[name]).norm()
                    den = ref[name].norm().clamp_min(1e-30)
                    errors.setdefault(name, []).append(float(num / den))
    float_model.to(home)
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
        report["format"] = {"name": config.bits, "family": config.family,
                            "lowering": get_format(config.bits).onnx_form}

    # Inputs first: nothing is written until model, weights and data are known to be good; what needs no model
    # is checked in the first seconds.
    from qvggt_export.device import out_of_memory_guard, resolve_device
    from qvggt_export.preflight import preflight

    preflight(config)
    device = resolve_device(config.device)
    report["device"] = {"requested": config.device, "used": str(device), "calib_dtype": config.calib_dtype,
                        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    with timer.stage("load_model"):
        model, report["model"] = _load_model(config)
        # The float reference stays on the CPU (export and parity run there); calibration works on `device`.
        float_model = copy.deepcopy(model) if config.quantized else None
        model.to(device)
    if config.export_track and getattr(model, "track_head", None) is None:
        raise QVGGTError(f"--export-track: model {config.model!r} has no tracking head")
    with timer.stage("calibration_data"):
        batches, report["calibration"], selection = _calibration_data(config, model, config.progress, device)

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

        if config.quantized:
            from qvggt_export.device import autocast
            from qvggt_export.quant.calibrate import calibrate
            from qvggt_export.quant.roles import find_targets, scope_summary

            quant_config = config.quant_config(model)
            scope = scope_summary(model, find_targets(model, quant_config.roles), config.quantize_scope)
            knobs = "--calib-size, --frames or --calib-dtype bf16"
            with timer.stage("quantize"), out_of_memory_guard("quantization", device, knobs):
                # Reconstruction checkpoints into the run folder (carried over by RunFolder: rerunning the same
                # command resumes) or where --recon-checkpoint says.
                checkpoint = (Path(config.recon_checkpoint) if config.recon_checkpoint else out_dir / RECON_CHECKPOINT
                              ) if config.recon_iters else None
                result = calibrate(model, quant_config, [b.to(device) for b in batches], progress,
                                   recon_checkpoint=checkpoint,
                                   statistics_context=lambda: autocast(device, config.calib_dtype))
                layers = result.layers
                report["quantization"] = {
                    "config": dataclasses.asdict(quant_config),
                    "layers": len(layers),
                    "transformed_layers": result.transformed,
                    "calibration_tokens": result.calibration_tokens,
                    "roles": sorted({layer.role for layer in layers}),
                    "scope": scope,
                    "weight_rel_error": {layer.name: round(layer.weight_rel_error, 6) for layer in layers},
                    "reconstruction": result.reconstruction,
                }
                if result.method_selection:
                    report["quantization"]["method_selection"] = result.method_selection
                if result.input_amax:
                    report["quantization"]["input_amax"] = {k: round(v, 6) for k, v in result.input_amax.items()}
            with timer.stage("quant_error"), out_of_memory_guard("the quantized-vs-float error pass", device, knobs):
                report["quantization"]["output_error_vs_float"] = _output_errors(float_model, model, batches, progress)
            model.cpu()  # export and parity run on the CPU (module docstring of qvggt_export.device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                report["device"]["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            from qvggt_export.quant.state import save_quantized

            weights_path, _ = save_quantized(model, out_dir / "quantized_model", report["model"]["spec"], quant_config)
            report["quantization"]["state"] = str(weights_path)
        else:
            model.cpu()

        from qvggt_export.export import export_onnx

        onnx_path = out_dir / "model.onnx"
        with timer.stage("export_onnx"):
            opset = get_format(config.bits).opset
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

        # Online rotations as quantized (--method auto may have chosen none), for the engine report.
        rotates = any(getattr(module, "rotate", False) for module in model.modules())
        report["engine"] = _engine_stage(config, onnx_path, timer, float_model or model, batches, rotates=rotates)
        if config.export_track:
            report["track"]["engine"] = _engine_stage(config, Path(report["track"]["path"]), timer, None, batches,
                                                      track=True, rotates=rotates)
        report["timings_s"] = dict(timer.seconds, total=round(time.perf_counter() - started, 3))
        if config.quantized:
            # All calibration work: reading the pool, NFDS, loading the selection (calibration_data) + quantize.
            calibration_s = timer.seconds.get("calibration_data", 0.0) + timer.seconds.get("quantize", 0.0)
            report["calibration"]["selection_share_of_calibration"] = round(
                report["calibration"]["selection_seconds"] / max(calibration_s, 1e-9), 3)
        write_json_atomic(out_dir / "report.json", report)
        from qvggt_export.report.build import write_run_report  # report.html / report.md (never fails the run)

        write_run_report(out_dir, float_model, model, batches, config.seed, config.alpha)
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


def engine_target(config: PipelineConfig, rotates: bool | None = None) -> Any:
    """The :class:`~qvggt_export.engine.EngineTarget` a run's configuration asks for (profile and lowering
    resolved per format). ``rotates``: whether the quantized model has online rotations; ``None`` derives it from
    the method (for ``auto``: whether any candidate rotates, since the choice is not known yet)."""
    from qvggt_export.engine.stage import EngineTarget

    if rotates is None:
        rotates = config.quantized and any(METHODS[m].rotates for m in config.quant_config().candidate_methods)
    return EngineTarget(bits=config.bits, profile=config.resolved_engine_profile(),
                        lowering=config.resolved_engine_lowering(), backend=config.backend,
                        hadamard=config.resolved_engine_hadamard(), float16=config.engine_fp16,
                        rotates=rotates, seed=config.seed)


def _engine_stage(config: PipelineConfig, onnx_path: Path, timer: StageTimer,
                  reference_model: torch.nn.Module | None, batches: list[torch.Tensor],
                  track: bool = False, rotates: bool | None = None) -> dict[str, Any]:
    """``model.engine`` (or ``track.engine``) from the canonical graph, through
    :func:`qvggt_export.engine.build_engine_for_target` (lowering, Hadamard form, build)."""
    if not config.engine:
        return {"path": None, "reason": "engine build disabled (--no-engine)"}
    from qvggt_export.engine.stage import build_engine_for_target

    target = engine_target(config, rotates)
    result = build_engine_for_target(onnx_path, config.out_dir / ("track.engine" if track else "model.engine"),
                                     target, calibration_inputs=batches, reference_model=reference_model,
                                     stage=timer.stage)
    if not track and config.engine_profile is None and target.profile != DEFAULT_ENGINE_PROFILE \
            and "profile_name" in result:
        result = _with_profile_reason(result, config, target.profile)
    return result


def _with_profile_reason(result: dict[str, Any], config: PipelineConfig, profile: str) -> dict[str, Any]:
    """The report with ``profile_reason`` right after ``profile_name`` (key order as before the move)."""
    reason = (f"{DEFAULT_ENGINE_PROFILE} targets architectures without {config.bits} support; "
              f"{profile} is the default for {config.bits}")
    ordered: dict[str, Any] = {}
    for key, value in result.items():
        ordered[key] = value
        if key == "profile_name":
            ordered["profile_reason"] = reason
    return ordered
