"""Placeholder until the report lands in the next commit."""

from pathlib import Path


def write_report(out_dir: Path) -> dict[str, Path]:
    return {}
