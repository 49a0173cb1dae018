"""Lowering of the ``qvggt.export::QLinear`` placeholders into standard ONNX (opset 21) Q/DQ operators.

Pure graph rewriting on an ``onnx.ModelProto``; knows nothing of PyTorch or runtimes. One placeholder
``y = QLinear(x, weight_codes[out,in] int8, weight_step[out], bias[out])`` becomes::

    W     = DequantizeLinear(codes^T as INT4/INT8 [in,out], weight_step, axis=1)   # packed initializer
    step  = Max(ReduceMax(Abs(x), axes=[-1], keepdims=1) / qmax, MIN_STEP)       # per-token, dynamic
    codes = DequantizeLinear(QuantizeLinear(x / step, 1, zp), 1, zp)             # exact integers
    y     = MatMul(codes, W) * step + bias          # 8-bit activations
    y     = MatMul(codes * step, W) + bias          # 4-bit activations

For 8-bit activations the per-token step is applied after the GEMM (it factors out exactly), which
keeps the quantize scale a constant: TensorRT only fuses Q/DQ with constant scales into integer
GEMMs, and rejects blocked QuantizeLinear with a run-time scale (measured with TensorRT-RTX 1.7.1).
For 4-bit activations TensorRT-RTX cannot compile INT4 codes of a run-time scale into a GEMM at all,
so the step is reapplied first; both forms are the same math and exact in ONNX Runtime.

Floating-point placeholders ``qvggt.export::FQLinear`` (attribute ``format``) lower as follows.

**fp8** (opset >= 19; the canonical graph stays at 21): the int8 form with FLOAT8E4M3FN codes::

    W     = DequantizeLinear(codes^T as FLOAT8E4M3FN [in,out], weight_scale[out], axis=1)
    s     = Max(ReduceMax(Abs(x), axes=[-1], keepdims=1) / 448, FLT_MIN)         # per-token, dynamic
    codes = DequantizeLinear(QuantizeLinear(x / s, 1, e4m3 zero), 1, e4m3 zero)    # saturating cast
    y     = MatMul(codes, W) * s + bias

The quantize scale is the constant 1 and the per-token scale is applied after the GEMM, as for int8,
so TensorRT sees constant-scale FP8 Q/DQ around the MatMul (an FP8 GEMM). ONNX Runtime CPU runs it and
reproduces PyTorch's E4M3 rounding (round to nearest even, saturating) bit for bit.

**nvfp4** (opset 23): the representation TensorRT (and ModelOpt's NVFP4 export) uses::

    W_bs  = DequantizeLinear(block_scales^T as FLOAT8E4M3FN [in/16,out], weight_global)      # fp32 scales
    W     = DequantizeLinear(codes^T as FLOAT4E2M1 [in,out], W_bs, axis=0, block_size=16)
    x2    = Reshape(x, [-1, in])              # TensorRT's dynamic quantize takes 2-D or 3-D input only
    q, bs = trt::TRT_FP4DynamicQuantize(x2, input_global, axis=-1, block_size=16, scale_type=FLOAT8E4M3FN)
    xd    = DequantizeLinear(q, DequantizeLinear(bs, input_global), axis=-1, block_size=16)
    y     = Reshape(MatMul(xd, W) + bias, [*x.shape[:-1], out])

``TRT_FP4DynamicQuantize`` (TensorRT's IDynamicQuantizeLayer through the ONNX parser) computes each
16-element block's E4M3 scale ``amax_b / (6 * input_global)`` and the E2M1 codes at run time; the global
scales are constants (``input_global`` is calibrated). Block scales run along the GEMM's reduction
axis, so nothing factors out of the MatMul. ONNX Runtime 1.32 cannot run this graph: the custom op has
no ONNX Runtime kernel and the CPU provider has no FLOAT4E2M1 QuantizeLinear/DequantizeLinear kernels
(NOT_IMPLEMENTED, measured). It is checked structurally instead (:func:`check_nvfp4_structure`:
op types, dtypes, block sizes, and the decoded weights against the PyTorch codes) and numerically with
ONNX's own reference evaluator (:func:`reference_evaluator`), to which
:func:`fp4_dynamic_quantize_reference` supplies ``TRT_FP4DynamicQuantize`` as TensorRT documents it. That
op's implementation is ours, not TensorRT's: whether TensorRT's kernel rounds identically is verified only
on a Blackwell GPU (not available here).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.errors import QVGGTError
from qvggt_export.export.hadamard_onnx import VARIANTS, HadamardEmission, add_to_model, emit_hadamard
from qvggt_export.formats import FORMATS, get_format
from qvggt_export.quant.config import FLOAT_QUANT_FORMATS
from qvggt_export.quant.formats import FP4_E2M1_VALUES, FP8_E4M3_MAX, NVFP4_BLOCK_SIZE
from qvggt_export.quant.functional import MIN_STEP, qrange
from qvggt_export.quant.modules import FLOAT_PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, PLACEHOLDER_OP

LAYER_MAP_KEY = "qvggt.quantized_layers"
# Model metadata: the quantization format of the lowered layers ("int", "fp8", "nvfp4", or a mix).
FORMAT_KEY = "qvggt.quant_format"
NVFP4_OPSET = get_format("nvfp4").opset
NVFP4_IR_VERSION = 11  # FLOAT4E2M1 and opset 23 need IR version 11
TRT_DOMAIN = "trt"
TRT_FP4_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
# The floor of the per-token FP8 scale: qvggt_export.quant.formats floors it at float32's smallest normal.
_FP8_MIN_SCALE = float(np.finfo(np.float32).tiny)


def _container(bits: int) -> int:
    return TensorProto.INT4 if bits <= 4 else TensorProto.INT8


def _int_tensor(name: str, codes: np.ndarray, container: int) -> onnx.TensorProto:
    """Signed integer codes as a raw INT8 or packed INT4 initializer (two codes per byte, first in the low
    nibble, as the ONNX spec lays INT4 out)."""
    flat = codes.astype(np.int8).ravel()
    if container == TensorProto.INT8:
        raw = flat.tobytes()
    else:
        nibbles = (flat.astype(np.uint8) & 0x0F)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, container, list(codes.shape), raw, raw=True)


def _constant_values(graph: onnx.GraphProto, name: str, consumed: set[str] | None = None) -> np.ndarray:
    """The value of an initializer or Constant, following the Identity nodes by which the exporter
    deduplicates equal constants (their names are added to ``consumed``)."""
    for _ in range(len(graph.node)):
        source = next((n for n in graph.node if n.op_type == "Identity" and n.output[0] == name), None)
        if source is None:
            break
        if consumed is not None:
            consumed.add(name)
        name = source.input[0]
    if consumed is not None:
        consumed.add(name)
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise QVGGTError(f"QLinear input {name!r} is not a constant; the quantized weights must be initializers")


def _lower_input_transform(x: str, layer: str, transform_names: list[str], rotate: bool, graph: onnx.GraphProto,
                           nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                           emissions: list[HadamardEmission], hadamard: str, opset: int, call: int = 0) -> str:
    """Emit ``((x * pre) @ H) * post`` (factors that are all ones are skipped); returns the output name.

    ``call`` > 0 is a later call of the same layer (a module run in a loop, as the camera trunk): its nodes
    get their own names and read the first call's factors.

    The rotation is the Hadamard op of :mod:`.hadamard_onnx` in the requested form: ``"function"``
    (O(d log d) local function, runs everywhere), ``"dense"`` (d x d MatMul) or ``"plugin"`` (the
    TensorRT plugin node, no body).
    """
    if not transform_names:
        return x
    pre_name, post_name = transform_names
    pre = _constant_values(graph, pre_name, set()).astype(np.float32)
    post = _constant_values(graph, post_name, set()).astype(np.float32)
    params = f"{layer}/"
    p = _call_prefix(layer, call)
    pre_ref = None if np.all(pre == 1.0) else params + "input_pre"
    post_ref = None if np.all(post == 1.0) else params + "input_post"
    if pre_ref and not call:
        inits.append(numpy_helper.from_array(pre, pre_ref))
    if post_ref and not call:
        inits.append(numpy_helper.from_array(post, post_ref))
    if rotate:
        emission = emit_hadamard(x, p + "x_rot", pre.shape[0], pre_ref, post_ref, prefix=p + "input_",
                                 variant=hadamard, opset=opset)
        nodes.extend(emission.nodes)
        emissions.append(emission)
        return emission.output
    if pre_ref:
        nodes.append(helper.make_node("Mul", [x, pre_ref], [p + "x_pre"], name=p + "input_pre_scale"))
        x = p + "x_pre"
    if post_ref:
        nodes.append(helper.make_node("Mul", [x, post_ref], [p + "x_post"], name=p + "input_post_scale"))
        x = p + "x_post"
    return x


def _call_prefix(layer: str, call: int) -> str:
    """Name prefix of a layer's nodes and activations: ``layer/`` for its first call, ``layer/call<N>/`` after."""
    return f"{layer}/" if not call else f"{layer}/call{call}/"


