"""Issue 4's bad-input list, each through the Python API and (where it fails before any model work) the CLI.

Empty folder, fewer candidates than the budget, sequences shorter than ``--frames``, mixed image sizes,
corrupt images, K larger than the filtered pool: each is a clear :class:`QVGGTError` (CLI: exit 2, one
line, no output folder) or a documented fallback with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvggt_export.calib import NFDSConfig, build_candidate_pool, select_calibration_set
from qvggt_export.cli import EXIT_USAGE, main
from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt


def _images(folder: Path, count: int, size: tuple[int, int] = (42, 28)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count + size[0])
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def tiny():
    return build_vggt("tiny").eval()


def _cli_fails(capsys, tmp_path: Path, data: Path, match: str, *extra: str) -> None:
    out = tmp_path / "out"
    argv = ["--calib-data", str(data), "--no-engine", "--no-progress", "--out", str(out), *extra]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert match in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err  # one line: the error, nothing else on stderr
    assert not out.exists(), "a failed run must not leave an output folder"


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty" / "scene").mkdir(parents=True)
    with pytest.raises(QVGGTError, match="no images .* in .*empty"):
        build_candidate_pool(tmp_path / "empty", frames=2, target_size=28)
    _cli_fails(capsys, tmp_path, tmp_path / "empty", "no images")


def test_fewer_candidates_than_the_budget(tmp_path, capsys, tiny):
    _images(tmp_path / "few" / "a", 3)
    _images(tmp_path / "few" / "b", 3)
    pool = build_candidate_pool(tmp_path / "few", frames=3, target_size=28, pool_size=None)
    assert len(pool) == 2  # one stride-1 window per 3-frame scene
    for strategy in ("nfds", "random"):
        with pytest.raises(QVGGTError, match="has 2 samples, fewer than the calibration budget 3"):
            select_calibration_set(pool, tiny, NFDSConfig(strategy=strategy, budget=3), progress=False)
    # The pool exists but the noise filter leaves too few: a clear error too, naming p.
    with pytest.raises(QVGGTError, match=r"noise filter \(p=0.5\) keeps 1 of 2 candidates, fewer than .* 2"):
        select_calibration_set(pool, tiny, NFDSConfig(budget=2, p=0.5), progress=False)
    _cli_fails(capsys, tmp_path, tmp_path / "few", "yields 2 candidate sequences of 3 frames, fewer than --calib-size",
               "--frames", "3", "--calib-size", "3", "--calib-pool", "4")


def test_sequences_shorter_than_frames(tmp_path, capsys, caplog):
    _images(tmp_path / "short" / "a", 2)
    _images(tmp_path / "short" / "b", 3)
    with caplog.at_level(logging.WARNING):  # fallback: a short sequence is skipped, the others are used
        pool = build_candidate_pool(tmp_path / "short", frames=3, target_size=28, pool_size=None)
    assert "skipping sequence a: 2 frame(s), fewer than frames=3" in caplog.text
    assert pool.ids == ["b[0:3:1]"]
    with pytest.raises(QVGGTError, match="no sequence .* has at least 4 readable frames .longest: 3."):
        build_candidate_pool(tmp_path / "short", frames=4, target_size=28)
    _cli_fails(capsys, tmp_path, tmp_path / "short", "has at least 4 readable frames", "--frames", "4")


def test_mixed_image_sizes(tmp_path, capsys, tiny, caplog):
    _images(tmp_path / "mixed" / "wide", 3, size=(56, 28))
    _images(tmp_path / "mixed" / "tall", 3, size=(28, 56))
    with caplog.at_level(logging.WARNING):
        crop = build_candidate_pool(tmp_path / "mixed", frames=2, target_size=28, pool_size=None)
    assert crop.resolutions() == {(14, 28), (28, 28)} and "mode='pad'" in caplog.text  # warned, not fatal
    # NFDS copes with mixed resolutions (statistics are per candidate) ...
    selection = select_calibration_set(crop, tiny, NFDSConfig(budget=4, k=2), progress=False)
    assert len(selection.selected) == 4
    # ... and "pad" makes every sample square, the documented fix for an export (one resolution).
    pad = build_candidate_pool(tmp_path / "mixed", frames=2, target_size=28, mode="pad", pool_size=None)
    assert pad.resolutions() == {(28, 28)} and {tuple(s.shape) for s in pad} == {(2, 3, 28, 28)}
    # The CLI exports one resolution: with every candidate selected both sizes meet, a one-line error.
    _cli_fails(capsys, tmp_path, tmp_path / "mixed", "different resolutions", "--frames", "2", "--image-size", "28",
               "--calib-size", "6", "--calib-pool", "6", "--nfds-p", "0")


def test_corrupt_images(tmp_path, capsys, tiny, caplog):
    paths = _images(tmp_path / "bad" / "scene", 5)
    paths[1].write_bytes(b"not an image")  # caught from the header when the pool is built
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])  # header fine, pixels truncated: caught when loaded
    with pytest.raises(QVGGTError, match=r"cannot read image .*001\.png"):
        build_candidate_pool(tmp_path / "bad", frames=2, target_size=28, pool_size=None)
    with caplog.at_level(logging.WARNING):  # fallback with skip_bad: dropped and named, never a traceback
        pool = build_candidate_pool(tmp_path / "bad", frames=2, target_size=28, pool_size=None, skip_bad=True)
        selection = select_calibration_set(pool, tiny, NFDSConfig(budget=2, k=2), progress=False)
    assert not any(p.endswith("001.png") for r in pool.refs for p in r.paths)
    truncated = {r.id for r in pool.refs if str(paths[3]) in r.paths}
    assert truncated and set(selection.skipped) == truncated and "003.png" in caplog.text
    assert not set(selection.selected_ids) & truncated and len(selection.selected) == 2
    _cli_fails(capsys, tmp_path, tmp_path / "bad", "cannot read image", "--frames", "2")


def test_k_larger_than_the_filtered_pool(tmp_path, tiny, caplog):
    _images(tmp_path / "k" / "scene", 4)
    pool = build_candidate_pool(tmp_path / "k", frames=2, target_size=28, pool_size=None)
    assert len(pool) == 6
    with caplog.at_level(logging.WARNING):  # fallback: K lowered to what the filter kept, recorded in notes
        selection = select_calibration_set(pool, tiny, NFDSConfig(budget=3, k=8, p=0.2), progress=False)
    assert int(selection.kept.sum()) == 5 and selection.k_used == 5
    assert "K lowered from 8 to 5" in selection.notes[0] and "using K=5" in caplog.text
    assert len(selection.selected) == 3
