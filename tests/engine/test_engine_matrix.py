"""TensorRT-RTX builds, on this CPU-only machine, an engine for the `tiny` and the planted-outlier model in
every format, with the Hadamard plugin and with its ONNX-function fallback; each engine targets exactly the
requested compute capabilities, and the plugin layers are in it (the builder's per-layer report)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
import torch

from qvggt_export.engine import build_engine, load_profile
from qvggt_export.engine.hadamard import retarget_hadamard
from qvggt_export.export import export_onnx
from qvggt_export.export.qdq import opset_for_format
from qvggt_export.model import build_vggt
from qvggt_export.quant import QuantConfig, format_family
from qvggt_export.quant.calibrate import calibrate

pytestmark = [pytest.mark.slow, pytest.mark.rtx, pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                                  reason="needs TensorRT-RTX (pip install 'qvggt-export[rtx]')")]

# Each format with a profile it can build for (fp8: Ada and newer; nvfp4: Blackwell only).
PROFILES = {"w8a8": "rtx-sm89", "w6a6": "rtx-sm89", "w4a4": "rtx-sm89", "fp8": "rtx-sm89", "nvfp4": "rtx-sm120"}
CASES = [
    *[("tiny-outliers", fmt, "plugin") for fmt in PROFILES],
    # `tiny` with the plugin in every format is built elsewhere (quick start, pipeline and export tests).
    ("tiny", "w8a8", "function"), ("tiny-outliers", "w4a4", "function"), ("tiny-outliers", "nvfp4", "function"),
]


def _images(frames: int, seed: int) -> torch.Tensor:
    return torch.rand(1, frames, 3, 70, 70, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("preset", "fmt", "hadamard"), CASES)
def test_engine_builds(preset: str, fmt: str, hadamard: str, tmp_path: Path) -> None:
    model = build_vggt(preset, seed=0)
    calibrate(model, QuantConfig(bits=fmt, method="dsfq"), [_images(2, seed=0)])
    graph = export_onnx(model, tmp_path / "model.onnx", _images(2, seed=1),
                        opset=opset_for_format(format_family(fmt))).onnx_path
    plugin_nodes = 0
    if hadamard == "plugin":
        proto = onnx.load(str(graph))
        plugin_nodes = retarget_hadamard(proto, "plugin")
        graph = tmp_path / "model.plugin.onnx"
        onnx.save(proto, str(graph))
        from qvggt_export.plugins import register

        register("rtx")
    result = build_engine(graph, tmp_path / "model.engine", PROFILES[fmt], format_name=fmt)

    assert result.engine_path.is_file() and result.engine_path.stat().st_size == result.size_bytes > 0
    assert sorted(result.target_sms) == sorted(load_profile(PROFILES[fmt]).compute_capabilities)
    custom_layers = result.layer_types.get("custom_layer", 0)
    if hadamard == "plugin":
        assert plugin_nodes == 32 and "qvggt::Hadamard" in result.plugin_ops
        assert custom_layers == plugin_nodes  # one plugin layer per DSFQ linear, none optimised away
    else:
        assert custom_layers == 0 and "qvggt::Hadamard" not in result.plugin_ops
    quantized_gemms = {k: v for k, v in result.gemm_precisions.items() if k != "Float x Float"}
    expected = {"w8a8": "Int8 x Int8", "w6a6": "Int8 x Int8", "fp8": "FP8 x FP8", "nvfp4": "FP4"}
    if fmt in expected:  # w4a4 as written: TensorRT-RTX runs float GEMMs on dequantized INT4 weights
        assert sum(v for k, v in quantized_gemms.items() if k.startswith(expected[fmt])) >= 32, quantized_gemms
