"""NVIDIA ModelOpt (``nvidia-modelopt``, ``mtq.quantize``) as an external baseline on the planted-outlier VGGT.

Same testbed, calibration data and metrics as benchmarks/dsfq_ablation.py (imported from it): the
``tiny-outliers`` preset, per seed the same generated calibration sequences for every method, errors vs the
float model on a fixed held-out set (normalised RMSE of the last aggregator layer, depth, world points and
pose encoding; camera rotation / translation-direction angles). Medians over seeds.

Every ModelOpt config is scoped to exactly the layers our methods quantize (the 32 aggregator qkv / proj /
fc1 / fc2 linears of ``find_targets``): its ``*weight_quantizer`` / ``*input_quantizer`` settings and its
algorithm are kept, re-targeted to those layers, everything else disabled. Rows:

* ours: ``rtn`` (Base), ``smooth`` (SmoothQuant scales, alpha 0.5), ``dsfq`` (Hadamard, then smoothing) via
  ``qvggt_export.quant.calibrate.calibrate``, at W8A8, W4A4 (per-output-channel weights, per-token dynamic
  activations) and FP8 (E4M3, same granularity);
* ModelOpt stock configs: ``INT8_SMOOTHQUANT_CFG`` (alpha 1.0, its default; and alpha 0.5 as ours),
  ``INT8_DEFAULT_CFG``, ``FP8_DEFAULT_CFG``, ``FP8_PER_CHANNEL_PER_TOKEN_CFG``, and the weight-only / mixed
  ``INT4_BLOCKWISE_WEIGHT_ONLY_CFG``, ``INT4_AWQ_CFG`` (W4A16) and ``W4A8_AWQ_BETA_CFG`` (INT4 weights, FP8
  activations), for which we have no counterpart;
* ModelOpt integer fake quant at our granularity (per-channel weights, per-token dynamic activations, max
  calibration) at W8A8 and W4A4: ModelOpt has no stock integer W4A4 config; this is the config a user would
  write, and it cross-checks our ``rtn``.

Not run, and why (ModelOpt 0.47): SmoothQuant at W4A4 (``smoothquant`` smooths only 8-bit layers: it warns
"Only int8 smoothing is supported" and leaves a per-channel *static* activation quantizer that no GEMM can
execute, so its numbers would flatter it); SmoothQuant with dynamic per-token activations (asserts "Axis and
block_sizes are both set"); NVFP4 and ModelOpt's ``rotate`` (CUDA only, DESIGN.md section 3).

    pip install 'qvggt-export[baseline]'                 # nvidia-modelopt
    python benchmarks/modelopt_baseline.py [--seeds 3]   # ~10 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from dsfq_ablation import METRICS, PRESET, _batches, evaluate  # same data and metrics as the ablation

from qvggt_export.model import build_vggt
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.roles import find_targets

RESULTS = Path(__file__).resolve().parent / "results"
CALIB_SEQUENCES = 8  # as dsfq_ablation's default
HELD_OUT = (6, 1000)  # sequences, seed: dsfq_ablation's held-out set
OURS = {"w8a8": ("rtn", "smooth", "dsfq"), "w4a4": ("rtn", "smooth", "dsfq"), "fp8": ("rtn", "smooth", "dsfq")}
# ModelOpt runs: (group, label, stock config name or None for a custom one, weight cfg, input cfg, algorithm).
# A cfg of "stock" takes the stock config's own entry; None disables the quantizer.
_INT_PER_TOKEN = {"axis": None, "type": "dynamic", "block_sizes": {-1: None}}  # as FP8_PER_CHANNEL_PER_TOKEN_CFG
MODELOPT = [
    ("w8a8", "INT8_SMOOTHQUANT_CFG (alpha 1.0)", "INT8_SMOOTHQUANT_CFG", "stock", "stock", "stock"),
    ("w8a8", "INT8_SMOOTHQUANT_CFG, alpha 0.5", "INT8_SMOOTHQUANT_CFG", "stock", "stock",
     {"method": "smoothquant", "alpha": 0.5}),
    ("w8a8", "INT8_DEFAULT_CFG (max)", "INT8_DEFAULT_CFG", "stock", "stock", "stock"),
    ("w8a8", "int8 per-channel / per-token dynamic (max)", None, {"num_bits": 8, "axis": 0},
     {"num_bits": 8, **_INT_PER_TOKEN}, "max"),
    ("w4a4", "int4 per-channel / per-token dynamic (max)", None, {"num_bits": 4, "axis": 0},
     {"num_bits": 4, **_INT_PER_TOKEN}, "max"),
    ("fp8", "FP8_DEFAULT_CFG (per-tensor)", "FP8_DEFAULT_CFG", "stock", "stock", "stock"),
    ("fp8", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "stock", "stock", "stock"),
    ("weight-only / mixed", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG (W4A16, max)", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
     "stock", "stock", "stock"),
    ("weight-only / mixed", "INT4_AWQ_CFG (W4A16, AWQ-lite)", "INT4_AWQ_CFG", "stock", "stock", "stock"),
    ("weight-only / mixed", "W4A8_AWQ_BETA_CFG (INT4 W, FP8 A)", "W4A8_AWQ_BETA_CFG", "stock", "stock", "stock"),
]
GROUPS = ("w8a8", "w4a4", "fp8", "weight-only / mixed")
NOTES = {
    "w4a4 SmoothQuant": "ModelOpt 0.47 smoothquant smooths 8-bit layers only ('Only int8 smoothing is "
                        "supported, skip'); the 4-bit layers keep a per-channel static activation quantizer "
                        "(not executable by a GEMM), so the numbers would not be SmoothQuant's",
    "per-token SmoothQuant": "smoothquant with dynamic per-token activations fails in ModelOpt 0.47 "
                             "(AssertionError 'Axis and block_sizes are both set')",
    "NVFP4, rotate": "need CUDA in ModelOpt (DESIGN.md section 3)",
}


def modelopt_config(mtq: object, targets: list[str], stock: str | None, weight: object, inp: object,
                    algorithm: object) -> dict:
    """A ModelOpt config that quantizes exactly ``targets`` (list-form ``quant_cfg`` of ModelOpt >= 0.4x)."""
    base = copy.deepcopy(getattr(mtq, stock)) if stock else {"quant_cfg": [], "algorithm": "max"}
    entries = {e["quantizer_name"]: e for e in base["quant_cfg"] if "parent_class" not in e}
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name in targets:
        for suffix, spec in (("weight_quantizer", weight), ("input_quantizer", inp)):
            if spec == "stock":
                entry = {k: v for k, v in entries[f"*{suffix}"].items() if k != "quantizer_name"}
            elif spec is None:
                entry = {"enable": False}
            else:
                entry = {"cfg": spec}
            quant_cfg.append({"quantizer_name": f"{name}.{suffix}", **copy.deepcopy(entry)})
    return {"quant_cfg": quant_cfg, "algorithm": base["algorithm"] if algorithm == "stock" else algorithm}


def run_modelopt(mtq: object, config: dict, batches: list[torch.Tensor]) -> tuple[torch.nn.Module, dict]:
    model = build_vggt(PRESET).eval()

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for images in batches:
                m(images)

    log = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(log):
        warnings.simplefilter("always")
        mtq.quantize(model, config, forward_loop=forward_loop)
    enabled = [n for n, mod in model.named_modules() if n.endswith("_quantizer") and getattr(mod, "is_enabled", False)]
    # ModelOpt warns once per disabled (non-target) quantizer that it is "not calibrated": noise, dropped.
    messages = sorted({str(w.message)[:160] for w in caught if "is not calibrated" not in str(w.message)})
    return model, {"enabled_quantizers": len(enabled), "modelopt_log": log.getvalue().strip().splitlines()[-3:],
                   "warnings": messages[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the saved JSON")
    args = parser.parse_args()
    if args.render:
        write_markdown(json.loads((RESULTS / "modelopt_baseline.json").read_text()))
        return
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise SystemExit(f"needs nvidia-modelopt: pip install 'qvggt-export[baseline]' ({exc})") from exc
    torch.manual_seed(0)
    load_before = os.getloadavg()
    float_model = build_vggt(PRESET).eval()
    targets = [t.name for t in find_targets(float_model)]
    held_out = _batches(*HELD_OUT)
    with torch.no_grad():
        references = [(float_model(x), float_model.aggregator(x)[0][-1]) for x in held_out]

    jobs: list[tuple[str, str, str, Callable[[list[torch.Tensor], int], tuple[torch.nn.Module, dict]]]] = []
    for bits, methods in OURS.items():
        for method in methods:
            def ours(batches: list[torch.Tensor], seed: int, bits: str = bits, method: str = method):
                model = build_vggt(PRESET).eval()
                calibrate(model, QuantConfig(bits=bits, method=method, seed=seed), batches)
                return model, {}
            jobs.append((bits, f"ours {method}", "ours", ours))
    for group, label, stock, weight, inp, algorithm in MODELOPT:
        config = modelopt_config(mtq, targets, stock, weight, inp, algorithm)
        jobs.append((group, f"ModelOpt {label}", "modelopt",
                     lambda batches, seed, config=config: run_modelopt(mtq, config, batches)))

    runs = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        batches = _batches(CALIB_SEQUENCES, seed=seed)  # the same calibration set for every method
        for group, label, kind, job in jobs:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            try:
                model, info = job(batches, seed)
                errors, failure = evaluate(model, references, held_out), None
            except Exception as exc:  # a baseline that cannot run here is recorded, not fatal
                errors, info, failure = {}, {}, f"{type(exc).__name__}: {exc}"[:300]
            runs.append({"group": group, "label": label, "kind": kind, "seed": seed,
                         "seconds": round(time.perf_counter() - t0, 1), **errors, **info, "failure": failure})
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in runs[-1].items()
                   if k not in ("modelopt_log", "warnings")}, flush=True)

    medians = {}
    for group, label, _, _ in jobs:
        ok = [r for r in runs if r["label"] == label and r["group"] == group and r["failure"] is None]
        entry = {m: statistics.median(r[m] for r in ok) for m in METRICS} if ok else {}
        entry["seeds_ok"] = len(ok)
        entry["failures"] = sorted({r["failure"] for r in runs if r["label"] == label and r["failure"]})
        medians[f"{group}/{label}"] = entry
    cross = {}
    for bits in ("w8a8", "w4a4"):
        a = medians[f"{bits}/ours rtn"]
        b = medians[f"{bits}/ModelOpt int{bits[1]} per-channel / per-token dynamic (max)"]
        if a.get("seeds_ok") and b.get("seeds_ok"):
            cross[bits] = {m: abs(a[m] - b[m]) / max(abs(b[m]), 1e-12) for m in METRICS}

    result = {
        "preset": PRESET, "seeds": args.seeds, "calib_sequences": CALIB_SEQUENCES,
        "held_out_sequences": HELD_OUT[0], "quantized_layers": len(targets),
        "modelopt_version": modelopt.__version__, "torch": torch.__version__,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - started, 1), "not_run": NOTES,
        "rtn_vs_modelopt_same_granularity_relative_difference": cross, "medians": medians, "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "modelopt_baseline.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(result)


def write_markdown(result: dict) -> None:
    """benchmarks/results/modelopt_baseline.md from the recorded result (``--render`` redoes only this)."""
    medians = result["medians"]
    lines = [
        f"# ModelOpt baseline on `{result['preset']}` (median of {result['seeds']} seeds)", "",
        f"nvidia-modelopt {result['modelopt_version']}, torch {result['torch']} (CPU); {result['quantized_layers']} "
        f"quantized layers (the aggregator qkv/proj/fc1/fc2 linears) for every row; {result['calib_sequences']} "
        f"calibration sequences per seed, the same for every row; {result['held_out_sequences']} held-out sequences. "
        f"Run {result['seconds']} s, load average {result['load_average_before_after'][0]} -> "
        f"{result['load_average_before_after'][1]} (shared 2-core machine).",
        "", "Normalised error = RMSE(quantized - float) / std(float); angles in degrees vs the float model "
        "(metrics of benchmarks/dsfq_ablation.py). Ours: per-output-channel weights, per-token dynamic "
        "activations. ModelOpt stock INT8/FP8 configs: per-tensor *static* activations.", "",
        "| group | method | agg | depth | points | pose_enc | rot deg | trans deg | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # Keys are "<group>/<label>" and labels contain "/" too: split on the known group names, rows by group.
    keyed = [(g, k[len(g) + 1:], m) for g in GROUPS for k, m in medians.items() if k.startswith(f"{g}/")]
    for group, label, m in keyed:
        if not m["seeds_ok"]:
            lines.append(f"| {group} | {label} | failed: {'; '.join(m['failures'])} |||||||")
            continue
        lines.append(f"| {group} | {label} | {m['agg']:.4f} | {m['depth']:.4f} | {m['points']:.4f} | "
                     f"{m['pose']:.4f} | {m['rot_deg']:.3f} | {m['trans_deg']:.3f} | {m['seeds_ok']} |")
    lines += ["", "Lowest median error per format (computed from the table):", ""]
    for group in ("w8a8", "w4a4", "fp8"):
        rows = {k[len(group) + 1:]: v for k, v in medians.items() if k.startswith(f"{group}/") and v["seeds_ok"]}
        best = {metric: min(rows, key=lambda r, metric=metric: rows[r][metric]) for metric in ("agg", "rot_deg")}
        lines.append(f"- {group}: aggregator error {best['agg']} ({rows[best['agg']]['agg']:.4f}); camera rotation "
                     f"{best['rot_deg']} ({rows[best['rot_deg']]['rot_deg']:.3f} deg)")
    cross = result["rtn_vs_modelopt_same_granularity_relative_difference"]
    lines += ["", "Cross-check, ours `rtn` vs ModelOpt integer fake quant at the same granularity (max relative "
              "difference over the metrics): " + ", ".join(
                  f"{bits} {max(v.values()):.1%}" for bits, v in cross.items()) + ".", "", "Not run:", ""]
    lines += [f"- {k}: {v.removeprefix('not run: ')}" for k, v in result["not_run"].items()]
    (RESULTS / "modelopt_baseline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