def _is_placeholder(node: onnx.NodeProto) -> bool:
    return node.domain == PLACEHOLDER_DOMAIN and node.op_type in (PLACEHOLDER_OP, FLOAT_PLACEHOLDER_OP)


def count_placeholders(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if _is_placeholder(n))


def opset_for_format(family: str) -> int:
    """The lowest default-domain opset a format's lowered graph needs (``"int"``, ``"fp8"``: 21, ``"nvfp4"``: 23)."""
    opsets = {spec.family: spec.opset for spec in FORMATS.values() if spec.quantized and spec.exported}
    if family not in opsets:
        raise QVGGTError(f"unknown quantization format family {family!r}; expected {', '.join(opsets)}")
    return opsets[family]


def _e4m3_tensor(name: str, bits: np.ndarray) -> onnx.TensorProto:
    """uint8 E4M3 bit patterns (as PyTorch's float8_e4m3fn stores them) as a FLOAT8E4M3FN initializer: the
    ONNX encoding is the same byte."""
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(bits.shape),
                              np.ascontiguousarray(bits, dtype=np.uint8).tobytes(), raw=True)


def _e4m3_values(bits: np.ndarray) -> np.ndarray:
    """uint8 E4M3 bit patterns -> their fp32 values (decoded by ONNX's own FLOAT8E4M3FN reader)."""
    return numpy_helper.to_array(_e4m3_tensor("bits", bits)).astype(np.float32)


