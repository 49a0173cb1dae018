"""Canonical ONNX export of a (quantized) VGGT: one input, official output names, Q/DQ lowering.

The graph takes ``images`` [B, S, 3, H, W] float32 in [0, 1] (ImageNet normalisation is inside),
with the frame count S dynamic and the resolution fixed per export, and returns the dense outputs of
the official dict (``pose_enc``, ``depth``, ``depth_conf``, ``world_points``, ``world_points_conf``,
as the enabled heads provide). The tracking head needs query points and stays out of this graph.
``precision="fp16"`` exports the float model in half precision the same way: the graph input stays
float32 ``images`` in [0, 1] and is cast to float16 as the graph's first node, every weight and every
operator runs in float16, and each output is cast back to float32 as the graph's last node, so consumers
see the same input/output contract (names, dtypes, shapes) for fp32, fp16 and the quantized formats.
Files are written to a temporary folder beside the target and renamed into place, so an interrupted
export never leaves a ``model.onnx`` that looks whole.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.export.qdq import count_placeholders, lower_qlinear_placeholders
from qvggt_export.io import ensure_writable_dir
from qvggt_export.quant.modules import PLACEHOLDER_DOMAIN, QuantLinear

logger = logging.getLogger(__name__)

OPSET = 21
# The TorchScript exporter emits opset <= 20; the graph is traced at 20 and declared 21 after the Q/DQ
# lowering (INT4 needs 21). Every operator it emits has the same semantics in 21 for these types
# (opset 21 only widened type lists), which the full ONNX checker verifies.
TRACE_OPSET = 20
DENSE_OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
# Float precisions of the unquantized reference export (quantized formats keep float32 around their Q/DQ).
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# Protobuf's hard limit is 2 GiB; switch to external data a little below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


class _DenseOutputs(nn.Module):
    """images -> tuple of the dense official outputs, in :data:`DENSE_OUTPUTS` order."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.dtype == torch.float32:
            predictions = self.model(images)
            return tuple(predictions[name] for name in self.names)
        # Reduced precision inside, float32 at the graph's boundary (same contract as the fp32 export).
        predictions = self.model(images.to(self.dtype))
        return tuple(predictions[name].float() for name in self.names)


def output_names_for(model: nn.Module) -> tuple[str, ...]:
    names = []
    if getattr(model, "camera_head", None) is not None:
        names.append("pose_enc")
    if getattr(model, "depth_head", None) is not None:
        names += ["depth", "depth_conf"]
    if getattr(model, "point_head", None) is not None:
        names += ["world_points", "world_points_conf"]
    if not names:
        raise QVGGTError("the model has no camera, depth or point head to export")
    return tuple(names)


@dataclass
class ExportResult:
    onnx_path: Path
    size_bytes: int
    external_data: bool
    input_shape: list[int | str]
    outputs: list[str]
    opset: int
    precision: str
    num_nodes: int
    num_qlinear: int
    export_seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)


