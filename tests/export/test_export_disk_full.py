"""A disk that fills up while the graph is written: a clear error, and neither a partial ``model.onnx`` nor a
temporary file left behind (an earlier good export in the folder stays as it was)."""

from __future__ import annotations

import errno

import onnx
import pytest
import torch

import qvggt_export.export.onnx_export as onnx_export
from qvggt_export.errors import QVGGTError
from qvggt_export.export import export_onnx
from qvggt_export.model import build_vggt


def test_disk_full_while_saving_leaves_the_previous_export(tmp_path, monkeypatch):
    model = build_vggt("tiny")
    images = torch.rand(1, 2, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "model.onnx"
    export_onnx(model, path, images)
    before = path.read_bytes()
    real_save = onnx.save

    def save_then_fill_the_disk(proto, target, *args, **kwargs):
        real_save(proto, target, *args, **kwargs)  # a partial file exists at this point, as on a real full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_export.onnx, "save", save_then_fill_the_disk)
    with pytest.raises(QVGGTError, match="No space left on device"):
        export_onnx(model, path, images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert path.read_bytes() == before
