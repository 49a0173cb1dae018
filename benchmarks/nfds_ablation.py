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

**Cost** (``--cost``): seconds of the NFDS statistics pass, one candidate at a time and in batches of
``--cost-batch`` (with and without a reader thread), vs calibration (DSFQ statistics, transforms, block
reconstruction, quantization) at the issue's shape (pool 400, budget 40, 10 frames) on ``tiny``, pool
from the real clips, for ``--recon-list`` steps per block (default 0, 100 and 600; 600 is the published
QuantVGGT recipe: 15 epochs over 40 sequences at calibration batch size 1, ``evaluation/quarot/args_utils.py``),
interleaved (NFDS passes, calibration, NFDS passes, ...), after a profile of the pass (reading vs bare
forward, top operators). Writes ``nfds_cost.{md,json}``.

    python benchmarks/nfds_ablation.py --cost --threads 1

Runs single-threaded by default (``--threads``): on a shared 2-core machine two intra-op threads
contend with other jobs and make small ops 100x slower, which swamps every timing.
"""

from __future__ import annotations

import argparse
import contextlib
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
    readers,
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
READ_WORKERS = (0, 2, 4)  # reading threads compared in the cost profile


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
    stats = collect_statistics(candidates, float_model, NFDSConfig(budget=args.budget, k=args.k,
                                                                   correlation=args.correlation), progress=False)
    statistics_s = time.perf_counter() - started
    runs = []
    calibration_s = 0.0
    for seed in range(args.seeds):  # strategies interleaved per seed: machine load drifts evenly over all four
        for strategy in args.strategies:
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
    for strategy in args.strategies:
        rows = [r for r in runs if r["strategy"] == strategy]
        summary[strategy] = {m: {"mean": statistics.mean(r[m] for r in rows),
                                 "stdev": statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0}
                             for m in METRICS}
        summary[strategy]["corrupted_selected_mean"] = statistics.mean(r["corrupted_selected"] for r in rows)
    values = {s: {m: [r[m] for r in runs if r["strategy"] == s] for m in METRICS} for s in args.strategies}
    p_lower_var = {m: _f_test_lower(values["nfds"][m], values["random"][m]) for m in METRICS}
    diagnostics = _diagnostics(stats, ids, corrupted, args)
    result = {"preset": PRESET, "source": source_name, "pool": len(pool), "corrupted": len(corrupted),
              "budget": args.budget, "k": args.k, "p": NFDSConfig().p, "frames": args.frames, "seeds": args.seeds,
              "recon_iters": args.recon_iters, "correlation": args.correlation, "strategies": list(args.strategies),
              "threads": torch.get_num_threads(),
              "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
              "held_out_sequences": len(held_out), "nfds_statistics_s": round(statistics_s, 2),
              "mean_calibration_s": round(calibration_s / len(runs), 2),
              "summary": summary, "p_nfds_lower_variance_than_random": p_lower_var, "diagnostics": diagnostics,
              "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    name = "nfds_ablation" + (f"_corrupt{int(round(args.corrupt * 100))}" if corrupted else "")
    name += f"_{args.tag}" if args.tag else ""
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# NFDS ablation on `{PRESET}`, W4A4 DSFQ + {args.recon_iters} reconstruction steps/block, eq. 12 "
             f"{args.correlation}", "",
             f"Eq. 12 form: `{args.correlation}` (`NFDSConfig.correlation`; flattened = the paper's per-frame s x d "
             "patch-token vectors, pooled = mean-pooled frame features).", "",
             f"Pool: {len(pool)} windows of {args.frames} frames from {source_name} ({diagnostics['pool_by_source']}); "
             f"budget {args.budget} ({100 * args.budget / len(pool):.0f} % of the pool); K = {args.k}; "
             f"p = {result['p']}; {args.seeds} seeds per strategy; {len(held_out)} held-out sequences "
             f"(other scenes); {len(corrupted)} pool candidates deliberately degraded (--corrupt).", "",
             "Mean +- standard deviation over seeds of the normalised error vs the float model "
             "(RMSE / std of the float output) and of the camera-rotation error (degrees):", "",
             "| strategy | last aggregator layer | depth | world_points | rotation deg | degraded picked |",
             "|---|---|---|---|---|---|"]
    for strategy in args.strategies:
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


def _profile(pool, model, device, batch_size: int) -> dict:
    """Where one statistics pass spends its time: reading, the bare aggregator forward (batch 1 vs ``batch_size``)
    and the top operators of one batch-1 forward of the aggregator (torch profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    out: dict = {"read_workers": list(READ_WORKERS)}
    for _ in range(2):  # reading the pool alone, serial vs reading threads, interleaved
        for workers in READ_WORKERS:
            t0 = time.perf_counter()
            stream = pool.iter_samples(workers=workers)
            first = next(stream)
            first_s = time.perf_counter() - t0
            samples = [first[1]] + [sample for _, sample in stream]
            out.setdefault(f"read_pool_s_workers{workers}", []).append(time.perf_counter() - t0)
            out.setdefault(f"read_first_sample_ms_workers{workers}", []).append(1e3 * first_s)
    read_s = out[f"read_pool_s_workers{readers.DEFAULT_READ_WORKERS}"][-1]
    aggregator = model.aggregator
    sizes = sorted({1, 4, batch_size, 16, 32})
    subset = samples[: 2 * max(sizes)]
    out.update(read_pool_s=read_s, read_per_candidate_ms=1e3 * read_s / len(samples), batch_sizes=sizes)
    with torch.inference_mode():
        aggregator(subset[0].unsqueeze(0).to(device))  # warm-up
        for _ in range(2):  # two interleaved rounds: the machine's load drifts
            for size in sizes:
                t0 = time.perf_counter()
                for start in range(0, len(subset), size):
                    aggregator(torch.stack(subset[start:start + size]).to(device))
                out.setdefault(f"forward_ms_per_candidate_batch{size}", []).append(
                    1e3 * (time.perf_counter() - t0) / len(subset))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for sample in subset[:8]:
                aggregator(sample.unsqueeze(0).to(device))
    out.update(_decode_pool_probe())
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    out["top_ops_self_cpu_share"] = {e.key: round(e.self_cpu_time_total / total, 3) for e in events[:8]}
    out["ops_per_forward"] = sum(e.count for e in events) / 8
    del samples
    return out


def _decode_pool_probe(frames: int = 200) -> dict:
    """Would a decoding thread pool help? Per-frame work of reading a video window (PyAV ``to_image`` + the
    model's resize/pad; both release the GIL) on ``frames`` decoded frames, serial vs 2 threads, twice."""
    from concurrent.futures import ThreadPoolExecutor

    import av

    from qvggt_export.model.preprocess import preprocess_image

    with av.open(str(DATA / "videos" / "great_wall.mp4")) as container:
        t0 = time.perf_counter()
        decoded = []
        for frame in container.decode(video=0):
            decoded.append(frame)
            if len(decoded) == frames:
                break
        decode_s = time.perf_counter() - t0

    def work(frame):
        return preprocess_image(frame.to_image(), SIZE, "pad", 14)

    serial, threaded = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        want = [work(f) for f in decoded]
        serial.append(1e3 * (time.perf_counter() - t0) / len(decoded))
        with ThreadPoolExecutor(2) as pool:
            t0 = time.perf_counter()
            got = list(pool.map(work, decoded))
            threaded.append(1e3 * (time.perf_counter() - t0) / len(decoded))
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    return {"video_decode_ms_per_frame": 1e3 * decode_s / len(decoded),
            "to_image_preprocess_ms_per_frame_serial": serial, "to_image_preprocess_ms_per_frame_2_threads": threaded}


@contextlib.contextmanager
def _read_workers(workers: int | None):
    """Run the pass with ``workers`` reading threads (the statistics pass reads with the pool's default)."""
    default = readers.DEFAULT_READ_WORKERS
    readers.DEFAULT_READ_WORKERS = default if workers is None else workers
    try:
        yield
    finally:
        readers.DEFAULT_READ_WORKERS = default


def _nfds_pass(pool, model, batch_size: int, prefetch: int | None, budget: int, workers: int | None = None):
    config = NFDSConfig(budget=budget, batch_size=batch_size)
    t0 = time.perf_counter()
    with _read_workers(workers):
        stats = collect_statistics(pool, model, config, progress=False, prefetch=prefetch)
    selection = select_from_statistics(stats, config)
    return time.perf_counter() - t0, stats, selection


def cost(args) -> None:
    """NFDS statistics seconds (batch 1 vs batched) vs calibration seconds at the issue's shape, interleaved."""
    if not (DATA / "videos").is_dir():
        raise SystemExit(f"--cost needs the real clips in {DATA}")
    sources = [str(DATA / "sequences"), str(DATA / "videos")]
    device = torch.device(args.device)
    batch = args.cost_batch
    if batch < 2:
        raise SystemExit(f"--cost-batch must be >= 2 (it is compared with batch 1), got {batch}")
    model = build_vggt(args.cost_preset).eval().to(device)
    t0 = time.perf_counter()
    pool = build_candidate_pool(sources, args.cost_frames, args.cost_size, "pad", pool_size=args.cost_pool, seed=0)
    pool_s = time.perf_counter() - t0
    profile = _profile(pool, model, device, batch)
    print(profile, flush=True)
    t0 = time.perf_counter()
    _nfds_pass(pool[:args.cost_budget], model, batch, None, args.cost_budget // 4)  # warm-up: imports, K-Means
    warmup_s = time.perf_counter() - t0
    # How far ahead must a reader thread read to hide the reading? (iter_samples now streams a run of windows,
    # so a shallow queue can overlap; this process gets about one core here.) Two interleaved rounds.
    depths = (0, batch, 8 * batch)
    for _ in range(2):
        for depth in depths:
            seconds, stats, _ = _nfds_pass(pool, model, batch, depth, args.cost_budget)
            profile.setdefault(f"prefetch{depth}_s", []).append(seconds)
            profile.setdefault(f"prefetch{depth}_wait_s", []).append(stats.timing["load_s"])
    profile["prefetch_depths"] = list(depths)
    # (batch size, reader-thread depth, reading threads): None = the defaults.
    variants = {"batch1": (1, 0, None), f"batch{batch}": (batch, None, None),
                f"batch{batch}_serial_read": (batch, None, 0), f"batch{batch}_prefetch": (batch, batch, None)}
    rows = []
    for recon in args.recon_list:
        runs = {}
        selections = {}
        for name, (size, prefetch, workers) in variants.items():
            seconds, stats, selection = _nfds_pass(pool, model, size, prefetch, args.cost_budget, workers)
            runs[name] = {"total_s": seconds, "load_s": stats.timing["load_s"],
                          "forward_s": stats.timing["forward_s"], "selection_s": selection.timing["selection_s"]}
            selections[name] = selection
        first = next(iter(selections.values()))
        # Same statistics and selection whatever the batch (tests/calib/test_nfds_batched.py, 1e-5 relative).
        assert all(s.selected_ids == first.selected_ids for s in selections.values())
        t0 = time.perf_counter()
        batches = [sample.unsqueeze(0).to(device) for sample in first.samples()]
        load_selected_s = time.perf_counter() - t0
        quantized = build_vggt(args.cost_preset).eval().to(device)
        t0 = time.perf_counter()
        calibrate(quantized, QuantConfig(bits="w4a4", method="dsfq", seed=0, recon_iters=recon), batches)
        calib_s = time.perf_counter() - t0
        rest = pool_s + load_selected_s + calib_s
        row = {"recon_iters": recon, "nfds": runs, "calibrate_s": calib_s, "load_selected_s": load_selected_s}
        for name, run in runs.items():
            row[f"share_{name}_of_nfds_plus_calibrate"] = run["total_s"] / (run["total_s"] + calib_s)
            row[f"share_{name}_of_all_calibration"] = run["total_s"] / (run["total_s"] + rest)
        rows.append(row)
        print(row, flush=True)
    result = {"preset": args.cost_preset, "pool": len(pool), "budget": args.cost_budget, "frames": args.cost_frames,
              "image_size": args.cost_size, "device": str(device), "sources": "../shared/data sequences + videos",
              "batch_size": batch, "read_workers_default": readers.DEFAULT_READ_WORKERS, "pool_build_s": pool_s,
              "warmup_s": warmup_s, "profile": profile,
              "threads": torch.get_num_threads(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nfds_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    _ms = lambda values: " / ".join(f"{x:.2f}" for x in values)  # noqa: E731
    ops = ", ".join(f"{k} {100 * v:.0f} %" for k, v in profile["top_ops_self_cpu_share"].items())
    lines = [f"# NFDS cost vs calibration on `{args.cost_preset}` (pool {len(pool)}, budget {args.cost_budget}, "
             f"{args.cost_frames} frames, {args.cost_size}x{args.cost_size}, {device})", "",
             f"Pool from the real clips (../shared/data); {result['threads']} thread(s); load average "
             f"{result['load_average_1_5_15']} at the end. Each row: four NFDS passes (statistics + selection, "
             f"reading the {len(pool)} candidates included) -- batch 1, batch {batch} (the default), batch {batch} "
             "with serial reading (`workers=0`; the others read with the default "
             f"{readers.DEFAULT_READ_WORKERS} preprocessing threads), batch {batch} with a reader thread ({batch} "
             f"ahead) -- all selecting the same {args.cost_budget}, then one "
             "calibration (`calibrate`: DSFQ W4A4 statistics, transforms, block reconstruction with one sequence "
             "per step, quantization) on them; interleaved.", "",
             "## Profile of the pass", "",
             "- reading the pool alone (decode + preprocess, streamed, frames shared by overlapping windows decoded "
             "once), two interleaved rounds, seconds (first sample after): " + "; ".join(
                 f"{w} preprocessing threads: " + " / ".join(f"{t:.2f} ({f:.0f} ms)" for t, f in zip(
                     profile[f"read_pool_s_workers{w}"], profile[f"read_first_sample_ms_workers{w}"], strict=True))
                 for w in profile["read_workers"]),
             "- bare aggregator forward (all layers cached, as a model call does) per candidate, two interleaved "
             f"rounds over {2 * max(profile['batch_sizes'])} candidates: " + ", ".join(
                 f"batch {size} {_ms(profile[f'forward_ms_per_candidate_batch{size}'])} ms"
                 for size in profile["batch_sizes"]),
             f"- one batch-1 forward: {profile['ops_per_forward']:.0f} operator calls; self CPU time: {ops}",
             f"- reading a video window, per frame: decode {profile['video_decode_ms_per_frame']:.2f} ms (sequential), "
             f"then `to_image` + resize/pad {_ms(profile['to_image_preprocess_ms_per_frame_serial'])} ms serially "
             f"vs {_ms(profile['to_image_preprocess_ms_per_frame_2_threads'])} ms in a 2-thread pool (same tensors)",
             f"- batch-{batch} pass with a reader thread N candidates ahead, two interleaved rounds, seconds (of which "
             "the forwards waited for data): " + "; ".join(
                 f"N = {d}: " + " / ".join(f"{t:.1f} ({w:.1f})" for t, w in zip(
                     profile[f"prefetch{d}_s"], profile[f"prefetch{d}_wait_s"], strict=True))
                 for d in profile["prefetch_depths"]),
             "",
             "## NFDS share of calibration", "",
             f"| recon iters | calibrate s | NFDS s, batch 1 (load / forward) | NFDS s, batch {batch} (load / forward) "
             f"| batch {batch}, serial reading (load / forward) | batch {batch} + reader thread (waiting) "
             f"| share, batch 1 | share, batch {batch} | share, batch {batch} serial reading "
             f"| share of all calibration work, batch {batch} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        one, many, serial, ahead = (row["nfds"][k] for k in variants)
        b1, bb = "share_batch1_of_nfds_plus_calibrate", f"share_batch{batch}_of_nfds_plus_calibrate"
        bs = f"share_batch{batch}_serial_read_of_nfds_plus_calibrate"
        lines.append(f"| {row['recon_iters']} | {row['calibrate_s']:.1f} | {one['total_s']:.1f} ({one['load_s']:.1f} / "
                     f"{one['forward_s']:.1f}) | {many['total_s']:.1f} ({many['load_s']:.1f} / {many['forward_s']:.1f})"
                     f" | {serial['total_s']:.1f} ({serial['load_s']:.1f} / {serial['forward_s']:.1f})"
                     f" | {ahead['total_s']:.1f} ({ahead['load_s']:.1f}) | {100 * row[b1]:.1f} % | "
                     f"{100 * row[bb]:.1f} % | {100 * row[bs]:.1f} % "
                     f"| {100 * row[f'share_batch{batch}_of_all_calibration']:.1f} % |")
    lines += ["", "Share = NFDS / (NFDS + calibrate). \"All calibration work\" also adds building the pool "
              f"({pool_s:.1f} s: headers, video demux) and loading the selected sequences to the denominator. "
              f"Not in any row: a one-off {warmup_s:.1f} s warm-up pass (imports of tqdm/scikit-learn, first "
              "K-Means) run before the timed rows, which a pipeline run pays once."]
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
    parser.add_argument("--correlation", default=NFDSConfig().correlation, choices=["flattened", "pooled"],
                        help="eq. 12 form (NFDSConfig.correlation; default: the paper's flattened form)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                        help="strategies compared (nfds and random are required for the summary)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see notes)")
    parser.add_argument("--cost", action="store_true", help="measure NFDS cost vs calibration instead")
    parser.add_argument("--cost-preset", default="tiny")
    parser.add_argument("--cost-pool", type=int, default=400)
    parser.add_argument("--cost-budget", type=int, default=40)
    parser.add_argument("--cost-frames", type=int, default=10)
    parser.add_argument("--cost-size", type=int, default=SIZE, help="square image size of the cost run")
    parser.add_argument("--device", default="cpu", help="device of the cost run (e.g. cuda on a GPU host)")
    parser.add_argument("--cost-batch", type=int, default=NFDSConfig().batch_size,
                        help="batched NFDS pass compared with batch 1 (default: NFDSConfig's)")
    parser.add_argument("--recon-list", type=int, nargs="+", default=[0, 100, 600],
                        help="reconstruction steps per block; 600 = the published recipe (15 epochs x 40, batch 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.cost:
        cost(args)
    else:
        ablation(args)


if __name__ == "__main__":
    main()
