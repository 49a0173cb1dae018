"""Block reconstruction: capture passes replayed from recorded outputs vs run from the images.

Reconstruction learns block by block; each block needs its inputs in the float and the quantized chain. Run
from the images, a capture pass for block b executes the patch embedding and blocks 0..b (O(blocks^2) in
all); replayed (:mod:`qvggt_export.quant.reconstruct`, *Cost*), it starts from the previous block's
recorded outputs (O(blocks)). Both give bit-identical learned steps; this measures the time, interleaved in
one run, on:

* ``tiny-outliers``: 4 + 4 aggregator blocks, conv patch embedding;
* ``deep``: the same width with VGGT-1B's depths: 24 + 24 aggregator blocks and a 24-block DINOv2 patch
  embedding (so the embedding costs about a third of a forward, as in VGGT-1B).

    python benchmarks/recon_capture.py [--iters 20] [--sequences 8] [--frames 4]  # about 3-6 min

Writes benchmarks/results/recon_capture.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from qvggt_export.calib import SyntheticSequenceConfig, generate_sequences
from qvggt_export.model import build_vggt
from qvggt_export.model.config import DinoConfig, resolve_config
from qvggt_export.quant import QuantConfig, find_targets
from qvggt_export.quant.dsfq import apply_transforms, collect_channel_stats
from qvggt_export.quant.reconstruct import reconstruct_blocks

RESULTS = Path(__file__).parent / "results"


def model_configs() -> dict:
    base = resolve_config("tiny-outliers")
    agg = base.aggregator
    deep = dataclasses.replace(
        base, name="deep",
        aggregator=dataclasses.replace(agg, depth=24),
        dino=DinoConfig(img_size=agg.img_size, patch_size=14, embed_dim=agg.embed_dim, depth=24,
                        num_heads=agg.num_heads))
    return {"tiny-outliers": base, "deep": deep}


def run(config, quant: QuantConfig, batches: list[torch.Tensor], replay: bool) -> tuple[float, dict, dict]:
    model = build_vggt(config)
    targets = find_targets(model, quant.roles)
    stats = collect_channel_stats(model, targets, batches, quant.seed, raw=False, rotated=True)
    apply_transforms(model, targets, quant.method, stats, quant.alpha, quant.seed)
    started = time.perf_counter()
    steps, report = reconstruct_blocks(model, targets, quant, batches, replay=replay)
    return time.perf_counter() - started, steps, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20, help="reconstruction steps per block")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    batches = generate_sequences(SyntheticSequenceConfig(num_sequences=args.sequences, frames=args.frames,
                                                         height=70, width=70, seed=0))
    quant = QuantConfig(bits="w4a4", method="dsfq", seed=0, recon_iters=args.iters)
    rows = []
    for name, config in model_configs().items():
        times: dict[bool, list[float]] = {False: [], True: []}
        results = {}
        for _ in range(args.repeats):
            for replay in (False, True):  # interleaved: both see the same machine load
                seconds, steps, report = run(config, quant, batches, replay)
                times[replay].append(seconds)
                results[replay] = (steps, report)
        (steps_full, _), (steps_replay, report_replay) = results[False], results[True]
        identical = steps_full.keys() == steps_replay.keys() and all(
            torch.equal(steps_full[k], steps_replay[k]) for k in steps_full)
        full, replayed = min(times[False]), min(times[True])
        rows.append({"model": name, "blocks": len(report_replay),
                     "replayed_blocks": int(sum(r["replayed"] for r in report_replay.values())),
                     "seconds_full": round(full, 2), "seconds_replay": round(replayed, 2),
                     "speedup": round(full / replayed, 2), "steps_bit_identical": identical,
                     "all_seconds": {"full": [round(t, 2) for t in times[False]],
                                     "replay": [round(t, 2) for t in times[True]]}})
        print(rows[-1], flush=True)
    result = {"iters": args.iters, "sequences": args.sequences, "frames": args.frames, "size": 70,
              "method": "dsfq", "bits": "w4a4", "threads": args.threads, "repeats": args.repeats,
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recon_capture.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Block reconstruction: replayed vs full capture passes ({args.sequences} sequences x {args.frames} "
        f"frames, 70 x 70, DSFQ W4A4, {args.iters} steps per block, {args.threads} thread)",
        "",
        f"Best of {args.repeats} interleaved runs each; load average {result['load_average_before_after'][0]} -> "
        f"{result['load_average_before_after'][1]} (shared 2-core machine). `reconstruct_blocks` only (the "
        "statistics pass and transforms before it are the same in both).",
        "",
        "| model | blocks (replayed) | full passes s | replayed s | speedup | learned steps bit-identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['blocks']} ({r['replayed_blocks']}) | {r['seconds_full']} | "
                     f"{r['seconds_replay']} | {r['speedup']}x | {'yes' if r['steps_bit_identical'] else 'NO'} |")
    (RESULTS / "recon_capture.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
