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
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.errors import QVGGTError
from qvggt_export.export.hadamard_onnx import VARIANTS, HadamardEmission, add_to_model, emit_hadamard
from qvggt_export.quant.functional import MIN_STEP, qrange
from qvggt_export.quant.modules import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP

LAYER_MAP_KEY = "qvggt.quantized_layers"


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


def _constant_values(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise QVGGTError(f"QLinear input {name!r} is not a constant; the quantized weights must be initializers")


def _lower_input_transform(x: str, layer: str, transform_names: list[str], rotate: bool, graph: onnx.GraphProto,
                           nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                           emissions: list[HadamardEmission], hadamard: str, opset: int) -> str:
    """Emit ``((x * pre) @ H) * post`` (factors that are all ones are skipped); returns the output name.

    The rotation is the Hadamard op of :mod:`.hadamard_onnx` in the requested form: ``"function"``
    (O(d log d) local function, runs everywhere), ``"dense"`` (d x d MatMul) or ``"plugin"`` (the
    TensorRT plugin node, no body).
    """
    if not transform_names:
        return x
    pre_name, post_name = transform_names
    pre = _constant_values(graph, pre_name).astype(np.float32)
    post = _constant_values(graph, post_name).astype(np.float32)
    p = f"{layer}/"
    pre_ref = None if np.all(pre == 1.0) else p + "input_pre"
    post_ref = None if np.all(post == 1.0) else p + "input_post"
    if pre_ref:
        inits.append(numpy_helper.from_array(pre, pre_ref))
    if post_ref:
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


def count_placeholders(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.domain == PLACEHOLDER_DOMAIN and n.op_type == PLACEHOLDER_OP)


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
    for node in graph.node:
        if not (node.domain == PLACEHOLDER_DOMAIN and node.op_type == PLACEHOLDER_OP):
            new_nodes.append(node)
            continue
        count += 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        wbits, abits = int(attrs["weight_bits"]), int(attrs["act_bits"])
        layer = attrs.get("layer", b"")
        layer = layer.decode() if isinstance(layer, bytes) else str(layer)
        layer = layer or f"qlinear_{count}"
        x, codes_name, step_name, bias_name, *transform_names = node.input
        codes = _constant_values(graph, codes_name).astype(np.int8)
        step = _constant_values(graph, step_name).astype(np.float32)
        bias = _constant_values(graph, bias_name).astype(np.float32)
        consumed.update({codes_name, step_name, bias_name, *transform_names})
        raw_input = x
        x = _lower_input_transform(x, layer, transform_names, bool(attrs.get("rotate", 0)), graph, new_nodes,
                                   new_inits, emissions, hadamard, opset)
        tensor_map[layer] = {"input": raw_input, "transformed": x, "codes": f"{layer}/x_codes",
                             "output": node.output[0]}
        wmin, wmax = qrange(wbits)
        if codes.min() < wmin or codes.max() > wmax:
            raise QVGGTError(f"{layer}: weight codes outside the {wbits}-bit range [{wmin}, {wmax}]")

        p = f"{layer}/"
        w_q, w_step, b = p + "weight_q", p + "weight_step", p + "bias"
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
    still_used = {i for n in new_nodes for i in n.input} | {o.name for o in graph.output}
    kept_inits = [i for i in graph.initializer if i.name not in consumed or i.name in still_used]
    kept_nodes = [n for n in new_nodes
                  if not (n.op_type == "Constant" and n.output[0] in consumed and n.output[0] not in still_used)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
    for entry in list(model.opset_import):
        if entry.domain == PLACEHOLDER_DOMAIN:
            model.opset_import.remove(entry)
    if emissions:
        add_to_model(model, emissions, nodes=False)  # shared matrices, one function per size, qvggt opset
    # Where each quantized layer's tensors live, for the layer-by-layer parity checker.
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   LAYER_MAP_KEY: json.dumps(tensor_map, sort_keys=True)})
    return count
