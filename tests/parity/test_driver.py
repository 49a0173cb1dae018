"""One parity driver: the main job's check (check_parity) and `qvggt-export check` give the same numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qvggt_export.calib import SyntheticSequenceConfig
from qvggt_export.calib.synthetic import generate_sequences
from qvggt_export.model import build_vggt
from qvggt_export.parity import CheckConfig, check_export, check_parity
from qvggt_export.pipeline import PipelineConfig, run_pipeline
from qvggt_export.quant.state import load_quantized

pytestmark = pytest.mark.skipif(importlib.util.find_spec("polygraphy") is None,
                                reason="needs Polygraphy: pip install 'qvggt-export[cpu]'")

SMALL = {"frames": 2, "calib_pool": 3, "calib_size": 2, "nfds_k": 2, "progress": False, "engine": False}


@pytest.mark.parametrize("bits", ["w8a8", "fp32"])
def test_main_job_parity_and_check_agree(tmp_path: Path, bits: str) -> None:
    out = tmp_path / bits
    run_pipeline(PipelineConfig(out_dir=out, bits=bits, method="rtn", **SMALL))
    checked = check_export(CheckConfig(export_dir=out, frames=(2,), input_seed=5, localize="never"))

    # The same input check_export generated (frames 2, seed input_seed + frames), through the main job's call.
    height, width = checked["inputs"][0]["shape"][-2:]
    images = generate_sequences(SyntheticSequenceConfig(num_sequences=1, frames=2, height=height, width=width,
                                                        seed=7))[0].unsqueeze(0)
    float_model = build_vggt("tiny", seed=0)
    model = load_quantized(out / "quantized_model.json")[0] if bits != "fp32" else float_model
    report = check_parity(model, out / "model.onnx", [images],
                          float_model=float_model if bits != "fp32" else None).to_dict()

    outputs = checked["runtimes"]["onnxruntime"]["outputs"]
    assert set(outputs) == set(report["outputs"]) and outputs
    for name, main in report["outputs"].items():
        other = outputs[name]
        for key in ("max_abs", "max_rel", "rel_l2", "tolerance", "criterion", "passed", "cosine"):
            assert main[key] == other[key], (name, key, main[key], other[key])
        assert main["quant_noise_rel_l2"] == other["noise_rel_l2"]
    assert report["passed"] == checked["runtimes"]["onnxruntime"]["passed"]
