"""The tracking head as its own, optional ONNX graph: ``images`` + ``query_points`` -> ``track``, ``vis``, ``conf``.

The canonical graph (:func:`~qvggt_export.export.export_onnx`) has one input and the dense outputs; the track
head needs query points, so it gets a graph of its own:

* inputs ``images`` [B, S, 3, H, W] float32 in [0, 1] (the same contract as the canonical graph) and
  ``query_points`` [B, N, 2] float32, pixel (x, y) in frame 0;
* outputs (official names) ``track`` [B, S, N, 2] (pixels, the last refinement iteration), ``vis`` [B, S, N]
  and, when the tracker predicts it, ``conf`` [B, S, N];
* S (frames) and N (points) dynamic; B, H, W and the number of refinement iterations fixed per export.

Float32 and every quantized format of the canonical graph (int Q/DQ, fp8, nvfp4 at opset 23); there is no
float16 track graph (the tracker's iterative sampling is the part most sensitive to rounding, and upstream runs
the heads in float32).

The graph holds the aggregator too (the head reads its layers), so a user who runs both graphs runs the
aggregator twice. Quantized aggregator layers lower through the canonical exporter's placeholder machinery
(:mod:`qvggt_export.export.qdq`), so the Q/DQ form of the aggregator is identical in both graphs; the track
head itself stays float32, as upstream and as in QuantVGGT.

Export notes (what the head needed; see :mod:`qvggt_export.model.heads.track`): its ``nn.MultiheadAttention``
blocks are written out with standard ops during export (PyTorch's eval fast path has no ONNX form and its
slow path froze the frame count); grid sampling exports to ONNX ``GridSample`` (opset 16+) with
``align_corners=1``, bilinear (``linear``) mode and the head's ``border`` / ``zeros`` padding, which is
PyTorch's ``F.grid_sample`` semantics (checked on the written graph). No Python branch depends on the data or
on S or N; those that remain are fixed per export and stated here:

* configuration: the refinement loop (``iters``, unrolled), ``predict_conf``, the virtual tracks and the
  space-attention schedule of the update transformer;
* resolution: the feature-map sizes of the correlation pyramid, the grid-sample normalisation
  (``bilinear_sample``, explicit Python ints), the tracker's sin/cos position table and the DPT feature
  extractor's sizes (as in the canonical graph); the DPT frame chunking is off during export.

Checked by exporting at one (S, N) and running ONNX Runtime at others (``tests/export/test_track_export.py``,
:func:`qvggt_export.parity.track.check_track_parity`). TensorRT-RTX 1.7.1 parses the float and W8A8 track
graphs on a CPU-only machine (each GridSample becomes a TensorRT grid-sample layer) and builds SM86 engines with
a frames and a points profile; no engine has run (no GPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.export.onnx_export import (
    OPSET,
    count_ops,
    graph_size_bytes,
    lower_traced_graph,
    save_graph,
    trace_to_onnx,
)
from qvggt_export.io import ensure_writable_dir
from qvggt_export.quant.modules import FloatQuantLinear, QuantLinear

logger = logging.getLogger(__name__)

TRACK_INPUTS = ("images", "query_points")
TRACK_OUTPUTS = ("track", "vis", "conf")
# Below two frames or points the tracer may specialise a size-1 axis (broadcasts, squeezes) into the graph.
MIN_EXAMPLE_FRAMES = 2
MIN_EXAMPLE_POINTS = 2


@dataclass
class TrackExportResult:
    onnx_path: Path
    size_bytes: int
    external_data: bool
    input_shapes: dict[str, list[int | str]]
    outputs: list[str]
    opset: int
    num_nodes: int
    num_qlinear: int
    iters: int
    export_seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)


class _TrackOutputs(nn.Module):
    """(images, query_points) -> (track, vis[, conf]): the official forward's track branch only."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, images: torch.Tensor, query_points: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # As VGGT.forward, without the dense heads (tracing them would only add dead nodes).
        tokens, patch_start_idx = self.model.aggregator(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            track_list, vis, conf = self.model.track_head(tokens, images, patch_start_idx, query_points)
        outputs = {"track": track_list[-1], "vis": vis, "conf": conf}
        return tuple(outputs[name] for name in self.names)


def track_output_names(model: nn.Module) -> tuple[str, ...]:
    """``("track", "vis", "conf")``, without ``conf`` when the tracker does not predict it."""
    head = getattr(model, "track_head", None)
    if head is None:
        raise QVGGTError("the model has no track head (its config has track_head=None): nothing to export")
    return TRACK_OUTPUTS if head.config.tracker.predict_conf else TRACK_OUTPUTS[:2]


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear | FloatQuantLinear) for m in model.modules())


