"""--quantize-scope: which linears are quantized (aggregator / backbone / all), end to end on tiny and tiny-dino:
DSFQ, export, ONNX Runtime parity, engine build with TensorRT-RTX, and the report's scope summary."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from qvggt_export.cli import build_parser, main
from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from qvggt_export.pipeline import PipelineConfig, run_pipeline
from qvggt_export.quant.roles import QUANTIZE_SCOPES, find_targets, scope_roles, scope_summary

FAST = {"calib_size": 1, "calib_pool": 2, "frames": 2, "calib_strategy": "random", "progress": False}


def test_scope_roles_widen_per_model():
    tiny, dino = build_vggt("tiny"), build_vggt("tiny-dino")
    assert {r.split(".")[0] for r in scope_roles("aggregator", dino)} == {"frame", "global"}
    assert {r.split(".")[0] for r in scope_roles("backbone", dino)} == {"frame", "global", "patch_embed"}
    assert {r.split(".")[0] for r in scope_roles("all", dino)} == {"frame", "global", "patch_embed", "camera_trunk"}
    # tiny's patch embedding is a convolution: "all" takes what exists, "backbone" alone adds nothing.
    assert {r.split(".")[0] for r in scope_roles("all", tiny)} == {"frame", "global", "camera_trunk"}
    with pytest.raises(QVGGTError, match="adds nothing for this model"):
        scope_roles("backbone", tiny)
    with pytest.raises(QVGGTError, match="unknown quantize scope 'heads'"):
        scope_roles("heads")


def test_scope_summary_counts_parameters():
    model = build_vggt("tiny-dino")
    targets = find_targets(model, scope_roles("aggregator", model))
    summary = scope_summary(model, targets, "aggregator")
    expected = sum(p.numel() for t in targets for p in model.get_submodule(t.name).parameters())
    assert summary["parameters_quantized"] == expected
    assert summary["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert len(summary["layers"]) == 16
    wider = scope_summary(model, find_targets(model, scope_roles("all", model)), "all")
    assert summary["parameter_share"] < wider["parameter_share"] < 1


def test_cli_choices_are_the_registry(tmp_path: Path):
    action = next(a for a in build_parser()._actions if a.dest == "quantize_scope")
    assert tuple(action.choices) == tuple(QUANTIZE_SCOPES)
    with pytest.raises(QVGGTError, match="unknown quantize scope"):
        PipelineConfig(out_dir=tmp_path / "out", quantize_scope="everything")
    assert main(["--quantize-scope", "all", "--out", str(tmp_path / "o"), "--print-config"]) == 0
    with pytest.raises(QVGGTError, match="runs in a loop"):
        PipelineConfig(out_dir=tmp_path / "out", bits="fp8", quantize_scope="all")


def _quantized_matmuls(onnx_path: Path) -> int:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sum(node.op_type == "DequantizeLinear" for node in graph.node)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "scope", "layers"), [
    ("tiny", "all", 40), ("tiny-dino", "backbone", 24), ("tiny-dino", "all", 28),
])
def test_scope_end_to_end(tmp_path: Path, preset: str, scope: str, layers: int):
    """Export, parity and (with TensorRT-RTX) the engine follow the scope; narrower export has fewer Q/DQ."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed: engine build not checked")
    report = run_pipeline(PipelineConfig(out_dir=tmp_path / scope, model=preset, bits="w4a4", quantize_scope=scope,
                                         **FAST))
    quant = report["quantization"]
    assert quant["layers"] == layers == len(quant["scope"]["layers"])
    # The camera trunk runs once per refinement iteration: one Q/DQ GEMM per call, weights stored once.
    iterations = build_vggt(preset).config.camera_head.num_iterations
    trunk = sum(".trunk." in name for name in quant["scope"]["layers"])
    assert report["onnx"]["quantized_linears"] == layers + trunk * (iterations - 1)
    assert report["parity"]["passed"], report["parity"]
    assert report["engine"]["path"] and Path(report["engine"]["path"]).stat().st_size > 0
    saved = json.loads((tmp_path / scope / "report.json").read_text())
    assert saved["quantization"]["scope"]["name"] == scope
    narrow = run_pipeline(PipelineConfig(out_dir=tmp_path / "aggregator", model=preset, bits="w4a4", engine=False,
                                         **FAST))
    assert narrow["quantization"]["scope"]["parameter_share"] < quant["scope"]["parameter_share"]
    assert _quantized_matmuls(Path(narrow["onnx"]["path"])) < _quantized_matmuls(Path(report["onnx"]["path"]))


def test_reconstruction_follows_the_scope():
    """Block reconstruction visits the blocks of every block list the scope quantizes, not only the aggregator's."""
    import torch

    from qvggt_export.quant import QuantConfig
    from qvggt_export.quant.calibrate import calibrate

    model = build_vggt("tiny-dino")
    images = torch.rand(1, 2, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    result = calibrate(model, QuantConfig(bits="w4a4", recon_iters=1, roles=scope_roles("all", model)), [images])
    blocks = set(result.reconstruction)
    assert {"aggregator.patch_embed.blocks.0", "camera_head.trunk.0", "aggregator.frame_blocks.0"} <= blocks
