"""Image-folder calibration readers: layouts, windows, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qvggt_export.calib import iter_folder_sequences, scene_folders
from qvggt_export.errors import QVGGTError
from tests.conftest import require_shared_data


def _write(folder, count, size=(84, 70)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_single_scene_windows(tmp_path):
    _write(tmp_path, 7)
    samples = list(iter_folder_sequences(tmp_path, frames=3, target_size=70))
    assert len(samples) == 2  # non-overlapping windows 0-2, 3-5; the 7th image is left over
    assert all(s.shape == (3, 3, 56, 70) for s in samples)


def test_scene_per_subfolder_and_limit(tmp_path):
    _write(tmp_path / "a", 4)
    _write(tmp_path / "b", 2)
    _write(tmp_path / "c", 6)
    assert [len(s) for s in scene_folders(tmp_path)] == [4, 2, 6]
    samples = list(iter_folder_sequences(tmp_path, frames=3, target_size=70))
    assert len(samples) == 3  # a: 1, b: too short, c: 2
    assert len(list(iter_folder_sequences(tmp_path, frames=3, target_size=70, max_sequences=2))) == 2


def test_errors(tmp_path):
    with pytest.raises(QVGGTError, match="not found"):
        list(iter_folder_sequences(tmp_path / "missing", 2, 70))
    with pytest.raises(QVGGTError, match="no images"):
        list(iter_folder_sequences(tmp_path, 2, 70))
    _write(tmp_path / "short", 2)
    with pytest.raises(QVGGTError, match="fewer than 5 images"):
        list(iter_folder_sequences(tmp_path, 5, 70))
    (tmp_path / "short" / "009.jpg").write_bytes(b"garbage")
    with pytest.raises(QVGGTError, match="cannot read image .*009.jpg"):
        list(iter_folder_sequences(tmp_path / "short", 3, 70))
    file = tmp_path / "short" / "000.png"
    with pytest.raises(QVGGTError, match="must be a folder"):
        list(iter_folder_sequences(file, 1, 70))


def test_real_sequences(tmp_path):
    data = require_shared_data()
    samples = list(iter_folder_sequences(data / "sequences", frames=4, target_size=70, max_sequences=3))
    assert len(samples) == 3
    assert all(s.shape[0] == 4 and s.shape[-1] == 70 and 0.0 <= float(s.min()) <= float(s.max()) <= 1.0
               for s in samples)
