"""Fast Walsh-Hadamard transform vs dense ``x @ H`` on this CPU (DESIGN.md section 4: the plugin's reason).

For x of shape [2048, d] float32 and d in (768, 1024, 4096), times in one run, interleaved round by
round so machine load hits both sides alike: the dense product ``x @ hadamard_matrix(d)``, ``fwht(x)``,
``fwht(x, signs, post_scale)`` (the DSFQ op), and ``x.clone()`` (the memory floor any out-of-place
transform pays). Medians over the rounds; ratio = dense / fwht. Both at the default thread count and
at one thread. Results go to benchmarks/results/fwht_speed.{json,md}.

    python benchmarks/fwht_speed.py          # ~1 minute on a 2-core CPU
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qvggt_export.quant.hadamard import fwht, fwht_stages, hadamard_matrix, random_signs

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = 2048
SIZES = (768, 1024, 4096)
ROUNDS = 7  # dense calls per setting (up to ~1 s each at d = 4096)
FAST_PER_ROUND = 3  # fwht/clone calls per round, interleaved with the dense call
GOAL_RATIO_4096 = 50.0


def _timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _flops_dense(d: int) -> int:
    return 2 * d * d


def _flops_fwht(d: int) -> int:
    # What the implementation does: 2 f multiply-adds per element for each Sylvester stage of f points,
    # 2 m for the dense Paley factor.
    stages, m = fwht_stages(d)
    return d * (sum(2 * f for f in stages) + (2 * m if m > 1 else 0))


def measure(d: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(ROWS, d, generator=gen)
    h = hadamard_matrix(d, torch.float32)
    signs = random_signs(d, 0)
    post = torch.rand(d, generator=gen) + 0.5
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "fwht": lambda: fwht(x),
        "fwht_signs_post": lambda: fwht(x, signs, post),
        "clone": lambda: x.clone(),
    }
    with torch.no_grad():
        reference = x.double() @ hadamard_matrix(d)
        errors = {"fwht": (fwht(x).double() - reference).abs().max().item(),
                  "dense": ((x @ h).double() - reference).abs().max().item()}
        times: dict[str, list[float]] = {name: [] for name in ["dense", *cases]}
        for fn in [lambda: x @ h, *cases.values()]:
            fn()  # warm-up: allocator, MKL, caches
        for _ in range(ROUNDS):
            times["dense"].append(_timed(lambda: x @ h))
            for _ in range(FAST_PER_ROUND):
                for name, fn in cases.items():
                    times[name].append(_timed(fn))
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    return {
        "d": d, "threads": threads, "stages": fwht_stages(d)[0], "paley_order": fwht_stages(d)[1],
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "min_ms": {k: round(min(v) * 1e3, 3) for k, v in times.items()},
        "ratio_dense_over_fwht": round(med["dense"] / med["fwht"], 1),
        "ratio_dense_over_fwht_signs_post": round(med["dense"] / med["fwht_signs_post"], 1),
        "ratio_dense_over_clone": round(med["dense"] / med["clone"], 1),
        "flop_ratio_dense_over_fwht": round(_flops_dense(d) / _flops_fwht(d), 1),
        "op_ratio_d_over_log2d": round(d / math.log2(d), 1),
        "max_abs_err_vs_fp64": errors,
    }


def main() -> None:
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    rows = [measure(d, t) for t in sorted({default_threads, 1}, reverse=True) for d in SIZES]
    torch.set_num_threads(default_threads)
    load_after = os.getloadavg()
    at_4096 = [r for r in rows if r["d"] == 4096]
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "shape": [ROWS, "d"], "dtype": "float32", "rounds": ROUNDS,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "goal": f"dense / fwht >= {GOAL_RATIO_4096:g} at d = 4096",
        "goal_met": {str(r["threads"]): r["ratio_dense_over_fwht"] >= GOAL_RATIO_4096 for r in at_4096},
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fwht_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# FWHT vs dense Hadamard matmul", "",
        f"x = [{ROWS}, d] float32 on {result['machine']} ({result['cpus']} CPUs), torch {result['torch']}; "
        f"median of {ROUNDS} dense / {ROUNDS * FAST_PER_ROUND} fast calls, interleaved; load average "
        f"{result['load_average_before_after'][0]} -> {result['load_average_before_after'][1]}.", "",
        "| d | threads | split | dense ms | fwht ms | fwht+signs+scale ms | clone ms | dense/fwht | dense/clone | "
        "flop ratio | fwht err vs fp64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["median_ms"]
        split = " x ".join(str(f) for f in r["stages"]) + (f" x {r['paley_order']}" if r["paley_order"] > 1 else "")
        lines.append(
            f"| {r['d']} | {r['threads']} | {split} | {m['dense']:.1f} | {m['fwht']:.2f} | "
            f"{m['fwht_signs_post']:.2f} | {m['clone']:.2f} | **{r['ratio_dense_over_fwht']}x** | "
            f"{r['ratio_dense_over_clone']}x | {r['flop_ratio_dense_over_fwht']}x | "
            f"{r['max_abs_err_vs_fp64']['fwht']:.1e} |")
    lines += [
        "", f"Goal: {result['goal']}; met: {result['goal_met']} (by thread count).",
        "`dense/clone` is the ceiling for any out-of-place transform in PyTorch here (a plain copy of x); "
        "`flop ratio` counts the multiply-adds the radix-16 implementation performs (a radix-2 butterfly would "
        "do fewer, but as many memory passes as stages). This is a shared 2-core machine: rerun when comparing.",
    ]
    (RESULTS / "fwht_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
