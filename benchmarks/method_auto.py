"""``--method auto`` vs every single method, W4A4: error of the quantized model vs the float model.

Testbeds:

* the five planted-outlier testbeds of ``dsfq_ablation.py`` (``preset``, ``vggt-like``, ``massive``,
  ``token-only``, ``channel-only`` on the ``tiny-outliers`` preset), with its generated calibration sequences
  (``_batches(n, seed)``), its fixed held-out set (6 generated sequences, seed 1000) and its metrics
  (``evaluate``);
* ``real/<planting>``: the real clips of ``../shared/data`` (3 photo sequences, 2 videos), windows of
  ``--frames`` frames read by the project's own pool builder (``qvggt_export.calib.build_candidate_pool``, as
  ``--calib-data`` reads them) at the model's 70 px in ``pad`` mode (one square resolution for clips of
  different aspect ratios). **Split by time**: calibration windows lie entirely in the first half of each clip's
  frames, held-out windows entirely in the second half (a window that straddles the middle is used by neither).
  Each seed draws ``--calib-sequences`` calibration windows round-robin over the clips; the held-out set is
  fixed (``--held-out-per-clip`` windows per clip, drawn once). Skipped with a printed reason when
  ``../shared/data`` is absent.

Methods: the five transforms of the registry (rtn, smooth, rotate, smooth_rotate, dsfq) and ``auto`` (per
block the candidate with the lowest block-output MSE on the calibration set, then block reconstruction), at
``--recon-iters`` 0 and a small reconstruction (``--small-recon``, 20 steps per block by default). Every seed
changes the calibration draw and the Hadamard signs; medians over seeds.

Metrics (vs the float model, on the held-out set): camera rotation / translation angle (degrees,
``pose_angle_errors``), normalised pose_enc, depth, point-map and aggregator RMSE (RMSE / std of the float
output), and depth AbsRel vs the float depth (no alignment).

**Noise and verdict** (:func:`verdict`): per testbed and metric, the best single method is the one with the
lowest median over seeds; the noise is the range (max - min) of that method's errors across the seeds; auto is
"within noise of best" when ``median(auto) <= median(best) + noise``.

Writes benchmarks/results/method_auto.{json,md}.

    nice python benchmarks/method_auto.py [--seeds 3] [--small-recon 20]   # about 5-8 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from dsfq_ablation import LABELS, METRICS, PLANTINGS, _batches, evaluate, model_config  # same testbeds, metrics

from qvggt_export.errors import QVGGTError
from qvggt_export.eval.metrics import depth_metrics
from qvggt_export.model import build_vggt
from qvggt_export.model.config import VGGTConfig
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.config import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"
SINGLE = tuple(LABELS)  # the registry's transforms, in its order
AUTO = "auto"
ALL_METRICS = (*METRICS, "abs_rel")
TABLE_METRICS = ("rot_deg", "depth")  # the two columns of the markdown tables
BITS = "w4a4"
HELD_OUT_SEED = 1000
# Frame strides of the real-clip windows (the videos are 30 fps: stride 1 neighbours are near-duplicates, so
# wider strides are allowed too; the photo sequences only fit the small ones).
STRIDES = (1, 2, 4, 8, 16)
_WINDOW_ID = re.compile(r"^(?P<clip>.+)\[(?P<start>\d+):(?P<stop>\d+):(?P<stride>\d+)\]$")


@dataclasses.dataclass
class Testbed:
    name: str
    config: VGGTConfig
    calibration: Callable[[int], list[torch.Tensor]]  # seed -> calibration batches [1, S, 3, H, W]
    held_out: list[torch.Tensor]
    info: dict


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def verdict(single: Mapping[str, Sequence[float]], auto: Sequence[float]) -> dict:
    """Whether auto is within noise of the best single method, for one testbed and one metric (lower is better).

    Args:
        single: per method, its error in each seed.
        auto: auto's error in each seed.

    Returns:
        ``best`` (the method with the lowest median), ``best_median``, ``noise`` (the range max - min of the best
        method's errors across seeds), ``auto_median``, ``gap`` (auto median - best median) and ``within``
        (``gap <= noise``).
    """
    if not single or not auto or any(not values for values in single.values()):
        raise ValueError("verdict needs at least one seed of auto and of every single method")
    medians = {method: statistics.median(values) for method, values in single.items()}
    best = min(medians, key=medians.get)
    noise = max(single[best]) - min(single[best])
    auto_median = statistics.median(auto)
    gap = auto_median - medians[best]
    return {"best": best, "best_median": medians[best], "noise": noise, "auto_median": auto_median, "gap": gap,
            "within": gap <= noise}


def split_windows_by_time(ids: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """Sort window ids ``clip[start:stop:stride]`` (the pool's) into ``{clip: {"calibration": [...],
    "held_out": [...]}}`` (indices into ``ids``): calibration windows end in the first half of the clip's frames,
    held-out windows start in the second half; the clip's length is taken as the largest ``stop`` of its windows
    (stride-1 windows reach the last frame). Straddling windows are in neither."""
    parsed = []
    for index, window in enumerate(ids):
        match = _WINDOW_ID.match(window)
        if match is None:
            raise ValueError(f"not a window id of the form clip[start:stop:stride]: {window!r}")
        parsed.append((index, match["clip"], int(match["start"]), int(match["stop"])))
    length = collections.defaultdict(int)
    for _, clip, _, stop in parsed:
        length[clip] = max(length[clip], stop)
    split: dict[str, dict[str, list[int]]] = {clip: {"calibration": [], "held_out": []} for clip in length}
    for index, clip, start, stop in parsed:
        half = length[clip] // 2
        if stop <= half:
            split[clip]["calibration"].append(index)
        elif start >= half:
            split[clip]["held_out"].append(index)
    return split


def round_robin(groups: Mapping[str, Sequence[int]], count: int, rng: np.random.Generator) -> list[int]:
    """``count`` distinct items drawn from the groups in turn (seed-shuffled group order, random item per turn),
    so every group gives one before any gives a second; fewer if the groups run out."""
    pools = {name: list(rng.permutation(len(items))) for name, items in groups.items()}
    order = [sorted(groups)[i] for i in rng.permutation(len(groups))]
    chosen: list[int] = []
    while len(chosen) < count and any(pools[name] for name in order):
        for name in order:
            if pools[name] and len(chosen) < count:
                chosen.append(groups[name][pools[name].pop()])
    return chosen


# --------------------------------------------------------------------------------------------------
# Testbeds
# --------------------------------------------------------------------------------------------------


def planted_testbed(planting: str, calib_sequences: int) -> Testbed:
    return Testbed(planting, model_config(planting), lambda seed: _batches(calib_sequences, seed=seed),
                   _batches(6, seed=HELD_OUT_SEED),
                   {"data": "generated (calib.synthetic), 4 frames, 70x70", "calibration_sequences": calib_sequences,
                    "held_out": f"6 generated sequences, seed {HELD_OUT_SEED}"})


def real_testbeds(plantings: Sequence[str], data: Path, frames: int, calib_sequences: int,
                  held_out_per_clip: int) -> list[Testbed]:
    """The ``real/<planting>`` testbeds (one window split, shared by every planting); [] with a printed reason
    when the data is absent."""
    sources = [data / "sequences", data / "videos"]
    missing = [str(s) for s in sources if not s.is_dir()]
    if missing:
        print(f"real clips skipped: {', '.join(missing)} not found (see ../shared/data/README.md)", flush=True)
        return []
    from qvggt_export.calib import build_candidate_pool

    size = model_config("preset").aggregator.img_size
    patch = model_config("preset").aggregator.patch_size
    pool = build_candidate_pool(sources, frames, size, "pad", pool_size=None, seed=0, strides=STRIDES,
                                patch_size=patch)
    ids = pool.ids
    split = split_windows_by_time(ids)
    calibration = {clip: parts["calibration"] for clip, parts in split.items() if parts["calibration"]}
    held_out_indices = [i for clip in sorted(split) for i in round_robin(
        {clip: split[clip]["held_out"]}, held_out_per_clip, np.random.default_rng(HELD_OUT_SEED))]
    if not calibration or not held_out_indices:
        raise QVGGTError(f"{data}: no clip has {frames}-frame windows in both halves of its frames")
    cache: dict[int, torch.Tensor] = {}

    def load(index: int) -> torch.Tensor:
        if index not in cache:
            cache[index] = pool[index].unsqueeze(0)
        return cache[index]

    draws: dict[int, list[str]] = {}

    def calibration_batches(seed: int) -> list[torch.Tensor]:
        chosen = round_robin(calibration, calib_sequences, np.random.default_rng(seed))
        draws[seed] = [ids[i] for i in chosen]
        return [load(i) for i in chosen]

    held_out = [load(i) for i in held_out_indices]
    info = {"data": [os.path.relpath(s, ROOT) for s in sources],
            "frames": frames, "resolution": list(held_out[0].shape[-2:]), "preprocess": "pad",
            "strides": list(STRIDES), "split": "by time: calibration windows in the first half of each clip's "
            "frames, held-out windows in the second half",
            "calibration_windows_available": {clip: len(v) for clip, v in calibration.items()},
            "calibration_sequences": calib_sequences, "calibration_draws": draws,
            "held_out": [ids[i] for i in held_out_indices]}
    return [Testbed(f"real/{planting}", model_config(planting), calibration_batches, held_out, info)
            for planting in plantings]


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def depth_abs_rel(model: torch.nn.Module, references: list, held_out: list[torch.Tensor]) -> float:
    """Mean over the held-out sequences of AbsRel of the quantized depth vs the float depth (no alignment)."""
    values = [depth_metrics(model(images)["depth"].numpy(), want["depth"].numpy(), align="none")["abs_rel"]
              for images, (want, _) in zip(held_out, references, strict=True)]
    return float(np.mean(values))


def selection_counts(selection: Mapping) -> dict[str, int]:
    """How many blocks auto gave each method (from ``CalibrationResult.method_selection``)."""
    return dict(collections.Counter(block["method"] for block in selection.get("blocks", {}).values()))


def run_testbed(testbed: Testbed, methods: Sequence[str], seeds: int, recon_iters: int) -> list[dict]:
    float_model = build_vggt(testbed.config)
    with torch.no_grad():
        references = [(float_model(x), float_model.aggregator(x)[0][-1]) for x in testbed.held_out]
    runs = []
    for seed in range(seeds):
        batches = testbed.calibration(seed)
        for method in methods:
            extra = {"auto_methods": SINGLE} if method == AUTO else {}
            quant = QuantConfig(bits=BITS, method=method, seed=seed, recon_iters=recon_iters, **extra)
            model = build_vggt(testbed.config)
            started = time.perf_counter()
            result = calibrate(model, quant, batches)
            seconds = time.perf_counter() - started
            run = {"testbed": testbed.name, "recon_iters": recon_iters, "method": method, "seed": seed,
                   "calibrate_s": round(seconds, 2), **evaluate(model, references, testbed.held_out),
                   "abs_rel": depth_abs_rel(model, references, testbed.held_out)}
            if method == AUTO:
                selection = result.method_selection
                # Per block: the choice and every candidate's error (its per-layer map repeats the choice at
                # granularity "block").
                run["selection"] = {**{k: v for k, v in selection.items() if k != "blocks"}, "blocks": {
                    block: {k: v for k, v in entry.items() if k != "layers"}
                    for block, entry in selection.get("blocks", {}).items()}}
                run["selection_counts"] = selection_counts(run["selection"])
            runs.append(run)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items() if k != "selection"},
                  flush=True)
    return runs


def summarise(runs: list[dict], methods: Sequence[str]) -> dict:
    """Per setting and testbed: medians per method and metric, the verdict per metric, auto's choices."""
    summary: dict = {}
    for (recon, testbed) in dict.fromkeys((r["recon_iters"], r["testbed"]) for r in runs):
        rows = [r for r in runs if r["recon_iters"] == recon and r["testbed"] == testbed]
        per = {m: [r for r in rows if r["method"] == m] for m in methods}
        entry = {"medians": {m: {k: statistics.median(r[k] for r in per[m]) for k in ALL_METRICS}
                             for m in methods if per[m]}}
        if AUTO in methods and per[AUTO]:
            entry["verdicts"] = {k: verdict({m: [r[k] for r in per[m]] for m in SINGLE}, [r[k] for r in per[AUTO]])
                                 for k in ALL_METRICS}
            counts: collections.Counter = collections.Counter()
            for r in per[AUTO]:
                counts.update(r["selection_counts"])
            entry["auto_choices"] = dict(counts.most_common())
        summary.setdefault(f"recon{recon}", {})[testbed] = entry
    return summary


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _pair(values: Mapping[str, float]) -> str:
    return f"{values['rot_deg']:.2f} / {values['depth']:.4f}"


