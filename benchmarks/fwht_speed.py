"""Fast Walsh-Hadamard transform vs dense ``x @ H`` on this CPU (DESIGN.md section 4: the plugin's reason).

For x of shape [2048, d] float32 and d in (768, 1024, 4096), times in one run, interleaved round by
round so machine load hits every case alike: the dense product ``x @ hadamard_matrix(d)``, ``fwht(x)``
(its default path: the compiled CPU kernel of qvggt_export.quant.fwht_native where it builds),
``fwht(x, signs, post_scale)`` (the DSFQ op), ``fwht(x)`` forced onto its PyTorch path, ``x.clone()``
and ``torch.empty_like(x).fill_(1)`` (a fresh output's first-touch page faults: the floor any out-of-place
transform on 4 KiB pages pays). Medians over the rounds; ratio = dense / fwht. Both at the default thread
count and at one thread. Results go to benchmarks/results/fwht_speed.{json,md}.

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

from qvggt_export.quant.hadamard import (
    fwht,
    fwht_backend,
    fwht_stages,
    hadamard_factors,
    hadamard_matrix,
    random_signs,
    use_native_fwht,
)

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
    # What the compiled kernel does: one add per element for each radix-2 Sylvester stage, 2 m for the dense
    # Paley factor (the PyTorch path does 2 f per element per f-point stage instead).
    power, m = hadamard_factors(d)
    return d * (power.bit_length() - 1 + (2 * m if m > 1 else 0))


def _torch_path(x: torch.Tensor) -> torch.Tensor:
    with use_native_fwht(False):
        return fwht(x)


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
        "fwht_pytorch_path": lambda: _torch_path(x),
        "clone": lambda: x.clone(),
        "fresh_output": lambda: torch.empty_like(x).fill_(1.0),
    }
    with torch.no_grad():
        reference = x.double() @ hadamard_matrix(d)
        errors = {"fwht": (fwht(x).double() - reference).abs().max().item(),
                  "fwht_pytorch_path": (_torch_path(x).double() - reference).abs().max().item(),
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
        "d": d, "threads": threads, "pytorch_path_stages": fwht_stages(d)[0], "paley_order": fwht_stages(d)[1],
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "min_ms": {k: round(min(v) * 1e3, 3) for k, v in times.items()},
        "ratio_dense_over_fwht": round(med["dense"] / med["fwht"], 1),
        "ratio_dense_over_fwht_signs_post": round(med["dense"] / med["fwht_signs_post"], 1),
        "ratio_dense_over_fwht_pytorch_path": round(med["dense"] / med["fwht_pytorch_path"], 1),
        "ratio_dense_over_clone": round(med["dense"] / med["clone"], 1),
        "ratio_dense_over_fresh_output": round(med["dense"] / med["fresh_output"], 1),
        "flop_ratio_dense_over_fwht": round(_flops_dense(d) / _flops_fwht(d), 1),
        "op_ratio_d_over_log2d": round(d / math.log2(d), 1),
        "max_abs_err_vs_fp64": errors,
    }


def _thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def main() -> None:
    default_threads = torch.get_num_threads()
    backend = fwht_backend()  # builds the kernel before any timing
    load_before = os.getloadavg()
    rows = [measure(d, t) for t in sorted({default_threads, 1}, reverse=True) for d in SIZES]
    torch.set_num_threads(default_threads)
    load_after = os.getloadavg()
    at_4096 = [r for r in rows if r["d"] == 4096]
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "shape": [ROWS, "d"], "dtype": "float32", "rounds": ROUNDS,
        "fwht_backend": backend, "transparent_hugepage": _thp_mode(),
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
        f"median of {ROUNDS} dense / {ROUNDS * FAST_PER_ROUND} other calls, interleaved; load average "
        f"{result['load_average_before_after'][0]} -> {result['load_average_before_after'][1]}; fwht path: "
        f"{backend}; transparent huge pages: `{result['transparent_hugepage']}`.", "",
        "| d | threads | dense ms | fwht ms | fwht+signs+scale ms | PyTorch path ms | clone ms | fresh output ms | "
        "**dense/fwht** | dense/PyTorch path | dense/clone | flop ratio | fwht err vs fp64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["median_ms"]
        lines.append(
            f"| {r['d']} | {r['threads']} | {m['dense']:.1f} | {m['fwht']:.2f} | {m['fwht_signs_post']:.2f} | "
            f"{m['fwht_pytorch_path']:.2f} | {m['clone']:.2f} | {m['fresh_output']:.2f} | "
            f"**{r['ratio_dense_over_fwht']}x** | {r['ratio_dense_over_fwht_pytorch_path']}x | "
            f"{r['ratio_dense_over_clone']}x | {r['flop_ratio_dense_over_fwht']}x | "
            f"{r['max_abs_err_vs_fp64']['fwht']:.1e} |")
    lines += [
        "", f"Goal: {result['goal']}; met: {result['goal_met']} (by thread count).", "",
        "`fwht` is the default path (the compiled kernel: each row transformed in L1 with radix-2 butterflies and, "
        "for 2^k m sizes, the dense Paley factor; signs/post-scale fused, rows over threads, no PyTorch op or "
        "OpenMP, output on transparent huge pages where the OS allows); "
        "`PyTorch path` is the same call with `use_native_fwht(False)` (radix-16 stages as small matmuls, the path "
        "autograd, tracing and non-CPU tensors take). `fresh output` is `torch.empty_like(x).fill_(1)`: with 4 KiB "
        "pages a new 32 MiB tensor costs ~8k first-touch page faults, which is most of `clone` here and a floor for "
        "any out-of-place PyTorch op (the dense product pays it too). `flop ratio` = 2 d^2 / (d log2 d) for the "
        "kernel's radix-2 stages. This is a shared 2-core machine: compare ratios within a run, not times across runs.",
    ]
    (RESULTS / "fwht_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