def _e2m1_nibbles(values: np.ndarray) -> np.ndarray:
    """E2M1 values -> 4-bit codes (sign bit 3, then the index of |v| in the E2M1 grid); raises off the grid."""
    grid = np.asarray(FP4_E2M1_VALUES, dtype=np.float32)
    mag = np.abs(values.astype(np.float32))
    index = np.searchsorted(grid, mag)
    index = np.minimum(index, grid.size - 1)
    if not np.array_equal(grid[index], mag):
        raise QVGGTError("nvfp4 weight codes are not all E2M1 values")
    return (index | np.where(values < 0, 8, 0)).astype(np.uint8)  # -0.0 is stored as +0


def _fp4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """E2M1 values as a packed FLOAT4E2M1 initializer (two per byte, first in the low nibble, as ONNX lays
    4-bit types out)."""
    nibbles = _e2m1_nibbles(values).ravel()
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, TensorProto.FLOAT4E2M1, list(values.shape), raw, raw=True)


def lower_qlinear_placeholders(model: onnx.ModelProto, *, hadamard: str = "function", opset: int = 21) -> int:
    """Replace every QLinear placeholder in ``model`` (in place) by Q/DQ operators; returns the count.

    Args:
        model: the traced graph.
        hadamard: form of the online rotation: ``"function"``, ``"dense"`` or ``"plugin"``.
        opset: the default-domain opset the lowered graph declares (for the Hadamard function bodies).
    """
    if hadamard not in VARIANTS:
        raise QVGGTError(f"unknown Hadamard form {hadamard!r}; choose one of {', '.join(VARIANTS)}")
    emissions: list[HadamardEmission] = []
    tensor_map: dict[str, dict[str, str]] = {}
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    consumed: set[str] = set()
    shared: dict[str, str] = {}

    def scalar(name: str, value: float | int, dtype: int) -> str:
        if name not in shared:
            new_inits.append(helper.make_tensor(name, dtype, [], [value]))
            shared[name] = name
        return name

    count = 0
    families: set[str] = set()
    calls: dict[str, int] = {}  # layer -> calls lowered so far (a module in a loop is traced once per call)
    for node in graph.node:
        if not _is_placeholder(node):
            new_nodes.append(node)
            continue
        count += 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        layer = attrs.get("layer", b"")
        layer = layer.decode() if isinstance(layer, bytes) else str(layer)
        layer = layer or f"qlinear_{count}"
        if node.op_type == FLOAT_PLACEHOLDER_OP:
            if layer in calls:
                raise QVGGTError(f"{layer} runs more than once per forward (a module in a loop, e.g. the camera "
                                 "trunk at --quantize-scope all); fp8 / nvfp4 exports write one call per layer: use "
                                 "an integer format or a narrower quantize scope")
            calls[layer] = 1
            fmt = attrs.get("format", b"")
            fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
            if fmt == "nvfp4" and opset < NVFP4_OPSET:
                raise QVGGTError(f"{layer}: nvfp4 needs opset {NVFP4_OPSET} (FLOAT4E2M1, blocked "
                                 f"DequantizeLinear); export with opset={NVFP4_OPSET}, got {opset}")
            _lower_float(node, fmt, layer, attrs, graph, new_nodes, new_inits, consumed, emissions, tensor_map,
                         scalar, hadamard, opset)
            families.add(fmt)
            continue
        families.add("int")
        call = calls.get(layer, 0)
        calls[layer] = call + 1
        wbits, abits = int(attrs["weight_bits"]), int(attrs["act_bits"])
        x, codes_name, step_name, bias_name, *transform_names = node.input
        codes = _constant_values(graph, codes_name, consumed).astype(np.int8)
        step = _constant_values(graph, step_name, consumed).astype(np.float32)
        bias = _constant_values(graph, bias_name, consumed).astype(np.float32)
        consumed.update({codes_name, step_name, bias_name, *transform_names})
        raw_input = x
        x = _lower_input_transform(x, layer, transform_names, bool(attrs.get("rotate", 0)), graph, new_nodes,
                                   new_inits, emissions, hadamard, opset, call)
        p = _call_prefix(layer, call)
        # The layer-by-layer checker compares a layer's first call.
        tensor_map.setdefault(layer, {"input": raw_input, "transformed": x, "codes": p + "x_codes",
                                      "output": node.output[0]})
        wmin, wmax = qrange(wbits)
        if codes.min() < wmin or codes.max() > wmax:
            raise QVGGTError(f"{layer}: weight codes outside the {wbits}-bit range [{wmin}, {wmax}]")

        w_q, w_step, b = f"{layer}/weight_q", f"{layer}/weight_step", f"{layer}/bias"
        if not call:  # later calls share the first call's weights
            new_inits.append(_int_tensor(w_q, np.ascontiguousarray(codes.T), _container(wbits)))
            new_inits.append(numpy_helper.from_array(step, w_step))
            new_inits.append(numpy_helper.from_array(bias, b))
        amin, amax = qrange(abits)
        container = _container(abits)
        zp = scalar(f"qvggt/zero_{'int4' if container == TensorProto.INT4 else 'int8'}", 0, container)
        one = scalar("qvggt/one", 1.0, TensorProto.FLOAT)
        qmax = scalar(f"qvggt/qmax_{abits}", float(amax), TensorProto.FLOAT)
        eps = scalar("qvggt/min_step", MIN_STEP, TensorProto.FLOAT)
        if "qvggt/axes_last" not in shared:
            new_inits.append(helper.make_tensor("qvggt/axes_last", TensorProto.INT64, [1], [-1]))
            shared["qvggt/axes_last"] = "qvggt/axes_last"
        scaled = p + "x_scaled"
        nodes = [
            helper.make_node("DequantizeLinear", [w_q, w_step], [p + "weight"], name=p + "weight_dq", axis=1),
            helper.make_node("Abs", [x], [p + "x_abs"], name=p + "act_abs"),
            helper.make_node("ReduceMax", [p + "x_abs", "qvggt/axes_last"], [p + "x_absmax"], name=p + "act_absmax",
                             keepdims=1),
            helper.make_node("Div", [p + "x_absmax", qmax], [p + "step_raw"], name=p + "act_step"),
            helper.make_node("Max", [p + "step_raw", eps], [p + "step"], name=p + "act_step_floor"),
            helper.make_node("Div", [x, p + "step"], [scaled], name=p + "act_scale"),
        ]
        if (amin, amax) != qrange(4 if container == TensorProto.INT4 else 8):
            # Bit widths narrower than their container: saturate before rounding (same as clamp after).
            lo, hi = scalar(f"qvggt/qmin_{abits}_f", float(amin), TensorProto.FLOAT), qmax
            nodes.append(helper.make_node("Clip", [scaled, lo, hi], [p + "x_clipped"], name=p + "act_clip"))
            scaled = p + "x_clipped"
        nodes += [
            helper.make_node("QuantizeLinear", [scaled, one, zp], [p + "x_q"], name=p + "act_q"),
            helper.make_node("DequantizeLinear", [p + "x_q", one, zp], [p + "x_codes"], name=p + "act_dq"),
        ]
        if container == TensorProto.INT8:
            # step after the GEMM: Q/DQ with constant scales around the MatMul -> an INT8 x INT8 GEMM.
            nodes += [
                helper.make_node("MatMul", [p + "x_codes", p + "weight"], [p + "gemm"], name=p + "gemm"),
                helper.make_node("Mul", [p + "gemm", p + "step"], [p + "gemm_scaled"], name=p + "gemm_rescale"),
            ]
        else:
            # INT4 codes from a run-time scale feeding a GEMM abort TensorRT-RTX 1.7 (Myelin CHECK), and
            # TensorRT has no INT4-activation GEMM anyway: rescale first, GEMM on dequantized values.
            nodes += [
                helper.make_node("Mul", [p + "x_codes", p + "step"], [p + "x_dq"], name=p + "act_rescale"),
                helper.make_node("MatMul", [p + "x_dq", p + "weight"], [p + "gemm_scaled"], name=p + "gemm"),
            ]
        nodes.append(helper.make_node("Add", [p + "gemm_scaled", b], [node.output[0]], name=p + "bias_add"))
        new_nodes.extend(nodes)

    if not count:
        return 0

    # Constants (and the Identity copies the exporter makes of equal constants) that only fed placeholders.
    def removable(n: onnx.NodeProto) -> bool:
        return n.op_type in ("Constant", "Identity") and n.output[0] in consumed

    graph_outputs = {o.name for o in graph.output}
    still_used = {i for n in new_nodes if not removable(n) for i in n.input} | graph_outputs
    kept_nodes = [n for n in new_nodes if not removable(n) or n.output[0] in still_used]
    still_used = {i for n in kept_nodes for i in n.input} | graph_outputs
    kept_inits = [i for i in graph.initializer if i.name not in consumed or i.name in still_used]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
    for entry in list(model.opset_import):
        if entry.domain == PLACEHOLDER_DOMAIN:
            model.opset_import.remove(entry)
    if "nvfp4" in families:
        if not any(entry.domain == TRT_DOMAIN for entry in model.opset_import):
            model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
        model.ir_version = max(model.ir_version, NVFP4_IR_VERSION)
    if emissions:
        add_to_model(model, emissions, nodes=False)  # shared matrices, one function per size, qvggt opset
    # Where each quantized layer's tensors live, for the layer-by-layer parity checker.
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   LAYER_MAP_KEY: json.dumps(tensor_map, sort_keys=True),
                                   FORMAT_KEY: "+".join(sorted(families))})
    return count


