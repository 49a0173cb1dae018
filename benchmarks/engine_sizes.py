"""Engine size, layer count and GEMM precisions per format and lowering, vs an FP16 engine of the same model.

For each model (``tiny`` and ``wide``: an aggregator-dominated config, 16 blocks of width 512 and only a depth
head, so that the quantized linears hold ~95 % of the weights, as they would in an engine whose other parts
are small) this builds TensorRT-RTX engines without a GPU:

* the float model: FP32 export, and the FP16 reference (the FP32 export through ``to_float16``: a strongly
  typed FP16 network);
* W8A8 and W6A6 (DSFQ): as written, ``int8-static``, ``int8-static`` + FP16 float parts;
* W4A4 (DSFQ): as written, ``w4a8``, ``w4a16``, ``w4a16`` + FP16 float parts;
* W4A4 as written with the three forms of the online Hadamard: the ``qvggt::Hadamard`` plugin (the default of
  every other row), the inlined ONNX function, and a dense d x d MatMul;
* fp8 / nvfp4 when the installed package can quantize and export them (skipped with the reason otherwise).

Each row records the engine's size, its ratio to the FP16 engine, layer count and types, GEMM operand types
(from the builder's per-layer report), attention fusion, build time, the ONNX initializer bytes split into
quantized-layer weights and everything else, and the lowering's accuracy in ONNX Runtime (vs the canonical
graph and vs the float PyTorch model, on one held-out random batch; static scales from one calibration batch).

    python benchmarks/engine_sizes.py                  # both models, ~15-25 min on 2 busy cores
    python benchmarks/engine_sizes.py --models tiny    # ~8 min

Results: ``benchmarks/results/engine_sizes.{json,md}``. Nothing here runs an engine (no GPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import onnx
import torch

from qvggt_export.engine import EngineProfile, build_engine, load_backend
from qvggt_export.engine.hadamard import retarget_hadamard
from qvggt_export.engine.lowering import lower_for_target, to_float16
from qvggt_export.errors import QVGGTError
from qvggt_export.export import export_onnx
from qvggt_export.model import build_vggt
from qvggt_export.model.config import AggregatorConfig, DPTHeadConfig, VGGTConfig
from qvggt_export.quant import QuantConfig
from qvggt_export.quant.calibrate import calibrate

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "rtx-sm89"  # one architecture: smaller engines, faster builds; sizes scale the same way
# NVFP4 builds only for Blackwell; its rows are built for SM120 instead (so their sizes are for another target).
NVFP4_PROFILE = EngineProfile(name="rtx-sm120", backend="rtx", compute_capabilities=("SM120",))
SIZE = 70
GOAL = 3.5


def wide_config(dim: int = 512) -> VGGTConfig:
    """Aggregator-dominated: 8 frame + 8 global blocks of width ``dim`` (64 quantized linears: 50 M weights at
    512, 201 M at 1024, VGGT-1B's width), a conv patch embed and one small DPT depth head."""
    token_dim = 2 * dim
    return VGGTConfig(
        name="wide" if dim == 512 else f"wide{dim}",
        aggregator=AggregatorConfig(img_size=SIZE, embed_dim=dim, depth=8, num_heads=dim // 64, patch_embed="conv"),
        camera_head=None,
        depth_head=DPTHeadConfig(dim_in=token_dim, features=32, out_channels=(16, 32, 64, 64),
                                 intermediate_layer_idx=(1, 3, 5, 7), output_dim=2, activation="exp"),
        point_head=None,
        track_head=None,
    )


def _images(seed: int, frames: int = 2) -> torch.Tensor:
    return torch.rand(1, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    quantized = other = 0
    for init in model.graph.initializer:
        size = len(init.raw_data) if init.HasField("raw_data") else init.ByteSize()
        if init.name.endswith("/weight_q") or init.name.endswith("/weight_scale_blocks"):
            quantized += size
        else:
            other += size
    return {"quantized_weight_bytes": quantized, "other_initializer_bytes": other}


def _build(proto: onnx.ModelProto, folder: Path, name: str, hadamard: str = "plugin",
           profile: Any = PROFILE) -> dict[str, Any]:
    proto = copy.deepcopy(proto)
    plugin_nodes = retarget_hadamard(proto, hadamard) if hadamard != "function" else 0
    path = folder / f"{name}.onnx"
    onnx.save(proto, str(path))
    row: dict[str, Any] = {"hadamard": hadamard if plugin_nodes or hadamard == "function" else "none",
                           "onnx_bytes": path.stat().st_size, **_initializer_bytes(proto)}
    try:
        result = build_engine(path, folder / f"{name}.engine", profile)
    except QVGGTError as exc:
        row["engine_error"] = str(exc).splitlines()[0][:300]
        return row
    row.update(engine_bytes=result.size_bytes, layers=result.num_layers, layer_types=result.layer_types,
               gemm_precisions=result.gemm_precisions, attention=result.attention,
               build_seconds=round(result.build_seconds, 1))
    for suffix in ("", ".build.log", ".profile.json"):
        (folder / f"{name}.engine{suffix}").unlink(missing_ok=True)  # keep the temp folder small
    return row


def _accuracy(info: Any) -> dict[str, Any]:
    worst = info.accuracy.get("worst_rel_l2", {})
    return {key: float(f"{value['rel_l2']:.3g}") for key, value in worst.items() if value is not None}


def run_model(name: str, config: str | VGGTConfig, folder: Path, formats: list[str],
              quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    float_model = build_vggt(config)
    params = sum(p.numel() for p in float_model.parameters())
    calibration, held_out = [_images(0)], [_images(1)]
    with torch.no_grad():
        float_outputs = [{k: v.numpy() for k, v in float_model(x).items() if isinstance(v, torch.Tensor)}
                         for x in held_out]

    def add(fmt: str, lowering: str, row: dict[str, Any], **extra: Any) -> None:
        rows.append({"model": name, "params": params, "format": fmt, "lowering": lowering, **extra, **row})
        engine = row.get("engine_bytes")
        print(f"{name:5} {fmt:6} {lowering:22} {row.get('hadamard', ''):8} engine {engine} layers "
              f"{row.get('layers')} gemm {row.get('gemm_precisions')} {row.get('engine_error', '')}", flush=True)

    export_onnx(float_model, folder / "fp32.onnx", calibration[0])
    fp32 = onnx.load(str(folder / "fp32.onnx"))
    if not quick:
        add("fp32", "as-written", _build(fp32, folder, "fp32"))
    add("fp16", "to_float16", _build(to_float16(fp32), folder, "fp16"))
    del fp32

    for fmt in formats:
        model = copy.deepcopy(float_model)
        try:
            calibrate(model, QuantConfig(bits=fmt, method="dsfq" if fmt.startswith("w") else "rtn"), calibration)
            # NVFP4 needs opset 23 (FLOAT4E2M1) and a Blackwell target (check_format_targets).
            export_onnx(model, folder / f"{fmt}.onnx", calibration[0], **({"opset": 23} if fmt == "nvfp4" else {}))
        except (QVGGTError, ValueError, TypeError) as exc:
            rows.append({"model": name, "params": params, "format": fmt, "lowering": "-",
                         "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(f"{name} {fmt}: skipped ({exc})", flush=True)
            continue
        canonical = onnx.load(str(folder / f"{fmt}.onnx"))
        lowerings: list[tuple[str, bool]] = [("as-written", False)]
        if fmt in ("w8a8", "w6a6"):
            lowerings += [("int8-static", False), ("int8-static", True)]
        elif fmt == "w4a4":
            lowerings += ([] if quick else [("w4a8", False)]) + [("w4a16", False), ("w4a16", True)]
        for target, half in lowerings:
            try:
                lowered, info = lower_for_target(canonical, target, calibration_inputs=calibration,
                                                 eval_inputs=held_out, float_outputs=float_outputs, float16=half)
            except QVGGTError as exc:
                add(fmt, target, {"lowering_error": str(exc)[:300]})
                continue
            label = target + (" + fp16" if half else "")
            profile = NVFP4_PROFILE if fmt == "nvfp4" else PROFILE
            add(fmt, label, _build(lowered, folder, f"{fmt}-{target}{'-fp16' if half else ''}", profile=profile),
                accuracy_worst_rel_l2=_accuracy(info), lowering_seconds=round(info.seconds, 1))
        if fmt == "w4a4" and not quick:
            for hadamard in ("function", "dense"):
                add(fmt, "as-written", _build(canonical, folder, f"{fmt}-{hadamard}", hadamard=hadamard))
    return rows


def _ratio(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["format"] == "fp16"), None)
        if ref and ref.get("engine_bytes") and row.get("engine_bytes"):
            row["fp16_engine_over_this"] = round(ref["engine_bytes"] / row["engine_bytes"], 3)


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Engine sizes per format and lowering (TensorRT-RTX, built without a GPU)",
        "",
        f"`python benchmarks/engine_sizes.py` on {result['machine']}, {result['backend']}, profile `{PROFILE}` "
        f"(SM89 only), load average {result['load_average_before_after'][0]} before / "
        f"{result['load_average_before_after'][1]} after (a shared 2-core machine: build times are noisy; sizes "
        "and layer counts are not). Engine size goal: W4A4 >= "
        f"{GOAL}x smaller than the FP16 engine.",
        "",
        "Columns: *fp16/this* = FP16 engine size / this engine's size; *q-weights* / *other* = ONNX initializer "
        "bytes of the quantized layers' weight codes / of everything else (float weights, scales, biases, "
        "Hadamard matrices); *gemm* = GEMM layers by operand types from the builder's per-layer report; "
        "*attn* = fused MHA kernels / unfused Softmax layers; *err* = worst output relative L2 of the lowered "
        "graph in ONNX Runtime vs the float PyTorch model (canonical graph's own error in brackets).",
        "",
    ]
    for model in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model]
        lines += [f"## `{model}` ({rows[0]['params'] / 1e6:.2f} M parameters)", "",
                  "| format | lowering | hadamard | engine bytes | fp16/this | layers | q-weights | other | gemm | "
                  "attn | err vs float | build s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|---|---|---:|"]
        canonical_err: dict[str, float] = {}
        for r in rows:
            acc = r.get("accuracy_worst_rel_l2", {})
            if "canonical_vs_float" in acc:
                canonical_err[r["format"]] = acc["canonical_vs_float"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['format']} | skipped: {r['skipped']} | | | | | | | | | | |")
                continue
            if "lowering_error" in r or "engine_error" in r:
                lines.append(f"| {r['format']} | {r['lowering']} | {r.get('hadamard', '')} | failed: "
                             f"{r.get('lowering_error') or r.get('engine_error')} | | | | | | | | |")
                continue
            acc = r.get("accuracy_worst_rel_l2", {})
            err = ""
            if "lowered_vs_float" in acc:
                err = f"{acc['lowered_vs_float']:.2e} ({canonical_err.get(r['format'], float('nan')):.2e})"
            gemm = ", ".join(f"{k}: {v}" for k, v in r.get("gemm_precisions", {}).items())
            att = r.get("attention", {})
            attn = f"{att.get('fused_mha_layers', '?')} / {att.get('unfused_softmax_layers', '?')}" if att else ""
            lines.append(
                f"| {r['format']} | {r['lowering']} | {r.get('hadamard', '')} | {r['engine_bytes']:,} | "
                f"{r.get('fp16_engine_over_this', '')} | {r['layers']} | {r['quantized_weight_bytes']:,} | "
                f"{r['other_initializer_bytes']:,} | {gemm} | {attn} | {err} | {r.get('build_seconds', '')} |")
        lines.append("")
    lines += result.get("findings", [])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,wide", help="comma-separated: tiny, wide, wide1024")
    parser.add_argument("--quick", action="store_true",
                        help="only the FP16 reference and the as-written / w4a16 rows (for big models)")
    parser.add_argument("--formats", default="w8a8,w6a6,w4a4,fp8,nvfp4")
    parser.add_argument("--out", default=str(RESULTS / "engine_sizes"), help="results path without extension")
    args = parser.parse_args()
    from qvggt_export.plugins import register

    register("rtx")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for model in models:
        config: str | VGGTConfig = wide_config(int(model[4:] or 512)) if model.startswith("wide") else model
        with tempfile.TemporaryDirectory(prefix=f"engine_sizes_{model}_") as tmp:
            try:
                rows += run_model(model, config, Path(tmp), formats, quick=args.quick)
            except Exception:  # keep the rows of the other model; the traceback says what broke
                traceback.print_exc()
    _ratio(rows)
    be = load_backend("rtx")
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs",
        "backend": f"{be.display_name} {be.version}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "profile": PROFILE,
        "models": models,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "configs": {m: dataclasses.asdict(wide_config(int(m[4:] or 512))) for m in models if m.startswith("wide")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {out}.json and .md in {result['wall_seconds']} s")


if __name__ == "__main__":
    main()
