"""``--method auto`` vs every single method, W4A4: error of the quantized model vs the float model.

Testbeds:

* the five planted-outlier testbeds of ``dsfq_ablation.py`` (``preset``, ``vggt-like``, ``massive``,
  ``token-only``, ``channel-only`` on the ``tiny-outliers`` preset), with its generated calibration sequences
  (``_batches(n, seed)``), a fixed held-out set (``--held-out`` generated sequences, 16 by default, seed 1000)
  and its metrics (``sequence_metrics``, kept per held-out sequence);
* ``real/<planting>``: the real clips of ``../shared/data`` (3 photo sequences, 2 videos), windows of
  ``--frames`` frames read by the project's own pool builder (``qvggt_export.calib.build_candidate_pool``, as
  ``--calib-data`` reads them) at the model's 70 px in ``pad`` mode (one square resolution for clips of
  different aspect ratios). **Split by time**: calibration windows lie entirely in the first half of each clip's
  frames, held-out windows entirely in the second half (a window that straddles the middle is used by neither).
  Each seed draws ``--calib-sequences`` calibration windows round-robin over the clips; the held-out set is
  fixed (``--held-out-per-clip`` windows per clip, drawn once). Skipped with a printed reason when
  ``../shared/data`` is absent.

Methods: the five transforms of the registry (rtn, smooth, rotate, smooth_rotate, dsfq) and the variants of
``auto`` (:data:`VARIANTS`): ``auto`` (per block the candidate with the lowest quantized block-output MSE on the
calibration set, then block reconstruction), ``auto-layer`` (the same, then each linear may switch candidate) and,
with reconstruction only, ``auto-recon`` (every candidate is learned, the lowest learned loss wins), at
``--recon-iters`` 0 and a small reconstruction (``--small-recon``, 20 steps per block by default). Every seed
changes the calibration draw and the Hadamard signs; medians over seeds. A variant this tree's ``QuantConfig``
refuses is skipped with a printed reason.

Metrics (vs the float model, on the held-out set): camera rotation / translation angle (degrees,
``pose_angle_errors``), normalised pose_enc, depth, point-map and aggregator RMSE (RMSE / std of the float
output), and depth AbsRel vs the float depth (no alignment).

Two verdicts per testbed, metric and auto variant (lower is better):

* **A, seed range** (:func:`verdict`): the best single method is the one with the lowest median over seeds (of
  the per-seed mean over the held-out set); the noise is the range (max - min) of that method's errors across
  the seeds; "within noise" when ``median(auto) <= median(best) + noise``. Degenerate where the best method does
  not depend on the seed (Base): its noise is 0.
* **B, paired bootstrap** (:func:`bootstrap_verdict`): the best single method is the one with the lowest mean
  over all (seed, held-out sequence) pairs; ``d[s, q] = auto[s, q] - best[s, q]``; the held-out sequences are
  resampled with replacement (``--bootstrap-resamples`` 2000, fixed RNG seed), each resampled sequence bringing
  its pairs of every seed, and the statistic is the mean of ``d``; "within noise" (auto not significantly worse)
  when the 95 % percentile interval of that mean includes 0 or lies below it (its lower end <= 0). It covers
  the noise of the held-out sample, not that of the calibration draw (3 seeds are too few to resample).

Writes benchmarks/results/method_auto.{json,md}.

    nice python benchmarks/method_auto.py [--seeds 3] [--small-recon 20] [--held-out 16]  # about 13 min, 1 core
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
from dsfq_ablation import LABELS, METRICS, PLANTINGS, _batches, model_config, sequence_metrics  # same testbeds
from scipy import stats

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
# auto's variants: name -> (QuantConfig settings besides method="auto", whether they need reconstruction).
VARIANTS = {
    AUTO: ({}, False),
    "auto-layer": ({"auto_granularity": "layer"}, False),
    "auto-recon": ({"auto_criterion": "reconstructed"}, True),
}
ALL_METRICS = (*METRICS, "abs_rel")
TABLE_METRICS = ("rot_deg", "depth")  # the two columns of the markdown tables
BITS = "w4a4"
HELD_OUT_SEED = 1000
CONFIDENCE = 0.95
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


def bootstrap_verdict(single: Mapping[str, Sequence[Sequence[float]]], auto: Sequence[Sequence[float]],
                      resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Whether auto is significantly worse than the best single method, for one testbed and one metric (lower is
    better), by a paired bootstrap over the held-out sequences.

    Args:
        single: per method, its error ``[seed][held-out sequence]``.
        auto: auto's error ``[seed][held-out sequence]`` (same seeds and sequences).
        resamples: bootstrap resamples.
        seed: seeds the resampling.
        confidence: of the two-sided percentile interval.

    Returns:
        ``best`` (the method with the lowest mean over all (seed, sequence) pairs), ``best_mean``, ``auto_mean``,
        ``diff`` (mean of ``auto - best`` over the pairs), ``low`` / ``high`` (the percentile interval of that mean
        when the sequences are resampled with replacement, each with its pairs of every seed) and ``within``
        (``low <= 0``: the interval includes 0 or lies below it).
    """
    want = np.asarray(auto, dtype=float)
    if want.ndim != 2 or want.shape[1] < 2 or not single:
        raise ValueError("bootstrap_verdict needs [seed][sequence] errors with at least 2 held-out sequences")
    errors = {method: np.asarray(values, dtype=float) for method, values in single.items()}
    if any(values.shape != want.shape for values in errors.values()):
        raise ValueError(f"every method needs the same [seed][sequence] shape as auto {want.shape}")
    means = {method: float(values.mean()) for method, values in errors.items()}
    best = min(means, key=means.get)
    # Pairs of one sequence travel together, so resampling sequences of the seed-averaged difference is the same.
    per_sequence = (want - errors[best]).mean(axis=0)
    if np.all(per_sequence == per_sequence[0]):  # every resample has the same mean (scipy warns on such data)
        low = high = float(per_sequence[0])
    else:
        interval = stats.bootstrap((per_sequence,), np.mean, n_resamples=resamples, confidence_level=confidence,
                                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return {"best": best, "best_mean": means[best], "auto_mean": float(want.mean()),
            "diff": float(per_sequence.mean()), "low": low, "high": high, "within": low <= 0}


def miss_diagnostics(auto_runs: Sequence[Mapping], winner: str) -> dict:
    """Where auto trails ``winner`` (a single method) on camera rotation: in auto's own walks (every seed), how
    often did ``winner`` measure a lower block error than auto's choice, on the special tokens (camera +
    registers), on the patch tokens and on the criterion (their mean)? Aggregator blocks only (where the error is
    split); ``chose_winner`` counts the blocks where auto picked ``winner`` itself."""
    counts = {"blocks": 0, "chose_winner": 0, "special": 0, "patch": 0, "criterion": 0}
    for run in auto_runs:
        for record in run.get("selection", {}).get("blocks", {}).values():
            parts = record.get("token_errors") or {}
            if winner not in parts or record["method"] not in parts:
                continue
            counts["blocks"] += 1
            if record["method"] == winner:
                counts["chose_winner"] += 1
                continue
            mine, theirs = parts[record["method"]], parts[winner]
            counts["special"] += theirs["special"] < mine["special"]
            counts["patch"] += theirs["patch"] < mine["patch"]
            counts["criterion"] += record["errors"][winner] < record["errors"][record["method"]]
    return counts


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


def planted_testbed(planting: str, calib_sequences: int, held_out: int) -> Testbed:
    return Testbed(planting, model_config(planting), lambda seed: _batches(calib_sequences, seed=seed),
                   _batches(held_out, seed=HELD_OUT_SEED),
                   {"data": "generated (calib.synthetic), 4 frames, 70x70", "calibration_sequences": calib_sequences,
                    "held_out": f"{held_out} generated sequences, seed {HELD_OUT_SEED}"})


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
            "held_out_per_clip": held_out_per_clip, "held_out": [ids[i] for i in held_out_indices]}
    return [Testbed(f"real/{planting}", model_config(planting), calibration_batches, held_out, info)
            for planting in plantings]


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_per_sequence(model: torch.nn.Module, references: list, held_out: list[torch.Tensor]
                          ) -> dict[str, list[float]]:
    """Per metric of :data:`ALL_METRICS`, its value on each held-out sequence: ``dsfq_ablation``'s metrics (their
    mean is what its ``evaluate`` returns) and AbsRel of the quantized depth vs the float depth (no alignment)."""
    values: dict[str, list[float]] = {k: [] for k in ALL_METRICS}
    for images, (want, want_tokens) in zip(held_out, references, strict=True):
        got = model(images)
        row = sequence_metrics(got, model.aggregator(images)[0][-1], want, want_tokens)
        row["abs_rel"] = depth_metrics(got["depth"].numpy(), want["depth"].numpy(), align="none")["abs_rel"]
        for k in ALL_METRICS:
            values[k].append(float(row[k]))
    return values


