"""``qvggt-export eval --fidelity`` on the real clips: W4A4 rtn (Base) vs dsfq on the planted-outlier model.

For each method: one ``run_pipeline`` (``tiny-outliers``, W4A4, generated calibration sequences, no engine),
then :func:`qvggt_export.eval.evaluate` in fidelity mode on ``../shared/data/sequences`` (real photos; the float
model's cameras, depth and point maps are the reference). The model has random weights with planted outliers:
the numbers compare methods on one model and say nothing about trained VGGT-1B.

Writes benchmarks/results/eval_fidelity.{json,md}.

    python benchmarks/eval_fidelity.py [--max-sequences 4] [--frames 4]    # about 4-5 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "sequences"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rtn", "dsfq"])
    parser.add_argument("--max-sequences", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"real sequences not found at {args.data}", file=sys.stderr)
        return 2
    import torch

    from qvggt_export.eval.evaluate import EvalConfig, evaluate, table_rows
    from qvggt_export.pipeline import PipelineConfig, run_pipeline

    torch.set_num_threads(2)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            out = Path(tmp) / method
            started = time.perf_counter()
            run_pipeline(PipelineConfig(out_dir=out, bits="w4a4", model="tiny-outliers", method=method,
                                        engine=False, progress=False))
            report = evaluate(EvalConfig(out_dir=out, data=args.data, fidelity=True, frames=args.frames,
                                         max_sequences=args.max_sequences, progress=False))
            report.pop("report_path", None)
            report["wall_s"] = round(time.perf_counter() - started, 1)
            results[method] = report
            (_, values), = table_rows(report)
            extent = report["results"]["quantized_vs_float"]["points"]["extent"]
            rows.append(f"| {method} | " + " | ".join(values) + f" | {extent:.4f} |")
    sequences = results[args.methods[0]]["sequences"]
    data = args.data.resolve()
    meta = {"model": "tiny-outliers (random weights, planted outliers)", "bits": "w4a4",
            "data": str(data.relative_to(ROOT.parent)) if data.is_relative_to(ROOT.parent) else str(data),
            "frames": args.frames, "sequences": sequences, "torch": torch.__version__,
            "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_fidelity.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# Fidelity evaluation: W4A4 quantized vs float, real clips",
        "",
        f"`python benchmarks/eval_fidelity.py` ({meta['model']}, {sequences} windows of {args.frames} frames from "
        f"`{meta['data']}`, PyTorch fake quant; reference: the float model's outputs). AUC in percent over all frame "
        "pairs (VGGT's integer-degree definition), RRA / RTA mean degrees, depth after per-frame median scaling, "
        "points after Umeyama alignment (Acc / Comp in the float model's units; extent: the float point cloud's "
        "median distance to its centroid, in the same units).",
        "",
        "| method | AUC@30 | AUC@15 | AUC@5 | AUC@3 | RRA | RTA | AbsRel | d<1.25 | Acc | Comp | NC | extent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    (RESULTS / "eval_fidelity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