def _lower_float(node: onnx.NodeProto, fmt: str, layer: str, attrs: dict, graph: onnx.GraphProto,
                 new_nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto], consumed: set[str],
                 emissions: list[HadamardEmission], tensor_map: dict[str, dict[str, str]], scalar, hadamard: str,  # noqa: ANN001
                 opset: int) -> None:
    """Lower one ``FQLinear`` placeholder (fp8 or nvfp4; see the module docstring) into ``new_nodes``."""
    if fmt not in FLOAT_QUANT_FORMATS:
        raise QVGGTError(f"{layer}: unknown floating-point format {fmt!r} in the exported graph")
    x, codes_name, wscale_name, bscale_name, iglobal_name, bias_name, *transform_names = node.input
    codes = _constant_values(graph, codes_name, consumed).astype(np.uint8)  # E4M3 bit patterns [out, in]
    wscale = _constant_values(graph, wscale_name, consumed).astype(np.float32)
    bscale = _constant_values(graph, bscale_name, consumed).astype(np.uint8)
    iglobal = _constant_values(graph, iglobal_name, consumed).astype(np.float32).reshape(-1)
    bias = _constant_values(graph, bias_name, consumed).astype(np.float32)
    consumed.update({codes_name, wscale_name, bscale_name, iglobal_name, bias_name, *transform_names})
    raw_input = x
    x = _lower_input_transform(x, layer, transform_names, bool(attrs.get("rotate", 0)), graph, new_nodes,
                               new_inits, emissions, hadamard, opset)
    out_features, in_features = codes.shape
    p = f"{layer}/"
    out = node.output[0]
    b = p + "bias"
    new_inits.append(numpy_helper.from_array(bias, b))
    if "qvggt/axes_last" not in {i.name for i in new_inits}:
        new_inits.append(helper.make_tensor("qvggt/axes_last", TensorProto.INT64, [1], [-1]))
    if fmt == "fp8":
        if wscale.shape != (out_features,):
            raise QVGGTError(f"{layer}: fp8 weight scale must have shape [{out_features}], got {list(wscale.shape)}")
        new_inits.append(_e4m3_tensor(p + "weight_q", np.ascontiguousarray(codes.T)))
        new_inits.append(numpy_helper.from_array(wscale, p + "weight_scale"))
        zp = scalar("qvggt/zero_fp8", 0, TensorProto.FLOAT8E4M3FN)
        one = scalar("qvggt/one", 1.0, TensorProto.FLOAT)
        fmax = scalar("qvggt/fp8_max", FP8_E4M3_MAX, TensorProto.FLOAT)
        floor = scalar("qvggt/fp8_min_scale", _FP8_MIN_SCALE, TensorProto.FLOAT)
        new_nodes.extend([
            helper.make_node("DequantizeLinear", [p + "weight_q", p + "weight_scale"], [p + "weight"],
                             name=p + "weight_dq", axis=1),
            helper.make_node("Abs", [x], [p + "x_abs"], name=p + "act_abs"),
            helper.make_node("ReduceMax", [p + "x_abs", "qvggt/axes_last"], [p + "x_absmax"], name=p + "act_absmax",
                             keepdims=1),
            helper.make_node("Div", [p + "x_absmax", fmax], [p + "scale_raw"], name=p + "act_scale"),
            helper.make_node("Max", [p + "scale_raw", floor], [p + "step"], name=p + "act_scale_floor"),
            helper.make_node("Div", [x, p + "step"], [p + "x_scaled"], name=p + "act_div"),
            # saturate=1 (the default): out-of-range values clamp to +-448, as the PyTorch side does.
            helper.make_node("QuantizeLinear", [p + "x_scaled", one, zp], [p + "x_q"], name=p + "act_q", saturate=1),
            helper.make_node("DequantizeLinear", [p + "x_q", one, zp], [p + "x_codes"], name=p + "act_dq"),
            helper.make_node("MatMul", [p + "x_codes", p + "weight"], [p + "gemm"], name=p + "gemm"),
            helper.make_node("Mul", [p + "gemm", p + "step"], [p + "gemm_scaled"], name=p + "gemm_rescale"),
            helper.make_node("Add", [p + "gemm_scaled", b], [out], name=p + "bias_add"),
        ])
        tensor_map[layer] = {"input": raw_input, "transformed": x, "codes": p + "x_codes", "output": out}
        return
    blocks = in_features // NVFP4_BLOCK_SIZE
    if in_features % NVFP4_BLOCK_SIZE or bscale.shape != (out_features, blocks) or wscale.size != 1 \
            or iglobal.size != 1:
        raise QVGGTError(f"{layer}: inconsistent nvfp4 tensors (codes {list(codes.shape)}, block scales "
                         f"{list(bscale.shape)}, global scales {wscale.size} and {iglobal.size})")
    if not (np.isfinite(iglobal).all() and iglobal[0] > 0 and np.isfinite(wscale).all() and wscale.reshape(-1)[0] > 0):
        raise QVGGTError(f"{layer}: nvfp4 global scales must be finite and > 0")
    decoded = _e4m3_values(codes)  # the E2M1 codes, stored as E4M3 values by the PyTorch side
    new_inits.append(_fp4_tensor(p + "weight_q", np.ascontiguousarray(decoded.T)))
    new_inits.append(_e4m3_tensor(p + "weight_block_scale", np.ascontiguousarray(bscale.T)))
    new_inits.append(helper.make_tensor(p + "weight_global_scale", TensorProto.FLOAT, [],
                                        [float(wscale.reshape(-1)[0])]))
    new_inits.append(helper.make_tensor(p + "input_global_scale", TensorProto.FLOAT, [], [float(iglobal[0])]))
    new_inits.append(helper.make_tensor(p + "in_2d", TensorProto.INT64, [2], [-1, in_features]))
    new_inits.append(helper.make_tensor(p + "out_features", TensorProto.INT64, [1], [out_features]))
    g_in = p + "input_global_scale"
    new_nodes.extend([
        helper.make_node("DequantizeLinear", [p + "weight_block_scale", p + "weight_global_scale"],
                         [p + "weight_scale"], name=p + "weight_scale_dq"),
        helper.make_node("DequantizeLinear", [p + "weight_q", p + "weight_scale"], [p + "weight"],
                         name=p + "weight_dq", axis=0, block_size=NVFP4_BLOCK_SIZE),
        helper.make_node("Reshape", [x, p + "in_2d"], [p + "x_2d"], name=p + "act_flatten"),
        helper.make_node(TRT_FP4_DYNAMIC_QUANTIZE, [p + "x_2d", g_in], [p + "x_q", p + "x_block_scale_q"],
                         name=p + "act_q", domain=TRT_DOMAIN, axis=-1, block_size=NVFP4_BLOCK_SIZE,
                         scale_type=TensorProto.FLOAT8E4M3FN),
        helper.make_node("DequantizeLinear", [p + "x_block_scale_q", g_in], [p + "x_block_scale"],
                         name=p + "act_scale_dq"),
        helper.make_node("DequantizeLinear", [p + "x_q", p + "x_block_scale"], [p + "x_dq"], name=p + "act_dq",
                         axis=-1, block_size=NVFP4_BLOCK_SIZE),
        helper.make_node("MatMul", [p + "x_dq", p + "weight"], [p + "gemm"], name=p + "gemm"),
        helper.make_node("Add", [p + "gemm", b], [p + "y_2d"], name=p + "bias_add"),
        helper.make_node("Shape", [x], [p + "lead_shape"], name=p + "lead_shape", end=-1),
        helper.make_node("Concat", [p + "lead_shape", p + "out_features"], [p + "out_shape"], name=p + "out_shape",
                         axis=0),
        helper.make_node("Reshape", [p + "y_2d", p + "out_shape"], [out], name=p + "unflatten"),
    ])
    tensor_map[layer] = {"input": raw_input, "transformed": x, "codes": p + "x_dq", "output": out}