def render(result: dict) -> str:
    meta = result["meta"]
    methods = meta["methods"]
    label = {**LABELS, AUTO: "auto"}
    lines = [f"# `--method auto` vs every single method ({BITS.upper()}, error vs the float model)", "",
             f"`nice python benchmarks/method_auto.py` ({meta['command']}): `{meta['preset']}` with planted outliers "
             "(random weights: this compares methods on one model and says nothing about trained VGGT-1B), "
             f"{meta['seeds']} seeds (calibration draw + Hadamard signs), medians. Wall time {meta['wall_s']} s, "
             f"torch {meta['torch']}, {meta['threads']} thread(s), load average {meta['load_before']} before, "
             f"{meta['load_after']} after (shared 2-core machine).", "",
             "Cells: camera-rotation error (deg) / depth RMSE over the float depth's std, on the held-out set. "
             "**Noise** (per testbed and metric): the range (max - min) across seeds of the best single method's "
             "error, the best single method being the one with the lowest median. **Within noise**: "
             "median(auto) <= median(best) + noise.", ""]
    for setting, testbeds in result["summary"].items():
        recon = int(setting.removeprefix("recon"))
        lines += [f"## recon_iters = {recon}" + (" (no block reconstruction)" if recon == 0 else " per block"), "",
                  "| testbed | " + " | ".join(label[m] for m in methods)
                  + " | best rot / depth | noise rot / depth | auto within noise: rot | depth |",
                  "|---|" + "---|" * len(methods) + "---|---|---|---|"]
        others = []
        for testbed, entry in testbeds.items():
            cells = [_pair(entry["medians"][m]) for m in methods]
            v = entry.get("verdicts")
            if v is None:
                lines.append(f"| {testbed} | " + " | ".join(cells) + " | n/a | n/a | n/a | n/a |")
                continue
            lines.append(f"| {testbed} | " + " | ".join(cells)
                         + f" | {label[v['rot_deg']['best']]} / {label[v['depth']['best']]}"
                         + f" | {v['rot_deg']['noise']:.2f} / {v['depth']['noise']:.4f}"
                         + "".join(f" | {'yes' if v[k]['within'] else '**no**'}" for k in TABLE_METRICS) + " |")
            failed = [k for k in ALL_METRICS if k not in TABLE_METRICS and not v[k]["within"]]
            if failed:
                others.append(f"{testbed}: " + ", ".join(
                    f"{k} (auto {v[k]['auto_median']:.4g}, best {label[v[k]['best']]} {v[k]['best_median']:.4g}, "
                    f"noise {v[k]['noise']:.4g})" for k in failed))
        lines += ["", "Other metrics (agg, points, pose_enc, trans deg, AbsRel) where auto is not within noise: "
                  + ("; ".join(others) if others else "none") + ".", ""]
        if any("auto_choices" in e for e in testbeds.values()):
            lines += ["Blocks auto gave each method (summed over seeds):", "",
                      "| testbed | " + " | ".join(label[m] for m in SINGLE) + " |", "|---|" + "---|" * len(SINGLE)]
            for testbed, entry in testbeds.items():
                choices = entry.get("auto_choices", {})
                lines.append(f"| {testbed} | " + " | ".join(str(choices.get(m, 0)) for m in SINGLE) + " |")
            # Where auto chose one method in every block of every seed, it should equal that method up to what
            # the two code paths do differently (nothing without reconstruction).
            same = [(t, next(iter(e["auto_choices"])), e["medians"]) for t, e in testbeds.items()
                    if len(e.get("auto_choices", {})) == 1]
            if same:
                lines += ["", "Where auto chose one method for every block in every seed, auto vs that method (rot / "
                          "depth medians): " + "; ".join(f"{t}: {_pair(med[AUTO])} vs {label[m]} {_pair(med[m])}"
                                                         for t, m, med in same) + "."]
            lines.append("")
    real = result["meta"].get("real_clips")
    lines += ["## Data", "", "- planted testbeds: generated sequences as in `dsfq_ablation.py` "
              f"({meta['calib_sequences']} calibration sequences per seed, 6 held-out, seed {HELD_OUT_SEED});"]
    if real:
        lines.append(f"- real clips: {', '.join(real['data'])}, {real['frames']}-frame windows at "
                     f"{real['resolution'][0]}x{real['resolution'][1]} (`pad`), strides {real['strides']}; split "
                     f"{real['split']}; {len(real['held_out'])} held-out windows: {', '.join(real['held_out'])}.")
    else:
        lines.append(f"- real clips: skipped ({result['meta'].get('real_clips_skipped', 'not run')}).")
    return "\n".join(lines) + "\n"


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def dump(result: dict) -> str:
    """The results JSON: floats to 6 significant digits, one line per run (252 runs with auto's per-block errors
    would be a 300 kB file indented)."""
    result = _rounded(result)
    head = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2)
    runs = ",\n    ".join(json.dumps(run) for run in result["runs"])
    return head[:-2] + ',\n  "runs": [\n    ' + runs + "\n  ]\n}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--calib-sequences", type=int, default=8, help="calibration sequences / windows per seed")
    parser.add_argument("--small-recon", type=int, default=20,
                        help="steps per block of the reconstruction setting (0: run only recon_iters=0)")
    parser.add_argument("--plantings", nargs="*", choices=sorted(PLANTINGS), default=list(PLANTINGS))
    parser.add_argument("--real-plantings", nargs="*", choices=sorted(PLANTINGS), default=["preset", "massive"],
                        help="model plantings evaluated on the real clips (none: skip the real clips)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with sequences/ and videos/")
    parser.add_argument("--frames", type=int, default=4, help="frames per real-clip window")
    parser.add_argument("--held-out-per-clip", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=[*SINGLE, AUTO], choices=[*SINGLE, AUTO])
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: these tensors are tiny; more only spin on a shared machine)")
    parser.add_argument("--out", default="method_auto", help="results file stem under benchmarks/results")
    parser.add_argument("--render", type=Path, help="only re-render the markdown of an existing results JSON")
    args = parser.parse_args()
    if args.render is not None:
        args.render.with_suffix(".md").write_text(render(json.loads(args.render.read_text())))
        return 0
    methods = [m for m in (*SINGLE, AUTO) if m in args.methods]
    if AUTO in methods:
        try:
            QuantConfig(bits=BITS, method=AUTO)
        except QVGGTError as exc:
            print(f"auto skipped: this tree has no --method auto ({exc})", flush=True)
            methods.remove(AUTO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    started = time.perf_counter()
    testbeds = [planted_testbed(p, args.calib_sequences) for p in args.plantings]
    real = real_testbeds(args.real_plantings, args.data, args.frames, args.calib_sequences,
                         args.held_out_per_clip) if args.real_plantings else []
    testbeds += real
    settings = [0] + ([args.small_recon] if args.small_recon else [])
    runs = [run for recon in settings for testbed in testbeds
            for run in run_testbed(testbed, methods, args.seeds, recon)]
    meta = {"command": " ".join(sys.argv[1:]) or "defaults", "preset": "tiny-outliers", "bits": BITS,
            "methods": methods, "seeds": args.seeds, "recon_settings": settings,
            "calib_sequences": args.calib_sequences, "wall_s": round(time.perf_counter() - started, 1),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "noise": "per testbed and metric: max - min across seeds of the best single method (lowest median)",
            "within_noise": "median(auto) <= median(best) + noise",
            "testbeds": {t.name: t.info for t in testbeds}}
    if real:
        meta["real_clips"] = real[0].info
    elif args.real_plantings:
        meta["real_clips_skipped"] = f"{args.data} has no sequences/ and videos/"
    result = {"meta": meta, "summary": summarise(runs, methods), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(dump(result))
    text = render(result)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
