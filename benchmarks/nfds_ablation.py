"""NFDS ablation (paper Fig. 5 / Tab. 13): does the calibration-set sampler lower the seed-to-seed
variance of the quantized model's error, and raise (or keep) its mean?

Pool: windows of the real multi-view clips in ``../shared/data`` (kitchen, fern, great_wall video) when
present, otherwise generated sequences. Held out: other scenes (room, colosseum video) or other generated
sequences. For each strategy (nfds, random, filtered, clustered) and each of ``--seeds`` seeds, select
``--budget`` sequences from the pool, quantize ``tiny-outliers`` at W4A4 with DSFQ + block
reconstruction (the stages whose result depends on the calibration data), and measure the error of
the last aggregator layer and of the heads vs the float model on the held-out set. One statistics pass
serves every seed and strategy, so the comparison is paired. Writes benchmarks/results/nfds_ablation.*

    python benchmarks/nfds_ablation.py [--seeds 5] [--pool 80] [--budget 10] [--k 5]   # ~10 min on 2 cores
    python benchmarks/nfds_ablation.py --corrupt 0.2      # 20 % of the pool made "noisy" (see below)

``--corrupt F`` tests the noise filter's premise, that a pool holds some bad captures: a seed-fixed
fraction F of the candidates is degraded, a third each with heavy sensor noise (Gaussian, sigma 0.25),
overexposure (x3, clipped) or one frame blanked to mid-grey. Results go to ``nfds_ablation_corrupt*``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
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
SIZE = 70


def _sources() -> tuple[object, object, str]:
    if (DATA / "sequences").is_dir():
        pool = [DATA / "sequences" / "kitchen", DATA / "sequences" / "llff_fern", DATA / "videos" / "great_wall.mp4"]
        held = [DATA / "sequences" / "room", DATA / "videos" / "colosseum.mp4"]
        return [str(p) for p in pool], [str(p) for p in held], "real clips (../shared/data)"
    pool_cfg = SyntheticSequenceConfig(num_sequences=1, frames=4, height=SIZE, width=SIZE, seed=0)
    held_cfg = SyntheticSequenceConfig(num_sequences=1, frames=4, height=SIZE, width=SIZE, seed=999)
    return pool_cfg, held_cfg, "generated sequences (no ../shared/data)"


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).pow(2).mean().sqrt() / want.std().clamp_min(1e-12))


@torch.no_grad()
def _evaluate(model, references, held_out) -> dict[str, float]:
    totals = {"agg": 0.0, "depth": 0.0, "points": 0.0, "rot_deg": 0.0}
    for images, (want, want_tokens) in zip(held_out, references, strict=True):
        got = model(images)
        totals["agg"] += _error(model.aggregator(images)[0][-1], want_tokens)
        totals["depth"] += _error(got["depth"], want["depth"])
        totals["points"] += _error(got["world_points"], want["world_points"])
        totals["rot_deg"] += float(pose_angle_errors(want["pose_enc"], got["pose_enc"])["rotation"].mean())
    return {k: v / len(held_out) for k, v in totals.items()}


def _corrupt(candidates: list[torch.Tensor], fraction: float) -> set[int]:
    """Degrade a seed-fixed ``fraction`` of the candidates in place; returns their indices."""
    if fraction <= 0:
        return set()
    generator = torch.Generator().manual_seed(1234)
    chosen = torch.randperm(len(candidates), generator=generator)[: round(fraction * len(candidates))].tolist()
    for n, index in enumerate(chosen):
        sample = candidates[index].clone()
        if n % 3 == 0:
            sample = (sample + 0.25 * torch.randn(sample.shape, generator=generator)).clamp(0, 1)
        elif n % 3 == 1:
            sample = (sample * 3).clamp(0, 1)
        else:
            sample[-1] = 0.5
        candidates[index] = sample
    return set(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pool", type=int, default=80)
    parser.add_argument("--budget", type=int, default=10)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--recon-iters", type=int, default=10)
    parser.add_argument("--corrupt", type=float, default=0.0, help="fraction of pool candidates degraded")
    args = parser.parse_args()
    torch.manual_seed(0)
    pool_source, held_source, source_name = _sources()
    float_model = build_vggt(PRESET)
    pool = build_candidate_pool(pool_source, args.frames, SIZE, "pad", pool_size=args.pool, seed=0)
    held_pool = build_candidate_pool(held_source, args.frames, SIZE, "pad", pool_size=8, seed=1)
    held_out = [sample.unsqueeze(0) for sample in held_pool]
    with torch.no_grad():
        references = [(float_model(x), float_model.aggregator(x)[0][-1]) for x in held_out]

    candidates = [sample for sample in pool]
    corrupted = _corrupt(candidates, args.corrupt)
    started = time.perf_counter()
    stats = collect_statistics(candidates, float_model, NFDSConfig(budget=args.budget, k=args.k), progress=False)
    statistics_s = time.perf_counter() - started
    runs = []
    calibration_s = 0.0
    for strategy in STRATEGIES:
        for seed in range(args.seeds):
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
            print({k: v for k, v in runs[-1].items() if k != "selected"}, flush=True)

    summary = {}
    for strategy in STRATEGIES:
        rows = [r for r in runs if r["strategy"] == strategy]
        summary[strategy] = {m: {"mean": statistics.mean(r[m] for r in rows),
                                 "stdev": statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0}
                             for m in ("agg", "depth", "points", "rot_deg")}
    runs_per_strategy = args.seeds
    for strategy in STRATEGIES:
        rows = [r for r in runs if r["strategy"] == strategy]
        summary[strategy]["corrupted_selected_mean"] = statistics.mean(r["corrupted_selected"] for r in rows)
    result = {"preset": PRESET, "source": source_name, "pool": len(pool), "corrupted": len(corrupted),
              "budget": args.budget, "k": args.k,
              "frames": args.frames, "seeds": args.seeds, "recon_iters": args.recon_iters,
              "held_out_sequences": len(held_out), "nfds_statistics_s": round(statistics_s, 2),
              "mean_calibration_s": round(calibration_s / (len(STRATEGIES) * runs_per_strategy), 2),
              "summary": summary, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    name = "nfds_ablation" + (f"_corrupt{int(round(args.corrupt * 100))}" if corrupted else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# NFDS ablation on `{PRESET}`, W4A4 DSFQ + {args.recon_iters} reconstruction steps/block", "",
             f"Pool: {len(pool)} windows of {args.frames} frames from {source_name}; budget {args.budget}; "
             f"K = {args.k}; {args.seeds} seeds per strategy; {len(held_out)} held-out sequences; "
             f"{len(corrupted)} pool candidates deliberately degraded (--corrupt).", "",
             "Mean +- standard deviation over seeds of the normalised error vs the float model "
             "(RMSE / std of the float output) and of the camera-rotation error:", "",
             "| strategy | last aggregator layer | depth | world_points | rotation deg | degraded picked |",
             "|---|---|---|---|---|---|"]
    for strategy in STRATEGIES:
        s = summary[strategy]
        lines.append(f"| {strategy} | " + " | ".join(f"{s[m]['mean']:.4f} +- {s[m]['stdev']:.4f}"
                                                     for m in ("agg", "depth", "points", "rot_deg"))
                     + f" | {s['corrupted_selected_mean']:.1f} |")
    nfds, rand = summary["nfds"], summary["random"]
    metrics = ("agg", "depth", "points", "rot_deg")
    lower_var = {m: nfds[m]["stdev"] < rand[m]["stdev"] for m in metrics}
    no_worse = {m: nfds[m]["mean"] <= rand[m]["mean"] for m in metrics}
    lines += ["", f"NFDS vs random: lower seed-to-seed stdev: {lower_var}; mean no worse: {no_worse}.",
              f"NFDS statistics pass: {statistics_s:.1f} s for {len(pool)} candidates; one calibration "
              f"(DSFQ + reconstruction) takes {result['mean_calibration_s']} s."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
