"""Full-size engines: VGGT-1B (random weights), DSFQ W4A4 at each quantization scope, vs the FP16 engine.

Per job (``all``, ``fp16``, ``aggregator``, ``backbone``: the widest scope first, so that a run cut short
still answers the size goal), three stages, each timed with its own peak RSS:

1. **transform**: ``build_vggt("vggt-1b")`` (seed 0) and DSFQ W4A4 (``calibrate``) on the scope's linears
   (:func:`qvggt_export.quant.roles.scope_roles`), calibrated on one generated sequence; none for ``fp16``;
2. **export**: :func:`qvggt_export.export.export_onnx` with external data (``fp16``: ``precision="fp16"``);
3. **engine**: :func:`qvggt_export.engine.stage.build_engine_for_target` with TensorRT-RTX for one target
   (profile ``rtx-sm89``, frames 1..32), the Hadamard plugin form; W4A4 lowered to ``w4a16`` (TensorRT-RTX's
   default for W4A4) with the float parts in FP16 (``--engine-fp16``), so that the engine is compared with
   an FP16 engine on equal terms (the canonical graph's float parts are FP32).

Stages 1-2 run in one worker process (the quantized model passes from one to the other in memory), stage 3
in a second one; each worker reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (its own high-water
mark) after each stage, so the export's peak includes the model built in stage 1. The orchestrator rewrites
``benchmarks/results/vggt1b_engine.{json,md}`` after every stage: a run that is stopped keeps what it
measured.

Device memory per frame count (10, 20, 30 frames) is what an *execution context* reports
(``IExecutionContext.update_device_memory_size_for_shapes`` after ``set_input_shape``): it needs the
engine deserialized, hence a CUDA GPU of a targeted architecture. Without one the benchmark records that,
plus the memory lines of the builder's log (what the builder says without a GPU).

    python benchmarks/vggt1b_engine.py [--jobs all fp16 aggregator backbone] [--size 518] [--work DIR]
    python benchmarks/vggt1b_engine.py --device-memory ENGINE   # on a GPU host: 10/20/30-frame memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "vggt1b_engine"
PROFILE = "rtx-sm89"
JOBS = ("all", "fp16", "aggregator", "backbone")
FRAME_COUNTS = (10, 20, 30)
GOAL_RATIO, GOAL_SECONDS, GOAL_RSS_GIB = 3.5, 600, 12.0
_MEMORY_WORDS = ("memory", "MiB", "MB]", "bytes")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _images(size: int, frames: int, seed: int) -> Any:
    import torch

    return torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Workers (one process per group of stages)
# ----------------------------------------------------------------------------------------------------------


def worker_prepare(job: str, work: Path, size: int, frames: int, preset: str = "vggt-1b") -> list[dict[str, Any]]:
    """Stages 1-2: transform (DSFQ W4A4 at ``job``'s scope; nothing for fp16) and export."""
    from qvggt_export.export import export_onnx
    from qvggt_export.model import build_vggt
    from qvggt_export.quant import QuantConfig
    from qvggt_export.quant.calibrate import calibrate
    from qvggt_export.quant.roles import find_targets, scope_roles, scope_summary

    stages = []
    started = time.perf_counter()
    model = build_vggt(preset, seed=0)
    images = _images(size, frames, seed=0)
    transform: dict[str, Any] = {"stage": "transform"}
    if job != "fp16":
        config = QuantConfig(bits="w4a4", method="dsfq", roles=scope_roles(job, model))
        targets = find_targets(model, config.roles)
        transform["scope"] = {k: v for k, v in scope_summary(model, targets, job).items() if k != "layers"}
        transform["scope"]["layers"] = len(targets)
        calibrate(model, config, [images])
    transform.update(seconds=round(time.perf_counter() - started, 1), peak_rss_gib=round(_peak_rss_gib(), 2))
    stages.append(transform)
    _emit(work, job, "transform", transform)

    started = time.perf_counter()
    folder = work / job
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    exported = export_onnx(model, folder / "model.onnx", images, precision="fp16" if job == "fp16" else "fp32")
    export = {"stage": "export", "seconds": round(time.perf_counter() - started, 1),
              "peak_rss_gib": round(_peak_rss_gib(), 2), "onnx_bytes": exported.size_bytes,
              "external_data": exported.external_data, "quantized_linears": exported.num_qlinear,
              "initializer_bytes_by_part": initializer_bytes_by_part(folder / "model.onnx")}
    _emit(work, job, "export", export)
    return [transform, export]


def worker_engine(job: str, work: Path) -> dict[str, Any]:
    """Stage 3: the TensorRT-RTX engine from the export (Hadamard plugin, graph as written)."""
    from qvggt_export.engine.stage import EngineTarget, build_engine_for_target

    folder = work / job
    started = time.perf_counter()
    quantized = job != "fp16"
    target = EngineTarget(bits="w4a4" if quantized else "fp16", profile=PROFILE,
                          lowering="w4a16" if quantized else "as-written", float16=quantized, backend="rtx",
                          hadamard="plugin", rotates=quantized)
    report = build_engine_for_target(folder / "model.onnx", folder / "model.engine", target)
    engine: dict[str, Any] = {"stage": "engine", "seconds": round(time.perf_counter() - started, 1),
                              "peak_rss_gib": round(_peak_rss_gib(), 2)}
    if not report.get("path"):
        engine["error"] = str(report.get("reason"))[:500]
    else:
        engine.update(engine_bytes=report["size_bytes"], build_seconds=round(report["build_seconds"], 1),
                      layers=report.get("num_layers"), gemm_precisions=report.get("gemm_precisions"),
                      target_sms=report.get("target_sms"), plugin_nodes=report.get("hadamard_plugin_nodes"))
        log = Path(report["path"] + ".build.log")
        if log.is_file():
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
                     if any(word in line for word in _MEMORY_WORDS) and "Layer(" not in line]
            engine["builder_memory_lines"] = lines[:12]
            for line in lines:  # the builder's own figures for the profile (its largest shapes: 32 frames)
                for label, key in (("Total Activation Memory:", "activation_bytes"),
                                   ("Total Weights Memory:", "weights_bytes")):
                    if label in line:
                        engine[f"builder_{key}"] = int(line.split(label)[1].split()[0])
        engine["device_memory"] = device_memory(Path(report["path"]))
    _emit(work, job, "engine", engine)
    return engine