def _check_examples(model: nn.Module, images: torch.Tensor, query_points: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[2] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise QVGGTError(f"example images must be [B, S, 3, H, W], got {shape}")
    if images.dtype != torch.float32:
        raise QVGGTError(f"example images must be float32 in [0, 1], got {images.dtype}")
    if not isinstance(query_points, torch.Tensor) or query_points.dim() != 3 or query_points.shape[-1] != 2:
        shape = tuple(query_points.shape) if isinstance(query_points, torch.Tensor) else type(query_points).__name__
        raise QVGGTError(f"example query points must be [B, N, 2] (pixel x, y in frame 0), got {shape}")
    if query_points.dtype != torch.float32:
        raise QVGGTError(f"example query points must be float32, got {query_points.dtype}")
    if query_points.shape[0] != images.shape[0]:
        raise QVGGTError(f"query points batch {query_points.shape[0]} != images batch {images.shape[0]}")
    if images.shape[1] < MIN_EXAMPLE_FRAMES or query_points.shape[1] < MIN_EXAMPLE_POINTS:
        raise QVGGTError(f"example inputs need >= {MIN_EXAMPLE_FRAMES} frames and >= {MIN_EXAMPLE_POINTS} points "
                         f"(a size-1 axis can be traced as a constant), got {images.shape[1]} frames, "
                         f"{query_points.shape[1]} points; the graph then takes any count")
    if not torch.isfinite(query_points).all():
        raise QVGGTError("example query points contain NaN or inf")
    patch = getattr(getattr(model, "aggregator", None), "patch_size", None)
    height, width = images.shape[-2:]
    if patch is not None and (height % patch or width % patch):
        raise QVGGTError(f"image size {height}x{width} is not a multiple of the patch size {patch}")


def export_track_onnx(model: nn.Module, onnx_path: str | os.PathLike[str], example_images: torch.Tensor,
                      example_query_points: torch.Tensor, *, opset: int = OPSET,
                      hadamard: str = "function") -> TrackExportResult:
    """Export the track branch of ``model`` (float or fake-quantized) to ``onnx_path``; the model is not modified.

    Args:
        model: a VGGT with a track head, optionally with quantized aggregator layers.
        onnx_path: target file; weights go to ``<name>.data`` beside it when over ~1.8 GB.
        example_images: [B, S, 3, H, W] float32 in [0, 1]; fixes B and the resolution (S stays dynamic).
        example_query_points: [B, N, 2] float32 pixel (x, y) in frame 0 (N stays dynamic).
        opset: ONNX opset (21 or newer: INT4 Q/DQ; 23 for nvfp4, as for the canonical graph).
        hadamard: form of DSFQ's online rotation, as in :func:`~qvggt_export.export.export_onnx`.

    Raises:
        QVGGTError: bad examples, no track head, an opset that is too old, a graph that fails the ONNX
            checker, or a failed write (nothing is left under ``onnx_path`` then).
    """
    if opset < OPSET:
        raise QVGGTError(f"opset {opset} is too old: INT4 Q/DQ needs opset {OPSET} or newer")
    names = track_output_names(model)
    _check_examples(model, example_images, example_query_points)
    onnx_path = Path(onnx_path)
    ensure_writable_dir(onnx_path.parent)
    wrapper = _TrackOutputs(model, names).eval()
    dynamic = {"images": {1: "frames"}, "query_points": {1: "points"}, "track": {1: "frames", 2: "points"},
               "vis": {1: "frames", 2: "points"}, "conf": {1: "frames", 2: "points"}}
    started = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export-track-", dir=onnx_path.parent))
    try:
        proto = trace_to_onnx(model, wrapper, (example_images, example_query_points), tmp_dir / "raw.onnx",
                              input_names=list(TRACK_INPUTS), output_names=list(names),
                              dynamic_axes={k: v for k, v in dynamic.items() if k in (*TRACK_INPUTS, *names)},
                              placeholders=_quantized(model))
        num_q = lower_traced_graph(proto, hadamard, opset)
        _declare_output_shapes(proto, int(example_images.shape[0]))
        _check_grid_samples(proto)
        # A plugin node has no schema: shape inference cannot type it.
        external = save_graph(proto, onnx_path, full_check=hadamard != "plugin", tmp_dir=tmp_dir)
    except OSError as exc:  # tracing writes into tmp_dir too
        raise QVGGTError(f"writing {onnx_path} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    size = graph_size_bytes(onnx_path)
    result = TrackExportResult(
        onnx_path=onnx_path, size_bytes=size, external_data=external, input_shapes=shapes, outputs=list(names),
        opset=opset, num_nodes=len(proto.graph.node), num_qlinear=num_q, iters=model.track_head.config.iters,
        export_seconds=time.perf_counter() - started, op_counts=count_ops(proto),
    )
    logger.info("exported the track graph %s (%d nodes, %d quantized linears, %.1f MB) in %.1f s", onnx_path,
                result.num_nodes, num_q, size / 1e6, result.export_seconds)
    return result


def _declare_output_shapes(proto: onnx.ModelProto, batch: int) -> None:
    """State each output's shape as the contract has it (the tracer's shape inference loses the batch and the
    coordinate axis of ``track``, naming them ``Multrack_dim_0``...); the full checker verifies them."""
    for output in proto.graph.output:
        dims = [batch, "frames", "points", 2] if output.name == "track" else [batch, "frames", "points"]
        shape = output.type.tensor_type.shape
        del shape.dim[:]
        for value in dims:
            dim = shape.dim.add()
            if isinstance(value, int):
                dim.dim_value = value
            else:
                dim.dim_param = value


# PyTorch's F.grid_sample(mode="bilinear", align_corners=True) is ONNX GridSample mode "linear" (opset 20+;
# "bilinear" in 16-19) with align_corners=1; the head pads with "border" (point features) or "zeros"
# (correlation windows).
_GRID_SAMPLE_MODES = {b"linear", b"bilinear"}
_GRID_SAMPLE_PADDING = {b"border", b"zeros"}


def _check_grid_samples(proto: onnx.ModelProto) -> None:
    """Refuse a graph whose GridSample nodes do not have the head's sampling semantics (a silent change of
    exporter defaults would shift every track by up to half a pixel)."""
    for node in proto.graph.node:
        if node.op_type != "GridSample":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (attrs.get("align_corners") != 1 or attrs.get("mode", b"bilinear") not in _GRID_SAMPLE_MODES
                or attrs.get("padding_mode", b"zeros") not in _GRID_SAMPLE_PADDING):
            raise QVGGTError(f"GridSample node {node.name!r} exported with {attrs}; the track head needs "
                             "align_corners=1, bilinear mode and border/zeros padding")
