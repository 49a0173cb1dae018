"""The device check (issue 12): what the toolchain does on one CUDA GPU, each figure a ratio measured in this run.

Sections (each writes its part of the results as soon as it ends, so a run cut short still reports):

1. ``hadamard``: the fused kernel (``plugins/hadamard_cuda.py``, NVRTC; "tiled" and "simple" schedules) vs the
   PyTorch ``fwht`` vs a dense ``x @ H``, fp32 and bf16, d = 1024 and 4096, on VGGT-1B's token count for 10
   frames at 518 px (10 x 1374 rows): max |error| vs a float64 reference and times (CUDA events, medians).
   Goal: kernel >= 10x faster than dense bf16 at d = 4096.
2. ``int8_gemm``: ``torch._int_mm`` (INT8 x INT8 -> INT32) vs bf16 ``torch.mm`` at VGGT-1B's linear shapes: the
   measured ceiling of a W8A8 GEMM speed-up on this GPU.
3. ``pipeline_tiny``: the whole pipeline on ``tiny`` (W4A4 DSFQ, 20 reconstruction steps per block, no engine:
   no TensorRT there) with --device cpu, --device cuda and --device cuda --calib-dtype bf16: same NFDS selection,
   quantized weights equal to tolerance, parity passed in each.
4. ``vggt1b``: VGGT-1B size (random weights) on CUDA with a reduced recipe (pool 24, 8 samples, 10 frames at
   518 px, DSFQ W4A4, 20 steps per block): seconds and peak GPU memory per stage, and the published recipe
   (pool 400, 40 samples, 600 steps per block) projected from them, labelled as a projection.

    python benchmarks/gpu_check.py                     # on a GPU: writes benchmarks/results/gpu_check.{json,md}
    python benchmarks/gpu_check.py --out DIR           # results elsewhere
    python benchmarks/gpu_check.py --sections hadamard,int8_gemm

Without a GPU it prints what it would measure, runs nothing heavy and writes nothing (CI-free rehearsal mode);
``--rehearse`` runs every section at toy sizes on the CPU where a section can run there (the kernel and the
INT8 GEMM cannot) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("hadamard", "int8_gemm", "pipeline_tiny", "vggt1b")
TOKENS_PER_FRAME_518 = 37 * 37 + 5  # patches + camera + 4 register tokens
FRAMES = 10
VGGT1B_LINEARS = {"qkv": (1024, 3072), "proj": (1024, 1024), "fc1": (1024, 4096), "fc2": (4096, 1024)}
GOAL_KERNEL_VS_DENSE_BF16_4096 = 10.0
PUBLISHED = {"pool": 400, "samples": 40, "steps_per_block": 600}


def _cuda_time(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def section_env() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    try:
        import cuda.bindings
        from cuda.bindings import nvrtc

        info["cuda_bindings"] = cuda.bindings.__version__
        info["nvrtc"] = ".".join(str(v) for v in nvrtc.nvrtcVersion()[1:])
    except Exception as exc:  # noqa: BLE001 (reported, not fatal)
        info["cuda_bindings"] = f"unavailable: {exc}"
    return info


def section_hadamard(rehearse: bool) -> dict[str, Any]:
    from qvggt_export.plugins.hadamard_cuda import compile_kernel_source, hadamard_cuda
    from qvggt_export.quant.hadamard import fwht, hadamard_matrix, random_signs

    rows = TOKENS_PER_FRAME_518 * FRAMES
    result: dict[str, Any] = {"rows": rows, "cases": []}
    major, minor = torch.cuda.get_device_capability(0)
    started = time.perf_counter()
    compile_kernel_source(f"sm_{major}{minor}", cache=False)
    result["nvrtc_compile_s"] = round(time.perf_counter() - started, 3)
    for d in (1024, 4096):
        gen = torch.Generator().manual_seed(d)
        x64 = torch.randn(rows, d, generator=gen, dtype=torch.float64).cuda()
        signs = random_signs(d, seed=d).double().cuda()
        post = (torch.rand(d, generator=gen, dtype=torch.float64) + 0.5).cuda()
        ref = fwht(x64, signs=signs, post_scale=post)
        for dtype in (torch.float32, torch.bfloat16):
            x = x64.to(dtype)
            h = hadamard_matrix(d, dtype=dtype, device="cuda")
            s32, p32 = signs.float(), post.float()
            s_d, p_d = signs.to(dtype), post.to(dtype)
            out = torch.empty_like(x)
            runs: dict[str, Callable[[], Any]] = {
                "kernel_tiled": lambda: hadamard_cuda(x, s32, p32, out=out, schedule="tiled"),  # noqa: B023
                "kernel_simple": lambda: hadamard_cuda(x, s32, p32, out=out, schedule="simple"),  # noqa: B023
                "fwht_torch": lambda: fwht(x, signs=s_d, post_scale=p_d),  # noqa: B023
                "dense": lambda: ((x * s_d) @ h) * p_d,  # noqa: B023
                "dense_matmul_only": lambda: x @ h,  # noqa: B023
                "copy": lambda: out.copy_(x),  # noqa: B023 (the memory-traffic floor: read + write once)
            }
            case: dict[str, Any] = {"d": d, "dtype": str(dtype).removeprefix("torch."), "ms": {}, "error": {}}
            for name, fn in runs.items():
                if name != "copy":
                    y = fn().double()
                    case["error"][name] = {"max_abs_rel": float((y - ref).abs().max() / ref.abs().max()),
                                           "rel_l2": float((y - ref).norm() / ref.norm())}
                case["ms"][name] = round(_cuda_time(fn), 4)
            ms = case["ms"]
            case["speedup"] = {"kernel_vs_dense": round(ms["dense"] / ms["kernel_tiled"], 2),
                               "kernel_vs_dense_matmul_only": round(ms["dense_matmul_only"] / ms["kernel_tiled"], 2),
                               "kernel_vs_fwht_torch": round(ms["fwht_torch"] / ms["kernel_tiled"], 2),
                               "tiled_vs_simple": round(ms["kernel_simple"] / ms["kernel_tiled"], 2)}
            moved = 2 * x.numel() * x.element_size()
            case["kernel_tiled_gb_s"] = round(moved / (ms["kernel_tiled"] * 1e-3) / 1e9, 1)
            case["copy_gb_s"] = round(moved / (ms["copy"] * 1e-3) / 1e9, 1)
            result["cases"].append(case)
            print(f"  hadamard d={d} {case['dtype']}: {ms} speedups {case['speedup']}", flush=True)
    bf16_4096 = next(c for c in result["cases"] if c["d"] == 4096 and c["dtype"] == "bfloat16")
    result["goal"] = {"kernel_vs_dense_bf16_4096": bf16_4096["speedup"]["kernel_vs_dense"],
                      "target": GOAL_KERNEL_VS_DENSE_BF16_4096,
                      "met": bf16_4096["speedup"]["kernel_vs_dense"] >= GOAL_KERNEL_VS_DENSE_BF16_4096}
    return result


def section_int8_gemm(rehearse: bool) -> dict[str, Any]:
    m = TOKENS_PER_FRAME_518 * FRAMES
    result: dict[str, Any] = {"tokens": m, "shapes": []}
    gen = torch.Generator().manual_seed(0)
    for name, (k, n) in VGGT1B_LINEARS.items():
        a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).cuda()
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).cuda()
        b = w.t()  # [k, n] column-major: the weight layout cuBLASLt's INT8 GEMM takes
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        exact = torch.equal(torch._int_mm(a[:64], b).double(), (a[:64].double() @ b.double()))
        ms_int8 = _cuda_time(lambda: torch._int_mm(a, b))  # noqa: B023
        ms_bf16 = _cuda_time(lambda: a16 @ b16)  # noqa: B023
        flops = 2 * m * k * n
        row = {"layer": name, "m": m, "k": k, "n": n, "int8_ms": round(ms_int8, 4), "bf16_ms": round(ms_bf16, 4),
               "int8_tops": round(flops / ms_int8 / 1e9, 1), "bf16_tflops": round(flops / ms_bf16 / 1e9, 1),
               "int8_speedup": round(ms_bf16 / ms_int8, 2), "int8_exact": exact}
        result["shapes"].append(row)
        print(f"  int8 {row}", flush=True)
    return result


def _pipeline_run(out: Path, device: str, calib_dtype: str, recon_iters: int) -> tuple[dict[str, Any], float]:
    from qvggt_export.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(out_dir=out, bits="w4a4", method="dsfq", recon_iters=recon_iters,
                            engine=False, progress=False, device=device, calib_dtype=calib_dtype)
    started = time.perf_counter()
    report = run_pipeline(config)
    return report, time.perf_counter() - started


def _compare_quantized(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "quantized_model.safetensors")), load_file(str(b / "quantized_model.safetensors"))
    if ta.keys() != tb.keys():
        return {"same_keys": False}
    codes_total = codes_differ = 0
    worst_float = 0.0
    for key, va in ta.items():
        vb = tb[key]
        if va.dtype in (torch.int8, torch.uint8, torch.int32, torch.int64):
            codes_total += va.numel()
            codes_differ += int((va != vb).sum())
        else:
            scale = float(va.abs().max().clamp_min(1e-30))
            worst_float = max(worst_float, float((va.double() - vb.double()).abs().max()) / scale)
    return {"same_keys": True, "integer_codes": codes_total, "codes_differ": codes_differ,
            "codes_differ_fraction": codes_differ / max(codes_total, 1), "float_tensors_max_rel_diff": worst_float}


def _selected(folder: Path) -> list[Any]:
    return json.loads((folder / "calibration_selection.json").read_text())["selected_indices"]


def section_pipeline_tiny(rehearse: bool) -> dict[str, Any]:
    steps = 2 if rehearse else 20
    # (device, statistics dtype, reconstruction steps); each compared with the CPU run of the same steps. Without
    # reconstruction the weights follow from the statistics alone; with it, Adam's trajectory also differs.
    runs = [("cpu", "fp32", steps), ("cpu", "fp32", 0)]
    if not rehearse:
        runs += [("cuda", "fp32", steps), ("cuda", "bf16", steps), ("cuda", "fp32", 0)]
    result: dict[str, Any] = {"config": f"tiny, w4a4 dsfq, 16 candidates -> 4, no engine; recon{steps} = {steps} "
                                        "reconstruction steps per block", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for device, dtype, recon in runs:
            tag = f"{device}-{dtype}-recon{recon}"
            folders[tag] = Path(tmp) / tag
            report, seconds = _pipeline_run(folders[tag], device, dtype, recon)
            result["runs"][tag] = {"seconds": round(seconds, 2), "parity_passed": report["parity"]["passed"],
                                   "device": report["device"], "selected": _selected(folders[tag]),
                                   "output_error_vs_float": report["quantization"]["output_error_vs_float"],
                                   "timings_s": report["timings_s"]}
            print(f"  pipeline {tag}: {seconds:.1f} s, parity {report['parity']['passed']}", flush=True)
        for tag in folders:
            base = f"cpu-fp32-{tag.rsplit('-', 1)[1]}"
            if tag.startswith("cpu-"):
                continue
            run = result["runs"][tag]
            run["same_selection_as_cpu"] = run["selected"] == result["runs"][base]["selected"]
            run["vs_cpu"] = _compare_quantized(folders[base], folders[tag])
    return result


def section_vggt1b(rehearse: bool) -> dict[str, Any]:
    from qvggt_export.calib import NFDSConfig, SyntheticSequenceConfig, build_candidate_pool, select_calibration_set
    from qvggt_export.model import build_vggt
    from qvggt_export.quant import QuantConfig
    from qvggt_export.quant.calibrate import calibrate

    preset, size = ("tiny", 70) if rehearse else ("vggt-1b", 518)
    pool_size, samples, steps = (6, 2, 2) if rehearse else (12, 4, 4)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    result: dict[str, Any] = {"preset": preset, "image_size": size, "frames": FRAMES, "pool": pool_size,
                              "samples": samples, "steps_per_block": steps, "stages": {}}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        entry = {"seconds": round(time.perf_counter() - started, 2)}
        if device.type == "cuda":
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            entry["allocated_after_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        result["stages"][name] = entry
        print(f"  vggt1b {name}: {entry}", flush=True)
        return value

    model = stage("build_model", lambda: build_vggt(preset, seed=0, device=device).eval())
    result["parameters"] = sum(p.numel() for p in model.parameters())
    pool = build_candidate_pool(SyntheticSequenceConfig(num_sequences=pool_size, frames=FRAMES, height=size,
                                                        width=size, seed=0), FRAMES, size, "crop",
                                pool_size=pool_size, seed=0, patch_size=14)
    config = NFDSConfig(strategy="nfds", budget=samples, seed=0, batch_size=4)
    selection = stage("nfds_selection", lambda: select_calibration_set(pool, model, config, progress=False))
    if device.type == "cuda":
        from qvggt_export.device import autocast

        def nfds_bf16() -> Any:
            with autocast(device, "bf16"):
                return select_calibration_set(pool, model, config, progress=False)

        selection_bf16 = stage("nfds_selection_bf16_autocast", nfds_bf16)
        result["nfds_bf16_same_selection"] = selection_bf16.selected_ids == selection.selected_ids
        result["nfds_bf16_selection_overlap"] = len(set(selection_bf16.selected_ids) & set(selection.selected_ids))
    batches = [s.unsqueeze(0).to(device) for s in selection.samples()]
    with torch.no_grad():
        stage("float_forward_1x10frames", lambda: model(batches[0]))
    quant = QuantConfig(bits="w4a4", method="dsfq", seed=0, recon_iters=steps)
    calibrated = stage("dsfq_calibrate_with_reconstruction", lambda: calibrate(model, quant, batches))
    result["reconstruction_blocks"] = len(calibrated.reconstruction)
    with torch.no_grad():
        stage("quantized_forward_1x10frames", lambda: model(batches[0]))
    # Projection of the published recipe from the reduced run (linear in the counts that drive each stage).
    nfds = result["stages"]["nfds_selection"]["seconds"]
    calib_s = result["stages"]["dsfq_calibrate_with_reconstruction"]["seconds"]
    scale_nfds = PUBLISHED["pool"] / pool_size
    scale_recon = (PUBLISHED["steps_per_block"] / steps)
    result["projection_published_recipe"] = {
        "label": "PROJECTION (not measured): NFDS scaled by pool size, calibration by steps per block; capture "
                 "passes scale with samples and are a small part at 600 steps",
        "nfds_s": round(nfds * scale_nfds, 1), "calibrate_s": round(calib_s * scale_recon, 1),
        "total_h": round((nfds * scale_nfds + calib_s * scale_recon) / 3600, 2)}
    return result


def _write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_check.md").write_text(_markdown(results))


def _markdown(r: dict[str, Any]) -> str:
    env = r.get("env", {})
    lines = ["# Device check (benchmarks/gpu_check.py)", "",
             f"{r.get('date', '')}: {env.get('gpu')} (CC {env.get('compute_capability')}, {env.get('memory_gib')} "
             f"GiB), torch {env.get('torch')} / CUDA {env.get('cuda')}, cuda-bindings {env.get('cuda_bindings')}, "
             f"NVRTC {env.get('nvrtc')}. Every ratio below is measured in this one run.", ""]
    if "hadamard" in r:
        h = r["hadamard"]
        lines += [f"## Hadamard transform ({h['rows']} rows = 10 frames x 1374 tokens at 518 px)", "",
                  f"NVRTC compile at first use: {h['nvrtc_compile_s']} s (then cached on disk).", "",
                  "| d | dtype | kernel tiled ms | kernel simple ms | fwht (PyTorch) ms | dense ms | copy ms | "
                  "kernel vs dense | vs fwht | kernel GB/s | max err kernel | max err dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in h["cases"]:
            ms, e = c["ms"], c["error"]
            lines.append(f"| {c['d']} | {c['dtype']} | {ms['kernel_tiled']} | {ms['kernel_simple']} | "
                         f"{ms['fwht_torch']} | {ms['dense']} | {ms['copy']} | {c['speedup']['kernel_vs_dense']}x | "
                         f"{c['speedup']['kernel_vs_fwht_torch']}x | {c['kernel_tiled_gb_s']} | "
                         f"{e['kernel_tiled']['max_abs_rel']:.1e} | {e['dense']['max_abs_rel']:.1e} |")
        g = h["goal"]
        lines += ["", f"Goal kernel >= {g['target']}x faster than dense bf16 at d = 4096: "
                      f"**{g['kernel_vs_dense_bf16_4096']}x, {'met' if g['met'] else 'NOT met'}**. Errors: max |y - "
                      "ref| / max |ref| against a float64 reference.", ""]
    if "int8_gemm" in r:
        lines += ["## INT8 GEMM ceiling (torch._int_mm vs bf16, VGGT-1B linears, 13740 tokens)", "",
                  "| layer | K x N | int8 ms | bf16 ms | int8 TOPS | bf16 TFLOP/s | int8 speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for s in r["int8_gemm"]["shapes"]:
            lines.append(f"| {s['layer']} | {s['k']} x {s['n']} | {s['int8_ms']} | {s['bf16_ms']} | {s['int8_tops']} "
                         f"| {s['bf16_tflops']} | {s['int8_speedup']}x |")
        lines.append("")
    if "pipeline_tiny" in r:
        p = r["pipeline_tiny"]
        lines += [f"## Pipeline on tiny: CUDA vs CPU ({p['config']})", "",
                  "| run | seconds | parity | same selection as CPU | integer codes differing | float tensors max "
                  "rel diff | depth rel L2 vs float |", "|---|---|---|---|---|---|---|"]
        for tag, run in p["runs"].items():
            vs = run.get("vs_cpu", {})
            depth = run["output_error_vs_float"].get("depth", {}).get("rel_l2_mean")
            lines.append(f"| {tag} | {run['seconds']} | {run['parity_passed']} | "
                         f"{run.get('same_selection_as_cpu', '(reference)')} | "
                         f"{vs.get('codes_differ', '-')} / {vs.get('integer_codes', '-')} | "
                         f"{vs.get('float_tensors_max_rel_diff', '-')} | {depth} |")
        lines.append("")
    if "vggt1b" in r:
        v = r["vggt1b"]
        lines += [f"## {v['preset']} ({v.get('parameters', 0) / 1e6:.0f} M parameters, random weights) on CUDA, "
                  f"reduced recipe: pool {v['pool']}, {v['samples']} samples, {v['frames']} frames at "
                  f"{v['image_size']} px, DSFQ W4A4, {v['steps_per_block']} steps per block", "",
                  "| stage | seconds | peak GiB |", "|---|---|---|"]
        for name, s in v["stages"].items():
            lines.append(f"| {name} | {s['seconds']} | {s.get('peak_gib', '-')} |")
        proj = v.get("projection_published_recipe")
        if proj:
            lines += ["", f"{proj['label']}: NFDS {proj['nfds_s']} s, calibration {proj['calibrate_s']} s, "
                          f"total {proj['total_h']} h (the paper: 2.67 GPU-hours on an RTX 4090)."]
        lines.append("")
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in r["notes"]] + [""]
    for name, err in r.get("errors", {}).items():
        lines += [f"## {name}: FAILED", "", "```", err[-3000:], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--rehearse", action="store_true",
                        help="no GPU: run the CPU-runnable sections at toy sizes (checks the script, writes nothing)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    gpu = torch.cuda.is_available()
    if not gpu and not args.rehearse:
        print("No CUDA GPU visible: nothing measured, nothing written. On a GPU this script would measure:")
        print(__doc__.split("\n\n", 1)[1])
        return 0
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": section_env(),
                               "errors": {}}
    runners = {"hadamard": section_hadamard, "int8_gemm": section_int8_gemm,
               "pipeline_tiny": section_pipeline_tiny, "vggt1b": section_vggt1b}
    started = time.perf_counter()
    for name in sections:
        if not gpu and name in ("hadamard", "int8_gemm"):
            print(f"[{name}] skipped: needs a CUDA GPU")
            continue
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = runners[name](args.rehearse)
            results[name]["section_s"] = round(time.perf_counter() - t0, 1)
        except Exception:  # noqa: BLE001 (one failing section must not hide the others' figures)
            results["errors"][name] = traceback.format_exc()
            print(results["errors"][name], file=sys.stderr, flush=True)
        results["total_s"] = round(time.perf_counter() - started, 1)
        if gpu or args.out != RESULTS:  # a rehearsal writes only where it is told to
            _write(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "errors"}, indent=1, default=str)[:4000])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
