"""Byte identity of the quick start's artifacts across a refactor (issue 11).

Run the quick start (``qvggt-export --bits w4a4 --out DIR --no-progress``) once on the code before the change
and once after, then::

    python benchmarks/refactor_identity.py --before /tmp/before --after /tmp/after \
        --before-commit da88fbb --after-commit HEAD

writes ``benchmarks/results/refactor_identity.{md,json}``: sha256 of every artifact in both runs.
``calibration_selection.json`` holds wall-clock timings of the NFDS pass, which differ between any two runs,
so it is also compared with its ``timing`` entry removed. ``report.json`` and ``model.engine`` (the TensorRT-RTX
builder's output, which embeds build-time data) are listed, not expected to match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ARTIFACTS = ("model.onnx", "quantized_model.safetensors", "quantized_model.json", "calibration_selection.json",
             "model.lowered.onnx", "model.plugin.onnx", "model.engine", "report.json")
EXPECTED_IDENTICAL = ARTIFACTS[:6]
RESULTS = Path(__file__).resolve().parent / "results"


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def selection_without_timing(path: Path) -> str | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data.pop("timing", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--before-commit", default="?")
    parser.add_argument("--after-commit", default="?")
    args = parser.parse_args()
    rows = []
    for name in ARTIFACTS:
        before, after = sha256(args.before / name), sha256(args.after / name)
        identical = before == after and before is not None
        rows.append({"file": name, "before": before, "after": after, "identical": identical})
    selection = {"before": selection_without_timing(args.before / "calibration_selection.json"),
                 "after": selection_without_timing(args.after / "calibration_selection.json")}
    selection["identical"] = selection["before"] == selection["after"] and selection["before"] is not None
    ok = all(r["identical"] for r in rows
             if r["file"] in EXPECTED_IDENTICAL and r["file"] != "calibration_selection.json")
    ok = ok and selection["identical"]
    result = {"command": "qvggt-export --bits w4a4 --out DIR --no-progress", "before_commit": args.before_commit,
              "after_commit": args.after_commit, "artifacts": rows, "selection_without_timing": selection,
              "identical": ok}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "refactor_identity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Quick-start artifacts before and after the issue-11 refactor", "",
             f"`{result['command']}`, before: commit `{args.before_commit}`, after: commit `{args.after_commit}`"
             " (`benchmarks/refactor_identity.py`).", "",
             "| file | sha256 before | sha256 after | identical |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row['file']}` | `{(row['before'] or '-')}` | `{(row['after'] or '-')}` | "
                     f"{'yes' if row['identical'] else 'no'} |")
    lines.append(f"| `calibration_selection.json` without `timing` | `{(selection['before'] or '-')}` | "
                 f"`{(selection['after'] or '-')}` | {'yes' if selection['identical'] else 'no'} |")
    lines += ["", f"**Identical where expected: {'yes' if ok else 'NO'}** (every artifact but `report.json`, which "
              "holds timings, `model.engine`, which the TensorRT-RTX builder does not write deterministically, and "
              "the raw `calibration_selection.json`, whose `timing` entry holds wall-clock seconds).", ""]
    (RESULTS / "refactor_identity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
