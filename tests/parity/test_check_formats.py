"""``qvggt-export check`` on the floating-point formats: fp8 outputs and layers (a corrupted weight scale named
in E4M3 steps), nvfp4 checked structurally and in ONNX's reference evaluator, outputs and layer by layer (ONNX
Runtime cannot run it), with the report saying so; and the export run's entry points."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qvggt_export.cli import EXIT_OK, EXIT_PARITY_FAILED, main
from qvggt_export.errors import QVGGTError
from qvggt_export.export import export_onnx
from qvggt_export.export.qdq import opset_for_format
from qvggt_export.model import build_vggt
from qvggt_export.parity.formats import NVFP4_REASON, layer_parity, nvfp4_parity
from qvggt_export.quant import QuantConfig
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.state import save_quantized

PRESET = "tiny-outliers"
OUTPUTS = {"pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"}


def _export(folder: Path, fmt: str) -> tuple[Path, torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A quantized export with its saved fake-quant model, as the export run writes them (no NFDS, no engine)."""
    images = torch.rand(1, 2, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    model = build_vggt(PRESET, seed=0).eval()
    float_model = copy.deepcopy(model)
    config = QuantConfig(bits=fmt, method="dsfq")
    calibrate(model, config, [images])
    save_quantized(model, folder / "quantized_model", PRESET, config)
    export_onnx(model, folder / "model.onnx", images, opset=opset_for_format(fmt))
    return folder, model, float_model, images


def _argv(folder: Path, fmt: str, onnx_path: Path | None = None) -> list[str]:
    return ["check", "--onnx", str(onnx_path or folder / "model.onnx"), "--bits", fmt, "--model", PRESET,
            "--seed", "0", "--quantized", str(folder / "quantized_model.json")]


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return _export(tmp_path_factory.mktemp("fp8"), "fp8")


@pytest.fixture(scope="module")
def nvfp4_export(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return _export(tmp_path_factory.mktemp("nvfp4"), "nvfp4")


def test_fp8_check_outputs_and_layers(fp8_export, capsys) -> None:  # noqa: ANN001
    folder = fp8_export[0]
    assert main([*_argv(folder, "fp8"), "--frames", "2", "1"]) == EXIT_OK
    report = json.loads((folder / "model.check.json").read_text())
    assert report["passed"] and report["first_failing_layer"] is None
    onnxruntime = report["runtimes"]["onnxruntime"]
    assert set(onnxruntime["outputs"]) == OUTPUTS and onnxruntime["providers"] == ["CPUExecutionProvider"]
    assert all(o["noise_rel_l2"] > 0 and o["rel_l2"] <= o["tolerance"] for o in onnxruntime["outputs"].values())
    layers = report["layers"]
    assert layers["checked"] and len(layers["layers"]) == 32 and "E4M3" in report["units"]
    assert all(entry["passed"] for entry in layers["layers"])
    assert max(entry["code_max_delta_e4m3_steps"] for entry in layers["layers"]) <= 1
    assert max(entry["output_rel"] for entry in layers["layers"]) < 1e-5  # float summation order only
    assert "32 quantized layers" in capsys.readouterr().out


def test_fp8_corrupted_scale_is_localised(fp8_export, tmp_path, capsys) -> None:  # noqa: ANN001
    folder = fp8_export[0]
    target = "aggregator.global_blocks.1.mlp.fc1"
    proto = onnx.load(str(folder / "model.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == f"{target}/weight_scale")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    assert main([*_argv(folder, "fp8", broken), "--frames", "2"]) == EXIT_PARITY_FAILED
    assert f"first diverging layer: {target}" in capsys.readouterr().err
    report = json.loads((tmp_path / "broken.check.json").read_text())
    assert not report["passed"] and report["first_failing_layer"] == target
    layers = report["layers"]["layers"]
    first = next(i for i, entry in enumerate(layers) if not entry["passed"])
    assert first > 0 and layers[first]["output_rel"] > 0.1  # an O(1) error, not a rounding tie
    assert all(entry["passed"] for entry in layers[:first])


@pytest.mark.slow
def test_nvfp4_check_structure_and_reference_evaluator(nvfp4_export, capsys) -> None:  # noqa: ANN001
    folder = nvfp4_export[0]
    assert main([*_argv(folder, "nvfp4"), "--frames", "1"]) == EXIT_OK  # the evaluator is NumPy: one frame
    report = json.loads((folder / "model.check.json").read_text())
    assert report["passed"] and report["first_failing_layer"] is None
    assert "onnxruntime" not in report["runtimes"]
    assert report["onnxruntime"] == {"ran": False, "reason": NVFP4_REASON}
    assert "cannot run NVFP4" in NVFP4_REASON and report["method"] == "structural + reference evaluator"
    assert report["structure"] == {"passed": True, "layers": 32, "failures": []}
    reference = report["runtimes"]["onnx-reference"]
    assert set(reference["outputs"]) == OUTPUTS and "reference evaluator" in reference["runtime"]
    assert all(o["rel_l2"] < 1e-5 for o in reference["outputs"].values())  # observed ~1e-7
    layers = report["layers"]  # teacher-forced in the reference evaluator
    assert layers["checked"] and len(layers["layers"]) == 32 and all(e["passed"] for e in layers["layers"])
    assert max(e["transform_rel"] for e in layers["layers"]) < 1e-5  # observed 1.4e-7
    assert max(e["output_rel"] for e in layers["layers"]) < 1e-5  # observed 2.7e-7
    assert max(e["act_flips"] for e in layers["layers"]) <= 4  # observed 0 (bit-equal NVFP4 activations)
    out = capsys.readouterr().out
    assert "onnx-reference" in out and "ONNX Runtime not run" in out


@pytest.mark.slow
def test_nvfp4_corrupted_code_is_named(nvfp4_export, tmp_path, capsys) -> None:  # noqa: ANN001
    folder = nvfp4_export[0]
    target = "aggregator.frame_blocks.2.attn.proj"
    proto = onnx.load(str(folder / "model.onnx"))
    weight = next(i for i in proto.graph.initializer if i.name == f"{target}/weight_q")
    raw = bytearray(weight.raw_data)
    raw[0] ^= 0x01  # one code, one E2M1 step: below what any output tolerance can see
    weight.raw_data = bytes(raw)
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    assert main([*_argv(folder, "nvfp4", broken), "--frames", "1"]) == EXIT_PARITY_FAILED
    assert f"first diverging layer: {target}" in capsys.readouterr().err
    report = json.loads((tmp_path / "broken.check.json").read_text())
    assert not report["passed"] and report["first_failing_layer"] == target
    assert report["structure"]["failures"] == [f"{target}: decoded FP4 weight codes differ from the PyTorch codes"]


@pytest.mark.slow
def test_nvfp4_corrupted_transform_is_localised(nvfp4_export, tmp_path, capsys) -> None:  # noqa: ANN001
    """A wrong smoothing factor is outside what the structural check reads: the layer check names the layer."""
    folder = nvfp4_export[0]
    target = "aggregator.frame_blocks.2.attn.proj"
    proto = onnx.load(str(folder / "model.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == f"{target}/input_post")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    assert main([*_argv(folder, "nvfp4", broken), "--frames", "1"]) == EXIT_PARITY_FAILED
    assert f"first diverging layer: {target}" in capsys.readouterr().err
    report = json.loads((tmp_path / "broken.check.json").read_text())
    assert report["structure"]["passed"] and report["first_failing_layer"] == target
    layers = report["layers"]["layers"]
    first = next(i for i, entry in enumerate(layers) if not entry["passed"])
    assert first > 0 and layers[first]["name"] == target and layers[first]["transform_rel"] > 0.1


def test_pipeline_parity_api(nvfp4_export, fp8_export) -> None:  # noqa: ANN001
    """The export run's entry points: nvfp4 parity in the report's schema, and the layer check's dispatch."""
    folder, model, float_model, images = nvfp4_export
    parity = nvfp4_parity(model, float_model, folder / "model.onnx", [images[:, :1]])
    assert parity["passed"] and set(parity) == {"runtime", "method", "passed", "inputs", "outputs", "reason",
                                                "structure", "layers"}
    assert parity["layers"]["first_failing_layer"] is None and len(parity["layers"]["layers"]) == 32
    with pytest.raises(QVGGTError, match="no layer-by-layer check for format family 'fp4'"):
        layer_parity(model, folder / "model.onnx", images, "fp4")
    folder, model, _, images = fp8_export
    with pytest.raises(QVGGTError, match="not QuantLinear modules"):  # an fp8 graph is not an integer one
        layer_parity(model, folder / "model.onnx", images, "int")
