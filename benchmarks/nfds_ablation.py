"""NFDS ablation (paper Fig. 5 / Tab. 13) and NFDS cost.

**Ablation** (default): does the calibration-set sampler lower the seed-to-seed variance of the quantized
model's error, and raise (or keep) its mean? Pool: windows of the real multi-view clips in
``../shared/data`` (kitchen, fern, great_wall video) when present, otherwise generated sequences. Held
out (never selected from, never looked at when choosing settings): other scenes (room, colosseum video)
or other generated sequences. For each strategy (nfds, random, filtered, clustered) and each of
``--seeds`` seeds, select ``--budget`` sequences from the pool, quantize ``tiny-outliers`` at W4A4 with
DSFQ + block reconstruction (the stages whose result depends on the calibration data), and measure the
error of the last aggregator layer and of the heads vs the float model on the held-out set. One
statistics pass serves every seed and strategy. Besides mean and stdev the results give a one-sided
F-test p-value for "NFDS has lower variance than random" (small seed counts make stdevs noisy) and
diagnostics of the filter and the clusters: which sources and how many degraded candidates the filter
drops, cluster sizes, and how many degraded candidates each strategy picks.

    python benchmarks/nfds_ablation.py                        # paper ratios: pool 200, budget 20 (10 %), K 8
    python benchmarks/nfds_ablation.py --corrupt 0.2          # 20 % of the pool made "noisy" (see below)
    python benchmarks/nfds_ablation.py --pool 80 --budget 10 --k 5 --tag small   # the first, smaller setting

``--corrupt F`` tests the noise filter's premise, that a pool holds some bad captures: a seed-fixed
fraction F of the candidates is degraded, a third each with heavy sensor noise (Gaussian, sigma 0.25),
overexposure (x3, clipped) or one frame blanked to mid-grey.

**Cost** (``--cost``): seconds of the NFDS statistics pass vs calibration (DSFQ statistics, transforms,
block reconstruction, quantization) at the issue's shape (pool 400, budget 40, 10 frames) on ``tiny``,
pool from the real clips, for several ``--recon-list`` settings, interleaved (NFDS pass, calibration,
NFDS pass, ...). Writes ``nfds_cost.{md,json}``.

Runs single-threaded by default (``--threads``): on a shared 2-core machine two intra-op threads
contend with other jobs and make small ops 100x slower, which swamps every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from qvggt_export.calib import (
    NFDSConfig,
    SyntheticSequenceConfig,
    build_candidate_pool,
    collect_statistics,
    select_from_statistics,
)
from qvggt_export.model import build_vggt
from qvggt_export.model.pose import pose_angle_errors
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.config import QuantConfig

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PRESET = "tiny-outliers"
STRATEGIES = ("nfds", "random", "filtered", "clustered")
METRICS = ("agg", "depth", "points", "rot_deg")
SIZE = 70


def _sources() -> tuple[object, object, str]:
    if (DATA / "sequences").is_dir():
        pool = [DATA / "sequences" / "kitchen", DATA / "sequences" / "llff_fern", DATA / "videos" / "great_wall.mp4"]
        held = [DATA / "sequences" / "room", DATA / "videos" / "colosseum.mp4"]
        return [str(p) for p in pool], [str(p) for p in held], "real clips (../shared/data)"
    pool_cfg = SyntheticSequenceConfig(num_sequences=1, frames=4, height=SIZE, width=SIZE, seed=0)
    held_cfg = SyntheticSequenceConfig(num_sequences=1, frames=4, height=SIZE, width=SIZE, seed=999)
    return pool_cfg, held_cfg, "generated sequences (no ../shared/data)"


def _source_of(sample_id: str) -> str:
    return sample_id.split("[", 1)[0].split("/", 1)[0]


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).pow(2).mean().sqrt() / want.std().clamp_min(1e-12))


@torch.inference_mode()
def _evaluate(model, references, held_out) -> dict[str, float]:
    totals = dict.fromkeys(METRICS, 0.0)
    for images, (want, want_tokens) in zip(held_out, references, strict=True):
        got = model(images)
        totals["agg"] += _error(model.aggregator(images)[0][-1], want_tokens)
        totals["depth"] += _error(got["depth"], want["depth"])
        totals["points"] += _error(got["world_points"], want["world_points"])
        totals["rot_deg"] += float(pose_angle_errors(want["pose_enc"], got["pose_enc"])["rotation"].mean())
    return {k: v / len(held_out) for k, v in totals.items()}


def _corrupt(candidates: list[torch.Tensor], fraction: float) -> dict[int, str]:
    """Degrade a seed-fixed ``fraction`` of the candidates in place; returns {index: kind of degradation}."""
    if fraction <= 0:
        return {}
    generator = torch.Generator().manual_seed(1234)
    chosen = torch.randperm(len(candidates), generator=generator)[: round(fraction * len(candidates))].tolist()
    kinds = {}
    for n, index in enumerate(chosen):
        sample = candidates[index].clone()
        if n % 3 == 0:
            sample, kinds[index] = (sample + 0.25 * torch.randn(sample.shape, generator=generator)).clamp(0, 1), "noise"
        elif n % 3 == 1:
            sample, kinds[index] = (sample * 3).clamp(0, 1), "overexposed"
        else:
            sample[-1], kinds[index] = 0.5, "blank frame"
        candidates[index] = sample
    return kinds


def _f_test_lower(a: list[float], b: list[float]) -> float:
    """One-sided p-value of H1: var(a) < var(b) (F-test; assumes roughly normal errors)."""
    from scipy.stats import f

    va, vb = statistics.variance(a), statistics.variance(b)
    if vb == 0:
        return 1.0
    return float(f.cdf(va / vb, len(a) - 1, len(b) - 1))


def _diagnostics(stats, ids: list[str], corrupted: dict[int, str], args) -> dict:
    """What the filter drops and what the clusters look like (seed 0; the filter does not depend on it)."""
    nfds = select_from_statistics(stats, NFDSConfig(strategy="nfds", budget=args.budget, k=args.k, seed=0))
    clustered = select_from_statistics(stats, NFDSConfig(strategy="clustered", budget=args.budget, k=args.k, seed=0))
    sources = Counter(_source_of(i) for i in ids)
    dropped = [i for i, keep in enumerate(nfds.kept) if not keep]
    out = {
        "pool_by_source": dict(sources),
        "filter_dropped_by_source": dict(Counter(_source_of(ids[i]) for i in dropped)),
        "filter_dropped": len(dropped),
        "degraded_in_pool": dict(Counter(corrupted.values())),
        "degraded_dropped_by_filter": dict(Counter(corrupted[i] for i in dropped if i in corrupted)),
        "nfds_cluster_sizes": sorted(Counter(int(x) for x in nfds.labels if x >= 0).values()),
        "clustered_cluster_sizes": sorted(Counter(int(x) for x in clustered.labels).values()),
        "clustered_degraded_per_cluster": {},
        "correlation_vector_range": [float(stats.vectors.min()), float(stats.vectors.max())],
    }
    if corrupted:
        per = Counter(int(clustered.labels[i]) for i in corrupted)
        sizes = Counter(int(x) for x in clustered.labels)
        out["clustered_degraded_per_cluster"] = {str(c): f"{per.get(c, 0)}/{sizes[c]}" for c in sorted(sizes)}
    return out


def ablation(args) -> None:
    pool_source, held_source, source_name = _sources()
    float_model = build_vggt(PRESET)
    pool = build_candidate_pool(pool_source, args.frames, SIZE, "pad", pool_size=args.pool, seed=0)
    held_pool = build_candidate_pool(held_source, args.frames, SIZE, "pad", pool_size=8, seed=1)
    held_out = [sample.unsqueeze(0) for sample in held_pool]
    with torch.inference_mode():
        references = [(float_model(x), float_model.aggregator(x)[0][-1]) for x in held_out]

    ids = pool.ids
    candidates = [sample for _, sample in pool.iter_samples()]
    corrupted = _corrupt(candidates, args.corrupt)
    started = time.perf_counter()
    stats = collect_statistics(candidates, float_model, NFDSConfig(budget=args.budget, k=args.k), progress=False)
    statistics_s = time.perf_counter() - started
    runs = []
    calibration_s = 0.0
    for seed in range(args.seeds):  # strategies interleaved per seed: machine load drifts evenly over all four
        for strategy in STRATEGIES:
            selection = select_from_statistics(stats, NFDSConfig(strategy=strategy, budget=args.budget, k=args.k,
                                                                 seed=seed))
            batches = [candidates[i].unsqueeze(0) for i in selection.selected_indices]
            model = build_vggt(PRESET)
            t0 = time.perf_counter()
            calibrate(model, QuantConfig(bits="w4a4", method="dsfq", seed=0, recon_iters=args.recon_iters), batches)
            calibration_s += time.perf_counter() - t0
            runs.append({"strategy": strategy, "seed": seed, "selected": list(selection.selected_indices),
                         "corrupted_selected": sum(i in corrupted for i in selection.selected_indices),
                         **_evaluate(model, references, held_out)})
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in runs[-1].items() if k != "selected"},
                  flush=True)

    summary = {}
    for strategy in STRATEGIES:
        rows = [r for r in runs if r["strategy"] == strategy]
        summary[strategy] = {m: {"mean": statistics.mean(r[m] for r in rows),
                                 "stdev": statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0}
                             for m in METRICS}
        summary[strategy]["corrupted_selected_mean"] = statistics.mean(r["corrupted_selected"] for r in rows)
    values = {s: {m: [r[m] for r in runs if r["strategy"] == s] for m in METRICS} for s in STRATEGIES}
    p_lower_var = {m: _f_test_lower(values["nfds"][m], values["random"][m]) for m in METRICS}
    diagnostics = _diagnostics(stats, ids, corrupted, args)
    result = {"preset": PRESET, "source": source_name, "pool": len(pool), "corrupted": len(corrupted),
              "budget": args.budget, "k": args.k, "p": NFDSConfig().p, "frames": args.frames, "seeds": args.seeds,
              "recon_iters": args.recon_iters, "threads": torch.get_num_threads(),
              "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
              "held_out_sequences": len(held_out), "nfds_statistics_s": round(statistics_s, 2),
              "mean_calibration_s": round(calibration_s / len(runs), 2),
              "summary": summary, "p_nfds_lower_variance_than_random": p_lower_var, "diagnostics": diagnostics,
              "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    name = "nfds_ablation" + (f"_corrupt{int(round(args.corrupt * 100))}" if corrupted else "")
    name += f"_{args.tag}" if args.tag else ""
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# NFDS ablation on `{PRESET}`, W4A4 DSFQ + {args.recon_iters} reconstruction steps/block", "",
             f"Pool: {len(pool)} windows of {args.frames} frames from {source_name} ({diagnostics['pool_by_source']}); "
             f"budget {args.budget} ({100 * args.budget / len(pool):.0f} % of the pool); K = {args.k}; "
             f"p = {result['p']}; {args.seeds} seeds per strategy; {len(held_out)} held-out sequences "
             f"(other scenes); {len(corrupted)} pool candidates deliberately degraded (--corrupt).", "",
             "Mean +- standard deviation over seeds of the normalised error vs the float model "
             "(RMSE / std of the float output) and of the camera-rotation error (degrees):", "",
             "| strategy | last aggregator layer | depth | world_points | rotation deg | degraded picked |",
             "|---|---|---|---|---|---|"]
    for strategy in STRATEGIES:
        s = summary[strategy]
        lines.append(f"| {strategy} | " + " | ".join(f"{s[m]['mean']:.4f} +- {s[m]['stdev']:.4f}" for m in METRICS)
                     + f" | {s['corrupted_selected_mean']:.1f} |")
    nfds, rand = summary["nfds"], summary["random"]
    lines += ["", "NFDS vs random, per metric (agg, depth, points, rotation):", "",
              "| | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS),
              "| stdev ratio nfds / random | " + " | ".join(
                  f"{nfds[m]['stdev'] / max(rand[m]['stdev'], 1e-30):.2f}" for m in METRICS) + " |",
              "| F-test p (nfds variance lower) | " + " | ".join(f"{p_lower_var[m]:.3f}" for m in METRICS) + " |",
              "| mean no worse than random | " + " | ".join(
                  "yes" if nfds[m]["mean"] <= rand[m]["mean"] else "no" for m in METRICS) + " |",
              "", "Diagnostics (seed 0):", "",
              f"- the noise filter drops {diagnostics['filter_dropped']} candidates, by source: "
              f"{diagnostics['filter_dropped_by_source']}",
              f"- degraded candidates in the pool: {diagnostics['degraded_in_pool'] or 'none'}; dropped by the "
              f"filter: {diagnostics['degraded_dropped_by_filter'] or 'none'}",
              f"- cluster sizes after the filter (nfds): {diagnostics['nfds_cluster_sizes']}; without it "
              f"(clustered): {diagnostics['clustered_cluster_sizes']}",
              f"- degraded per cluster (clustered): {diagnostics['clustered_degraded_per_cluster'] or 'n/a'}",
              f"- eq. 12 correlation values span {diagnostics['correlation_vector_range'][0]:.4f} .. "
              f"{diagnostics['correlation_vector_range'][1]:.4f}",
              "", f"NFDS statistics pass: {statistics_s:.1f} s for {len(pool)} candidates; one calibration "
              f"(DSFQ + reconstruction) takes {result['mean_calibration_s']} s; {result['threads']} thread(s), "
              f"load average {result['load_average_1_5_15']} at the end."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cost(args) -> None:
    """NFDS statistics seconds vs calibration seconds at the issue's shape, interleaved."""
    if not (DATA / "videos").is_dir():
        raise SystemExit(f"--cost needs the real clips in {DATA}")
    sources = [str(DATA / "sequences"), str(DATA / "videos")]
    device = torch.device(args.device)
    model = build_vggt(args.cost_preset).eval().to(device)
    t0 = time.perf_counter()
    pool = build_candidate_pool(sources, args.cost_frames, args.cost_size, "pad", pool_size=args.cost_pool, seed=0)
    pool_s = time.perf_counter() - t0
    config = NFDSConfig(budget=args.cost_budget)
    rows = []
    nfds_runs = []
    for recon in args.recon_list:
        t0 = time.perf_counter()
        ahead = collect_statistics(pool, model, config, progress=False, prefetch=2)  # reader thread, for comparison
        ahead_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = collect_statistics(pool, model, config, progress=False)  # the default (CPU: no reader thread)
        selection = select_from_statistics(stats, config)
        nfds_s = time.perf_counter() - t0
        assert (ahead.means == stats.means).all() and (ahead.vectors == stats.vectors).all()
        nfds_runs.append({"total_s": nfds_s, **stats.timing, "selection_s": selection.timing["selection_s"],
                          "prefetch2_s": ahead_s, "prefetch2_wait_s": ahead.timing["load_s"]})
        t0 = time.perf_counter()
        batches = [sample.unsqueeze(0).to(device) for sample in selection.samples()]
        load_selected_s = time.perf_counter() - t0
        quantized = build_vggt(args.cost_preset).eval().to(device)
        t0 = time.perf_counter()
        calibrate(quantized, QuantConfig(bits="w4a4", method="dsfq", seed=0, recon_iters=recon), batches)
        calib_s = time.perf_counter() - t0
        rows.append({"recon_iters": recon, "nfds_s": nfds_s, "calibrate_s": calib_s,
                     "load_selected_s": load_selected_s,
                     "share_of_nfds_plus_calibrate": nfds_s / (nfds_s + calib_s),
                     "share_of_all_calibration": nfds_s / (pool_s + nfds_s + load_selected_s + calib_s)})
        print(rows[-1], flush=True)
    result = {"preset": args.cost_preset, "pool": len(pool), "budget": args.cost_budget, "frames": args.cost_frames,
              "image_size": args.cost_size, "device": str(device), "sources": "../shared/data sequences + videos",
              "pool_build_s": pool_s,
              "threads": torch.get_num_threads(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
              "nfds_runs": nfds_runs, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nfds_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# NFDS cost vs calibration on `{args.cost_preset}` (pool {len(pool)}, budget {args.cost_budget}, "
             f"{args.cost_frames} frames, {args.cost_size}x{args.cost_size}, {device})", "",
             f"Pool from the real clips (../shared/data); {result['threads']} thread(s); load average "
             f"{result['load_average_1_5_15']} at the end. Each row: one NFDS pass (statistics + selection; "
             "loading the 400 candidates included), then one calibration (`calibrate`: DSFQ statistics, "
             "transforms, block reconstruction, quantization) on its 40 selected sequences, interleaved.", "",
             "| recon iters | NFDS s (load / forward) | NFDS s with a reader thread (waiting for data) | calibrate s | "
             "NFDS / (NFDS + calibrate) | NFDS / all calibration work |", "|---|---|---|---|---|---|"]
    for row, run in zip(rows, nfds_runs, strict=True):
        lines.append(f"| {row['recon_iters']} | {row['nfds_s']:.1f} ({run['load_s']:.1f} / {run['forward_s']:.1f}) | "
                     f"{run['prefetch2_s']:.1f} ({run['prefetch2_wait_s']:.1f}) | "
                     f"{row['calibrate_s']:.1f} | {100 * row['share_of_nfds_plus_calibrate']:.1f} % | "
                     f"{100 * row['share_of_all_calibration']:.1f} % |")
    lines += ["", f"Pool build (headers, video demux): {pool_s:.1f} s; \"all calibration work\" adds it and loading "
              "the selected sequences to the denominator."]
    (RESULTS / "nfds_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--pool", type=int, default=200)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--recon-iters", type=int, default=10)
    parser.add_argument("--corrupt", type=float, default=0.0, help="fraction of pool candidates degraded")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see notes)")
    parser.add_argument("--cost", action="store_true", help="measure NFDS cost vs calibration instead")
    parser.add_argument("--cost-preset", default="tiny")
    parser.add_argument("--cost-pool", type=int, default=400)
    parser.add_argument("--cost-budget", type=int, default=40)
    parser.add_argument("--cost-frames", type=int, default=10)
    parser.add_argument("--cost-size", type=int, default=SIZE, help="square image size of the cost run")
    parser.add_argument("--device", default="cpu", help="device of the cost run (e.g. cuda on a GPU host)")
    parser.add_argument("--recon-list", type=int, nargs="+", default=[0, 20, 100])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.cost:
        cost(args)
    else:
        ablation(args)


if __name__ == "__main__":
    main()
