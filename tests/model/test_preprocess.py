"""The official loader's sizing rules (crop / pad), alpha handling and bad-file errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvggt_export.errors import QVGGTError
from qvggt_export.model import load_and_preprocess_images


def _photo(path, width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode).save(path)
    return path


def test_crop_mode_sizes(tmp_path):
    landscape = _photo(tmp_path / "l.png", 640, 480)
    portrait = _photo(tmp_path / "p.png", 480, 640)
    # 480 * 518 / 640 = 388.5 -> /14 = 27.75 -> 28 patches -> 392 rows
    assert load_and_preprocess_images([landscape]).shape == (1, 3, 392, 518)
    # 640 * 518 / 480 = 690.7 -> 49 patches = 686 rows, centre-cropped to 518
    out = load_and_preprocess_images([portrait])
    assert out.shape == (1, 3, 518, 518)
    resized = np.asarray(Image.open(portrait).convert("RGB").resize((518, 686), Image.Resampling.BICUBIC)) / 255.0
    top = (686 - 518) // 2
    expected = torch.from_numpy(resized[top:top + 518].astype(np.float32)).permute(2, 0, 1)
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_pad_mode_pads_with_white(tmp_path):
    portrait = _photo(tmp_path / "p.png", 480, 640)
    out = load_and_preprocess_images([portrait], mode="pad")
    assert out.shape == (1, 3, 518, 518)
    # width 480 * 518 / 640 = 388.5 -> 392; 126 columns of padding, 63 each side, value 1.0
    assert torch.all(out[0, :, :, :63] == 1.0) and torch.all(out[0, :, :, -63:] == 1.0)
    assert not torch.all(out[0, :, :, 63:64] == 1.0)


def test_target_size_and_range(tmp_path):
    out = load_and_preprocess_images([_photo(tmp_path / "a.jpg", 100, 100)], target_size=70)
    assert out.shape == (1, 3, 70, 70)
    assert out.dtype == torch.float32 and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (140, 140), (0, 0, 0, 0)).save(path)
    out = load_and_preprocess_images([path], target_size=70)
    assert torch.all(out == 1.0)


def test_mixed_sizes_are_padded(tmp_path):
    a = _photo(tmp_path / "a.png", 640, 480)
    b = _photo(tmp_path / "b.png", 480, 640)
    out = load_and_preprocess_images([a, b])
    assert out.shape == (2, 3, 518, 518)


def test_bad_files(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(QVGGTError, match="cannot read image .*broken.jpg"):
        load_and_preprocess_images([tmp_path / "broken.jpg"])
    with pytest.raises(QVGGTError, match="image not found"):
        load_and_preprocess_images([tmp_path / "nope.png"])
    with pytest.raises(QVGGTError, match="at least one image"):
        load_and_preprocess_images([])
    with pytest.raises(QVGGTError, match="preprocessing mode"):
        load_and_preprocess_images([_photo(tmp_path / "x.png", 20, 20)], mode="stretch")