def layer_counts(selection: Mapping) -> dict[str, int]:
    """How many linears auto gave each method (from ``CalibrationResult.method_selection``), nonzero only."""
    return {m: n for m, n in selection.get("layer_counts", {}).items() if n}


def variant_config(variant: str, seed: int, recon_iters: int) -> QuantConfig:
    settings, _ = VARIANTS[variant]
    return QuantConfig(bits=BITS, method=AUTO, auto_methods=SINGLE, seed=seed, recon_iters=recon_iters, **settings)


def available_variants(variants: Sequence[str], recon_iters: int) -> list[str]:
    """The variants that apply to this setting and that this tree's ``QuantConfig`` accepts (others: printed)."""
    usable = []
    for variant in variants:
        if VARIANTS[variant][1] and not recon_iters:
            continue
        try:
            variant_config(variant, 0, recon_iters)
        except (QVGGTError, TypeError) as exc:  # TypeError: a QuantConfig field this tree does not have yet
            print(f"{variant} skipped at recon_iters={recon_iters}: {exc}", flush=True)
            continue
        usable.append(variant)
    return usable


def run_testbed(testbed: Testbed, methods: Sequence[str], seeds: int, recon_iters: int) -> list[dict]:
    float_model = build_vggt(testbed.config)
    with torch.no_grad():
        references = [(float_model(x), float_model.aggregator(x)[0][-1]) for x in testbed.held_out]
    runs = []
    for seed in range(seeds):
        batches = testbed.calibration(seed)
        for method in methods:
            if method in VARIANTS:
                quant = variant_config(method, seed, recon_iters)
            else:
                quant = QuantConfig(bits=BITS, method=method, seed=seed, recon_iters=recon_iters)
            model = build_vggt(testbed.config)
            started = time.perf_counter()
            result = calibrate(model, quant, batches)
            seconds = time.perf_counter() - started
            per_sequence = evaluate_per_sequence(model, references, testbed.held_out)
            run = {"testbed": testbed.name, "recon_iters": recon_iters, "method": method, "seed": seed,
                   "calibrate_s": round(seconds, 2), **{k: sum(v) / len(v) for k, v in per_sequence.items()}}
            if method in VARIANTS:
                selection = result.method_selection
                # Per block: the choice and every candidate's error; the per-linear map only where it differs
                # from the block's choice (granularity "layer").
                run["selection"] = {**{k: v for k, v in selection.items() if k != "blocks"}, "blocks": {
                    block: {**{k: v for k, v in entry.items() if k != "layers"},
                            **({"switched": switched} if (switched := {
                                name: m for name, m in entry.get("layers", {}).items() if m != entry["method"]})
                               else {})}
                    for block, entry in selection.get("blocks", {}).items()}}
                run["layer_counts"] = layer_counts(selection)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items() if k != "selection"},
                  flush=True)
            run["per_sequence"] = per_sequence
            runs.append(run)
    return runs


