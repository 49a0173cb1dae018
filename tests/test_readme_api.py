"""The README's Python API example reproduces the CLI's run: executed here, its artifacts compared by hash."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from qvggt_export.pipeline import PipelineConfig, run_pipeline

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Python API: the quick start step by step"
# Byte-identical artifacts; calibration_selection.json is compared without its wall-clock "timing" entry.
SAME_BYTES = ("quantized_model.safetensors", "quantized_model.json", "model.onnx", "model.lowered.onnx",
              "model.plugin.onnx")


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, "the README lost its Python API section"
    match = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], re.DOTALL)
    assert match is not None
    return match.group(1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def selection_without_timing(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("timing")
    return data


@pytest.mark.slow
def test_readme_api_example_reproduces_the_cli_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "parity passed: True" in printed

    api = tmp_path / "out" / "api-w4a4"
    cli = tmp_path / "cli"
    report = run_pipeline(PipelineConfig(out_dir=cli, bits="w4a4", progress=False))
    for name in SAME_BYTES:
        assert _sha256(api / name) == _sha256(cli / name), name
    assert selection_without_timing(api / "calibration_selection.json") == selection_without_timing(
        cli / "calibration_selection.json")
    if report["engine"]["path"]:  # TensorRT-RTX installed: the same engine graph was built
        assert (api / "model.engine").is_file()
        assert "engine: " in printed and "model.engine" in printed.split("engine: ")[-1]
