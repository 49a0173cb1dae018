"""Per-format parity checks beyond ONNX Runtime's output comparison: one home for the export run and ``check``.

* **Layer by layer** (:func:`layer_parity`): the integer formats go to
  :func:`~qvggt_export.parity.localize.localize_divergence` (codes in quantization steps), fp8 to
  :func:`fp8_layer_parity` (codes in E4M3 steps), nvfp4 to :func:`nvfp4_layer_parity`. All teacher-force each
  layer from the runtime's own input to it (ONNX Runtime; for nvfp4 ONNX's reference evaluator), so the first
  failing layer is where the graph goes wrong, not where rounding ties pile up.
* **nvfp4**, which ONNX Runtime 1.32 cannot run (no ``trt::TRT_FP4DynamicQuantize`` kernel, no CPU FLOAT4E2M1
  Q/DQ): :func:`nvfp4_expected` gives what
  :func:`~qvggt_export.export.qdq.check_nvfp4_structure` compares the graph against (decoded codes, block
  scales, global scales), and :func:`reference_parity` runs the graph in ONNX's NumPy reference evaluator
  (with our NumPy reading of TensorRT's documented FP4 dynamic quantize, not TensorRT itself) against
  PyTorch, and :func:`nvfp4_layer_parity` checks it layer by layer in that evaluator. :func:`nvfp4_parity` is
  all three, as the export run reports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.parity.compare import FLOAT_MAX_REL, QUANT_NOISE_RATIO
from qvggt_export.parity.localize import layer_values, matched_layers

# Per-layer FP8 criteria, as the integer checker's (localize.py) but in E4M3 steps: a correct layer differs
# from PyTorch only where x / s sits on a rounding tie, by one E4M3 step, in few codes.
FP8_MAX_CODE_STEPS = 1
FP8_MAX_FLIP_FRACTION = 1e-3
FP8_TRANSFORM_REL_TOL = 1e-4
FP8_OUTPUT_REL_TOL = 1e-3

# Per-layer NVFP4 criteria: the dequantized activations (codes x block scale x global scale) may differ only at
# rounding ties (one code, or one block scale and its 16 codes); transform and output as for the other formats.
NVFP4_MAX_ACT_FLIP_FRACTION = 1e-3
NVFP4_TRANSFORM_REL_TOL = 1e-4
NVFP4_OUTPUT_REL_TOL = 1e-3

NVFP4_RUNTIME = "onnx.reference (ONNX's NumPy reference evaluator) with a NumPy TRT_FP4DynamicQuantize"
NVFP4_METHOD = "structural + reference evaluator"
NVFP4_REASON = ("ONNX Runtime 1.32 cannot run NVFP4 graphs: no kernel for trt::TRT_FP4DynamicQuantize "
                "(TensorRT's dynamic FP4 quantize) and no CPU FLOAT4E2M1 QuantizeLinear/DequantizeLinear. "
                "Checked instead: op types, dtypes, block sizes, scales and decoded weight codes vs PyTorch, "
                "and the outputs of ONNX's reference evaluator, whose TRT_FP4DynamicQuantize is our NumPy "
                "reading of TensorRT's documented semantics (not TensorRT itself)")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def fp8_layer_parity(model: nn.Module, onnx_path: str | os.PathLike[str], images: torch.Tensor) -> dict[str, Any]:
    """Teacher-forced per-layer check of an fp8 graph against its fake-quant PyTorch model.

    Each quantized layer is recomputed in PyTorch from ONNX Runtime's input to it: the online transform
    (relative L2 <= 1e-4), the per-token E4M3 activation codes (compared in E4M3 steps, the distance of the
    bit patterns of same-sign codes: at most 1 step, in at most 0.1 % of codes) and the layer output
    (relative L2 <= 1e-3). Layers are judged in graph order.

    Args:
        model: the fp8 fake-quant model the graph was exported from.
        onnx_path: the exported graph (with the exporter's layer map in its metadata; external data allowed).
        images: [B, S, 3, H, W] at the export's resolution.

    Returns:
        ``{"first_failing_layer": name or None, "criteria": {...}, "layers": [per-layer dicts]}``.
    """
    from qvggt_export.quant import formats as ff
    from qvggt_export.quant.modules import FloatQuantLinear

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    layer_map, modules = matched_layers(proto, onnx_path, model,
                                        lambda m: isinstance(m, FloatQuantLinear) and m.format == "fp8",
                                        "fp8 FloatQuantLinear")
    values = layer_values(onnx_path, layer_map, images)

    position = {out: i for i, node in enumerate(proto.graph.node) for out in node.output}
    checks = []
    with torch.no_grad():
        for name, tensors in sorted(layer_map.items(), key=lambda item: position.get(item[1]["output"], 0)):
            module = modules[name]
            transform_rel = _rel(module.transform(torch.from_numpy(values[tensors["input"]])).numpy(),
                                 values[tensors["transformed"]])
            x = torch.from_numpy(values[tensors["transformed"]])
            scale = ff.fp8_e4m3_scale(x, "token")
            codes_pt = ff.quantize_fp8(x, scale)
            codes_ort = torch.from_numpy(values[tensors["codes"]]).to(torch.float8_e4m3fn)
            bits_pt, bits_ort = codes_pt.view(torch.uint8).int(), codes_ort.view(torch.uint8).int()
            # Same sign: the bit patterns are ordered, their distance counts E4M3 steps; a sign flip counts 255.
            steps = torch.where((bits_pt ^ bits_ort) & 0x80 == 0, (bits_pt - bits_ort).abs(), 255)
            steps = torch.where(codes_pt.float() == codes_ort.float(), 0, steps)  # +0 vs -0
            weight = module.dequantized_weight()
            output_pt = (codes_pt.float() @ weight.T * scale + module.bias).numpy()
            output_rel = _rel(values[tensors["output"]], output_pt)
            flips, count = int((steps > 0).sum()), steps.numel()
            max_steps = int(steps.max()) if count else 0
            passed = (transform_rel <= FP8_TRANSFORM_REL_TOL and max_steps <= FP8_MAX_CODE_STEPS
                      and flips <= FP8_MAX_FLIP_FRACTION * count and output_rel <= FP8_OUTPUT_REL_TOL)
            checks.append({"name": name, "transform_rel": transform_rel, "code_flips": flips, "code_count": count,
                           "code_max_delta_e4m3_steps": max_steps, "output_rel": output_rel, "passed": passed})
    return {"first_failing_layer": next((c["name"] for c in checks if not c["passed"]), None),
            "criteria": {"transform_rel": FP8_TRANSFORM_REL_TOL, "code_max_delta_e4m3_steps": FP8_MAX_CODE_STEPS,
                         "flip_fraction": FP8_MAX_FLIP_FRACTION, "output_rel": FP8_OUTPUT_REL_TOL},
            "layers": checks}


def nvfp4_layer_parity(model: nn.Module, onnx_path: str | os.PathLike[str], images: torch.Tensor
                       ) -> dict[str, Any]:
    """Teacher-forced per-layer check of an nvfp4 graph, run in ONNX's reference evaluator (ONNX Runtime cannot
    run it; the evaluator's ``TRT_FP4DynamicQuantize`` is our NumPy reading of TensorRT's, not TensorRT).

    Each quantized layer is recomputed in PyTorch from the evaluator's input to it: the online transform
    (relative L2 <= 1e-4), the dequantized NVFP4 activation (block 16, the calibrated global scale; elements that
    differ, at most 0.1 %: rounding ties) and the layer output (relative L2 <= 1e-3). This covers what the
    structural check cannot: the online rotation / smoothing and the activation quantizer's arithmetic.

    Returns:
        ``{"first_failing_layer": name or None, "criteria": {...}, "layers": [per-layer dicts]}``.
    """
    from qvggt_export.export.qdq import reference_evaluator
    from qvggt_export.quant import formats as ff
    from qvggt_export.quant.modules import FloatQuantLinear

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path))
    layer_map, modules = matched_layers(proto, onnx_path, model,
                                        lambda m: isinstance(m, FloatQuantLinear) and m.format == "nvfp4",
                                        "nvfp4 FloatQuantLinear")
    existing = {o.name for o in proto.graph.output}
    wanted = sorted({t for entry in layer_map.values() for t in entry.values()} - existing)
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in wanted)
    evaluator = reference_evaluator(proto)
    names = list(evaluator.output_names)
    values = dict(zip(names, evaluator.run(None, {evaluator.input_names[0]: images.float().numpy()}), strict=True))

    position = {out: i for i, node in enumerate(proto.graph.node) for out in node.output}
    checks = []
    with torch.no_grad():
        for name, tensors in sorted(layer_map.items(), key=lambda item: position.get(item[1]["output"], 0)):
            module = modules[name]
            raw = torch.from_numpy(np.asarray(values[tensors["input"]], dtype=np.float32))
            transformed = np.asarray(values[tensors["transformed"]], dtype=np.float32)
            transform_rel = _rel(module.transform(raw).numpy(), transformed)
            x = torch.from_numpy(transformed)
            x_pt = ff.fake_quantize_nvfp4(x, ff.NVFP4_BLOCK_SIZE, module.input_global_scale[0])
            x_ref = np.asarray(values[tensors["codes"]], dtype=np.float32).reshape(x_pt.shape)
            flips, count = int((x_pt.numpy() != x_ref).sum()), int(x_ref.size)
            output_pt = (x_pt @ module.dequantized_weight().T + module.bias).numpy()
            output_rel = _rel(np.asarray(values[tensors["output"]], dtype=np.float32), output_pt)
            passed = (transform_rel <= NVFP4_TRANSFORM_REL_TOL and flips <= NVFP4_MAX_ACT_FLIP_FRACTION * count
                      and output_rel <= NVFP4_OUTPUT_REL_TOL)
            checks.append({"name": name, "transform_rel": transform_rel, "act_flips": flips, "act_count": count,
                           "output_rel": output_rel, "passed": passed})
    return {"first_failing_layer": next((c["name"] for c in checks if not c["passed"]), None),
            "criteria": {"transform_rel": NVFP4_TRANSFORM_REL_TOL, "act_flip_fraction": NVFP4_MAX_ACT_FLIP_FRACTION,
                         "output_rel": NVFP4_OUTPUT_REL_TOL},
            "runtime": NVFP4_RUNTIME, "layers": checks}


def layer_parity(model: nn.Module, onnx_path: str | os.PathLike[str], images: torch.Tensor, family: str
                 ) -> dict[str, Any]:
    """The teacher-forced layer-by-layer check of a quantized graph, per format family: ``"int"``
    (:func:`~qvggt_export.parity.localize.localize_divergence`, ONNX Runtime), ``"fp8"`` (:func:`fp8_layer_parity`,
    ONNX Runtime) or ``"nvfp4"`` (:func:`nvfp4_layer_parity`, ONNX's reference evaluator).

    Returns ``{"first_failing_layer", "criteria", "layers"}`` (plus ``runtime`` for nvfp4).
    """
    if family == "int":
        from qvggt_export.parity.localize import localize_divergence

        return localize_divergence(model, onnx_path, images).to_dict()
    if family == "fp8":
        return fp8_layer_parity(model, onnx_path, images)
    if family == "nvfp4":
        return nvfp4_layer_parity(model, onnx_path, images)
    raise QVGGTError(f"no layer-by-layer check for format family {family!r} (expected int, fp8 or nvfp4)")


def nvfp4_expected(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per nvfp4 layer of ``model``, the codes and scales the graph must carry, as
    :func:`~qvggt_export.export.qdq.check_nvfp4_structure` takes them: ``codes`` [out, in] E2M1 values,
    ``block_scales`` [out, in/16] E4M3 values, ``weight_global`` and ``input_global`` (floats)."""
    from qvggt_export.quant.modules import FloatQuantLinear

    return {name: {"codes": m.weight_code_values().numpy(), "block_scales": m.block_scale_values().numpy(),
                   "weight_global": float(m.weight_scale[0]), "input_global": float(m.input_global_scale[0])}
            for name, m in model.named_modules() if isinstance(m, FloatQuantLinear) and m.format == "nvfp4"}


def reference_parity(model: nn.Module, float_model: nn.Module | None, onnx_path: str | os.PathLike[str],
                     inputs: list[torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Outputs of ONNX's reference evaluator vs PyTorch, judged as ONNX Runtime parity is
    (:mod:`qvggt_export.parity.compare`): relative L2 <= max(1e-5, 2 x the quantization noise), worst input.

    Args:
        model: the fake-quant model the graph came from.
        float_model: the float model (sets the noise scale); ``None`` judges against 1e-5 alone.
        onnx_path: the graph (nvfp4 graphs included: the evaluator knows ``trt::TRT_FP4DynamicQuantize``).
        inputs: image batches [B, S, 3, H, W]. The evaluator is NumPy: keep them small.

    Returns:
        Per output name: ``max_abs``, ``max_rel``, ``rel_l2``, ``quant_noise_rel_l2``, ``tolerance``,
        ``criterion``, ``passed`` (the input closest to failing).
    """
    from qvggt_export.export.qdq import reference_evaluator

    evaluator = reference_evaluator(str(onnx_path))
    names = list(evaluator.output_names)
    worst: dict[str, dict[str, Any]] = {}
    for images in inputs:
        got = dict(zip(names, evaluator.run(None, {evaluator.input_names[0]: images.float().numpy()}), strict=True))
        with torch.no_grad():
            ref, flt = model(images), (float_model(images) if float_model is not None else None)
        for name in names:
            r, g = ref[name].float().numpy(), np.asarray(got[name], dtype=np.float32)
            diff = np.abs(g - r)
            rel = _rel(g, r)
            noise = _rel(flt[name].float().numpy(), r) if flt is not None else 0.0
            tolerance = max(FLOAT_MAX_REL, QUANT_NOISE_RATIO * noise)
            entry = {"max_abs": float(diff.max()), "max_rel": float(diff.max() / max(np.abs(r).max(), 1e-30)),
                     "rel_l2": rel, "quant_noise_rel_l2": noise, "tolerance": tolerance,
                     "criterion": f"rel_l2 <= max({FLOAT_MAX_REL:g}, {QUANT_NOISE_RATIO:g} x quant_noise_rel_l2)",
                     "passed": rel <= tolerance}
            if name not in worst or rel / tolerance > worst[name]["rel_l2"] / worst[name]["tolerance"]:
                worst[name] = entry
    return worst


def nvfp4_structure(model: nn.Module, onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`~qvggt_export.export.qdq.check_nvfp4_structure` of the graph against ``model``, plus
    ``first_failing_layer``: the first layer (in the model's module order) a failure names, else ``None``."""
    from qvggt_export.export.qdq import check_nvfp4_structure

    expected = nvfp4_expected(model)
    if not expected:
        raise QVGGTError("the PyTorch model has no nvfp4 layers to check the graph against")
    result = check_nvfp4_structure(onnx.load(str(onnx_path)), expected)
    named = {failure.split(": ", 1)[0] for failure in result["failures"]}
    return {**result, "first_failing_layer": next((layer for layer in expected if layer in named), None)}


def nvfp4_parity(model: nn.Module, float_model: nn.Module | None, onnx_path: str | os.PathLike[str],
                 inputs: list[torch.Tensor]) -> dict[str, Any]:
    """The export run's parity of an nvfp4 graph: :func:`nvfp4_structure`, :func:`reference_parity` and
    :func:`nvfp4_layer_parity` on the first input, with the reason ONNX Runtime is not used. ``passed`` needs all
    three."""
    structure = nvfp4_structure(model, onnx_path)
    del structure["first_failing_layer"]  # the export report's schema: failures name their layers
    outputs = reference_parity(model, float_model, onnx_path, inputs)
    layers = nvfp4_layer_parity(model, onnx_path, inputs[0])
    passed = (structure["passed"] and bool(outputs) and all(o["passed"] for o in outputs.values())
              and layers["first_failing_layer"] is None)
    return {"runtime": NVFP4_RUNTIME, "method": NVFP4_METHOD, "passed": passed,
            "inputs": [list(x.shape) for x in inputs], "outputs": outputs, "reason": NVFP4_REASON,
            "structure": structure, "layers": layers}
