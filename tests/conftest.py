"""Shared test helpers: paths to ../shared (reference fixtures, real photos) with clear skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "vggt_reference"
SHARED_DATA = SHARED / "data"
FIXTURE_NAMES = ("tiny", "tiny_dino")


def require_fixtures() -> Path:
    if not (FIXTURES / "tiny_config.json").is_file():
        pytest.skip(f"VGGT reference fixtures not found at {FIXTURES} (a user's clone has no ../shared)")
    return FIXTURES


def require_shared_data() -> Path:
    if not (SHARED_DATA / "sequences").is_dir():
        pytest.skip(f"real multi-view photos not found at {SHARED_DATA} (a user's clone has no ../shared)")
    return SHARED_DATA


def fixture_config(name: str) -> dict:
    return json.loads((require_fixtures() / f"{name}_config.json").read_text())


@pytest.fixture
def fixtures_dir() -> Path:
    return require_fixtures()
