"""Tracking engines (``track.engine``) per format on ``tiny``: size, layers, GEMM types, build time.

Runs the pipeline (``--export-track``, engines built with TensorRT-RTX on this CPU-only machine; nothing is
executed) for each format with its default engine profile and lowering, and records the main and the track
engine side by side.

    python benchmarks/track_engine.py [--formats w4a4,w8a8,fp8,nvfp4]  # about 3-5 min

Writes benchmarks/results/track_engine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from qvggt_export.pipeline import PipelineConfig, run_pipeline

RESULTS = Path(__file__).parent / "results"
# None: ONNX Runtime cannot run the graph (NVFP4: no FLOAT4E2M1 Q/DQ, no TRT_FP4DynamicQuantize kernel)
PARITY = {True: "ok", False: "FAILED", None: "not run (ONNX Runtime has no NVFP4)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="w4a4,w8a8,fp8,nvfp4")
    parser.add_argument("--render", type=Path, help="only re-render the markdown of an existing results JSON")
    args = parser.parse_args()
    if args.render is not None:
        args.render.with_suffix(".md").write_text(render(json.loads(args.render.read_text())))
        return
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.formats.split(","):
            report = run_pipeline(PipelineConfig(out_dir=Path(tmp) / bits, bits=bits, export_track=True,
                                                 progress=False))
            main_engine, track_engine = report["engine"], report["track"]["engine"]
            if not track_engine.get("path"):
                rows.append({"bits": bits, "error": track_engine.get("reason")})
                continue
            rows.append({
                "bits": bits, "profile": track_engine["profile_name"],
                "lowering": (track_engine.get("lowering") or {}).get("target"),
                "targets": track_engine["target_sms"], "points": track_engine["profile"]["points"],
                "track_mb": round(track_engine["size_bytes"] / 1e6, 2), "track_layers": track_engine["num_layers"],
                "track_gemms": track_engine["gemm_precisions"],
                "track_build_s": round(track_engine["build_seconds"], 1),
                "main_mb": round(main_engine["size_bytes"] / 1e6, 2), "main_layers": main_engine["num_layers"],
                "track_parity_passed": report["track"]["parity"]["passed"]})
            print(rows[-1], flush=True)
    result = {"model": "tiny", "size": 70, "backend": "TensorRT-RTX (build only, CPU)",
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "track_engine.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "track_engine.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    rows = result["rows"]
    load = result["load_average_before_after"]
    lines = ["# Tracking engines per format (`tiny`, 70 x 70, TensorRT-RTX builds on a CPU-only machine; "
             "none executed)", "", f"Load average {load[0]} -> {load[1]}. Default engine profile and lowering per "
             "format; the track graph's ONNX Runtime parity as in the pipeline.",
             "", "| format | profile / targets | lowering | track engine MB (layers) | track GEMMs | main engine MB "
             "(layers) | track build s | track parity |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['bits']} | not built: {r['error']} | | | | | | |")
            continue
        gemms = ", ".join(f"{n} x {k}" for k, n in sorted(r["track_gemms"].items()))
        lines.append(f"| {r['bits']} | {r['profile']} / {' '.join(r['targets'])} | {r['lowering']} | {r['track_mb']} "
                     f"({r['track_layers']}) | {gemms} | {r['main_mb']} ({r['main_layers']}) | {r['track_build_s']} | "
                     f"{PARITY[r['track_parity_passed']]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
