"""Can NVIDIA ModelOpt's ONNX PTQ quantize the DPT heads' convolutions of our quantized export?

The widest quantization scope (``--quantize-scope all``) reaches every transformer linear; the DPT heads are
convolutions, which our Q/DQ writer does not cover. The plan (issue 15) was ModelOpt's ONNX PTQ
(``modelopt.onnx.quantization.quantize``, INT8 for TensorRT) on the exported graph, restricted to
``Conv`` / ``ConvTranspose`` (``op_types_to_quantize``), leaving our quantized linears alone. This script
runs exactly that on the ``tiny-dino`` W8A8 ``all``-scope export, and, as a control, on the float export of
the same model, and records what ModelOpt did (Q/DQ nodes before / after, its log) in
``benchmarks/results/modelopt_onnx_convs.{json,md}``.

    pip install 'qvggt-export[baseline]' onnx-graphsurgeon onnxslim onnxscript lief   # ModelOpt's ONNX deps
    python benchmarks/modelopt_onnx_convs.py
"""

from __future__ import annotations

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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "modelopt_onnx_convs.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# ModelOpt ONNX PTQ (INT8, Conv / ConvTranspose only) on our exports", "",
             f"`python benchmarks/modelopt_onnx_convs.py`: `tiny-dino`, {FRAMES} frames at {SIZE} px; ModelOpt "
             f"{results['fp32']['modelopt']}, `quantize(quantize_mode='int8', op_types_to_quantize=['Conv', "
             "'ConvTranspose'], calibration_method='max', calibration_eps=['cpu'])`.", "",
             "| graph | error | Q / DQ nodes before | Q / DQ nodes after | convs | ModelOpt log |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        after = row["after"] or {}
        lines.append(f"| {name} | {row['error'] or 'none'} | {row['before']['QuantizeLinear']} / "
                     f"{row['before']['DequantizeLinear']} | {after.get('QuantizeLinear', '-')} / "
                     f"{after.get('DequantizeLinear', '-')} | {row['before']['Conv+ConvTranspose']} | "
                     f"{'; '.join(row['log'])} |")
    lines += ["", "ModelOpt's INT8 ONNX PTQ (`modelopt/onnx/quantization/int8.py`) returns a graph that already has "
              "Q/DQ nodes unchanged (`if has_qdq_nodes(onnx_model): logger.info('Model already has QDQ nodes, "
              "skipping quantization')`), whatever `op_types_to_quantize` / `nodes_to_exclude` say; the control "
              "row shows it does run on this CPU-only machine and quantizes the float graph. So the DPT heads' "
              "convolutions stay float in every scope; quantizing them through ModelOpt would mean running it on the "
              "float export and moving its Conv Q/DQ nodes into ours (not done)."]
    (RESULTS / "modelopt_onnx_convs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
