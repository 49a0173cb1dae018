"""``qvggt-export eval``: what quantization cost, in the metrics the field reports, as one API call.

Two modes:

* **ground truth** (``data`` is a CO3Dv2 / 7-Scenes / DTU copy, :mod:`qvggt_export.eval.datasets`): the float
  model and the quantized model are each scored against the dataset's cameras (AUC@30/15/5/3, RRA, RTA),
  depth (abs-rel, delta < 1.25) and the point maps unprojected from its depth (Accuracy, Completion, Normal
  Consistency), so the table shows the float model's numbers and what quantization changed;
* **fidelity** (``fidelity=True``; ``data`` is any image folder, folder of scenes, CO3Dv2 root, video or list
  file the calibration readers take): no ground truth; the quantized model is scored with the float model's
  cameras, depth and point maps as the reference, by the same metrics.

The quantized model runs as the PyTorch fake-quant model rebuilt from the export folder (``runtime="pytorch"``,
default), as ``model.onnx`` in ONNX Runtime on the CPU (``"onnxruntime"``), or as ``model.engine``
(``"engine"``: a CUDA GPU and TensorRT; written against :class:`~qvggt_export.engine.runtime.QVGGTEngine`
and **not run** in this project's CI). The report is written atomically to ``<out_dir>/eval.json``.

Metric details and the relative-pose convention: :mod:`qvggt_export.eval.metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.eval.metrics import AUC_THRESHOLDS, CONVENTIONS, depth_metrics, point_metrics, pose_metrics
from qvggt_export.eval.metrics import relative_pose_errors as _relative_pose_errors
from qvggt_export.io import write_json_atomic

logger = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "onnxruntime", "engine")
REPORT_NAME = "eval.json"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate, on which data.

    Attributes:
        out_dir: an export folder written by ``qvggt-export`` (its models are evaluated; ``eval.json`` goes there).
        data: a dataset with ground truth, or (``fidelity``) any sequences.
        fidelity: compare with the float model instead of ground truth.
        runtime: how the quantized model runs: ``pytorch`` (fake quant), ``onnxruntime`` (``model.onnx``, CPU) or
            ``engine`` (``model.engine``, CUDA GPU only).
        frames: frames per evaluated sequence (default: the export's ``frames``; VGGT's CO3Dv2 protocol uses 10).
        max_sequences: at most this many sequences (ground truth) or windows (fidelity).
        convention: relative-pose convention (:mod:`qvggt_export.eval.metrics`).
        split: CO3Dv2 annotation split (``test`` or ``train``).
        preprocess: ``crop`` or ``pad`` (default: the export's). ``model.onnx`` and engines take one fixed
            resolution: square exports (generated calibration data) need ``pad`` for non-square photos.
        seed: seeds the frame choice.
        max_points: points per sequence in the nearest-neighbour search (seeded subsample).
        progress: progress bars.
    """

    out_dir: Path
    data: Path
    fidelity: bool = False
    runtime: str = "pytorch"
    frames: int | None = None
    max_sequences: int = 8
    convention: str = "camera"
    split: str = "test"
    preprocess: str | None = None
    seed: int = 0
    max_points: int = 50_000
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "data", Path(self.data))
        if self.runtime not in RUNTIMES:
            raise QVGGTError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.frames is not None and self.frames < 2:
            raise QVGGTError(f"frames must be >= 2 (poses are compared per frame pair), got {self.frames}")
        if self.max_sequences < 1:
            raise QVGGTError(f"max_sequences must be >= 1, got {self.max_sequences}")
        if self.convention not in CONVENTIONS:
            raise QVGGTError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        if self.preprocess not in (None, "crop", "pad"):
            raise QVGGTError(f"preprocess must be 'crop' or 'pad', got {self.preprocess!r}")
        if self.split not in ("test", "train"):
            raise QVGGTError(f"split must be 'test' or 'train', got {self.split!r}")
        if not self.out_dir.is_dir():
            raise QVGGTError(f"export folder not found: {self.out_dir}")
        if not self.data.exists():
            raise QVGGTError(f"data not found: {self.data}")


@dataclass
class Prediction:
    """One sequence's outputs as arrays: extrinsics [S, 3, 4], depth [S, H, W], world_points [S, H, W, 3]."""

    extrinsics: np.ndarray
    depth: np.ndarray
    world_points: np.ndarray


