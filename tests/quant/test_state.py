"""A quantized model saved to safetensors + JSON reloads to bit-identical outputs."""

from __future__ import annotations

import json

import pytest
import torch

from qvggt_export.calib import SyntheticSequenceConfig, generate_sequences
from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.state import load_quantized, save_quantized


@pytest.mark.parametrize("method", ["rtn", "dsfq"])
def test_save_and_reload_exactly(tmp_path, method):
    batches = [s.unsqueeze(0) for s in generate_sequences(
        SyntheticSequenceConfig(num_sequences=2, frames=2, height=70, width=70, seed=0))]
    model = build_vggt("tiny-outliers")
    config = QuantConfig(bits="w4a4", method=method, seed=5)
    calibrate(model, config, batches)
    weights, meta = save_quantized(model, tmp_path / "q", "tiny-outliers", config)
    assert weights.is_file() and json.loads(meta.read_text())["quantization"]["method"] == method
    reloaded, reloaded_config = load_quantized(meta)
    assert reloaded_config == config
    with torch.no_grad():
        want, got = model(batches[0]), reloaded(batches[0])
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(want[key], got[key]), key


def test_reload_errors(tmp_path):
    with pytest.raises(QVGGTError, match="description not found"):
        load_quantized(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(QVGGTError, match="not a qvggt-export quantized model"):
        load_quantized(tmp_path / "bad.json")
    with pytest.raises(QVGGTError, match="no quantized layers"):
        save_quantized(build_vggt("tiny"), tmp_path / "f", "tiny", QuantConfig())
