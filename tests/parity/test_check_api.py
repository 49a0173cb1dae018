"""The check API on files written outside the pipeline: a quantized graph with external data, and the
exporter's switch to external data (exercised on the tiny model by lowering the threshold)."""

from __future__ import annotations

import onnx
import pytest
import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.export import onnx_export
from qvggt_export.model import build_vggt
from qvggt_export.parity import CheckConfig, check_export
from qvggt_export.quant import QuantConfig, quantize_model
from qvggt_export.quant.state import save_quantized


def test_external_data_export_checks_clean(tmp_path, monkeypatch):
    """Weights over the threshold go to model.onnx.data; the full checker passes on the path, ONNX Runtime loads
    it, and the check (outputs and layers, which re-save the graph beside its data) passes."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    model = build_vggt("tiny")
    config = QuantConfig(bits="w8a8", method="rtn")
    quantize_model(model, config)
    save_quantized(model, tmp_path / "quantized_model", "tiny", config)
    result = onnx_export.export_onnx(model, tmp_path / "model.onnx", torch.rand(1, 2, 3, 70, 70))
    data, graph = tmp_path / "model.onnx.data", tmp_path / "model.onnx"
    assert result.external_data and data.is_file() and data.stat().st_size > 2 * graph.stat().st_size
    assert result.size_bytes == data.stat().st_size + graph.stat().st_size
    assert data.stat().st_mode & 0o777 == graph.stat().st_mode & 0o777  # same ordinary permissions
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    weights = [i for i in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer
               if i.name.endswith("/weight_q")]
    assert len(weights) == 32 and all(i.data_location == onnx.TensorProto.EXTERNAL for i in weights)
    report = check_export(CheckConfig(onnx=tmp_path / "model.onnx", bits="w8a8", model="tiny",
                                      quantized=tmp_path / "quantized_model.json", frames=(2,)))
    assert report["passed"] and report["layers"]["checked"] and report["first_failing_layer"] is None
    assert (tmp_path / "model.check.json").is_file()
    assert not list(tmp_path.glob(".model.layers-*")), "the layer check's temporary graph is removed"


def test_float_export_judged_by_polygraphy(tmp_path):
    """fp32 graphs are judged by Polygraphy's CompareFunc.simple (atol = 1e-5 x max|output|): a clean export
    passes, one with a 1 % error in the depth head's last convolution does not."""
    model = build_vggt("tiny")
    path = tmp_path / "fp32.onnx"
    onnx_export.export_onnx(model, path, torch.rand(1, 2, 3, 70, 70))
    config = {"onnx": path, "bits": "fp32", "model": "tiny", "frames": (2,)}
    report = check_export(CheckConfig(**config))
    outputs = report["runtimes"]["onnxruntime"]["outputs"]
    assert report["passed"] and all(o["judged_metric"] == "max_rel" and o["max_rel"] <= 1e-5 for o in outputs.values())
    proto = onnx.load(str(path))
    target = next(i for i in proto.graph.initializer if i.name == "model.depth_head.scratch.output_conv2.2.weight")
    target.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(target) * 1.01, target.name))
    onnx.save(proto, str(path))
    report = check_export(CheckConfig(**config))
    outputs = report["runtimes"]["onnxruntime"]["outputs"]
    assert not report["passed"] and not outputs["depth"]["passed"] and outputs["world_points"]["passed"]


def test_tensor_bytes_counts_weights_without_serializing():
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
            torch.zeros(10, dtype=torch.float32).numpy()))],
        "g", [], [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [10])],
        [onnx.numpy_helper.from_array(torch.zeros(100, dtype=torch.float32).numpy(), "w")]))
    assert onnx_export._tensor_bytes(model) == 440


def test_check_config_validation():
    with pytest.raises(QVGGTError, match="export folder or an ONNX file"):
        CheckConfig()
    with pytest.raises(QVGGTError, match="localize"):
        CheckConfig(onnx="x.onnx", localize="sometimes")
    with pytest.raises(QVGGTError, match="frame counts"):
        CheckConfig(onnx="x.onnx", frames=(0,))
    with pytest.raises(QVGGTError, match="preprocess"):
        CheckConfig(onnx="x.onnx", preprocess="stretch")
