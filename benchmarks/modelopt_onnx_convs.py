"""Can NVIDIA ModelOpt's ONNX PTQ quantize the DPT heads' convolutions of our quantized export?

The widest quantization scope (``--quantize-scope all``) reaches every transformer linear; the DPT heads are
convolutions, which our Q/DQ writer does not cover. The plan (issue 15) was ModelOpt's ONNX PTQ
(``modelopt.onnx.quantization.quantize``, INT8 for TensorRT) on the exported graph, restricted to
``Conv`` / ``ConvTranspose`` (``op_types_to_quantize``), leaving our quantized linears alone. This script
runs exactly that on the ``tiny-dino`` W8A8 ``all``-scope export, and, as a control, on the float export of
the same model, and records what ModelOpt did (Q/DQ nodes before / after, its log) in
``benchmarks/results/modelopt_onnx_convs.{json,md}``.

ModelOpt skips graphs that already hold Q/DQ nodes, so the script then does the next best thing without a
hand-written quantizer: it takes ModelOpt's Conv Q/DQ nodes (scales calibrated by ModelOpt on the float
export, which has the same Conv nodes and input tensor names as ours) and splices them into our export
(:func:`splice_conv_qdq`), and measures the effect: ONNX size, accuracy vs the float model in ONNX Runtime
(parity settings), and the TensorRT-RTX engine size (profile ``rtx-sm89``), with and without the convs in INT8.

    pip install 'qvggt-export[baseline]' onnx-graphsurgeon onnxslim onnxscript lief   # ModelOpt's ONNX deps
    python benchmarks/modelopt_onnx_convs.py
"""

from __future__ import annotations

import copy
import io
import json
import logging
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from qvggt_export.export import export_onnx
from qvggt_export.model import build_vggt
from qvggt_export.quant import QuantConfig
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.roles import scope_roles

RESULTS = Path(__file__).resolve().parent / "results"
SIZE, FRAMES = 56, 2


def _count(path: Path) -> dict[str, int]:
    ops = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
    return {"nodes": len(ops), "QuantizeLinear": ops.count("QuantizeLinear"),
            "DequantizeLinear": ops.count("DequantizeLinear"), "Conv+ConvTranspose": ops.count("Conv")
            + ops.count("ConvTranspose")}


def _modelopt(path: Path, images: np.ndarray) -> dict[str, Any]:
    import modelopt
    from modelopt.onnx.quantization import quantize

    out = path.with_name(path.stem + ".modelopt.onnx")
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    logging.getLogger().addHandler(handler)
    try:
        with redirect_stdout(captured), redirect_stderr(captured):
            quantize(str(path), quantize_mode="int8", calibration_data={"images": images}, calibration_method="max",
                     op_types_to_quantize=["Conv", "ConvTranspose"], output_path=str(out),
                     calibration_eps=["cpu"], high_precision_dtype="fp32")
        error = None
    except Exception as exc:  # report whatever ModelOpt raises, verbatim
        error = f"{type(exc).__name__}: {exc}"
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [line.split(" - ")[-1] for line in captured.getvalue().splitlines()]  # drop logger timestamps
    log = list(dict.fromkeys(line for line in lines if "QDQ" in line or "quantized nodes" in line))
    return {"modelopt": modelopt.__version__, "error": error, "before": _count(path),
            "after": _count(out) if out.is_file() else None, "log": log[:6]}