def device_memory(engine_path: Path) -> dict[str, Any]:
    """Device memory the engine's execution context needs at 10, 20 and 30 frames (GPU only).

    TensorRT reports it per shape once the engine is deserialized (``update_device_memory_size_for_shapes``);
    deserializing needs a CUDA GPU of an architecture the engine targets, so without one this says so.
    """
    from qvggt_export.engine.backend import cuda_device_count, load_backend

    if cuda_device_count() == 0:
        return {"measured": False, "reason": "needs a CUDA GPU to deserialize the engine (none visible here); "
                                             "run `python benchmarks/vggt1b_engine.py --device-memory ENGINE` there"}
    from qvggt_export.plugins import register

    backend = load_backend("rtx")
    register("rtx")
    trt = backend.trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        return {"measured": False, "reason": "deserialize_cuda_engine failed (GPU not among the engine's targets?)"}
    context = engine.create_execution_context()
    shape = list(engine.get_tensor_shape("images"))
    result: dict[str, Any] = {"measured": True,
                              "profile_max_bytes": int(engine.get_device_memory_size_for_profile_v2(0))}
    for frames in FRAME_COUNTS:
        context.set_input_shape("images", [1, frames, *shape[2:]])
        result[f"frames_{frames}_bytes"] = int(context.update_device_memory_size_for_shapes())
    return result