def prediction_from_outputs(outputs: dict[str, Any], image_hw: tuple[int, int]) -> Prediction:
    """The model's (or a runtime's) output dict for one sequence (batch 1) -> :class:`Prediction`."""
    from qvggt_export.model.pose import pose_encoding_to_extri_intri

    def array(name: str) -> np.ndarray:
        value = outputs[name]
        return value.detach().double().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, float)

    pose = torch.from_numpy(array("pose_enc"))
    extrinsics, _ = pose_encoding_to_extri_intri(pose, image_hw)
    return Prediction(extrinsics[0].numpy(), array("depth")[0, ..., 0], array("world_points")[0])


# ------------------------------------------------------------------------------------------------ runners


def _runner(config: EvalConfig, models: Any) -> Callable[[torch.Tensor], dict[str, Any]]:
    """``images [1, S, 3, H, W] -> outputs`` for the quantized model in the chosen runtime."""
    if config.runtime == "pytorch":
        model = models.model

        def run_torch(images: torch.Tensor) -> dict[str, Any]:
            with torch.no_grad():
                return model(images)

        return run_torch
    if config.runtime == "onnxruntime":
        if models.bits == "nvfp4":
            raise QVGGTError("ONNX Runtime cannot run nvfp4 graphs; evaluate them with --runtime pytorch")
        from qvggt_export.parity.compare import onnxruntime_session

        session = onnxruntime_session(models.onnx)
        names = [o.name for o in session.get_outputs()]
        graph_input = session.get_inputs()[0]
        input_name, graph_hw = graph_input.name, tuple(graph_input.shape[-2:])

        def run_onnx(images: torch.Tensor) -> dict[str, Any]:
            if tuple(images.shape[-2:]) != graph_hw:
                raise QVGGTError(f"{models.onnx} takes {graph_hw[0]}x{graph_hw[1]} images, the data preprocesses to "
                                 f"{images.shape[-2]}x{images.shape[-1]}: use --preprocess pad for square exports, "
                                 "or --runtime pytorch")
            values = session.run(names, {input_name: images.numpy().astype(np.float32)})
            return dict(zip(names, values, strict=True))

        return run_onnx
    # GPU only: written against the engine runtime's API, not run in this project's CI (no GPU).
    engine_path = config.out_dir / "model.engine"
    if not engine_path.is_file():
        raise QVGGTError(f"no engine to evaluate: {engine_path} not found (build one, or use --runtime pytorch)")
    if not torch.cuda.is_available():
        raise QVGGTError("--runtime engine needs a CUDA GPU; use --runtime pytorch or onnxruntime here")
    from qvggt_export.engine.runtime import QVGGTEngine

    engine = QVGGTEngine(engine_path)

    def run_engine(images: torch.Tensor) -> dict[str, Any]:
        outputs = engine.infer(images.cuda())
        torch.cuda.synchronize()
        return {k: v.float().cpu() for k, v in outputs.items()}

    return run_engine


# ------------------------------------------------------------------------------------------------ sequences


@dataclass
class _Case:
    name: str
    images: torch.Tensor  # [1, S, 3, H, W]
    reference: Prediction | None = None  # ground truth (None in fidelity mode: the float model is the reference)
    depth_valid: np.ndarray | None = None
    has_depth: bool = False
    has_points: bool = False


def _geometry(config: EvalConfig, models: Any) -> tuple[int, str, int]:
    size = models.config.get("image_size") or models.float_model.config.aggregator.img_size
    mode = config.preprocess or str(models.config.get("preprocess", "crop"))
    return int(size), mode, models.float_model.config.aggregator.patch_size


def _fidelity_cases(config: EvalConfig, models: Any, frames: int) -> Iterator[_Case]:
    from qvggt_export.calib import build_candidate_pool

    size, mode, patch = _geometry(config, models)
    pool = build_candidate_pool(str(config.data), frames, size, mode, pool_size=config.max_sequences,
                                seed=config.seed, patch_size=patch)
    for ref, sample in pool.iter_samples():
        yield _Case(ref.id, sample.unsqueeze(0))


