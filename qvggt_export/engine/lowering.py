"""Per-target lowering of the canonical quantized ONNX graph (pure ONNX graph rewriting), in the engine stage.

(Moved from ``qvggt_export.export.lowering``: the canonical exporter knows no runtime; rewriting its graph for
TensorRT is the engine stage's work, see :func:`qvggt_export.engine.build_engine_for_target`.)

The canonical graph of :mod:`qvggt_export.export.qdq` is exact in ONNX Runtime, but TensorRT cannot run all
of its math natively (DESIGN.md section 3): it quantizes activations only to INT8 / FP8 / FP4 with
build-time constant scales, and INT4 is weight-only there. :func:`lower_for_target` rewrites the quantized
layers of a canonical graph for one kind of engine and measures, in ONNX Runtime, what the rewrite costs in
accuracy against the canonical graph (and against the float model when its outputs are given).

Targets:

* ``"as-written"``: the canonical graph unchanged (per-token dynamic activation quantization computed in
  the graph: ``Abs -> ReduceMax -> Div -> Max -> Div -> Q/DQ``). TensorRT-RTX builds it for every format;
  for 8-bit activations it fuses Q/DQ -> MatMul into an INT8 GEMM (the per-token step is applied after
  it), for 4-bit activations the GEMM runs on dequantized values, so the 4-bit activation rounding is
  emulated, not executed in 4-bit math.
* ``"int8-static"`` (W8A8, W6A6): each quantized layer's per-token step becomes one static per-tensor
  scale, ``amax / qmax`` of the layer's transformed input over the calibration inputs (measured by running
  ONNX Runtime with those tensors exposed as outputs). The layer becomes
  ``[Clip ->] QuantizeLinear(x, s) -> DequantizeLinear(s) -> MatMul(DQ(W)) -> Add(bias)``, the pattern
  TensorRT fuses into an INT8 x INT8 GEMM, with no reduction over each token at run time. W6A6 keeps its
  6-bit activation grid (Clip to the 6-bit range, then INT8 containers).
* ``"w4a8"`` (W4A4 graphs): INT4 weights with static per-tensor INT8 activations (same rewrite as
  ``int8-static`` with qmax 127). Builds with TensorRT-RTX 1.7.1; whether a fused INT4 x INT8 kernel runs
  cannot be seen without a GPU (the build log shows the GEMM's data types: see
  ``benchmarks/results/engine_sizes.md``).
* ``"w4a16"`` (W4A4 graphs): weight-only INT4, the one INT4 form TensorRT documents as native. The
  activation quantization chain is dropped; the online transform (Hadamard / smoothing) and the INT4
  per-channel weight DequantizeLinear stay, so the GEMM is ``MatMul(x_transformed, DQ(W_int4))``.

``float16=True`` additionally casts every float tensor of the lowered graph to FP16 (graph inputs and
outputs stay FP32 through Casts), as a strongly typed TensorRT network then runs the float parts (and
dequantized weights) in FP16. It is refused for ``"as-written"`` quantized graphs: the in-graph per-token
step floor (1e-8) underflows in FP16.

Default lowering per (format, backend, target architectures), :func:`default_lowering` (the ``lowerings``
column of the format registry, :mod:`qvggt_export.formats`):

============  =======================  ====================================================================
format        backend / targets        lowering (why)
============  =======================  ====================================================================
fp32 / fp16   any                      as-written (nothing quantized)
fp8, nvfp4    any (check_format_       as-written (TensorRT's own formats)
              targets first)
w8a8, w6a6    rtx (SM75 ... SM121)     as-written: TensorRT-RTX 1.7.1 fuses the per-token form into the
                                       same Int8 x Int8 GEMMs as int8-static (measured), with half the
                                       accuracy loss and a smaller engine (benchmarks/results/engine_sizes.md)
w8a8, w6a6    trt (server, CURRENT)    int8-static: constant Q scales are the form TensorRT documents for
                                       INT8 GEMMs; the per-token form's fusion is not verified on full
                                       TensorRT (no GPU here)
w4a4          any                      w4a16: TensorRT has no 4-bit activation math; INT4 weight-only is
                                       its documented native form, and more accurate than W4A4 as written
                                       (no activation rounding). NVFP4 on SM100+/SM120 is the separate
                                       ``nvfp4`` format, not a rewrite of INT4 codes
============  =======================  ====================================================================

The report of every lowering (:class:`LoweringInfo`) says which lowering an engine got and what it cost.
ONNX Runtime sessions use the parity settings of DESIGN.md section 3 (``session.disable_quant_qdq=1``,
``session.qdq_matmulnbits_accuracy_level=0``) so that its integer fusions do not change the numerics.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.errors import QVGGTError
from qvggt_export.export.qdq import LAYER_MAP_KEY
from qvggt_export.formats import FORMATS, format_names

__all__ = [
    "LOWERING_KEY",
    "TARGETS",
    "LayerFormat",
    "LoweringInfo",
    "default_lowering",
    "lower_for_target",
    "quantized_layer_formats",
    "to_float16",
]

logger = logging.getLogger(__name__)

#: Lowering targets accepted by :func:`lower_for_target`.
TARGETS = ("as-written", "int8-static", "w4a8", "w4a16")
#: Metadata key of a lowered graph: JSON with the target and the static scales.
LOWERING_KEY = "qvggt.lowering"

# Node-name suffixes the canonical exporter (qdq.py) gives each quantized layer's activation chain.
_ACT_CHAIN = ("act_abs", "act_absmax", "act_step", "act_step_floor", "act_scale", "act_clip", "act_q", "act_dq",
              "gemm", "gemm_rescale", "act_rescale")
_REQUIRED = ("weight_dq", "act_abs", "act_step", "act_q", "gemm", "bias_add")
_GEMM_OUT = "gemm_scaled"  # the tensor bias_add reads, in every canonical layer form
_MIN_STEP = 1e-8  # same floor as the canonical graph (qvggt_export.quant.functional.MIN_STEP)
_PROTO_LIMIT = 1_800_000_000  # above this a model goes to ONNX Runtime through a file with external data


@dataclass(frozen=True)
class LayerFormat:
    """How one quantized layer of a canonical graph is quantized (read from the graph).

    Attributes:
        name: The layer (module) name, e.g. ``aggregator.frame_blocks.0.attn.qkv``.
        weight_bits: 4 for INT4 containers; 8 for INT8 containers (W8 and W6 weights alike).
        act_bits: Activation bit width (from the value of its step's divisor ``qmax = 2^(bits-1) - 1``).
        transformed: Name of the layer's input after its online transform (what gets quantized).
        kind: ``"int"``, or the ONNX weight type of a floating-point format (``"FLOAT8E4M3FN"``,
            ``"FLOAT4E2M1"``), which no lowering here rewrites.
    """

    name: str
    weight_bits: int
    act_bits: int
    transformed: str
    kind: str = "int"


@dataclass
class LoweringInfo:
    """What :func:`lower_for_target` did and what it costs.

    Attributes:
        target: The lowering target.
        float16: Whether float tensors were cast to FP16.
        weight_bits / act_bits: Bits of the canonical graph's quantized layers (``None`` without any).
        engine_act_bits: Activation bits the engine computes with (``None``: float activations).
        layers: Quantized layers rewritten.
        nodes_before / nodes_after: Node counts of the main graph.
        static_scales: Per layer, the static activation scale (``int8-static``, ``w4a8``).
        calibration_inputs: How many input batches the static scales were measured on.
        accuracy: ``{"lowered_vs_canonical": {output: {rel_l2, max_abs}}, "lowered_vs_float": ...,
            "canonical_vs_float": ..., "eval_inputs": n, "in_sample": bool, "worst_rel_l2": {...}}``;
            ``{"skipped": reason}`` when not measured.
        seconds: Wall time of the call.
        note: What the lowering means for this graph, in one sentence.
    """

    target: str
    float16: bool
    weight_bits: int | None
    act_bits: int | None
    engine_act_bits: int | None
    layers: int
    nodes_before: int
    nodes_after: int
    static_scales: dict[str, float] = field(default_factory=dict)
    calibration_inputs: int = 0
    accuracy: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (static scales summarised: count, min, max)."""
        scales = list(self.static_scales.values())
        return {
            "target": self.target,
            "float16": self.float16,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "engine_act_bits": self.engine_act_bits,
            "layers": self.layers,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "static_scales": ({"count": len(scales), "min": float(min(scales)), "max": float(max(scales))}
                              if scales else None),
            "calibration_inputs": self.calibration_inputs,
            "accuracy": self.accuracy,
            "seconds": round(self.seconds, 3),
            "note": self.note,
        }


# ----------------------------------------------------------------------------------------------------------
# Reading the canonical graph
# ----------------------------------------------------------------------------------------------------------


def _layer_map(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    meta = {p.key: p.value for p in model.metadata_props}
    if LOWERING_KEY in meta:
        done = json.loads(meta[LOWERING_KEY]).get("target", "?")
        raise QVGGTError(f"the graph was already lowered (target {done!r}); lower the canonical graph instead")
    if LAYER_MAP_KEY not in meta:
        return {}
    try:
        layer_map = json.loads(meta[LAYER_MAP_KEY])
    except json.JSONDecodeError as exc:
        raise QVGGTError(f"metadata {LAYER_MAP_KEY!r} is not valid JSON: {exc}") from exc
    if not isinstance(layer_map, dict):
        raise QVGGTError(f"metadata {LAYER_MAP_KEY!r} must be an object of layers, got {type(layer_map).__name__}")
    return layer_map


def quantized_layer_formats(model: onnx.ModelProto) -> list[LayerFormat]:
    """The quantized layers of a canonical graph and their formats, checked against the graph's nodes.

    Integer layers (INT4 / INT8 weight codes) are read in full; layers of floating-point formats (FP8, NVFP4
    weights) get ``kind`` set to their weight type and are only ever kept as written.

    Raises:
        QVGGTError: The layer map names an integer layer whose canonical nodes are missing (not a canonical
            export).
    """
    layer_map = _layer_map(model)
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    formats = []
    for name in sorted(layer_map):
        entry = layer_map[name]
        weight_dq = nodes.get(f"{name}/weight_dq")
        weight_q = inits.get(weight_dq.input[0]) if weight_dq is not None else None
        if weight_q is not None and weight_q.data_type not in (TensorProto.INT4, TensorProto.INT8):
            kind = TensorProto.DataType.Name(weight_q.data_type)
            formats.append(LayerFormat(name, 0, 0, entry.get("transformed", ""), kind=kind))
            continue
        missing = [s for s in _REQUIRED if f"{name}/{s}" not in nodes]
        if missing or "transformed" not in entry or weight_q is None:
            raise QVGGTError(
                f"layer {name!r} of the layer map has no canonical Q/DQ nodes ({', '.join(missing) or 'transformed'} "
                "missing, or its weight codes are not an initializer); lower_for_target needs the graph exactly "
                "as qvggt_export.export wrote it"
            )
        weight_bits = 4 if weight_q.data_type == TensorProto.INT4 else 8
        # The activation bits from the step's divisor qmax = 2^(bits-1) - 1 (the graph's own math, not a naming
        # convention). The layer map does not record bits: adding them would change every canonical export.
        qmax_name = nodes[f"{name}/act_step"].input[1]
        qmax_init = inits.get(qmax_name)
        qmax = float(numpy_helper.to_array(qmax_init)) if qmax_init is not None else float("nan")
        act_bits = int(round(np.log2(qmax + 1))) + 1 if qmax > 0 else 0
        if act_bits < 2 or 2 ** (act_bits - 1) - 1 != qmax:
            raise QVGGTError(f"layer {name!r}: cannot read its activation bits from the step divisor {qmax_name!r} "
                             f"(expected a constant 2^(bits-1) - 1, got {qmax})")
        formats.append(LayerFormat(name, weight_bits, act_bits, entry["transformed"]))
    return formats


# ----------------------------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------------------------


def default_lowering(format_name: str, target_sms: Sequence[str] = (), backend: str = "rtx") -> str:
    """The lowering an engine of ``format_name`` gets by default (table in the module doc).

    Args:
        format_name: ``"w8a8"``, ``"w6a6"``, ``"w4a4"``, ``"fp32"``, ``"fp16"``, ``"fp8"`` or ``"nvfp4"``.
        target_sms: Compute capabilities of the build profile (``"SM89"``, ``"CURRENT"``). Today's table does
            not depend on them beyond :func:`qvggt_export.engine.check_format_targets`; callers pass them so
            that a per-architecture choice needs no API change.
        backend: ``"rtx"`` (TensorRT-RTX) or ``"trt"`` (full TensorRT); ``"auto"`` counts as ``"rtx"``, the
            backend ``auto`` picks when it is installed.

    Raises:
        QVGGTError: Unknown format or backend name.
    """
    if backend not in ("auto", "rtx", "trt"):
        raise QVGGTError(f"unknown backend {backend!r}; expected auto, rtx or trt")
    spec = FORMATS.get(format_name)
    if spec is None or not spec.exported:
        raise QVGGTError(f"no default lowering for format {format_name!r}; expected one of "
                         f"{', '.join(format_names())}")
    return spec.default_lowering(backend)


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto, folder: str | None = None) -> Any:
    from qvggt_export.onnxrt import parity_session_options

    ort, options = parity_session_options("Measuring a lowering's accuracy")
    try:
        if model.ByteSize() < _PROTO_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        if folder is None:
            raise QVGGTError("internal: a large model needs a folder for its external data")
        path = os.path.join(folder, f"model_{len(os.listdir(folder))}.onnx")
        onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except QVGGTError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise QVGGTError(f"ONNX Runtime cannot load the graph: {exc}") from exc


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _run(session: Any, input_name: str, inputs: Sequence[np.ndarray], names: list[str]) -> list[list[np.ndarray]]:
    outputs = []
    for index, batch in enumerate(inputs):
        try:
            outputs.append(session.run(names, {input_name: batch}))
        except Exception as exc:  # ORT's own exception types
            raise QVGGTError(f"ONNX Runtime failed on input {index} (shape {list(batch.shape)}): {exc}") from exc
    return outputs


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return exposed


def _compare(a_runs: list[dict[str, np.ndarray]], b_runs: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per output over every input: relative L2 ``||a - b|| / ||b||`` and max |a - b|."""
    result = {}
    for name in b_runs[0]:
        if name not in a_runs[0]:
            continue
        diff_sq = ref_sq = 0.0
        max_abs = 0.0
        for a, b in zip(a_runs, b_runs, strict=True):
            x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
            if x.shape != y.shape:
                raise QVGGTError(f"output {name!r} has shape {list(x.shape)} here and {list(y.shape)} in the reference")
            diff_sq += float(np.sum((x - y) ** 2))
            ref_sq += float(np.sum(y ** 2))
            max_abs = max(max_abs, float(np.max(np.abs(x - y))) if x.size else 0.0)
        result[name] = {"rel_l2": float(np.sqrt(diff_sq) / max(np.sqrt(ref_sq), 1e-30)), "max_abs": max_abs}
    return result


def _worst(table: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    if not table:
        return None
    name = max(table, key=lambda k: table[k]["rel_l2"])
    return {"output": name, "rel_l2": table[name]["rel_l2"]}


# ----------------------------------------------------------------------------------------------------------
# Rewrites
# ----------------------------------------------------------------------------------------------------------


def _static_amax(model: onnx.ModelProto, layers: list[LayerFormat], inputs: Sequence[np.ndarray], input_name: str,
                 folder: str) -> dict[str, float]:
    names = sorted({layer.transformed for layer in layers})
    session = _session(_with_outputs(model, names), folder)
    amax = dict.fromkeys(names, 0.0)
    for values in _run(session, input_name, inputs, names):
        for name, value in zip(names, values, strict=True):
            if value.size:
                amax[name] = max(amax[name], float(np.max(np.abs(value))))
    return {layer.name: amax[layer.transformed] for layer in layers}


def _rewrite_layers(model: onnx.ModelProto, layers: list[LayerFormat], target: str,
                    amax: Mapping[str, float]) -> dict[str, float]:
    """Replace each layer's activation chain in place; returns the static scales used (empty for w4a16)."""
    graph = model.graph
    by_name = {layer.name: layer for layer in layers}
    chain = {f"{layer.name}/{suffix}": layer.name for layer in layers for suffix in _ACT_CHAIN}
    new_inits: list[onnx.TensorProto] = []
    scales: dict[str, float] = {}
    zero = "qvggt/lowered_zero_int8"
    if target != "w4a16":
        new_inits.append(helper.make_tensor(zero, TensorProto.INT8, [], [0]))

    def replacement(layer: LayerFormat) -> list[onnx.NodeProto]:
        p = f"{layer.name}/"
        x, weight, out = layer.transformed, p + "weight", p + _GEMM_OUT
        if target == "w4a16":
            return [helper.make_node("MatMul", [x, weight], [out], name=p + "gemm")]
        # int8-static keeps the format's activation grid (6 bits for W6A6); w4a8 moves 4-bit activations to 8.
        bits = 8 if target == "w4a8" else layer.act_bits
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = max(amax[layer.name] / qmax, _MIN_STEP)
        scales[layer.name] = scale
        nodes = []
        new_inits.append(numpy_helper.from_array(np.array(scale, np.float32), p + "act_static_scale"))
        if bits < 8:
            # A narrower grid in an INT8 container: saturate at the grid's ends first (QuantizeLinear would at
            # -128/127), as the canonical graph clips its codes.
            new_inits.append(numpy_helper.from_array(np.array(qmin * scale, np.float32), p + "act_clip_lo"))
            new_inits.append(numpy_helper.from_array(np.array(qmax * scale, np.float32), p + "act_clip_hi"))
            nodes.append(helper.make_node("Clip", [x, p + "act_clip_lo", p + "act_clip_hi"], [p + "x_clipped"],
                                          name=p + "act_clip"))
            x = p + "x_clipped"
        nodes += [
            # Constant Q/DQ scales around the MatMul: what TensorRT fuses into an integer GEMM.
            helper.make_node("QuantizeLinear", [x, p + "act_static_scale", zero], [p + "x_q"], name=p + "act_q"),
            helper.make_node("DequantizeLinear", [p + "x_q", p + "act_static_scale", zero], [p + "x_dq"],
                             name=p + "act_dq"),
            helper.make_node("MatMul", [p + "x_dq", weight], [out], name=p + "gemm"),
        ]
        return nodes

    emitted: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        owner = chain.get(node.name)
        if owner is None:
            new_nodes.append(node)
            continue
        if owner not in emitted:  # at the first removed node: its inputs (x, weight DQ) are already computed
            emitted.add(owner)
            new_nodes.extend(replacement(by_name[owner]))
    missing = sorted(set(by_name) - emitted)
    if missing:
        raise QVGGTError(f"layers {missing[:5]} have no activation chain to lower")
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Drop initializers only the removed chains read (qmax, floors, ones); shared ones others still use stay.
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for function in model.functions:
        used |= {i for n in function.node for i in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.value_info[:]  # shapes of removed tensors; the consumers infer the rest
    return scales


_FLOAT_ATTR_DTYPES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                      "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "CastLike": None}


def _half_nodes(nodes: Any, constants: list[onnx.NodeProto] | None = None) -> None:
    for node in nodes:
        attr_name = _FLOAT_ATTR_DTYPES.get(node.op_type)
        for attribute in node.attribute:
            if attr_name is not None and attribute.name == attr_name and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(_half_tensor(attribute.t))
            if attribute.type == onnx.AttributeProto.GRAPH:
                _half_nodes(attribute.g.node)
                _half_initializers(attribute.g)
            if node.op_type == "Constant" and attribute.name in ("value_float", "value_floats"):
                raise QVGGTError(f"Constant node {node.name!r} uses {attribute.name}; to_float16 cannot convert it")


def _half_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor)
    finite = np.abs(values[np.isfinite(values)]) if values.size else values
    if finite.size and float(finite.max()) > float(np.finfo(np.float16).max):
        raise QVGGTError(f"tensor {tensor.name!r} holds {float(finite.max()):.3g}, beyond the FP16 range")
    return numpy_helper.from_array(values.astype(np.float16), tensor.name)


def _half_initializers(graph: onnx.GraphProto) -> None:
    converted = [(_half_tensor(i) if i.data_type == TensorProto.FLOAT else i) for i in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(converted)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose float32 tensors are all float16; graph inputs and outputs stay float32.

    Float initializers, Constant tensors, ``Cast(to=FLOAT)`` and float attributes of local functions are
    converted; a ``Cast`` to FP16 follows each float input and a ``Cast`` to FP32 precedes each float output,
    so a runtime feeds and reads the same tensors as before. A strongly typed TensorRT network built from it
    runs in FP16 (TensorRT 11 has no FP16 builder flag).

    Raises:
        QVGGTError: A float constant outside the FP16 range, or a construct it cannot convert.
    """
    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    _half_initializers(graph)
    _half_nodes(graph.node)
    for function in half.functions:
        _half_nodes(function.node)
    head, tail = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            half_name = f"{value.name}/fp16"
            head.append(helper.make_node("Cast", [value.name], [half_name], name=f"{value.name}/to_fp16",
                                         to=TensorProto.FLOAT16))
            for node in graph.node:
                for index, name in enumerate(node.input):
                    if name == value.name:
                        node.input[index] = half_name
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            half_name = f"{value.name}/fp16"
            for node in graph.node:
                for index, name in enumerate(node.output):
                    if name == value.name:
                        node.output[index] = half_name
                for index, name in enumerate(node.input):
                    if name == value.name:
                        node.input[index] = half_name
            tail.append(helper.make_node("Cast", [half_name], [value.name], name=f"{value.name}/to_fp32",
                                         to=TensorProto.FLOAT))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return half


# ----------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------


def _check_target(target: str, layers: list[LayerFormat]) -> None:
    if target not in TARGETS:
        raise QVGGTError(f"unknown lowering target {target!r}; expected one of {', '.join(TARGETS)}")
    if target == "as-written":
        return
    floating = sorted({layer.kind for layer in layers if layer.kind != "int"})
    if floating:
        raise QVGGTError(f"lowering {target!r} rewrites integer Q/DQ layers; this graph has {', '.join(floating)} "
                         "weights (a floating-point format, already in TensorRT's own form): use 'as-written'")
    if not layers:
        raise QVGGTError(f"lowering {target!r} needs a quantized canonical graph; this one has no quantized "
                         "layers (a float export): use 'as-written'")
    weights = sorted({layer.weight_bits for layer in layers})
    acts = sorted({layer.act_bits for layer in layers})
    fmt = f"W{'/'.join(map(str, weights))}A{'/'.join(map(str, acts))}"
    if target == "int8-static" and not 4 < min(acts) <= max(acts) <= 8:
        raise QVGGTError(f"lowering 'int8-static' is for 6- to 8-bit activations; this graph is {fmt}: use 'w4a8' "
                         "(INT8 activations) or 'w4a16' (weight-only) for 4-bit activations")
    if target in ("w4a8", "w4a16") and weights != [4]:
        raise QVGGTError(f"lowering {target!r} keeps INT4 weights; this graph is {fmt}: use 'int8-static' or "
                         "'as-written'")


def _note(target: str, layers: list[LayerFormat]) -> str:
    if not layers:
        return "float graph: nothing quantized"
    if layers[0].kind != "int":
        return f"floating-point format ({layers[0].kind} weights) as written"
    act = layers[0].act_bits
    return {
        "as-written": (f"canonical graph: per-token dynamic {act}-bit activations computed in the graph"
                       + ("; TensorRT runs the GEMM on dequantized values (4-bit activation rounding emulated)"
                          if act <= 4 else "")),
        "int8-static": f"static per-tensor {act}-bit activation scales from calibration amax (INT8 containers)",
        "w4a8": "INT4 weights, static per-tensor INT8 activation scales from calibration amax",
        "w4a16": "weight-only INT4: activations stay in floating point (activation quantization removed)",
    }[target]


def lower_for_target(
    model: onnx.ModelProto,
    target: str,
    *,
    calibration_inputs: Sequence[Any] = (),
    eval_inputs: Sequence[Any] | None = None,
    float_outputs: Sequence[Mapping[str, Any]] | None = None,
    float16: bool = False,
    measure: bool = True,
    input_name: str = "images",
) -> tuple[onnx.ModelProto, LoweringInfo]:
    """Lower a canonical qvggt ONNX graph for one kind of TensorRT engine (not in place: returns a copy).

    Args:
        model: The canonical graph (as :func:`qvggt_export.export.export_onnx` wrote it), weights loaded.
        target: One of :data:`TARGETS` (see the module doc; :func:`default_lowering` picks one per format).
        calibration_inputs: ``images`` batches [1, S, 3, H, W] (numpy or torch) for the static activation
            scales; required for ``int8-static`` and ``w4a8``.
        eval_inputs: Batches to measure accuracy on; defaults to ``calibration_inputs`` (then ``in_sample``
            is true in the report: static scales fit to the same data flatter them).
        float_outputs: The float model's outputs on ``eval_inputs`` (one ``{output name: array}`` per batch,
            e.g. ``VGGT(images)`` of the unquantized model), to measure lowered and canonical vs float.
        float16: Also cast the float parts to FP16 (:func:`to_float16`); refused for ``as-written`` quantized
            graphs.
        measure: Measure accuracy in ONNX Runtime (needs ``onnxruntime``); ``False`` only rewrites.
        input_name: The image input.

    Returns:
        The lowered graph (metadata ``qvggt.lowering`` records the target and static scales; the canonical
        layer map is removed, since its tensors no longer exist) and what the lowering did and cost.

    Raises:
        QVGGTError: Unknown target, a target the graph's format cannot take, missing calibration inputs, a
            graph that is not canonical, or an ONNX Runtime failure.
    """
    started = time.perf_counter()
    if not isinstance(model, onnx.ModelProto):
        raise QVGGTError(f"lower_for_target takes an onnx.ModelProto, got {type(model).__name__}")
    layers = quantized_layer_formats(model)
    _check_target(target, layers)
    calibration = [_as_numpy(x) for x in calibration_inputs]
    evaluation = [_as_numpy(x) for x in eval_inputs] if eval_inputs is not None else calibration
    static = target in ("int8-static", "w4a8")
    if static and not calibration:
        raise QVGGTError(f"lowering {target!r} needs calibration_inputs to measure static activation scales")
    if float16 and target == "as-written" and layers:
        raise QVGGTError("float16 is refused for 'as-written' quantized graphs: the per-token step floor (1e-8) "
                         "underflows in FP16; lower to 'int8-static', 'w4a8' or 'w4a16' first")
    if float_outputs is not None and len(float_outputs) != len(evaluation):
        raise QVGGTError(f"float_outputs has {len(float_outputs)} entries for {len(evaluation)} eval inputs")

    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    scales: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="qvggt_lowering_") as folder:
        if target != "as-written":
            amax = _static_amax(model, layers, calibration, input_name, folder) if static else {}
            scales = _rewrite_layers(lowered, layers, target, amax)
        if float16:
            lowered = to_float16(lowered)
        props = {p.key: p.value for p in lowered.metadata_props if p.key != LAYER_MAP_KEY}
        if target != "as-written" or float16:
            props[LOWERING_KEY] = json.dumps({"target": target, "float16": float16, "static_scales": scales},
                                             sort_keys=True)
            del lowered.metadata_props[:]
            helper.set_model_props(lowered, props)
        try:
            onnx.checker.check_model(lowered, full_check=lowered.ByteSize() < _PROTO_LIMIT)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise QVGGTError(f"the {target!r} lowering produced an invalid graph: {exc}") from exc

        accuracy: dict[str, Any] = {"skipped": "measure=False"}
        if measure:
            accuracy = _measure(model, lowered, target, float16, evaluation, float_outputs, input_name, folder,
                                in_sample=eval_inputs is None)

    integer = layers and layers[0].kind == "int"
    info = LoweringInfo(
        target=target,
        float16=float16,
        weight_bits=layers[0].weight_bits if integer else None,
        act_bits=layers[0].act_bits if integer else None,
        engine_act_bits=({"as-written": layers[0].act_bits, "int8-static": layers[0].act_bits, "w4a8": 8,
                          "w4a16": None}[target] if integer else None),
        layers=len(layers) if target != "as-written" else 0,
        nodes_before=len(model.graph.node),
        nodes_after=len(lowered.graph.node),
        static_scales=scales,
        calibration_inputs=len(calibration) if static else 0,
        accuracy=accuracy,
        seconds=time.perf_counter() - started,
        note=_note(target, layers) + ("; float parts in FP16" if float16 else ""),
    )
    logger.info("lowered %d layers for %s%s", info.layers, target, " (fp16)" if float16 else "")
    return lowered, info


def _measure(canonical: onnx.ModelProto, lowered: onnx.ModelProto, target: str, float16: bool,
             inputs: list[np.ndarray], float_outputs: Sequence[Mapping[str, Any]] | None, input_name: str,
             folder: str, *, in_sample: bool) -> dict[str, Any]:
    if not inputs:
        return {"skipped": "no eval or calibration inputs given"}
    names = [o.name for o in canonical.graph.output]

    def runs(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
        session = _session(model, folder)
        return [dict(zip(names, values, strict=True)) for values in _run(session, input_name, inputs, names)]

    try:
        canonical_runs = runs(canonical)
    except QVGGTError as exc:
        # e.g. NVFP4 graphs: TensorRT's dynamic-quantize op has no ONNX Runtime kernel.
        return {"skipped": f"ONNX Runtime cannot run the canonical graph: {exc}"}
    try:
        lowered_runs = canonical_runs if target == "as-written" and not float16 else runs(lowered)
    except QVGGTError as exc:
        # e.g. FP16 kernels ONNX Runtime's CPU provider lacks; the engine may still build.
        return {"skipped": f"ONNX Runtime cannot run the lowered graph: {exc}"}
    accuracy: dict[str, Any] = {"eval_inputs": len(inputs), "in_sample": in_sample,
                                "lowered_vs_canonical": _compare(lowered_runs, canonical_runs)}
    if float_outputs is not None:
        reference = [{k: _as_numpy(v) for k, v in entry.items()} for entry in float_outputs]
        accuracy["lowered_vs_float"] = _compare(lowered_runs, reference)
        accuracy["canonical_vs_float"] = _compare(canonical_runs, reference)
    accuracy["worst_rel_l2"] = {key: _worst(accuracy[key]) for key in
                                ("lowered_vs_canonical", "lowered_vs_float", "canonical_vs_float") if key in accuracy}
    return accuracy