def initializer_bytes_by_part(onnx_path: Path) -> dict[str, int]:
    """ONNX initializer bytes grouped by what they hold: ``quantized weight codes`` (INT4/INT8 ``weight_q``) and
    float tensors per model part (``aggregator.patch_embed``, ``depth_head``, ...): what stays big."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    parts: dict[str, int] = {}
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            size = int({entry.key: entry.value for entry in init.external_data}.get("length", 0))
        else:
            size = len(init.raw_data) or init.ByteSize()
        if init.name.endswith("/weight_q"):
            part = "quantized weight codes"
        elif init.name.startswith("onnx::"):
            part = "unnamed (onnx::*)"
        else:
            path = init.name.removeprefix("model.").split("/")[0].split(".")
            part = ".".join(path[:2]) if path[0] == "aggregator" else path[0]
        parts[part] = parts.get(part, 0) + size
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def _emit(work: Path, job: str, stage: str, data: dict[str, Any]) -> None:
    (work / f"{job}.{stage}.json").write_text(json.dumps(data, indent=2))


# ----------------------------------------------------------------------------------------------------------
# Orchestrator
# ----------------------------------------------------------------------------------------------------------


def _run_worker(args: list[str], timeout: float) -> tuple[int, str]:
    command = [sys.executable, __file__, *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return done.returncode, (done.stderr or "")[-1500:]


def _ratios(results: dict[str, Any]) -> None:
    fp16 = results["jobs"].get("fp16", {}).get("engine", {}).get("engine_bytes")
    for data in results["jobs"].values():
        engine = data.get("engine", {})
        if fp16 and engine.get("engine_bytes"):
            engine["fp16_over_this"] = round(fp16 / engine["engine_bytes"], 3)
        stages = [data.get(s, {}) for s in ("transform", "export", "engine")]
        if all("seconds" in s for s in stages):
            data["total_seconds"] = round(sum(s["seconds"] for s in stages), 1)
            data["max_peak_rss_gib"] = max(s["peak_rss_gib"] for s in stages)


def _markdown(results: dict[str, Any]) -> str:
    lines = ["# VGGT-1B engines per quantization scope (TensorRT-RTX, built without a GPU)", "",
             f"`python benchmarks/vggt1b_engine.py` on {results['machine']}; load average {results['load_start']} "
             f"at start, {results.get('load_end', 'n/a')} at end (shared machine: times are noisy, sizes are not). "
             f"Model `build_vggt(\"{results['model']}\")`, random weights (seed 0); DSFQ W4A4 calibrated on one "
             f"generated sequence of {results['frames']} frame(s) at {results['size']} px, which is also the export's "
             f"example; engine profile `{PROFILE}` (SM89 only, frames 1..32), Hadamard plugin; W4A4 engines from the "
             "`w4a16` lowering with FP16 float parts (`--engine-lowering w4a16 --engine-fp16`), the FP16 engine from "
             "the FP16 export.",
             "", f"Goals: W4A4 engine >= {GOAL_RATIO}x smaller than FP16 at the widest scope; transform + export + "
             f"engine within {GOAL_SECONDS // 60} min and {GOAL_RSS_GIB:.0f} GiB peak RSS.", "",
             "| job | quantized layers | params quantized / total | transform s | export s | engine s | total s | "
             "peak RSS GiB (transform / export / engine) | engine bytes | fp16/this |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for job, data in results["jobs"].items():
        scope = data.get("transform", {}).get("scope", {})
        params = (f"{scope['parameters_quantized'] / 1e6:.0f} M / {scope['parameters_total'] / 1e6:.0f} M "
                  f"({100 * scope['parameter_share']:.1f} %)" if scope else "-")

        def cell(stage: str, key: str, data: dict[str, Any] = data) -> str:
            value = data.get(stage, {}).get(key)
            return "n/a" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))

        rss = " / ".join(cell(s, "peak_rss_gib") for s in ("transform", "export", "engine"))
        lines.append(f"| {job} | {scope.get('layers', '-')} | {params} | {cell('transform', 'seconds')} | "
                     f"{cell('export', 'seconds')} | {cell('engine', 'seconds')} | {data.get('total_seconds', 'n/a')} "
                     f"| {rss} | {cell('engine', 'engine_bytes')} | {cell('engine', 'fp16_over_this')} |")
    notes = []
    for job, data in results["jobs"].items():
        for stage in ("transform", "export", "engine"):
            if "error" in data.get(stage, {}):
                notes.append(f"- `{job}` {stage}: {data[stage]['error']}")
        memory = data.get("engine", {}).get("device_memory")
        if memory and not memory.get("measured"):
            notes.append(f"- `{job}` device memory at {', '.join(map(str, FRAME_COUNTS))} frames: not measured, "
                         f"{memory['reason']}.")
        elif memory:
            notes.append(f"- `{job}` device memory: " + ", ".join(f"{k} {v:,}" for k, v in memory.items()
                                                                  if k != "measured"))
        parts = data.get("export", {}).get("initializer_bytes_by_part")
        if parts:
            notes.append(f"- `{job}` ONNX initializer bytes by part: " + ", ".join(
                f"{name} {size / 1e6:,.1f} MB" for name, size in list(parts.items())[:8]))
        builder = data.get("engine", {}).get("builder_memory_lines")
        if builder is not None:
            notes.append(f"- `{job}` builder log, memory lines: " + ("; ".join(f"`{line[:160]}`" for line in builder)
                                                                     or "none (the builder reports no memory figure)"))
    if results.get("not_run"):
        notes.append(f"- Not run (time): {', '.join(results['not_run'])}.")
    lines += ["", "Notes:", "", *notes] if notes else []
    lines += ["", "Peak RSS: each worker's `ru_maxrss` after the stage (transform and export share one process, "
              "so the export's peak includes the model built in the transform; the engine is built by a fresh "
              "process). fp16/this = FP16 engine bytes / this engine's bytes (same run, same profile)."]
    return "\n".join(lines) + "\n"


def _write(results: dict[str, Any]) -> None:
    _ratios(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(_markdown(results))


def orchestrate(jobs: list[str], work: Path, size: int, frames: int, deadline: float, keep: bool,
                preset: str = "vggt-1b") -> None:
    import tensorrt_rtx

    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TensorRT-RTX {tensorrt_rtx.__version__}",
        "load_start": [round(x, 2) for x in os.getloadavg()], "model": preset, "size": size, "frames": frames,
        "profile": PROFILE, "jobs": {}, "not_run": []}
    work.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        left = deadline - time.time()
        if left < 120:
            results["not_run"].append(job)
            continue
        data: dict[str, Any] = results["jobs"].setdefault(job, {})
        _write(results)
        code, err = _run_worker(["--worker", "prepare", "--job", job, "--work", str(work), "--size", str(size),
                                 "--frames", str(frames), "--model", preset], timeout=left)
        for stage in ("transform", "export"):
            path = work / f"{job}.{stage}.json"
            if path.is_file():
                data[stage] = json.loads(path.read_text())
        if code != 0:
            failed = "export" if "transform" in data else "transform"
            data.setdefault(failed, {})["error"] = f"worker exit {code}: {err.strip().splitlines()[-1:] or ''}"
            _write(results)
            continue
        _write(results)
        left = deadline - time.time()
        code, err = _run_worker(["--worker", "engine", "--job", job, "--work", str(work)], timeout=max(left, 60))
        path = work / f"{job}.engine.json"
        data["engine"] = json.loads(path.read_text()) if path.is_file() else {}
        if code != 0:
            data["engine"]["error"] = f"worker exit {code}: {err.strip().splitlines()[-1:] or ''}"
        if not keep:
            shutil.rmtree(work / job, ignore_errors=True)  # 2-3 GB of graphs per job
        results["load_end"] = [round(x, 2) for x in os.getloadavg()]
        _write(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--model", default="vggt-1b", help="preset (a small one to try the script: tiny-dino)")
    parser.add_argument("--frames", type=int, default=1, help="calibration / export example frames (default 1)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vggt1b_engine"))
    parser.add_argument("--budget-s", type=float, default=1500, help="stop starting jobs after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the graphs and engines in --work")
    parser.add_argument("--device-memory", type=Path, help="(GPU host) report an engine's device memory and exit")
    parser.add_argument("--worker", choices=["prepare", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device_memory:
        print(json.dumps(device_memory(args.device_memory), indent=2))
    elif args.worker == "prepare":
        worker_prepare(args.job, args.work, args.size, args.frames, args.model)
    elif args.worker == "engine":
        worker_engine(args.job, args.work)
    else:
        orchestrate(args.jobs, args.work, args.size, args.frames, time.time() + args.budget_s, args.keep, args.model)


if __name__ == "__main__":
    main()
