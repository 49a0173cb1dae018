"""The one parity driver: Polygraphy's comparator over PyTorch and ONNX Runtime (or an engine, or ONNX's
reference evaluator), judged per output by :func:`~qvggt_export.parity.compare.tolerance_for`.

:func:`compare_runs` serves the main job (:func:`qvggt_export.parity.compare.check_parity`, called by
:func:`qvggt_export.pipeline.run_pipeline`), ``qvggt-export check``
(:func:`qvggt_export.parity.check.check_export`), so both report the same numbers on the same inputs, and the
track graph (:func:`qvggt_export.parity.track.check_track_parity`, inputs ``images`` and ``query_points``).
The tolerances live in one place, :func:`~qvggt_export.parity.compare.tolerance_for`.

Runner names: ``"pytorch"`` is the reference (the model the graph was exported from, float or fake-quant),
``"pytorch-noise"`` (optional) the model that sets the noise scale of the criteria (the float model for a
quantized graph, the float16 copy for an fp16 graph, the float64 copy for a float track graph); every other
runner is a runtime judged against the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.parity.compare import tolerance_for
from qvggt_export.parity.metrics import output_metrics, pose_metrics

__all__ = ["compare_runs"]

REFERENCE = "pytorch"
NOISE = "pytorch-noise"


def compare_runs(runners: Sequence[Any], inputs: Sequence[Any], kind: str, labels: Sequence[str], *,
                 input_names: Sequence[str] = ("images",)) -> dict[str, Any]:
    """Run every runner on ``inputs`` through Polygraphy's ``Comparator`` and judge each runtime against the
    reference.

    Args:
        runners: Polygraphy runners; the first is the reference (named ``"pytorch"``); one named
            ``"pytorch-noise"`` sets the noise scale of relative criteria (required for ``"quantized"`` and
            ``"fp16"``).
        inputs: per case, the value of the graph's one input (image batches ``[1, S, 3, H, W]``, torch tensors or
            arrays), or a tuple with a value for each of ``input_names`` (the track graph: ``(images,
            query_points)``).
        kind: ``"fp32"``, ``"fp16"``, ``"quantized"`` or ``"track"``
            (:func:`~qvggt_export.parity.compare.tolerance_for`; for ``"track"`` the optional noise runner is the
            float64 model and the noise is its ``max_abs`` distance from the float32 reference).
        labels: one description per input, for the report.
        input_names: the graph's input names, in the order of each case's values.

    Returns:
        Per runtime (every runner but the reference and the noise model):
        ``{"outputs": {name: metrics of the input closest to failing, its tolerance and criterion, whether every
        input passed}, "passed": bool}``.
    """
    try:
        from polygraphy.comparator import Comparator
        from polygraphy.logger import G_LOGGER
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("polygraphy", "cpu", "The parity check") from exc
    if not inputs:
        raise QVGGTError("parity needs at least one input batch")
    runners = list(runners)
    graph_runtimes = [r.name for r in runners if r.name not in (REFERENCE, NOISE)]
    feeds = [{n: _as_array(v) for n, v in zip(input_names, case if isinstance(case, tuple) else (case,), strict=True)}
             for case in inputs]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # Polygraphy logs each run and comparison; the report says it all
        results = Comparator.run(runners, data_loader=feeds)
    by_name = dict(results.items())
    reference = by_name[REFERENCE]
    # The noise scale of relative criteria, always measured against the float32 model: fake-quant vs float, or
    # PyTorch float16 vs float32.
    noise: dict[int, dict[str, float]] = {}
    for index, (ref, other) in enumerate(zip(reference, by_name.get(NOISE, []), strict=False)):
        noise[index] = {name: _noise(kind, ref[name], other[name]) for name in ref}
    ref_index = {id(it): i for i, it in enumerate(reference)}
    position = {runner.name: i for i, runner in enumerate(runners)}
    runtimes: dict[str, Any] = {}
    for runtime in graph_runtimes:
        if runtime not in by_name:
            continue
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            accuracy = Comparator.compare_accuracy(results, comparisons=[(position[REFERENCE], position[runtime])],
                                                   compare_func=_metric_compare(kind, noise, ref_index))
        verdicts = [dict(v) for v in next(iter(accuracy[0].values()))]
        outputs = _runtime_metrics(kind, reference, by_name[runtime], verdicts, noise, list(labels))
        runtimes[runtime] = {"outputs": outputs, "passed": all(o["passed"] for o in outputs.values())}
    return runtimes


def _noise(kind: str, reference: np.ndarray, other: np.ndarray) -> float:
    """The noise scale of one output: fake-quant vs float (``quantized``, relative to the float model), PyTorch
    float16 vs float32 (``fp16``), float64 vs float32 (``track``: the tracker's float32 rounding, max_abs)."""
    if kind == "quantized":
        return output_metrics(reference, other)["rel_l2"]
    if kind == "track":
        return output_metrics(reference, other)["max_abs"]
    return output_metrics(other, reference)["rel_l2"]


def _as_array(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    return np.asarray(images).astype(np.float32)


def _metric_compare(kind: str, noise: dict[int, dict[str, float]], ref_index: dict[int, int]) -> Any:
    """A Polygraphy compare function implementing :func:`tolerance_for` for one pair of runners."""
    import polygraphy.comparator as comparator

    # SimpleCompareFunc in newer Polygraphy; CompareFunc.simple (deprecated there) in older releases.
    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple

    def compare(reference: Any, candidate: Any) -> dict[str, bool]:
        if kind == "fp32":
            # Polygraphy's own comparator, with per-output absolute tolerances scaled to each output's range.
            atol = {name: tolerance_for("fp32")[1] * float(np.abs(reference[name]).max()) for name in reference}
            verdicts = simple(atol=atol, rtol=0.0, check_error_stat="max")(reference, candidate)
            return {name: bool(v) for name, v in verdicts.items()}
        index = ref_index[id(reference)]
        verdicts = {}
        for name in reference:
            if name not in candidate:
                verdicts[name] = False
                continue
            metric, tolerance, _ = tolerance_for(kind, noise.get(index, {}).get(name), name)
            verdicts[name] = output_metrics(candidate[name], reference[name])[metric] <= tolerance
        return verdicts

    return compare


def _runtime_metrics(kind: str, reference: list[Any], candidate: list[Any], verdicts: list[dict[str, bool]],
                     noise: dict[int, dict[str, float]], labels: list[str]) -> dict[str, Any]:
    """Per output: the metrics of the input closest to failing (largest metric / tolerance), and whether every
    input passed (Polygraphy's verdicts)."""
    per_output: dict[str, list[dict[str, Any]]] = {}
    for index, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        for name in ref:
            if name not in got:
                raise QVGGTError(f"the runtime did not produce output {name!r}")
            if got[name].shape != ref[name].shape:
                raise QVGGTError(f"output {name}: runtime shape {got[name].shape} vs PyTorch {ref[name].shape}")
            scale = noise.get(index, {}).get(name)
            metric, tolerance, criterion = tolerance_for(kind, scale, name)
            values = output_metrics(got[name], ref[name])
            entry = {**values, "tolerance": tolerance, "judged_metric": metric, "criterion": criterion,
                     "noise": scale, "noise_rel_l2": scale if kind != "track" else None, "input": labels[index],
                     "passed": bool(verdicts[index].get(name, False)),
                     "ratio": values[metric] / tolerance if np.isfinite(values[metric]) else float("inf")}
            if name == "pose_enc":
                entry["pose"] = pose_metrics(got[name], ref[name])
            per_output.setdefault(name, []).append(entry)
    outputs = {}
    for name, entries in per_output.items():
        worst = max(entries, key=lambda e: (not e["passed"], e["ratio"]))
        outputs[name] = {**worst, "passed": all(e["passed"] for e in entries)}
    return outputs