def summarise(runs: list[dict], resamples: int, bootstrap_seed: int) -> dict:
    """Per setting and testbed: medians per method and metric; per auto variant, verdicts A and B per metric and
    the linears it gave each method (summed over seeds)."""
    summary: dict = {}
    order = [*SINGLE, *VARIANTS]
    for (recon, testbed) in dict.fromkeys((r["recon_iters"], r["testbed"]) for r in runs):
        rows = [r for r in runs if r["recon_iters"] == recon and r["testbed"] == testbed]
        per = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"]) for m in order}
        per = {m: v for m, v in per.items() if v}
        entry: dict = {"medians": {m: {k: statistics.median(r[k] for r in per[m]) for k in ALL_METRICS} for m in per}}
        singles = [m for m in SINGLE if m in per]
        for variant in (v for v in VARIANTS if v in per):
            entry.setdefault("verdicts", {})[variant] = {k: verdict(
                {m: [r[k] for r in per[m]] for m in singles}, [r[k] for r in per[variant]]) for k in ALL_METRICS}
            entry.setdefault("bootstrap", {})[variant] = {k: bootstrap_verdict(
                {m: [r["per_sequence"][k] for r in per[m]] for m in singles},
                [r["per_sequence"][k] for r in per[variant]], resamples, bootstrap_seed) for k in ALL_METRICS}
            counts: collections.Counter = collections.Counter()
            for r in per[variant]:
                counts.update(r["layer_counts"])
            entry.setdefault("choices", {})[variant] = dict(counts.most_common())
            if variant == AUTO:  # where it misses rotation: did its block error see the winner coming?
                misses = {v["best"] for v in (entry["verdicts"][variant]["rot_deg"],
                                              entry["bootstrap"][variant]["rot_deg"]) if not v["within"]}
                if misses:
                    entry["rotation_misses"] = {w: miss_diagnostics(per[variant], w) for w in sorted(misses)}
        summary.setdefault(f"recon{recon}", {})[testbed] = entry
    return summary


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _pair(values: Mapping[str, float]) -> str:
    return f"{values['rot_deg']:.2f} / {values['depth']:.4f}"