def splice_conv_qdq(ours: onnx.ModelProto, quantized: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``ours`` with the Q/DQ nodes that feed ``quantized``'s Conv / ConvTranspose nodes, matched by node name.

    Both graphs come from the same model structure, so Conv names and their input tensor names agree (checked).
    Returns the new model and the number of convolutions that got Q/DQ inputs.
    """
    producers = {out: node for node in quantized.graph.node for out in node.output}
    q_inits = {init.name: init for init in quantized.graph.initializer}
    ours = copy.deepcopy(ours)
    our_convs = {n.name: n for n in ours.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    existing = {init.name for init in ours.graph.initializer}
    inserted: dict[str, list[onnx.NodeProto]] = {}
    placed: set[str] = set()  # a Q/DQ pair on a tensor several convolutions read is inserted once
    for conv in (n for n in quantized.graph.node if n.op_type in ("Conv", "ConvTranspose")):
        target = our_convs.get(conv.name)
        chain: list[onnx.NodeProto] = []
        for index, name in enumerate(conv.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            original = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None
            if target is None or (original is not None and target.input[index] != original):
                raise ValueError(f"{conv.name}: input {index} differs between the graphs; cannot splice")
            chain += [n for n in ([q] if original is not None else []) + [dq] if n.name not in placed]
            placed.update(n.name for n in chain)
            target.input[index] = dq.output[0]
            for node in chain:
                for init_name in node.input:
                    if init_name in q_inits and init_name not in existing:
                        ours.graph.initializer.append(q_inits[init_name])
                        existing.add(init_name)
        if chain:
            inserted[conv.name] = chain
    nodes = []
    for node in ours.graph.node:
        nodes.extend(inserted.get(node.name, []) if node.op_type in ("Conv", "ConvTranspose") else [])
        nodes.append(node)
    del ours.graph.node[:]
    ours.graph.node.extend(nodes)
    used = {name for node in ours.graph.node for name in node.input}
    kept = [init for init in ours.graph.initializer if init.name in used]
    del ours.graph.initializer[:]
    ours.graph.initializer.extend(kept)
    return ours, len(inserted)


def _effect(folder: Path, ours: Path, spliced: onnx.ModelProto, float_model: Any, images: torch.Tensor) -> dict:
    """ONNX bytes, accuracy vs float (ONNX Runtime, parity settings) and TensorRT-RTX engine bytes, both graphs."""
    from qvggt_export.engine import build_engine
    from qvggt_export.engine.hadamard import plugin_graph
    from qvggt_export.onnxrt import parity_session_options
    from qvggt_export.plugins import register

    onnx.save(spliced, str(folder / "spliced.onnx"))
    held_out = torch.rand(1, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = {k: v.numpy() for k, v in float_model(held_out).items() if isinstance(v, torch.Tensor)}
    ort, options = parity_session_options()
    register("rtx")
    rows = {}
    for label, path in (("ours (convs float)", ours), ("ours + ModelOpt INT8 convs", folder / "spliced.onnx")):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {"images": held_out.numpy()}), strict=True))
        errors = {k: float(f"{np.linalg.norm(outputs[k] - v) / max(np.linalg.norm(v), 1e-30):.3g}")
                  for k, v in reference.items() if k in outputs}
        graph, _ = plugin_graph(path, folder, path.stem + ".plugin.onnx")
        engine = build_engine(graph, folder / f"{path.stem}.engine", "rtx-sm89")
        rows[label] = {"onnx_bytes": path.stat().st_size, "rel_l2_vs_float": errors,
                       "engine_bytes": engine.size_bytes, "gemm_precisions": engine.gemm_precisions,
                       "layer_types": engine.layer_types}
    return rows


def main() -> None:
    float_model = build_vggt("tiny-dino")
    images = torch.rand(1, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model = build_vggt("tiny-dino")
    calibrate(model, QuantConfig(bits="w8a8", method="dsfq", roles=scope_roles("all", model)), [images])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="modelopt_convs_") as tmp:
        folder = Path(tmp)
        export_onnx(model, folder / "w8a8_all.onnx", images)
        export_onnx(float_model, folder / "fp32.onnx", images)
        for name in ("w8a8_all", "fp32"):
            results[name] = _modelopt(folder / f"{name}.onnx", images.numpy())
        spliced, convs = splice_conv_qdq(onnx.load(str(folder / "w8a8_all.onnx")),
                                         onnx.load(str(folder / "fp32.modelopt.onnx")))
        effect = _effect(folder, folder / "w8a8_all.onnx", spliced, float_model, images)
    results["splice"] = {"convs_with_qdq": convs, "rows": effect}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "modelopt_onnx_convs.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# ModelOpt ONNX PTQ (INT8, Conv / ConvTranspose only) on our exports", "",
             f"`python benchmarks/modelopt_onnx_convs.py`: `tiny-dino`, {FRAMES} frames at {SIZE} px; ModelOpt "
             f"{results['fp32']['modelopt']}, `quantize(quantize_mode='int8', op_types_to_quantize=['Conv', "
             "'ConvTranspose'], calibration_method='max', calibration_eps=['cpu'])`.", "",
             "| graph | error | Q / DQ nodes before | Q / DQ nodes after | convs | ModelOpt log |",
             "|---|---|---|---|---|---|"]
    for name in ("w8a8_all", "fp32"):
        row = results[name]
        after = row["after"] or {}
        lines.append(f"| {name} | {row['error'] or 'none'} | {row['before']['QuantizeLinear']} / "
                     f"{row['before']['DequantizeLinear']} | {after.get('QuantizeLinear', '-')} / "
                     f"{after.get('DequantizeLinear', '-')} | {row['before']['Conv+ConvTranspose']} | "
                     f"{'; '.join(row['log'])} |")
    lines += ["", "ModelOpt's INT8 ONNX PTQ (`modelopt/onnx/quantization/int8.py`) returns a graph that already has "
              "Q/DQ nodes unchanged (`if has_qdq_nodes(onnx_model): logger.info('Model already has QDQ nodes, "
              "skipping quantization')`), whatever `op_types_to_quantize` / `nodes_to_exclude` say; the control "
              "row shows it does run on this CPU-only machine and quantizes the float graph. So the DPT heads' "
              "convolutions stay float in every scope of the pipeline; the table below measures what running ModelOpt "
              "on the float export and moving its Conv Q/DQ nodes into ours would give (a measurement, not wired "
              "into the pipeline)."]
    lines += ["", f"Spliced: ModelOpt's Q/DQ inputs of {convs} convolutions (from the `fp32` row's output) moved into "
              "the `w8a8_all` export by node name (`splice_conv_qdq`); ONNX Runtime with the parity settings "
              "(integer fusions off), held-out batch; TensorRT-RTX engines for `rtx-sm89`.", "",
              "| graph | ONNX bytes | engine bytes | GEMMs | worst rel L2 vs float | rel L2 per output |",
              "|---|---:|---:|---|---:|---|"]
    for label, row in effect.items():
        errors = row["rel_l2_vs_float"]
        lines.append(f"| {label} | {row['onnx_bytes']:,} | {row['engine_bytes']:,} | {row['gemm_precisions']} | "
                     f"{max(errors.values()):.3g} | {', '.join(f'{k} {v:.3g}' for k, v in errors.items())} |")
    (RESULTS / "modelopt_onnx_convs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
