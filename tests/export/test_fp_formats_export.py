"""FP8 and NVFP4 ONNX lowering: FP8 runs in ONNX Runtime and matches PyTorch (outputs and every layer's
codes); NVFP4, which ONNX Runtime cannot run, is checked structurally and with ONNX's reference evaluator;
both build TensorRT-RTX engines with the Hadamard plugin for the architectures that support them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qvggt_export.engine.hadamard import plugin_graph
from qvggt_export.errors import QVGGTError
from qvggt_export.export import export_onnx
from qvggt_export.export.qdq import (
    FORMAT_KEY,
    check_nvfp4_structure,
    fp4_dynamic_quantize_reference,
    opset_for_format,
    reference_evaluator,
)
from qvggt_export.model import build_vggt
from qvggt_export.parity import check_parity, onnxruntime_session
from qvggt_export.parity.formats import fp8_layer_parity, nvfp4_expected
from qvggt_export.quant import FloatQuantLinear, QuantConfig
from qvggt_export.quant import formats as ff
from qvggt_export.quant.calibrate import calibrate

RTX_REASON = "needs TensorRT-RTX to build engines: pip install 'qvggt-export[rtx]'"


def _quantized_export(tmp_path_factory: pytest.TempPathFactory, fmt: str, method: str):  # noqa: ANN202
    torch.manual_seed(0)
    images = torch.rand(1, 2, 3, 70, 70)
    model = build_vggt("tiny-outliers", seed=0).eval()
    float_model = copy.deepcopy(model)
    calibrate(model, QuantConfig(bits=fmt, method=method), [images])
    path = tmp_path_factory.mktemp(fmt) / "model.onnx"
    export_onnx(model, path, images, opset=opset_for_format(fmt))
    return model, float_model, path, images


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return _quantized_export(tmp_path_factory, "fp8", "dsfq")


@pytest.fixture(scope="module")
def nvfp4_export(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return _quantized_export(tmp_path_factory, "nvfp4", "dsfq")


def test_fp8_graph_carries_the_pytorch_codes(fp8_export) -> None:  # noqa: ANN001
    model, _, path, _ = fp8_export
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}[FORMAT_KEY] == "fp8"
    assert next(e.version for e in proto.opset_import if e.domain == "") == 21
    inits = {i.name: i for i in proto.graph.initializer}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FloatQuantLinear)}
    assert len(layers) == 32
    for name, module in layers.items():
        weight = inits[f"{name}/weight_q"]
        assert weight.data_type == TensorProto.FLOAT8E4M3FN and list(weight.dims) == [module.in_features,
                                                                                        module.out_features]
        decoded = numpy_helper.to_array(weight).astype(np.float32)
        assert np.array_equal(decoded, module.weight_code_values().numpy().T)
        assert np.array_equal(numpy_helper.to_array(inits[f"{name}/weight_scale"]), module.weight_scale.numpy())
    assert inits["qvggt/zero_fp8"].data_type == TensorProto.FLOAT8E4M3FN
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 32 and ops.count("DequantizeLinear") == 64


def test_fp8_onnxruntime_parity_outputs_and_layers(fp8_export) -> None:  # noqa: ANN001
    model, float_model, path, images = fp8_export
    report = check_parity(model, path, [images, images[:, :1]], float_model=float_model)  # 2 and 1 frames
    assert report.passed, report.to_dict()
    for out in report.outputs:  # observed: 0.1-0.5 x the quantization noise
        assert out.rel_l2 <= out.tolerance
    layers = fp8_layer_parity(model, path, images)
    assert layers["first_failing_layer"] is None
    assert len(layers["layers"]) == 32
    # ONNX Runtime's FP8 QuantizeLinear rounds as PyTorch's float8 cast: observed 0 flipped codes.
    assert max(entry["code_max_delta_e4m3_steps"] for entry in layers["layers"]) <= 1
    assert max(entry["output_rel"] for entry in layers["layers"]) < 1e-5  # observed ~3e-7


def test_fp8_layer_check_names_a_corrupted_scale(fp8_export, tmp_path: Path) -> None:  # noqa: ANN001
    model, _, path, images = fp8_export
    proto = onnx.load(str(path))
    target = "aggregator.global_blocks.1.mlp.fc1"
    init = next(i for i in proto.graph.initializer if i.name == f"{target}/weight_scale")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    bad = tmp_path / "model.onnx"
    onnx.save(proto, str(bad))
    layers = fp8_layer_parity(model, bad, images)
    assert layers["first_failing_layer"] == target


def test_nvfp4_onnxruntime_cannot_run_it(nvfp4_export) -> None:  # noqa: ANN001
    # The measured fact the structural / reference checks rest on; if a newer ONNX Runtime runs it, use it.
    with pytest.raises(QVGGTError, match="TRT_FP4DynamicQuantize|FLOAT4|NOT_IMPLEMENTED|Could not find"):
        onnxruntime_session(nvfp4_export[2])


def test_nvfp4_structure_and_reference_evaluator(nvfp4_export) -> None:  # noqa: ANN001
    model, float_model, path, images = nvfp4_export
    proto = onnx.load(str(path))
    assert next(e.version for e in proto.opset_import if e.domain == "") == 23 and proto.ir_version >= 11
    expected = nvfp4_expected(model)
    result = check_nvfp4_structure(proto, expected)
    assert result == {"passed": True, "layers": 32, "failures": []}
    evaluator = reference_evaluator(str(path))
    one_frame = images[:, :1]  # the reference evaluator is NumPy: keep it small
    outputs = dict(zip(evaluator.output_names, evaluator.run(None, {"images": one_frame.numpy()}), strict=True))
    with torch.no_grad():
        ref = model(one_frame)
    for name, value in outputs.items():
        rel = float(np.linalg.norm(value - ref[name].numpy()) / np.linalg.norm(ref[name].numpy()))
        assert rel < 1e-5, (name, rel)  # observed <= 1e-6: float summation order only


def test_nvfp4_structure_check_names_corruption(nvfp4_export) -> None:  # noqa: ANN001
    model, _, path, _ = nvfp4_export
    expected = nvfp4_expected(model)
    target = "aggregator.frame_blocks.2.attn.proj"
    proto = onnx.load(str(path))
    weight = next(i for i in proto.graph.initializer if i.name == f"{target}/weight_q")
    raw = bytearray(weight.raw_data)
    raw[0] ^= 0x01  # one code changes by one E2M1 step
    weight.raw_data = bytes(raw)
    node = next(n for n in proto.graph.node if n.name == f"{target}/act_q")
    next(a for a in node.attribute if a.name == "block_size").i = 32
    result = check_nvfp4_structure(proto, expected)
    assert not result["passed"]
    assert any(f.startswith(f"{target}: decoded FP4 weight codes differ") for f in result["failures"])
    assert any(f.startswith(f"{target}: node act_q attribute block_size=32") for f in result["failures"])


def test_fp4_reference_quantizer_matches_pytorch() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 64) * torch.logspace(-3, 1, 64)
    x[0, :16] = torch.tensor([0.25, 0.75, 1.75, 3.5, 5.0, 6.0, -0.25, -2.5] * 2)  # E2M1 ties when g * s = 1
    x[1, 16:32] = 0.0  # zero block
    x[2, 5] = 1e4  # saturating block scale
    g = float(ff.nvfp4_global_scale(x[3:]))  # amax of rows 0-2 exceed it: their scales saturate
    codes, scales = fp4_dynamic_quantize_reference(x.numpy(), g)
    codes_pt, scales_pt, _ = ff.quantize_nvfp4(x, 16, g)
    assert np.array_equal(codes.astype(np.float32), codes_pt.numpy())
    assert np.array_equal(scales.astype(np.float32), scales_pt.numpy())
    with pytest.raises(QVGGTError, match="divisible by the block size"):
        fp4_dynamic_quantize_reference(np.zeros((2, 40), np.float32), 1.0)


def _one_placeholder_graph(fmt: str) -> onnx.ModelProto:
    """x [2, 32] -> one FQLinear placeholder (as the tracer emits it) -> y [2, 8]."""
    from onnx import helper

    from qvggt_export.quant.modules import FLOAT_PLACEHOLDER_OP, PLACEHOLDER_DOMAIN

    arrays = {"codes": np.full((8, 32), 0x38, np.uint8), "wscale": np.ones(8 if fmt == "fp8" else 1, np.float32),
              "bscale": np.full((8, 2 if fmt == "nvfp4" else 0), 0x38, np.uint8), "iglobal": np.ones(1, np.float32),
              "bias": np.zeros(8, np.float32), "pre": np.ones(32, np.float32), "post": np.ones(32, np.float32)}
    node = helper.make_node(FLOAT_PLACEHOLDER_OP, ["x", *arrays], ["y"], domain=PLACEHOLDER_DOMAIN, format=fmt,
                            rotate=0, layer="layer")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid(PLACEHOLDER_DOMAIN, 1)])


def test_lowering_bad_input() -> None:
    from qvggt_export.export.qdq import lower_qlinear_placeholders

    with pytest.raises(QVGGTError, match="nvfp4 needs opset 23"):
        lower_qlinear_placeholders(_one_placeholder_graph("nvfp4"), opset=21)
    model = _one_placeholder_graph("fp8")
    assert lower_qlinear_placeholders(model, opset=21) == 1  # fp8 lowers at opset 21
    bad = _one_placeholder_graph("nvfp4")
    next(a for a in bad.graph.node[0].attribute if a.name == "format").s = b"fp6"
    with pytest.raises(QVGGTError, match="unknown floating-point format 'fp6'"):
        lower_qlinear_placeholders(bad, opset=23)
    with pytest.raises(QVGGTError, match="unknown quantization format family"):
        opset_for_format("fp4")


# The nvfp4 engine (SM120, FP4 GEMMs) is built and checked by tests/test_pipeline_formats.py::test_nvfp4_end_to_end.
@pytest.mark.rtx
@pytest.mark.parametrize(("fmt", "profile", "sms", "gemm"), [("fp8", "rtx-sm89-sm120", ("SM89", "SM120"), "FP8 x FP8")])
def test_engine_builds_with_the_hadamard_plugin(fmt: str, profile: str, sms: tuple[str, ...], gemm: str,
                                                request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)
    from qvggt_export.engine import build_engine
    from qvggt_export.plugins import register

    _, _, path, _ = request.getfixturevalue(f"{fmt}_export")
    graph, plugin_nodes = plugin_graph(path, tmp_path)
    assert plugin_nodes == 32
    register("rtx")
    result = build_engine(graph, tmp_path / "model.engine", profile, backend="rtx")
    assert result.target_sms == sms
    assert "qvggt::Hadamard" in result.plugin_ops and result.layer_types.get("custom_layer") == 32
    # the quantized GEMMs really run in the low-precision format (the builder's per-layer report)
    assert sum(n for kind, n in result.gemm_precisions.items() if kind.startswith(gemm)) == 32, result.gemm_precisions