LABEL = {**LABELS, **{v: v for v in VARIANTS}}
_DIGITS = {"rot_deg": 2, "trans_deg": 2}  # degrees; the relative errors get 4 decimals


def _num(metric: str, value: float, sign: bool = False) -> str:
    return f"{value:{'+' if sign else ''}.{_DIGITS.get(metric, 4)}f}"


def _cell_a(metric: str, v: Mapping) -> str:
    mark = "yes" if v["within"] else "**no**"
    return f"{_num(metric, v['gap'], True)} vs {LABEL[v['best']]} (noise {_num(metric, v['noise'])}): {mark}"


def _cell_b(metric: str, v: Mapping) -> str:
    mark = "yes" if v["within"] else "**no**"
    return (f"{_num(metric, v['diff'], True)} [{_num(metric, v['low'], True)}, {_num(metric, v['high'], True)}] "
            f"vs {LABEL[v['best']]}: {mark}")


def render(result: dict) -> str:
    meta = result["meta"]
    confidence = round(100 * meta.get("confidence", CONFIDENCE))
    lines = [f"# `--method auto` vs every single method ({BITS.upper()}, error vs the float model)", "",
             f"`nice python benchmarks/method_auto.py` ({meta['command']}): `{meta['preset']}` with planted outliers "
             "(random weights: this compares methods on one model and says nothing about trained VGGT-1B), "
             f"{meta['seeds']} seeds (calibration draw + Hadamard signs), medians. Wall time {meta['wall_s']} s, "
             f"torch {meta['torch']}, {meta['threads']} thread(s), load average {meta['load_before']} before, "
             f"{meta['load_after']} after (shared 2-core machine).", "",
             "Cells: camera-rotation error (deg) / depth RMSE over the float depth's std: per seed the mean over the "
             "held-out set, then the median over seeds. Auto variants: `auto` (per block, the lowest quantized "
             "block-output error), `auto-layer` (then per linear), `auto-recon` (with reconstruction only: every "
             "candidate learned, the lowest learned loss wins).", "",
             "Two verdicts per testbed, metric and variant (lower is better):", "",
             "- **A (seed range)**: best = the single method with the lowest median over seeds; noise = the range "
             "(max - min) across seeds of the best method's error; within noise when median(auto) <= median(best) "
             "+ noise. Cell: median(auto) - median(best) vs best (noise): verdict. Degenerate where the best "
             "method does not depend on the seed (Base: noise exactly 0).",
             "- **B (paired bootstrap)**: best = the single method with the lowest mean over all (seed, held-out "
             "sequence) pairs; d = auto - best per pair; the held-out sequences are resampled with replacement "
             f"({meta['bootstrap_resamples']} resamples, RNG seed {meta['bootstrap_seed']}), each bringing its "
             f"pairs of every seed; statistic mean(d); within noise (not significantly worse) when the "
             f"{confidence} % percentile interval includes 0 or lies below it (lower end <= 0). Cell: mean(d) "
             "[interval] vs best: verdict. It covers the noise of the held-out sample, not of the calibration "
             "draw (seeds are not resampled).", ""]
    for setting, testbeds in result["summary"].items():
        recon = int(setting.removeprefix("recon"))
        methods = list(next(iter(testbeds.values()))["medians"])
        variants = [m for m in methods if m in VARIANTS]
        lines += [f"## recon_iters = {recon}" + (" (no block reconstruction)" if recon == 0 else " per block"), "",
                  "| testbed | " + " | ".join(LABEL[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
        lines += [f"| {t} | " + " | ".join(_pair(e["medians"][m]) for m in methods) + " |" for t, e in testbeds.items()]
        if not variants:
            continue
        lines += ["", "Within noise, testbeds out of " + str(len(testbeds)) + ":", "",
                  "| variant | rot A | rot B | depth A | depth B | other metrics not within noise (A / B) |",
                  "|---|---|---|---|---|---|"]
        for variant in variants:
            a = {t: e["verdicts"][variant] for t, e in testbeds.items()}
            b = {t: e["bootstrap"][variant] for t, e in testbeds.items()}
            others = []
            for k in ALL_METRICS:
                if k in TABLE_METRICS:
                    continue
                fails_a = [t for t in testbeds if not a[t][k]["within"]]
                fails_b = [t for t in testbeds if not b[t][k]["within"]]
                if fails_a or fails_b:
                    others.append(f"{k}: {', '.join(fails_a) or '-'} / {', '.join(fails_b) or '-'}")
            lines.append(f"| {variant} | " + " | ".join(
                str(sum(x[t][k]["within"] for t in testbeds)) for k in TABLE_METRICS for x in (a, b))
                + f" | {'; '.join(others) or 'none'} |")
        lines += ["", "| testbed | variant | rot A | rot B | depth A | depth B |", "|---|---|---|---|---|---|"]
        for testbed, entry in testbeds.items():
            for variant in variants:
                a, b = entry["verdicts"][variant], entry["bootstrap"][variant]
                lines.append(f"| {testbed} | {variant} | " + " | ".join(
                    f"{_cell_a(k, a[k])} | {_cell_b(k, b[k])}" for k in TABLE_METRICS) + " |")
        lines += ["", "Linears each variant gave each method (summed over seeds):", "",
                  "| testbed | variant | " + " | ".join(LABELS[m] for m in SINGLE) + " |",
                  "|---|---|" + "---|" * len(SINGLE)]
        same = []
        for testbed, entry in testbeds.items():
            for variant in variants:
                choices = entry["choices"][variant]
                lines.append(f"| {testbed} | {variant} | " + " | ".join(str(choices.get(m, 0)) for m in SINGLE) + " |")
                if len(choices) == 1:
                    only = next(iter(choices))
                    same.append(f"{testbed} {variant}: {_pair(entry['medians'][variant])} vs {LABELS[only]} "
                                f"{_pair(entry['medians'][only])}")
        if same:
            # auto with one candidate everywhere is bit-identical to that method (tests/quant), so these must match.
            lines += ["", "Where a variant chose one method for every linear in every seed, it vs that method (rot / "
                      "depth medians): " + "; ".join(same) + "."]
        misses = [(t, w, c) for t, e in testbeds.items() for w, c in e.get("rotation_misses", {}).items()]
        if misses:
            lines += ["", "Where `auto` misses camera rotation (verdict A or B): in auto's own walks (aggregator "
                      "blocks x seeds), the blocks where the rotation winner measured a lower error than auto's "
                      "choice, on the special tokens (camera + registers), on the patch tokens and on the criterion "
                      "(their mean). Where these are 0, no block-output error of this kind points at the winner.",
                      "", "| testbed | rotation winner | blocks | chose it | lower special | lower patch | "
                      "lower criterion |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {t} | {LABEL[w]} | {c['blocks']} | {c['chose_winner']} | {c['special']} | {c['patch']} | "
                      f"{c['criterion']} |" for t, w, c in misses]
        lines.append("")
    real = meta.get("real_clips")
    lines += ["## Data", "", "- planted testbeds: generated sequences as in `dsfq_ablation.py` "
              f"({meta['calib_sequences']} calibration sequences per seed, {meta['held_out']} held-out, seed "
              f"{HELD_OUT_SEED});"]
    if real:
        lines.append(f"- real clips: {', '.join(real['data'])}, {real['frames']}-frame windows at "
                     f"{real['resolution'][0]}x{real['resolution'][1]} (`pad`), strides {real['strides']}; split "
                     f"{real['split']}; up to {real['held_out_per_clip']} held-out windows per clip, "
                     f"{len(real['held_out'])} in all (windows of one clip overlap in time, so they are not "
                     f"independent samples): {', '.join(real['held_out'])}.")
    else:
        lines.append(f"- real clips: skipped ({meta.get('real_clips_skipped', 'not run')}).")
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
    """The results JSON: floats to 6 significant digits, one line per run (hundreds of runs with per-sequence
    metrics and auto's per-block errors would be a file of megabytes indented)."""
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
    parser.add_argument("--held-out", type=int, default=16, help="held-out generated sequences (planted testbeds)")
    parser.add_argument("--held-out-per-clip", type=int, default=4,
                        help="held-out windows per real clip (fewer where a clip's second half has fewer)")
    parser.add_argument("--bootstrap-resamples", type=int, default=2000)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=[*SINGLE, *VARIANTS], choices=[*SINGLE, *VARIANTS])
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: these tensors are tiny; more only spin on a shared machine)")
    parser.add_argument("--out", default="method_auto", help="results file stem under benchmarks/results")
    parser.add_argument("--render", type=Path,
                        help="only recompute the verdicts and re-render the markdown of an existing results JSON")
    args = parser.parse_args()
    if args.render is not None:
        result = json.loads(args.render.read_text())
        result["summary"] = summarise(result["runs"], result["meta"]["bootstrap_resamples"],
                                      result["meta"]["bootstrap_seed"])
        args.render.write_text(dump(result))
        args.render.with_suffix(".md").write_text(render(result))
        return 0
    if args.held_out < 2 or args.held_out_per_clip < 1 or args.bootstrap_resamples < 1:
        parser.error("--held-out needs >= 2 (the bootstrap resamples sequences), --held-out-per-clip and "
                     "--bootstrap-resamples >= 1")
    singles = [m for m in SINGLE if m in args.methods]
    settings = [0] + ([args.small_recon] if args.small_recon else [])
    methods = {recon: singles + available_variants([v for v in VARIANTS if v in args.methods], recon)
               for recon in settings}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    started = time.perf_counter()
    testbeds = [planted_testbed(p, args.calib_sequences, args.held_out) for p in args.plantings]
    real = real_testbeds(args.real_plantings, args.data, args.frames, args.calib_sequences,
                         args.held_out_per_clip) if args.real_plantings else []
    testbeds += real
    runs = [run for recon in settings for testbed in testbeds
            for run in run_testbed(testbed, methods[recon], args.seeds, recon)]
    meta = {"command": " ".join(sys.argv[1:]) or "defaults", "preset": "tiny-outliers", "bits": BITS,
            "methods": {f"recon{recon}": m for recon, m in methods.items()}, "seeds": args.seeds,
            "recon_settings": settings, "calib_sequences": args.calib_sequences, "held_out": args.held_out,
            "bootstrap_resamples": args.bootstrap_resamples, "bootstrap_seed": args.bootstrap_seed,
            "confidence": CONFIDENCE, "wall_s": round(time.perf_counter() - started, 1),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "verdict_a": "best = lowest median over seeds; noise = max - min across seeds of the best method; "
            "within when median(auto) <= median(best) + noise",
            "verdict_b": "best = lowest mean over (seed, sequence) pairs; paired bootstrap of mean(auto - best) "
            "resampling held-out sequences (all seeds' pairs together); within when the percentile interval's "
            "lower end <= 0",
            "testbeds": {t.name: t.info for t in testbeds}}
    if real:
        meta["real_clips"] = real[0].info
    elif args.real_plantings:
        meta["real_clips_skipped"] = f"{args.data} has no sequences/ and videos/"
    runs = _rounded(runs)  # the verdicts from the numbers the JSON keeps, so that --render reproduces them
    result = {"meta": meta, "summary": summarise(runs, args.bootstrap_resamples, args.bootstrap_seed), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(dump(result))
    text = render(result)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