def _ground_truth_cases(config: EvalConfig, models: Any, frames: int) -> Iterator[_Case]:
    from PIL import Image

    from qvggt_export.eval.datasets import load_ground_truth, preprocess_depth, unproject_depth
    from qvggt_export.model.preprocess import load_and_preprocess_images

    size, mode, patch = _geometry(config, models)
    sequences = load_ground_truth(config.data, split=config.split)
    rng = np.random.default_rng(config.seed)
    usable = [s for s in sequences if len(s.frames) >= frames]
    if not usable:
        raise QVGGTError(f"no sequence of {config.data} has {frames} frames with ground truth (longest: "
                         f"{max(len(s.frames) for s in sequences)}); pass --frames")
    for sequence in usable[: config.max_sequences]:
        # A seeded choice of frames, kept in sequence order (upstream draws 10 at random per sequence).
        chosen = sorted(rng.choice(len(sequence.frames), frames, replace=False))
        picked = [sequence.frames[i] for i in chosen]
        images = load_and_preprocess_images([f.image for f in picked], mode, size, patch)
        extrinsics = np.stack([f.extrinsic for f in picked])
        height, width = images.shape[-2:]
        depth = np.zeros((frames, height, width), np.float32)
        points = np.full((frames, height, width, 3), np.nan)
        has_depth = all(f.depth is not None for f in picked)
        has_points = has_depth and all(f.intrinsic is not None for f in picked)
        if has_depth:
            for index, frame in enumerate(picked):
                with Image.open(frame.image) as image:
                    original = image.size
                raw = frame.depth()
                if raw.shape != (original[1], original[0]):  # depth at another resolution: to the image's first
                    raw = np.asarray(Image.fromarray(raw.astype(np.float32), mode="F").resize(
                        original, Image.Resampling.NEAREST))
                depth[index], intrinsic = preprocess_depth(raw, frame.intrinsic, original, size, mode, patch)
                if tuple(depth[index].shape) != (height, width):
                    raise QVGGTError(f"{frame.image}: depth preprocesses to {depth[index].shape}, the image to "
                                     f"{(height, width)}")
                if has_points:
                    points[index] = unproject_depth(depth[index], frame.extrinsic, intrinsic)
        yield _Case(f"{sequence.dataset}/{sequence.name}", images.unsqueeze(0),
                    Prediction(extrinsics, depth, points), depth > 0, has_depth, has_points)


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class _Scores:
    rra: list[np.ndarray]
    rta: list[np.ndarray]
    depth: list[dict[str, float]]
    points: list[dict[str, float]]

    @classmethod
    def empty(cls) -> _Scores:
        return cls([], [], [], [])

    def add(self, pred: Prediction, ref: Prediction, config: EvalConfig, depth_valid: np.ndarray | None,
            with_depth: bool, with_points: bool) -> dict[str, Any]:
        rra, rta = _relative_pose_errors(pred.extrinsics, ref.extrinsics, config.convention)
        self.rra.append(rra)
        self.rta.append(rta)
        row: dict[str, Any] = {"rra_mean": float(rra.mean()), "rta_mean": float(rta.mean())}
        if with_depth:
            frames = [depth_metrics(p, r, None if depth_valid is None else v)
                      for p, r, v in zip(pred.depth, ref.depth,
                                         depth_valid if depth_valid is not None else [None] * len(pred.depth),
                                         strict=True)]
            self.depth.extend(frames)
            row["abs_rel"] = float(np.nanmean([f["abs_rel"] for f in frames]))
        if with_points:
            scores = point_metrics(pred.world_points, ref.world_points, depth_valid, max_points=config.max_points,
                                   seed=config.seed)
            self.points.append(scores)
            row["accuracy"] = scores["accuracy"]
        return row

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rra:
            out["pose"] = pose_metrics(np.concatenate(self.rra), np.concatenate(self.rta), AUC_THRESHOLDS)
        if self.depth:
            out["depth"] = {key: float(np.nanmean([d[key] for d in self.depth])) for key in ("abs_rel", "delta_1.25")}
            out["depth"]["frames"] = len(self.depth)
        if self.points:
            out["points"] = {key: float(np.nanmean([p[key] for p in self.points]))
                             for key in ("accuracy", "completion", "normal_consistency", "extent")}
            out["points"]["sequences"] = len(self.points)
        return out


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Evaluate an export folder's quantized model (see the module notes); returns the report, also written to
    ``<out_dir>/eval.json``.

    Raises:
        QVGGTError: bad export folder or data (ground-truth mode on data without ground truth suggests
            ``--fidelity``), before anything is written.
    """
    from tqdm.auto import tqdm

    from qvggt_export.parity.check import load_export_models

    started = time.perf_counter()
    if not config.fidelity:
        from qvggt_export.eval.datasets import detect_dataset

        dataset = detect_dataset(config.data)  # fails fast, suggesting --fidelity, before the models load
    else:
        dataset = "sequences (no ground truth)"
    models = load_export_models(config.out_dir)
    frames = config.frames or max(2, int(models.config.get("frames", 2)))
    run_quantized = _runner(config, models)
    cases = _fidelity_cases(config, models, frames) if config.fidelity else _ground_truth_cases(config, models, frames)

    quantized_scores, float_scores = _Scores.empty(), _Scores.empty()
    per_sequence = []
    for case in tqdm(cases, disable=not config.progress, desc="eval", leave=False):
        hw = tuple(case.images.shape[-2:])
        with torch.no_grad():
            float_pred = prediction_from_outputs(models.float_model(case.images), hw)
        quant_pred = prediction_from_outputs(run_quantized(case.images), hw)
        entry: dict[str, Any] = {"name": case.name, "frames": int(case.images.shape[1]), "resolution": list(hw)}
        if config.fidelity:
            entry["quantized_vs_float"] = quantized_scores.add(quant_pred, float_pred, config, None, True, True)
        else:
            assert case.reference is not None
            entry["float"] = float_scores.add(float_pred, case.reference, config, case.depth_valid, case.has_depth,
                                              case.has_points)
            entry["quantized"] = quantized_scores.add(quant_pred, case.reference, config, case.depth_valid,
                                                      case.has_depth, case.has_points)
        per_sequence.append(entry)
    if not per_sequence:
        raise QVGGTError(f"no sequence of {frames} frames found in {config.data}")

    report: dict[str, Any] = {
        "mode": "fidelity" if config.fidelity else "ground_truth", "data": str(config.data), "dataset": dataset,
        "export_dir": str(config.out_dir), "bits": models.bits, "runtime": config.runtime, "frames": frames,
        "sequences": len(per_sequence), "convention": config.convention,
        "preprocess": _geometry(config, models)[1],
        "reference": "the float model's outputs" if config.fidelity else f"{dataset} ground truth",
        "protocol": {"pose": "all frame pairs; RRA, RTA (folded to min(t, 180-t)); AUC@T over integer-degree "
                             "thresholds (VGGT's calculate_auc_np), in percent",
                     "depth": "per frame, prediction scaled by median(reference / prediction); abs-rel, delta < 1.25",
                     "points": "Umeyama similarity alignment, then nearest neighbours (scipy cKDTree): Accuracy, "
                               "Completion (mean distances, reference units), Normal Consistency"},
        "results": ({"quantized_vs_float": quantized_scores.summary()} if config.fidelity
                    else {"float": float_scores.summary(), "quantized": quantized_scores.summary()}),
        "per_sequence": per_sequence, "seconds": round(time.perf_counter() - started, 3),
    }
    path = write_json_atomic(config.out_dir / REPORT_NAME, report)
    report["report_path"] = str(path)
    logger.info("eval: %d sequences, %s", len(per_sequence), path)
    return report


def summarize(report: dict[str, Any]) -> list[str]:
    """The eval table as text lines (the CLI prints them; the report embeds the same rows)."""
    lines = [f"eval {report['export_dir']} ({report['bits']}, {report['runtime']}) on {report['data']}: "
             f"{report['sequences']} sequences x {report['frames']} frames, reference: {report['reference']}"]
    header = (f"{'':20s}" + "".join(f"{'AUC@' + str(t):>8s}" for t in AUC_THRESHOLDS)
              + f"{'RRA':>8s}{'RTA':>8s}{'AbsRel':>9s}{'d<1.25':>8s}{'Acc':>9s}{'Comp':>9s}{'NC':>7s}")
    lines.append(header)
    for row, values in table_rows(report):
        lines.append(f"{row:20s}" + "".join(f"{v:>8s}" for v in values[:6]) + f"{values[6]:>9s}{values[7]:>8s}"
                     f"{values[8]:>9s}{values[9]:>9s}{values[10]:>7s}")
    lines.append(f"report: {report.get('report_path', '')}")
    return lines


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """One row per result (``float``, ``quantized`` or ``quantized_vs_float``): AUC@30/15/5/3, mean RRA / RTA
    (degrees), abs-rel, delta < 1.25, Accuracy, Completion, Normal Consistency, formatted; ``-`` where absent."""
    rows = []
    for name, result in report["results"].items():
        pose, depth, points = result.get("pose", {}), result.get("depth", {}), result.get("points", {})

        def fmt(value: Any, spec: str) -> str:
            return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)

        values = [fmt(pose.get(f"auc@{t}"), ".1f") for t in AUC_THRESHOLDS]
        values += [fmt(pose.get("rra_mean"), ".2f"), fmt(pose.get("rta_mean"), ".2f"),
                   fmt(depth.get("abs_rel"), ".4f"), fmt(depth.get("delta_1.25"), ".3f"),
                   fmt(points.get("accuracy"), ".4f"), fmt(points.get("completion"), ".4f"),
                   fmt(points.get("normal_consistency"), ".3f")]
        rows.append((name.replace("_", " "), values))
    return rows