def _attr(node: onnx.NodeProto, name: str) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def check_nvfp4_structure(model: onnx.ModelProto, expected: dict[str, dict[str, np.ndarray | float]]) -> dict:
    """Structural check of an nvfp4 graph, for where no runtime here can execute it (ONNX Runtime 1.32 has
    no FLOAT4E2M1 or ``TRT_FP4DynamicQuantize`` kernels).

    For every layer of ``expected`` it checks the initializers (FLOAT4E2M1 weight codes [in, out] and
    FLOAT8E4M3FN block scales [in/16, out] that decode to exactly the PyTorch codes and scales, and the two
    fp32 global scales), and the node chain: the double DequantizeLinear of the weight (axis 0, block 16),
    ``trt::TRT_FP4DynamicQuantize`` (axis -1, block 16, E4M3 scales, the calibrated global scale), the
    double DequantizeLinear of the activation and the MatMul that consumes both. It also checks the opset
    (>= 23), the ``trt`` domain import and that no quantized-linear placeholder is left.

    Args:
        model: the lowered graph (external data loaded).
        expected: per layer name ``{"codes": [out, in] E2M1 values, "block_scales": [out, in/16] E4M3 values,
            "weight_global": float, "input_global": float}`` (from the PyTorch modules).

    Returns:
        ``{"passed": bool, "layers": n, "failures": [...]}``, the failures naming layer and property.
    """
    failures: list[str] = []
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)
    if opset < NVFP4_OPSET:
        failures.append(f"graph: opset {opset} < {NVFP4_OPSET}")
    if not any(e.domain == TRT_DOMAIN for e in model.opset_import):
        failures.append(f"graph: no '{TRT_DOMAIN}' domain import")
    if count_placeholders(model):
        failures.append(f"graph: {count_placeholders(model)} quantized-linear placeholders left")
    dynamic = [n for n in graph.node if n.op_type == TRT_FP4_DYNAMIC_QUANTIZE]
    if len(dynamic) != len(expected):
        failures.append(f"graph: {len(dynamic)} {TRT_FP4_DYNAMIC_QUANTIZE} nodes for {len(expected)} layers")

    def want(cond: bool, layer: str, what: str) -> bool:
        if not cond:
            failures.append(f"{layer}: {what}")
        return cond

    for layer, ref in expected.items():
        p = f"{layer}/"
        codes = np.asarray(ref["codes"], dtype=np.float32)
        scales = np.asarray(ref["block_scales"], dtype=np.float32)
        out_features, in_features = codes.shape
        w, s = inits.get(p + "weight_q"), inits.get(p + "weight_block_scale")
        if want(w is not None and w.data_type == TensorProto.FLOAT4E2M1 and list(w.dims) == [in_features,
                out_features], layer, "weight codes are not a FLOAT4E2M1 [in, out] initializer"):
            want(np.array_equal(numpy_helper.to_array(w).astype(np.float32), codes.T), layer,
                 "decoded FP4 weight codes differ from the PyTorch codes")
        if want(s is not None and s.data_type == TensorProto.FLOAT8E4M3FN and list(s.dims) == [
                in_features // NVFP4_BLOCK_SIZE, out_features], layer,
                "weight block scales are not a FLOAT8E4M3FN [in/16, out] initializer"):
            want(np.array_equal(numpy_helper.to_array(s).astype(np.float32), scales.T), layer,
                 "decoded E4M3 block scales differ from the PyTorch scales")
        for key, name in (("weight_global", "weight_global_scale"), ("input_global", "input_global_scale")):
            init = inits.get(p + name)
            want(init is not None and init.data_type == TensorProto.FLOAT and
                 float(numpy_helper.to_array(init)) == np.float32(ref[key]), layer, f"{name} differs or is missing")
        chain = {
            "weight_scale_dq": ("DequantizeLinear", "", [p + "weight_block_scale", p + "weight_global_scale"], {}),
            "weight_dq": ("DequantizeLinear", "", [p + "weight_q", p + "weight_scale"],
                          {"axis": 0, "block_size": NVFP4_BLOCK_SIZE}),
            "act_q": (TRT_FP4_DYNAMIC_QUANTIZE, TRT_DOMAIN, [p + "x_2d", p + "input_global_scale"],
                      {"axis": -1, "block_size": NVFP4_BLOCK_SIZE, "scale_type": TensorProto.FLOAT8E4M3FN}),
            "act_scale_dq": ("DequantizeLinear", "", [p + "x_block_scale_q", p + "input_global_scale"], {}),
            "act_dq": ("DequantizeLinear", "", [p + "x_q", p + "x_block_scale"],
                       {"axis": -1, "block_size": NVFP4_BLOCK_SIZE}),
            "gemm": ("MatMul", "", [p + "x_dq", p + "weight"], {}),
        }
        for suffix, (op, domain, inputs, attrs) in chain.items():
            node = nodes.get(p + suffix)
            if not want(node is not None and node.op_type == op and node.domain == domain, layer,
                        f"node {suffix} is not {domain + '::' if domain else ''}{op}"):
                continue
            want(list(node.input) == inputs, layer, f"node {suffix} inputs {list(node.input)} != {inputs}")
            for key, value in attrs.items():
                want(_attr(node, key) == value, layer, f"node {suffix} attribute {key}={_attr(node, key)} != {value}")
    return {"passed": not failures, "layers": len(expected), "failures": failures[:50]}


def fp4_dynamic_quantize_reference(x: np.ndarray, global_scale: float, block_size: int = NVFP4_BLOCK_SIZE
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of ``trt::TRT_FP4DynamicQuantize`` along the last axis, as TensorRT documents its
    dynamic quantize layer and ModelOpt's NVFP4 export uses it: per block of ``block_size`` elements the
    E4M3 scale ``e4m3(min(amax_b / (6 * g), 448))``, then the E2M1 codes ``e2m1(x / (scale * g))`` (round to
    nearest even, saturating at 6; a zero scale gives zero codes). Written with ``ml_dtypes`` casts,
    independently of the PyTorch implementation in :mod:`qvggt_export.quant.formats`.

    Returns:
        ``(codes, scales)`` as ``ml_dtypes`` float4_e2m1fn ``[..., d]`` and float8_e4m3fn ``[..., d / B]``.
    """
    import ml_dtypes  # a dependency of onnx itself

    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    if d % block_size:
        raise QVGGTError(f"FP4 dynamic quantize needs the last axis ({d}) divisible by the block size {block_size}")
    g = np.float32(global_scale)
    blocks = x.reshape(*x.shape[:-1], d // block_size, block_size)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = np.minimum(amax / (np.float32(6.0) * g), np.float32(FP8_E4M3_MAX))
    scale = scale.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.where(scale > 0, np.clip(blocks / (safe * g), -6.0, 6.0), np.float32(0.0)).astype(np.float32)
    return (codes.reshape(x.shape).astype(ml_dtypes.float4_e2m1fn),
            scale[..., 0].astype(ml_dtypes.float8_e4m3fn))


def reference_evaluator(model: onnx.ModelProto | str) -> object:
    """An ``onnx.reference.ReferenceEvaluator`` (ONNX's own executable specification, pure NumPy) that also
    knows ``trt::TRT_FP4DynamicQuantize`` (:func:`fp4_dynamic_quantize_reference`): it runs nvfp4 graphs,
    which ONNX Runtime cannot. Slow for large models; meant for checking the graph's math."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the ONNX op's name)
        op_domain = TRT_DOMAIN

        def _run(self, x, global_scale, axis=-1, block_size=NVFP4_BLOCK_SIZE, scale_type=None):  # noqa: ANN001, ANN202
            if axis not in (-1, x.ndim - 1):
                raise QVGGTError(f"the reference {TRT_FP4_DYNAMIC_QUANTIZE} supports the last axis only, got {axis}")
            return fp4_dynamic_quantize_reference(x, float(np.asarray(global_scale).reshape(-1)[0]), block_size)

    return ReferenceEvaluator(model, new_ops=[TRT_FP4DynamicQuantize])
