"""The engine stage: from the canonical ONNX graph to an engine, doing every runtime-specific rewrite itself.

:func:`build_engine_for_target` takes the canonical graph that :func:`qvggt_export.export.export_onnx` (or
:func:`~qvggt_export.export.track_export.export_track_onnx`) wrote and an :class:`EngineTarget`, and

1. lowers the graph for the target (:func:`qvggt_export.engine.lowering.lower_for_target`: static
   activation scales from the calibration inputs, or weight-only INT4), measuring the rewrite's accuracy in
   ONNX Runtime against the float model; written as ``<name>.lowered.onnx``;
2. swaps each Hadamard function call for the ``qvggt::Hadamard`` TensorRT plugin node
   (:func:`qvggt_export.engine.hadamard.plugin_graph`, ``<name>.plugin.onnx``) and registers the plugin;
3. builds the engine (:func:`qvggt_export.engine.build.build_engine`).

Moved from ``qvggt_export.pipeline`` (``_build_engine_stage``, ``_track_engine_stage``, ``_lowered_graph``,
``_lowered_track_graph``, ``_engine_from_graph``, ``_engine_report``), with the run configuration replaced
by :class:`EngineTarget`; the code paths are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.formats import DEFAULT_ENGINE_PROFILE, get_format

__all__ = ["EngineTarget", "build_engine_for_target"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineTarget:
    """What engine to build from a canonical graph.

    Attributes:
        bits: The graph's format (a row of :mod:`qvggt_export.formats`).
        profile: Build profile name (``engines/*.json``) or path.
        lowering: Lowering target (``"as-written"``, ``"int8-static"``, ``"w4a8"``, ``"w4a16"``), or ``"auto"``
            for the format's default on ``backend``.
        backend: ``"auto"``, ``"rtx"`` or ``"trt"``.
        hadamard: ``"plugin"`` (the ``qvggt::Hadamard`` TensorRT plugin) or ``"function"`` (TensorRT inlines the
            ONNX function).
        float16: Run the unquantized parts in FP16 (not applied to the tracking graph).
        rotates: Whether the graph's quantization method has online rotations (for the report).
        seed: Seeds the fixed query points a tracking graph is lowered with.
    """

    bits: str
    profile: str = DEFAULT_ENGINE_PROFILE
    lowering: str = "auto"
    backend: str = "auto"
    hadamard: str = "plugin"
    float16: bool = False
    rotates: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        get_format(self.bits)
        if self.hadamard not in ("plugin", "function"):
            raise QVGGTError(f"engine hadamard must be 'plugin' or 'function', got {self.hadamard!r}")
        if self.backend not in ("auto", "rtx", "trt"):
            raise QVGGTError(f"backend must be auto, rtx or trt, got {self.backend!r}")

    @property
    def resolved_lowering(self) -> str:
        return get_format(self.bits).default_lowering(self.backend) if self.lowering == "auto" else self.lowering


def build_engine_for_target(canonical: str | Path, engine_path: str | Path, target: EngineTarget, *,
                            calibration_inputs: Sequence[Any] = (), reference_model: Any = None,
                            stage: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Lower ``canonical`` for ``target``, write its Hadamard form, build ``engine_path``; returns the report.

    Graphs are written beside the engine: ``<stem>.lowered.onnx`` (absent when the engine takes the graph as
    written) and ``<stem>.plugin.onnx`` (with the plugin Hadamard form). A graph with a ``query_points``
    input (the tracking graph) is lowered with the points held fixed and built without ``float16``.

    Args:
        canonical: The canonical graph as exported.
        engine_path: The engine to write.
        target: Format, profile, lowering, backend, Hadamard form.
        calibration_inputs: Image batches ``[B, S, 3, H, W]``: static activation scales of the ``int8-static``
            / ``w4a8`` lowerings, and the inputs the lowering's accuracy is measured on.
        reference_model: The float PyTorch model the lowering's accuracy is compared with (``None``: compared
            with the canonical graph only).
        stage: Wraps each step in ``stage(name)`` (a context manager, e.g. a stage timer); names
            ``lower_for_engine`` / ``build_engine`` (``lower_track_for_engine`` / ``build_track_engine``).

    Returns:
        The ``report.json`` ``engine`` entry: ``path``, ``onnx`` (the graph built), ``hadamard``, plugin node
        count, ``profile_name``, ``lowering`` and the build result; or ``{"path": None, "reason": ...}``
        (with ``"failed": True`` for a failed build) when no engine was built.
    """
    canonical, engine_path = Path(canonical), Path(engine_path)
    stage = stage or (lambda name: contextlib.nullcontext())
    out_dir = engine_path.parent
    stem = engine_path.stem
    if _is_track_graph(canonical):
        return _track_engine(canonical, engine_path, target, list(calibration_inputs), stage)
    choice: dict[str, Any] = {"profile_name": target.profile}
    with stage("lower_for_engine"):
        graph, choice["lowering"] = _lowered_graph(target, canonical, target.resolved_lowering, reference_model,
                                                   list(calibration_inputs), out_dir / f"{stem}.lowered.onnx")
    with stage("build_engine"):
        data, graph, plugin_nodes = _engine_from_graph(target, graph, engine_path, out_dir / f"{stem}.plugin.onnx")
    return _engine_report(target, graph, data, plugin_nodes, choice)


def _is_track_graph(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(i.name == "query_points" for i in proto.graph.input)


def _lowered_graph(target: EngineTarget, onnx_path: Path, lowering: str, reference_model: Any,
                   batches: list[Any], path: Path) -> tuple[Path, dict[str, Any]]:
    """The graph the engine is built from: the canonical export rewritten for the target (static activation
    scales from the calibration batches, or weight-only INT4), with its accuracy measured in ONNX Runtime
    against the float model on the same batches (in-sample for static scales: the report says so)."""
    import onnx

    from qvggt_export.engine.lowering import lower_for_target

    if lowering == "as-written" and not target.float16:
        return onnx_path, {"target": "as-written", "note": "the canonical graph, unchanged"}
    float_outputs = None
    if reference_model is not None:
        import torch

        float_outputs = []
        with torch.no_grad():
            for images in batches:
                outputs = reference_model(images)
                float_outputs.append({k: v.float().numpy() for k, v in outputs.items()
                                      if isinstance(v, torch.Tensor)})
    lowered, info = lower_for_target(onnx.load(str(onnx_path)), lowering, calibration_inputs=batches,
                                     float_outputs=float_outputs, float16=target.float16)
    from qvggt_export.export.onnx_export import save_graph

    save_graph(lowered, path, check=False)  # the lowering's own ONNX Runtime run has already loaded it
    return path, info.to_dict()


def _engine_report(target: EngineTarget, graph: Path, data: dict[str, Any], plugin_nodes: int,
                   choice: dict[str, Any]) -> dict[str, Any]:
    if "engine_path" not in data:  # not built: {"path": None, "reason": ...}
        return {**data, **choice}
    hadamard = "plugin" if plugin_nodes else ("function" if target.rotates else "none")
    from qvggt_export.engine.runtimes import loadable_by

    return {"path": data.pop("engine_path"), "onnx": str(graph), "hadamard": hadamard,
            "hadamard_plugin_nodes": plugin_nodes, "loadable_by": loadable_by(data["backend"], plugin_nodes > 0),
            **choice, **data}


def _engine_from_graph(target: EngineTarget, graph: Path, engine_path: Path,
                       plugin_path: Path) -> tuple[dict[str, Any], Path, int]:
    """Build one engine from ``graph`` (Hadamard calls swapped for plugin nodes into ``plugin_path`` first, when
    the target uses the plugin). Returns the build result as a dict, or ``{"path": None, "reason": ...}``, the
    graph the engine was built from, and the number of plugin nodes."""
    from qvggt_export.engine.build import build_engine
    from qvggt_export.engine.hadamard import plugin_graph

    backend = None if target.backend == "auto" else target.backend
    plugin_nodes = 0
    try:
        if target.hadamard == "plugin":
            graph, plugin_nodes = plugin_graph(graph, plugin_path.parent, plugin_path.name)
        if plugin_nodes:
            from qvggt_export.plugins import register

            register(target.backend)  # the parser instantiates the plugin through its creator
        result = build_engine(graph, engine_path, target.profile, backend=backend, format_name=target.bits)
    except MissingDependencyError as exc:
        logger.warning("no engine built: %s", exc)
        return {"path": None, "reason": str(exc)}, graph, plugin_nodes
    except QVGGTError as exc:
        logger.error("engine build failed: %s", exc)
        return {"path": None, "reason": f"build failed: {exc}", "failed": True}, graph, plugin_nodes
    return result.to_dict(), graph, plugin_nodes


def _track_engine(track_path: Path, engine_path: Path, target: EngineTarget, batches: list[Any],
                  stage: Callable[[str], Any]) -> dict[str, Any]:
    """``track.engine`` from ``track.onnx``: the same profile (targets, frame range; its point range for
    ``query_points``), backend, lowering target and Hadamard form as the main engine.

    Not applied: ``float16`` (the tracker stays float32, as in the track export and upstream). A static
    lowering (``int8-static``, ``w4a8``) measures its activation ranges with the query points fixed: the
    quantized layers are the aggregator's, whose inputs do not depend on the points (:func:`_lowered_track_graph`).
    """
    choice: dict[str, Any] = {"profile_name": target.profile}
    out_dir, stem = engine_path.parent, engine_path.stem
    with stage("lower_track_for_engine"):
        try:
            graph, choice["lowering"] = _lowered_track_graph(target, track_path, target.resolved_lowering, batches,
                                                             out_dir / f"{stem}.lowered.onnx")
        except MissingDependencyError as exc:
            return {"path": None, "reason": str(exc), **choice}
    if target.float16:
        choice["lowering"]["float16_not_applied"] = ("--engine-fp16 is not applied to the track engine: the "
                                                     "tracker stays float32, as in the track export")
    with stage("build_track_engine"):
        data, graph, plugin_nodes = _engine_from_graph(target, graph, engine_path, out_dir / f"{stem}.plugin.onnx")
    return _engine_report(target, graph, data, plugin_nodes, choice)


def _lowered_track_graph(target: EngineTarget, track_path: Path, lowering: str, batches: list[Any],
                         path: Path) -> tuple[Path, dict[str, Any]]:
    """The track graph rewritten for the engine's target (``track.lowered.onnx``), as the canonical graph is.

    :func:`~qvggt_export.engine.lowering.lower_for_target` runs graphs with one ``images`` input; the track
    graph also takes ``query_points``. It is lowered with ``query_points`` held as a constant (seeded points),
    then given its input back: the rewrite only touches the aggregator's quantized layers, whose inputs do not
    depend on the points, so the static scales are those of the canonical graph on the same images, and the
    accuracy it reports (lowered vs exported track graph, ONNX Runtime) is for those fixed points.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    from qvggt_export.engine.lowering import lower_for_target
    from qvggt_export.export.onnx_export import save_graph

    if lowering == "as-written":
        return track_path, {"target": "as-written", "note": "the track graph as exported, unchanged"}
    proto = onnx.load(str(track_path))
    (points_input,) = [i for i in proto.graph.input if i.name == "query_points"]
    height, width = batches[0].shape[-2:]
    generator = torch.Generator().manual_seed(target.seed)
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
    save_graph(lowered, path, full_check=False)
    result = info.to_dict()
    result["accuracy_points"] = int(points.shape[1])
    return path, result