def _tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the weights a graph holds in its protobuf (initializers and Constant-node tensors).

    The rest of the graph (nodes, names, shapes) is a few MB at VGGT-1B size, well inside the margin between
    :data:`EXTERNAL_DATA_THRESHOLD` and protobuf's 2 GiB limit.
    """
    def size(tensor: onnx.TensorProto) -> int:
        if tensor.raw_data:
            return len(tensor.raw_data)
        return sum(len(getattr(tensor, f)) * 8 for f in ("float_data", "int32_data", "int64_data", "double_data",
                                                          "uint64_data"))

    total = sum(size(t) for t in proto.graph.initializer)
    for nodes in [proto.graph.node, *(f.node for f in proto.functions)]:
        for node in nodes:
            total += sum(size(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


def _has_quantized_layers(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


@contextlib.contextmanager
def _fixed_resolution(model: nn.Module, height: int, width: int) -> Iterator[None]:
    """Freeze resolution-dependent constants (the DINO pos-embed resample) for the export."""
    patch_embed = getattr(getattr(model, "aggregator", None), "patch_embed", None)
    freeze = getattr(patch_embed, "freeze_pos_embed", None)
    if freeze is None:
        yield
        return
    patch = patch_embed.patch_size
    freeze(height // patch, width // patch)
    try:
        yield
    finally:
        patch_embed.unfreeze_pos_embed()


def export_onnx(model: nn.Module, onnx_path: str | os.PathLike[str], example_images: torch.Tensor, *,
                opset: int = OPSET, hadamard: str = "function", precision: str = "fp32") -> ExportResult:
    """Export ``model`` (float or fake-quantized) to ``onnx_path``; does not modify the model.

    Args:
        model: a VGGT, optionally with :class:`~qvggt_export.quant.QuantLinear` layers.
        onnx_path: target file; weights go to ``<name>.data`` beside it when over ~1.8 GB.
        example_images: [B, S, 3, H, W] in [0, 1]; fixes the resolution (S stays dynamic).
        opset: ONNX opset (21 or newer: INT4 and per-axis Q/DQ).
        hadamard: form of the online rotation of DSFQ layers: ``"function"`` (default: an O(d log d) ONNX
            local function that ONNX Runtime and TensorRT both run), ``"dense"`` (a d x d MatMul, for
            comparison) or ``"plugin"`` (a ``qvggt::Hadamard`` node for TensorRT with the plugin; ONNX
            Runtime cannot run it).
        precision: ``"fp32"`` (default) or ``"fp16"``: the float model's weights and arithmetic in half
            precision (a float16 copy of the model is traced; ``model`` itself is not changed), with the
            float32 input and outputs of every other export. Only for unquantized models.
    """
    if precision not in PRECISIONS:
        raise QVGGTError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and _has_quantized_layers(model):
        raise QVGGTError(f"precision {precision!r} exports the unquantized float model, but this model has "
                         "quantized layers (QuantLinear): export it with precision='fp32' (its Q/DQ format is "
                         "its precision) or pass the float model")
    if opset < OPSET:
        raise QVGGTError(f"opset {opset} is too old: INT4 Q/DQ needs opset {OPSET} or newer")
    if example_images.dim() != 5 or example_images.shape[2] != 3:
        raise QVGGTError(f"example images must be [B, S, 3, H, W], got {tuple(example_images.shape)}")
    onnx_path = Path(onnx_path)
    ensure_writable_dir(onnx_path.parent)
    names = output_names_for(model)
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:
        # A converted copy: the caller's float32 model stays untouched (it is the parity reference).
        model = copy.deepcopy(model).to(dtype)
    wrapper = _DenseOutputs(model, names, dtype).eval()
    started = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=onnx_path.parent))
    try:
        proto = trace_to_onnx(model, wrapper, (example_images,), tmp_dir / "raw.onnx", input_names=["images"],
                              output_names=list(names),
                              dynamic_axes={"images": {1: "frames"}, **{n: {1: "frames"} for n in names}},
                              placeholders=_has_quantized_layers(model))
        num_q = lower_traced_graph(proto, hadamard, opset)
        # A plugin node has no schema or body, so shape inference (the full check) cannot type it.
        external = save_graph(proto, onnx_path, full_check=hadamard != "plugin", tmp_dir=tmp_dir)
    except OSError as exc:  # tracing writes into tmp_dir too
        raise QVGGTError(f"writing {onnx_path} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    input_dims = proto.graph.input[0].type.tensor_type.shape.dim
    result = ExportResult(
        onnx_path=onnx_path, size_bytes=graph_size_bytes(onnx_path),
        external_data=external, input_shape=[d.dim_param or d.dim_value for d in input_dims],
        outputs=list(names), opset=opset, precision=precision, num_nodes=len(proto.graph.node), num_qlinear=num_q,
        export_seconds=time.perf_counter() - started, op_counts=count_ops(proto),
    )
    logger.info("exported %s (%s, %d nodes, %d quantized linears, %.1f MB) in %.1f s", onnx_path, precision,
                result.num_nodes, num_q, result.size_bytes / 1e6, result.export_seconds)
    return result


def trace_to_onnx(model: nn.Module, wrapper: nn.Module, example_inputs: tuple[torch.Tensor, ...], raw_path: Path, *,
                  input_names: list[str], output_names: list[str], dynamic_axes: dict[str, dict[int, str]],
                  placeholders: bool) -> onnx.ModelProto:
    """Trace ``wrapper`` (a forward over ``model``) with the TorchScript exporter at the resolution of the first
    example input (images [B, S, 3, H, W]) and return the raw graph, QLinear placeholders still in it
    (``placeholders``: declare their domain)."""
    height, width = example_inputs[0].shape[-2:]
    with _fixed_resolution(model, height, width), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python ints taken from fixed image sizes: intended (fixed resolution).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The TorchScript exporter is deprecated upstream (its warning is not actionable for users);
        # QuantLinear also emits dynamo-exporter placeholders, so moving over is a contained change.
        warnings.filterwarnings("ignore", message=".*feature will be removed.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            wrapper, example_inputs, str(raw_path), dynamo=False, opset_version=TRACE_OPSET,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            custom_opsets={PLACEHOLDER_DOMAIN: 1} if placeholders else None, do_constant_folding=True,
        )
    return onnx.load(str(raw_path))


def lower_traced_graph(proto: onnx.ModelProto, hadamard: str, opset: int) -> int:
    """Lower a traced graph's QLinear placeholders into Q/DQ (in place) and declare ``opset``; returns the
    number of quantized linears."""
    num_q = count_placeholders(proto)
    lowered = lower_qlinear_placeholders(proto, hadamard=hadamard, opset=opset)
    if lowered != num_q:
        raise QVGGTError(f"lowered {lowered} of {num_q} quantized linears")
    for entry in [*proto.opset_import, *(i for f in proto.functions for i in f.opset_import)]:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset  # function bodies must declare the model's opset
    proto.producer_name = "qvggt-export"
    return num_q


def save_graph(proto: onnx.ModelProto, onnx_path: str | os.PathLike[str], *, check: bool = True,
               full_check: bool = True, tmp_dir: Path | None = None) -> bool:
    """Write ``proto`` to ``onnx_path`` atomically: into a temporary folder beside it, checked, then renamed
    into place, with the weights as external data (``<name>.data``) above :data:`EXTERNAL_DATA_THRESHOLD`.

    Args:
        check: run ``onnx.checker`` (``full_check`` adds shape inference; a plugin node cannot pass it).
        tmp_dir: a temporary folder on the same file system to use (the caller removes it); default: one
            of its own, removed afterwards.

    Returns:
        Whether the weights went to external data.

    Raises:
        QVGGTError: the checker refuses the graph, or writing fails (nothing is left under ``onnx_path``;
            an earlier file there stays as it was).
    """
    onnx_path = Path(onnx_path)
    own_tmp = tmp_dir is None
    work = Path(tempfile.mkdtemp(prefix=f".{onnx_path.name}.", dir=onnx_path.parent)) if own_tmp else tmp_dir
    try:
        # Not proto.ByteSize(): protobuf refuses to size (serialize) a message over 2 GiB, the very case to detect.
        external = _tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD
        final_tmp = work / onnx_path.name
        data_name = onnx_path.name + ".data"
        if external:
            onnx.save(proto, str(final_tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name, size_threshold=1024)
            if check:
                onnx.checker.check_model(str(final_tmp), full_check=full_check)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(work / data_name, 0o666 & ~umask)  # onnx creates the data file 0600, unlike the graph
            os.replace(work / data_name, onnx_path.parent / data_name)
        else:
            if check:
                onnx.checker.check_model(proto, full_check=full_check)
            onnx.save(proto, str(final_tmp))
            with contextlib.suppress(FileNotFoundError):
                (onnx_path.parent / data_name).unlink()  # a stale data file from an older export
        os.replace(final_tmp, onnx_path)
    except onnx.checker.ValidationError as exc:
        raise QVGGTError(f"the exported graph {onnx_path.name} failed the ONNX checker: {exc}") from exc
    except OSError as exc:
        raise QVGGTError(f"writing {onnx_path} failed: {exc}") from exc
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return external


def graph_size_bytes(onnx_path: Path) -> int:
    """Bytes of a saved graph plus its external data file, if any."""
    data = onnx_path.parent / (onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def count_ops(proto: onnx.ModelProto) -> dict[str, int]:
    """Main-graph node count per op type, sorted by name."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
