"""Full-size export check: VGGT-1B (random weights), W4A4 round-to-nearest, ONNX with external data.

What it checks: that :func:`qvggt_export.export.export_onnx` handles a graph whose weights are over the
2 GiB protobuf limit (the aggregator's 192 linears packed to INT4, everything else stays float32), that the
result is written as ``model.onnx`` + ``model.onnx.data``, and that ``onnx.checker`` passes its *full* check
(shape inference included) on the file path, which is how the checker reads external data.

Why RTN and random weights: DSFQ needs calibration forward passes of the full-size model (87 s each for
2 frames at 518 on 2 cores); RTN quantizes from the weights alone, and the export's size, structure and
cost do not depend on the weights' values. The tracer runs one forward pass (2 frames at 518 x 518).

Records the time of each stage and the peak resident memory (``resource.getrusage``; ``ru_maxrss`` is the
process's high-water mark) after each stage, and rewrites the results after every stage, so a run that is
killed (memory, time) still says how far it got. Writes benchmarks/results/vggt1b_export.{json,md}.

    python benchmarks/vggt1b_export.py [--frames 2] [--size 518] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from qvggt_export.export import export_onnx
from qvggt_export.model import build_vggt
from qvggt_export.quant import QuantConfig, quantize_model

RESULTS = Path(__file__).resolve().parent / "results"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vggt1b_export.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# VGGT-1B W4A4 (RTN) ONNX export with external data", "",
             f"Machine: {results['machine']}; load average at start {results['load_average_start']}, "
             f"at end {results.get('load_average_end', 'n/a')}.", "",
             f"Model: `build_vggt(\"vggt-1b\")`, random weights (seed 0), {results['parameters'] / 1e9:.3f} B "
             f"parameters ({results['float_weight_bytes'] / 2**30:.2f} GiB as float32); W4A4 round-to-nearest on "
             f"the aggregator's linears; traced with {results['frames']} frames at {results['size']} x "
             f"{results['size']}.", "",
             f"Finished: **{results['finished']}**" + (f" (stopped at stage `{results['stage']}`: "
                                                       f"{results.get('error', 'killed')})"
                                                       if not results["finished"] else ""), "",
             "| stage | seconds | peak RSS after (GiB) |", "|---|---|---|"]
    for stage in results["stages"]:
        note = " (separate_process)" if stage.get("separate_process") else ""
        lines.append(f"| {stage['name']}{note} | {stage['seconds']:.1f} | {stage['peak_rss_gib']:.2f} |")
    if "export" in results:
        exp = results["export"]
        lines += ["", f"ONNX: {exp['onnx_bytes'] / 1e6:.1f} MB graph + {exp['data_bytes'] / 1e9:.3f} GB external "
                  f"data (`{exp['data_file']}`), total {exp['size_bytes'] / 1e9:.3f} GB; external data: "
                  f"{exp['external_data']}; {exp['num_nodes']} nodes, {exp['num_qlinear']} quantized linears, "
                  f"{exp['int4_initializers']} INT4 initializers ({exp['int4_bytes'] / 1e6:.1f} MB)."]
        if "inline_constant_bytes" in exp:
            lines += ["", f"Inside `model.onnx`: {exp['inline_constant_bytes'] / 1e6:.1f} MB of Constant-node tensors "
                      f"(constants the tracer froze at this resolution; the exporter moves initializers only) and "
                      f"{exp['inline_initializer_bytes'] / 1e6:.2f} MB of small initializers. Largest constants:", "",
                      "| node | shape | MB |", "|---|---|---|"]
            lines += [f"| `{c['node']}` | {c['shape']} | {c['bytes'] / 1e6:.1f} |"
                      for c in exp["largest_inline_constants"]]
    if "checker" in results:
        lines += ["", f"`onnx.checker.check_model(path, full_check=True)` on the file with external data: "
                  f"**{results['checker']}**."]
    if "onnxruntime" in results:
        outs = ", ".join(f"`{k}` {v['shape']}{'' if v['finite'] else ' NOT finite'}"
                         for k, v in results["onnxruntime"].items())
        lines += ["", f"ONNX Runtime (CPU) loads the graph with its external data and runs 1 frame: {outs}."]
    lines += ["", "Notes:", "",
              "- The first run of this benchmark stopped in `export_onnx` with protobuf's `EncodeError: Failed to "
              "serialize proto` at 13.5 GiB peak RSS: the exporter sized the graph with `ModelProto.ByteSize()`, "
              "which protobuf refuses above 2 GiB, the very case it had to detect. It now sums the tensors' bytes "
              "(`_tensor_bytes`); the table above is the run after that fix.",
              "- An earlier export held the depth and point heads' full-resolution position embeddings as Constant "
              "nodes ([128, 518, 518] float32, 137 MB each; graph file 315 MB). The heads now add the embedding as "
              "two 1-D factors ([C, 1, W] and [C, H, 1]), exactly, so the graph keeps O(C*(H+W)) constants.",
              "- The layer-by-layer parity check could not have run on such an export before: it linked the "
              "external data into a temporary folder, which ONNX Runtime 1.32 rejects (external data must sit in "
              "the model's folder, symlinks resolved); it now writes its temporary graph beside the original."]
    lines += ["", "Peak RSS is the process's high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`); stages "
              "marked `separate_process` ran in a second process on the kept export (`--ort-only`), with their own "
              "peak."]
    (RESULTS / "vggt1b_export.md").write_text("\n".join(lines) + "\n")


def _ort_stage(folder: Path, size: int, results: dict[str, Any], stage_done: Any) -> None:
    """ONNX Runtime (CPU, the parity session) loads the graph with its external data and runs one frame."""
    import numpy as np

    from qvggt_export.parity import onnxruntime_session

    results["stage"] = "onnxruntime"
    started = time.perf_counter()
    session = onnxruntime_session(folder / "model.onnx")
    stage_done("onnxruntime session (external data)", started)
    started = time.perf_counter()
    images = torch.rand(1, 1, 3, size, size, generator=torch.Generator().manual_seed(1)).numpy()
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images}), strict=True))
    results["onnxruntime"] = {name: {"shape": list(v.shape), "finite": bool(np.isfinite(v).all())}
                              for name, v in outputs.items()}
    stage_done("onnxruntime run (1 frame)", started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--keep", type=Path, help="keep the export in this folder (default: a temporary one)")
    parser.add_argument("--ort-only", type=Path, metavar="DIR",
                        help="only the ONNX Runtime stage, on an export kept with --keep (adds to the results)")
    args = parser.parse_args()
    if args.ort_only:
        results = json.loads((RESULTS / "vggt1b_export.json").read_text())
        results["stages"] = [s for s in results["stages"] if not s["name"].startswith("onnxruntime")]

        def record(name: str, started: float) -> None:
            results["stages"].append({"name": name, "seconds": round(time.perf_counter() - started, 2),
                                      "peak_rss_gib": round(_peak_rss_gib(), 3), "separate_process": True})
            _write(results)

        _ort_stage(args.ort_only, args.size, results, record)
        results["stage"] = "done"
        _write(results)
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, shared",
        "load_average_start": [round(x, 2) for x in os.getloadavg()], "frames": args.frames, "size": args.size,
        "torch": torch.__version__, "onnx": onnx.__version__, "finished": False, "stage": "build", "stages": [],
        "parameters": 0, "float_weight_bytes": 0}

    def stage_done(name: str, started: float) -> None:
        results["stages"].append({"name": name, "seconds": round(time.perf_counter() - started, 2),
                                  "peak_rss_gib": round(_peak_rss_gib(), 3)})
        _write(results)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="vggt1b-export-"))
    try:
        started = time.perf_counter()
        model = build_vggt("vggt-1b", seed=0).eval()
        results["parameters"] = sum(p.numel() for p in model.parameters())
        results["float_weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        stage_done("build_vggt", started)

        results["stage"] = "quantize"
        started = time.perf_counter()
        layers = quantize_model(model, QuantConfig(bits="w4a4", method="rtn"))
        results["quantized_layers"] = len(layers)
        stage_done("quantize (rtn w4a4)", started)

        results["stage"] = "export"
        started = time.perf_counter()
        images = torch.rand(1, args.frames, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        exported = export_onnx(model, folder / "model.onnx", images)
        stage_done("export_onnx (trace, lower, save, full check)", started)
        del model
        data = folder / "model.onnx.data"
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        int4 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT4]
        int4_bytes = sum(int(next((e.value for e in i.external_data if e.key == "length"), len(i.raw_data)))
                         for i in int4)
        results["export"] = {
            "external_data": exported.external_data, "size_bytes": exported.size_bytes,
            "onnx_bytes": (folder / "model.onnx").stat().st_size,
            "data_file": data.name if data.is_file() else None,
            "data_bytes": data.stat().st_size if data.is_file() else 0, "num_nodes": exported.num_nodes,
            "num_qlinear": exported.num_qlinear, "int4_initializers": len(int4), "int4_bytes": int4_bytes,
            "export_seconds": round(exported.export_seconds, 2),
            # what stays inside model.onnx: initializers under the 1 KiB external-data threshold and tensors
            # of Constant nodes (the exporter moves initializers only)
            "inline_initializer_bytes": sum(len(i.raw_data) for i in proto.graph.initializer),
            "inline_constant_bytes": sum(a.t.ByteSize() for n in proto.graph.node for a in n.attribute
                                         if a.type == onnx.AttributeProto.TENSOR),
            "largest_inline_constants": [
                {"node": name, "bytes": size, "shape": dims} for size, name, dims in sorted(
                    ((a.t.ByteSize(), n.name, list(a.t.dims)) for n in proto.graph.node for a in n.attribute
                     if a.type == onnx.AttributeProto.TENSOR), reverse=True)[:8]]}
        del proto

        # The exporter already ran the full check; run it again here, independently, on the saved files.
        results["stage"] = "checker"
        started = time.perf_counter()
        onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
        results["checker"] = "passed"
        stage_done("onnx.checker full check (path, external data)", started)
        _ort_stage(folder, args.size, results, stage_done)
        results["finished"] = True
        results["stage"] = "done"
    except BaseException as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results["peak_rss_gib"] = round(_peak_rss_gib(), 3)
        _write(results)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
