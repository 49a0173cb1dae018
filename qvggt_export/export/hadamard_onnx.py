"""ONNX forms of the Hadamard op ``y = ((x * pre) @ H) * post`` over the last axis (DESIGN.md section 4).

``H = hadamard_matrix(d)`` is the normalised ``kron(H_{2^k}, H_m)`` of :mod:`qvggt_export.quant.hadamard`
in its row-vector convention, so every form below computes what ``fwht(x, signs=pre, post_scale=post)``
computes in PyTorch. Three forms (``variant``) are emitted, for float32 ``x`` of rank >= 2 whose last
dimension ``d`` is static:

``"function"`` (runs in ONNX Runtime, parses in TensorRT; the canonical form)
    A node ``qvggt::Hadamard_<d>(x, pre, post)`` with attribute ``size = d``, calling the ONNX *local
    function* of the same name (``model.functions``, domain ``qvggt``): one per size, shared by every
    layer of that size, with the size baked into ``Constant`` nodes. Its body::

        xs = x * pre
        xs = Reshape(xs, [-1, m]) @ H_m                  Paley factor, if m > 1   (m MACs per element)
        for each Sylvester stage s, innermost first ("inner" = product of the factors already applied):
            xs = Reshape(xs, [-1, s]) @ H_s              when inner == 1          (s MACs per element)
            xs = H_s @ Reshape(xs, [-1, s, inner])       otherwise (H_s = H_s^T)  (s MACs per element)
        y  = Reshape(xs, Shape(x)) * post

    The stages are those of :func:`~qvggt_export.quant.hadamard.fwht_stages` (radix 16, the outermost
    taking the remainder: 1024 -> [4, 16, 16], 4096 -> [16, 16, 16]), in the order :func:`fwht` applies
    them, so ONNX Runtime reproduces the PyTorch transform (bit for bit on most tested sizes, within 1e-7
    relative on all). Every ``H_s`` is normalised already, so their Kronecker product is ``H`` and no
    ``1/sqrt(d)`` pass is needed.
    Work per element is ``sum(s) + m`` multiply-adds: for a fixed radix, ``O(log d)`` per element,
    ``O(d log d)`` per token, against ``d`` per element for the dense matrix (4096: 48 vs 4096). No
    matrix larger than ``max(16, m)`` exists in the body.

    Why the op type carries the size: TensorRT's ONNX parser looks local functions up by op type alone
    (not by domain, nor by the IR-10 ``overload`` field) and a function body is one fixed graph, while
    a VGGT holds two sizes (1024 and 4096). One op type per size resolves correctly in both ONNX
    Runtime and TensorRT, and keeps each body a plain, readable list of its stages. (TensorRT warns once
    per body node and repeated call that the node name exists already; the layers are built correctly.)

``"dense"``
    ``MatMul(x * pre, qvggt/hadamard_<d>) * post`` with the normalised ``d x d`` matrix as one
    initializer per size: the reference form, ``d^2`` multiply-adds per token. ``None`` factors are
    skipped.

``"plugin"``
    The bare custom node for TensorRT with the Hadamard plugin registered; ONNX Runtime cannot run it
    and no function backs it. The contract with the plugin (an ``IPluginV3`` creator named
    ``Hadamard``, version ``"1"``, namespace ``"qvggt"``):

    * op type ``Hadamard``, domain ``qvggt``; attributes ``plugin_version = "1"`` and
      ``plugin_namespace = "qvggt"`` (the parser finds the creator by op type, ``plugin_version`` and
      ``plugin_namespace``) and ``size`` (int ``d``), which reaches the creator as a field;
    * inputs ``x`` ([..., d] float32), ``pre`` and ``post`` ([d] float32 initializers, all ones where the
      layer has no such factor): always three;
    * output ``y = ((x * pre) @ H) * post``, shape and type of ``x``; ``H`` the normalised
      ``kron(H_{2^k}, H_m)`` with ``(2^k, m) = hadamard_factors(d)``: for ``m > 1`` the plugin builds
      ``H_m`` with the construction of :mod:`qvggt_export.quant.hadamard`.

    The node has exactly the inputs and attributes of the ``"function"`` node (plus the two plugin
    attributes), so :func:`qvggt_export.engine.hadamard.retarget_hadamard` turns one form into the other.

Every call returns a :class:`HadamardEmission`; initializers named ``qvggt/...`` are shared between calls
(same name, same value), functions dedupe by ``(domain, name)``. :func:`add_to_model` does that
bookkeeping. A function's standard opset must equal the model's (the ONNX checker refuses a mismatch).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qvggt_export.errors import QVGGTError

__all__ = [
    "HADAMARD_DOMAIN",
    "HADAMARD_DOMAIN_VERSION",
    "HADAMARD_OP",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "VARIANTS",
    "HadamardEmission",
    "add_to_model",
    "emit_hadamard",
    "function_name",
    "hadamard_cost",
    "hadamard_function",
]

#: Custom domain of the Hadamard nodes and functions, and its version in ``opset_import``.
HADAMARD_DOMAIN = "qvggt"
HADAMARD_DOMAIN_VERSION = 1
#: Op type of the plugin node: the name of the TensorRT plugin creator.
HADAMARD_OP = "Hadamard"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "qvggt"
VARIANTS = ("function", "dense", "plugin")
# The canonical export's opset (INT4 Q/DQ needs 21). Bodies use Constant/Shape/Reshape/MatMul/Mul, whose
# semantics for these types are the same from opset 13 on.
DEFAULT_OPSET = 21
_MIN_OPSET = 13
_FUNCTION_RE = re.compile(rf"^{HADAMARD_OP}_(\d+)$")


@dataclass(frozen=True)
class HadamardEmission:
    """What one Hadamard op adds to a model.

    Attributes:
        output: Name of the result tensor.
        nodes: Graph nodes, in topological order.
        initializers: Initializers the nodes read that the caller did not name: ``qvggt/ones_<d>`` (a
            missing ``pre``/``post``) and ``qvggt/hadamard_<d>`` (dense), shared by name across calls.
        functions: Local functions the nodes call (``"function"`` variant).
        opset_imports: ``(domain, version)`` pairs the model must import besides the standard one.
    """

    output: str
    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[onnx.TensorProto, ...]
    functions: tuple[onnx.FunctionProto, ...]
    opset_imports: tuple[tuple[str, int], ...]


def _plan(size: int) -> tuple[list[int], int]:
    if not isinstance(size, int) or isinstance(size, bool):
        raise QVGGTError(f"Hadamard size must be an int, got {size!r}")
    from qvggt_export.quant.hadamard import fwht_stages  # imports torch; kept off this module's import path

    return fwht_stages(size)  # raises QVGGTError for unsupported sizes


def _normalised(n: int) -> np.ndarray:
    from qvggt_export.quant.hadamard import hadamard_matrix

    return hadamard_matrix(n).float().numpy()  # built in float64, rounded once


def function_name(size: int) -> str:
    """Name (and op type) of the local function for size ``d``: ``Hadamard_<d>``."""
    return f"{HADAMARD_OP}_{size}"


def hadamard_function(size: int, opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """The local function ``qvggt::Hadamard_<size>(x, pre, post) -> y`` (module docstring).

    Args:
        size: ``d``, a size :func:`~qvggt_export.quant.hadamard.hadamard_factors` supports.
        opset: Standard opset the body imports; must equal the model's.

    Returns:
        A new FunctionProto; equal arguments give equal protos.

    Raises:
        QVGGTError: Unsupported size or opset.
    """
    if opset < _MIN_OPSET:
        raise QVGGTError(f"the Hadamard function needs opset {_MIN_OPSET} or newer, got {opset}")
    stages, m = _plan(size)
    fname = function_name(size)
    nodes: list[onnx.NodeProto] = []
    constants: set[str] = set()
    # Node names carry the function name: TensorRT names layers after them (all calls of one function share
    # them; the parser suffixes repeats and warns that their outputs are not queryable by layer name).

    def constant(name: str, array: np.ndarray) -> str:
        if name not in constants:  # 4096 = 16 x 16 x 16 reads one H_16 three times
            nodes.append(helper.make_node("Constant", [], [name], name=f"{fname}/{name}",
                                          value=numpy_helper.from_array(array, name)))
            constants.add(name)
        return name

    def node(op: str, inputs: list[str], output: str, label: str) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{fname}/{label}"))
        return output

    def stage(operand: str, dims: list[int], matrix: str, left: bool) -> str:
        index = sum(n.op_type == "MatMul" for n in nodes) + 1
        shape = constant("shape_" + "x".join(str(d).replace("-", "m") for d in dims), np.array(dims, np.int64))
        rows = node("Reshape", [operand, shape], f"r{index}", f"reshape{index}")
        return node("MatMul", [matrix, rows] if left else [rows, matrix], f"t{index}", f"stage{index}")

    node("Shape", ["x"], "x_shape", "x_shape")
    current = node("Mul", ["x", "pre"], "t0", "pre_scale")
    inner = 1
    if m > 1:
        # Paley factor on the innermost axis (channel c = i * m + r): rows @ H_m; H_m need not be symmetric.
        current = stage(current, [-1, m], constant(f"h{m}", _normalised(m)), left=False)
        inner = m
    for s in reversed(stages):
        h = constant(f"h{s}", _normalised(s))
        # The first stage multiplies rows; later ones contract the middle axis of the [.., s, inner] view:
        # X @ kron(H_s, B) = H_s^T X B per block, and H_s is symmetric, so the left product H_s @ X applies it.
        current = stage(current, [-1, s] if inner == 1 else [-1, s, inner], h, left=inner > 1)
        inner *= s
    current = node("Reshape", [current, "x_shape"], "y_raw", "restore_shape")
    node("Mul", [current, "post"], "y", "post_scale")
    return helper.make_function(
        HADAMARD_DOMAIN, fname, ["x", "pre", "post"], ["y"], nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["size"],
        doc_string=(f"y = ((x * pre) @ H) * post over the last axis; H = normalised kron(H_{size // m}, H_{m}) "
                    f"as Sylvester stages {stages} and Paley order {m} (qvggt_export.quant.hadamard.fwht)."),
    )


def emit_hadamard(x_name: str, out_name: str, size: int, pre_name: str | None = None,
                  post_name: str | None = None, *, prefix: str, variant: str = "function",
                  opset: int = DEFAULT_OPSET) -> HadamardEmission:
    """Nodes computing ``out = ((x * pre) @ H) * post`` over the last axis of ``x`` (``[..., size]`` float32).

    Args:
        x_name: Input tensor, rank >= 2, static last dimension ``size``.
        out_name: Name of the result.
        size: ``d``: ``2^k`` or ``2^k * m`` with a Paley order ``m`` (``hadamard_factors``).
        pre_name: ``[d]`` float32 tensor multiplied in before the transform (DSFQ signs), or ``None``.
        post_name: ``[d]`` float32 tensor multiplied in after it (smoothing ``1/c``), or ``None``.
        prefix: Prefix of node names and per-call tensor names, e.g. ``"blocks.0.attn.qkv/"``.
        variant: ``"function"``, ``"dense"`` or ``"plugin"`` (module docstring).
        opset: Standard opset of a function body (the model's).

    Returns:
        The emission, for :func:`add_to_model` or for merging by hand.

    Raises:
        QVGGTError: Unknown variant, unsupported size or opset, empty tensor names.
    """
    if variant not in VARIANTS:
        raise QVGGTError(f"unknown Hadamard variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if not x_name or not out_name:
        raise QVGGTError("emit_hadamard needs non-empty input and output names")
    _plan(size)
    if variant == "dense":
        nodes = []
        current = x_name
        if pre_name is not None:
            current = prefix + "hadamard_pre"
            nodes.append(helper.make_node("Mul", [x_name, pre_name], [current], name=prefix + "hadamard_pre_scale"))
        matrix = numpy_helper.from_array(_normalised(size), f"qvggt/hadamard_{size}")
        rotated = out_name if post_name is None else prefix + "hadamard_rot"
        nodes.append(helper.make_node("MatMul", [current, matrix.name], [rotated], name=prefix + "hadamard"))
        if post_name is not None:
            nodes.append(helper.make_node("Mul", [rotated, post_name], [out_name], name=prefix + "hadamard_post_scale"))
        return HadamardEmission(out_name, tuple(nodes), (matrix,), (), ())

    # function / plugin: one signature (x, pre, post); a missing factor is a shared vector of ones.
    inits: tuple[onnx.TensorProto, ...] = ()
    if pre_name is None or post_name is None:
        ones = numpy_helper.from_array(np.ones(size, np.float32), f"qvggt/ones_{size}")
        inits = (ones,)
        pre_name = pre_name if pre_name is not None else ones.name
        post_name = post_name if post_name is not None else ones.name
    inputs = [x_name, pre_name, post_name]
    imports = ((HADAMARD_DOMAIN, HADAMARD_DOMAIN_VERSION),)
    if variant == "plugin":
        node = helper.make_node(HADAMARD_OP, inputs, [out_name], name=prefix + "hadamard", domain=HADAMARD_DOMAIN,
                                plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, size=size)
        return HadamardEmission(out_name, (node,), inits, (), imports)
    function = hadamard_function(size, opset)
    node = helper.make_node(function.name, inputs, [out_name], name=prefix + "hadamard", domain=HADAMARD_DOMAIN,
                            size=size)
    return HadamardEmission(out_name, (node,), inits, (function,), imports)


def add_to_model(model: onnx.ModelProto, emissions: HadamardEmission | Iterable[HadamardEmission], *,
                 nodes: bool = True) -> None:
    """Add emissions to ``model`` in place: their nodes (appended; ``nodes=False`` when the caller has placed
    them), the initializers and functions the model lacks (by name), and the opset imports.

    Raises:
        QVGGTError: The model imports the ``qvggt`` domain at another version.
    """
    if isinstance(emissions, HadamardEmission):
        emissions = [emissions]
    graph = model.graph
    have_inits = {init.name for init in graph.initializer}
    have_functions = {(f.domain, f.name) for f in model.functions}
    imports = {entry.domain: entry.version for entry in model.opset_import}
    for emission in emissions:
        if nodes:
            graph.node.extend(emission.nodes)
        for init in emission.initializers:
            if init.name not in have_inits:
                graph.initializer.append(init)
                have_inits.add(init.name)
        for function in emission.functions:
            if (function.domain, function.name) not in have_functions:
                model.functions.append(function)
                have_functions.add((function.domain, function.name))
        for domain, version in emission.opset_imports:
            if domain not in imports:
                model.opset_import.append(helper.make_opsetid(domain, version))
                imports[domain] = version
            elif imports[domain] != version:
                raise QVGGTError(f"the model imports domain {domain!r} version {imports[domain]}; the Hadamard op "
                                 f"needs version {version}")


def _square_order(tensor: onnx.TensorProto) -> int | None:
    return int(tensor.dims[0]) if len(tensor.dims) == 2 and tensor.dims[0] == tensor.dims[1] else None


def hadamard_cost(size: int, variant: str) -> dict[str, Any]:
    """Work of one Hadamard op per token (one ``d``-vector), counted on the graph the variant emits.

    ``macs_per_token`` are the multiply-adds of the transform's matrix products (a ``MatMul`` with an
    ``s x s`` matrix costs ``d * s`` per token), ``scale_muls_per_token`` the elementwise pre/post
    multiplies (``2d``; counted with both factors present, the DSFQ case). The plugin has no graph to
    count: its kernel is taken to be radix-2 butterflies, ``d * k`` additions (``adds_per_token``) for the
    ``2^k`` Sylvester part plus ``d * m`` multiply-adds for a Paley factor ``m > 1``.

    Args:
        size: ``d``.
        variant: ``"function"``, ``"dense"`` or ``"plugin"``.

    Returns:
        ``size``, ``variant``, ``sylvester_stages``, ``paley_order``, ``nodes`` (ONNX nodes executed per
        call: the function body's, or those in the graph), ``node_types`` (count per op type),
        ``matmul_passes`` (passes over the activations doing matrix products), ``macs_per_token``,
        ``adds_per_token``, ``scale_muls_per_token``, ``flops_per_token`` (``2 macs + adds + muls``),
        ``matrix_floats`` (matrix entries stored once per size and model) and ``dense_ratio``
        (``d^2`` over the transform's ``macs + adds``).

    Raises:
        QVGGTError: Unknown variant or unsupported size.
    """
    emission = emit_hadamard("x", "y", size, "pre", "post", prefix="", variant=variant)
    stages, m = _plan(size)
    if variant == "function":
        graph_nodes = list(emission.functions[0].node)
        matrices = {n.output[0]: _square_order(n.attribute[0].t) for n in graph_nodes if n.op_type == "Constant"}
    else:
        graph_nodes = list(emission.nodes)
        matrices = {init.name: _square_order(init) for init in emission.initializers}
    orders = [next(matrices[i] for i in n.input if matrices.get(i)) for n in graph_nodes if n.op_type == "MatMul"]
    types = Counter(n.op_type for n in graph_nodes)
    macs, adds, passes = size * sum(orders), 0, len(orders)
    matrix_floats = sum(order * order for order in matrices.values() if order)
    if variant == "plugin":
        sylvester_bits = (size // m).bit_length() - 1
        macs, adds, passes = (size * m if m > 1 else 0), size * sylvester_bits, 1
        matrix_floats = m * m if m > 1 else 0
    muls = 2 * size
    return {
        "size": size,
        "variant": variant,
        "sylvester_stages": stages,
        "paley_order": m,
        "nodes": sum(types.values()),
        "node_types": dict(sorted(types.items())),
        "matmul_passes": passes,
        "macs_per_token": macs,
        "adds_per_token": adds,
        "scale_muls_per_token": muls,
        "flops_per_token": 2 * macs + adds + muls,
        "matrix_floats": matrix_floats,
        "dense_ratio": size * size / max(1, macs + adds),
    }
