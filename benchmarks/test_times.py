"""Wall time of the test suite, one test file at a time (never the whole suite in one process on the shared
machine), with an optional marker expression::

    python benchmarks/test_times.py --marker "not slow"      # the quick loop
    python benchmarks/test_times.py                          # everything

Writes ``benchmarks/results/test_times[_<label>].{md,json}``: per file the wall time (pytest's start
included), the exit code and the load average when it ended; the load average says how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--marker", default=None, help='pytest -m expression, e.g. "not slow"')
    parser.add_argument("--label", default=None, help="results file suffix (default: from the marker)")
    args = parser.parse_args()
    label = args.label or ("all" if args.marker is None else args.marker.replace(" ", "_"))
    rows = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        command = [sys.executable, "-m", "pytest", str(path.relative_to(ROOT)), "-q", "-p", "no:cacheprovider"]
        if args.marker:
            command += ["-m", args.marker]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        rows.append({"file": str(path.relative_to(ROOT)), "seconds": round(seconds, 1), "rc": result.returncode,
                     "load_average": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    total = sum(r["seconds"] for r in rows)
    RESULTS.mkdir(exist_ok=True)
    data = {"marker": args.marker, "total_s": round(total, 1), "files": rows}
    (RESULTS / f"test_times_{label}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# Test wall time per file (`-m {args.marker!r}`)" if args.marker else "# Test wall time per file",
             "", f"`benchmarks/test_times.py`; total {total:.0f} s over {len(rows)} files (rc 5: no test selected).",
             "", "| file | seconds | rc | load average |", "|---|---|---|---|"]
    lines += [f"| `{r['file']}` | {r['seconds']} | {r['rc']} | {r['load_average']:.2f} |" for r in rows]
    (RESULTS / f"test_times_{label}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
