"""The engine stage's Hadamard form: rewrite the canonical graph's Hadamard function calls as TensorRT plugin
nodes (or dense MatMuls), and write the graph an engine is built from.

Moved from :mod:`qvggt_export.export.hadamard_onnx` (``retarget_hadamard``) and ``qvggt_export.pipeline``
(``_plugin_graph``, now :func:`plugin_graph`): the canonical export stays runtime-free; choosing the form
TensorRT runs is engine work. The node forms themselves (function, dense, plugin contract) are still
emitted by :func:`qvggt_export.export.hadamard_onnx.emit_hadamard`.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from qvggt_export.errors import QVGGTError
from qvggt_export.export.hadamard_onnx import (
    _FUNCTION_RE,
    DEFAULT_OPSET,
    HADAMARD_DOMAIN,
    HADAMARD_OP,
    VARIANTS,
    HadamardEmission,
    add_to_model,
    emit_hadamard,
)

__all__ = ["plugin_graph", "retarget_hadamard"]


def _hadamard_size(node: onnx.NodeProto) -> int | None:
    """``d`` of a function-form or plugin-form Hadamard node, ``None`` for any other node."""
    if node.domain != HADAMARD_DOMAIN:
        return None
    match = _FUNCTION_RE.match(node.op_type)
    if node.op_type != HADAMARD_OP and match is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    size = attrs.get("size", int(match.group(1)) if match else None)
    if size is None or (match is not None and int(match.group(1)) != size) or len(node.input) != 3:
        raise QVGGTError(f"node {node.name!r} ({node.domain}::{node.op_type}) is not a well-formed Hadamard op: "
                         f"expected inputs (x, pre, post) and attribute size, got inputs {list(node.input)}, "
                         f"attributes {attrs}")
    return int(size)


def retarget_hadamard(model: onnx.ModelProto, variant: str, *, opset: int | None = None) -> int:
    """Rewrite the function-form and plugin-form Hadamard nodes of ``model``'s main graph as ``variant``, in
    place (e.g. a canonical ``"function"`` export into ``"plugin"`` nodes for a TensorRT build with the
    plugin registered). Functions and shared initializers left unused are removed.

    Args:
        model: The model.
        variant: ``"function"``, ``"dense"`` or ``"plugin"``.
        opset: Standard opset of new function bodies; defaults to the model's.

    Returns:
        The number of Hadamard ops rewritten.

    Raises:
        QVGGTError: Unknown variant, or a malformed ``qvggt`` Hadamard node.
    """
    if variant not in VARIANTS:
        raise QVGGTError(f"unknown Hadamard variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if opset is None:
        opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), DEFAULT_OPSET)
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    emissions: list[HadamardEmission] = []
    for node in graph.node:
        size = _hadamard_size(node)
        if size is None:
            new_nodes.append(node)
            continue
        x, pre, post = node.input
        ones = f"qvggt/ones_{size}"
        prefix = node.name[: -len("hadamard")] if node.name.endswith("hadamard") else f"{node.name or node.output[0]}/"
        emission = emit_hadamard(x, node.output[0], size, None if pre == ones else pre, None if post == ones else post,
                                 prefix=prefix, variant=variant, opset=opset)
        new_nodes.extend(emission.nodes)
        emissions.append(emission)
    if not emissions:
        return 0
    del graph.node[:]
    graph.node.extend(new_nodes)
    add_to_model(model, emissions, nodes=False)

    used_inputs = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    stale = [i for i in graph.initializer if i.name.startswith(("qvggt/ones_", "qvggt/hadamard_"))
             and i.name not in used_inputs]
    for init in stale:
        graph.initializer.remove(init)
    called = {(n.domain, n.op_type) for n in graph.node}
    for function in [f for f in model.functions if f.domain == HADAMARD_DOMAIN and _FUNCTION_RE.match(f.name)
                     and (f.domain, f.name) not in called]:
        model.functions.remove(function)
    if not any(domain == HADAMARD_DOMAIN for domain, _ in called) and not any(
            f.domain == HADAMARD_DOMAIN for f in model.functions):
        for entry in [e for e in model.opset_import if e.domain == HADAMARD_DOMAIN]:
            model.opset_import.remove(entry)
    return len(emissions)


def plugin_graph(onnx_path: Path, out_dir: Path, name: str = "model.plugin.onnx") -> tuple[Path, int]:
    """A copy of the graph whose Hadamard function calls are TensorRT plugin nodes, written to ``out_dir / name``.

    External weights stay where they are (the copy references the same ``.data`` file). NVFP4's
    ``trt::TRT_FP4DynamicQuantize`` stays as it is: TensorRT's ONNX parser imports it natively.

    Returns:
        The written graph and its plugin node count, or ``(onnx_path, 0)`` (nothing written) when the graph has
        no Hadamard op.
    """
    from qvggt_export.io import atomic_write

    proto = onnx.load(str(onnx_path), load_external_data=False)
    count = retarget_hadamard(proto, "plugin")
    if not count:
        return onnx_path, 0
    target = out_dir / name
    atomic_write(target, lambda tmp: onnx.save(proto, tmp))
    return target, count
