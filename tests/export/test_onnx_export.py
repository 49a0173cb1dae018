"""ONNX export: float parity, Q/DQ lowering exactness, INT4 packing, dynamic frames, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.export import export_onnx
from qvggt_export.export.qdq import lower_qlinear_placeholders
from qvggt_export.model import build_vggt
from qvggt_export.parity import check_parity, localize_divergence, onnxruntime_session
from qvggt_export.quant import QuantConfig, QuantLinear, quantize_model
from qvggt_export.quant import functional as qf
from qvggt_export.quant.modules import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP


def _images(frames: int, height: int = 70, width: int = 70, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [8, 4])
def test_lowering_reproduces_quant_linear_codes(bits):
    """One placeholder, lowered and run in ONNX Runtime, equals QuantLinear's eager output."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(48, 24), bits, bits, name="blk.fc1")
    inits = [numpy_helper.from_array(layer.weight_codes.numpy(), "codes"),
             numpy_helper.from_array(layer.weight_step.numpy(), "step"),
             numpy_helper.from_array(layer.bias.numpy(), "bias")]
    node = helper.make_node(PLACEHOLDER_OP, ["x", "codes", "step", "bias"], ["y"], domain=PLACEHOLDER_DOMAIN,
                            weight_bits=bits, act_bits=bits, layer="blk.fc1")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(PLACEHOLDER_DOMAIN, 1)])
    assert lower_qlinear_placeholders(model) == 1
    onnx.checker.check_model(model, full_check=True)
    weight = next(i for i in model.graph.initializer if i.name == "blk.fc1/weight_q")
    assert weight.data_type == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
    assert list(weight.dims) == [48, 24]
    assert not any(n.domain == PLACEHOLDER_DOMAIN for n in model.graph.node)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qlinear_{bits}_{os.getpid()}.onnx")
    onnx.save(model, path)
    x = torch.randn(2, 7, 48) * torch.linspace(0.1, 5, 48)
    got = onnxruntime_session(path).run(None, {"x": x.numpy()})[0]
    os.unlink(path)
    with torch.no_grad():
        want = layer(x).numpy()
    step = qf.per_token_step(x, bits).numpy()
    # Same codes on both sides; only the GEMM's summation order differs (float32 rounding).
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6 * step.max()


@pytest.mark.parametrize("preset, size", [("tiny", (70, 70)), ("tiny-dino", (56, 70))])
def test_float_export_matches_pytorch_for_several_frame_counts(tmp_path, preset, size):
    model = build_vggt(preset)
    result = export_onnx(model, tmp_path / "model.onnx", _images(3, *size))
    assert result.input_shape == [1, "frames", 3, *size]
    assert result.outputs == ["pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"]
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    report = check_parity(model, result.onnx_path, [_images(f, *size, seed=f) for f in (1, 2, 5)])
    assert report.passed, report.to_dict()
    assert max(o.max_rel for o in report.outputs) <= 1e-5


@pytest.mark.parametrize("bits", ["w8a8", "w4a4"])
def test_quantized_export_structure_and_parity(tmp_path, bits):
    float_model = build_vggt("tiny")
    model = build_vggt("tiny")
    quantize_model(model, QuantConfig(bits=bits))
    result = export_onnx(model, tmp_path / "model.onnx", _images(3))
    proto = onnx.load(str(result.onnx_path))
    ops = [n.op_type for n in proto.graph.node]
    assert result.num_qlinear == 32
    assert ops.count("QuantizeLinear") == 32 and ops.count("DequantizeLinear") == 64
    container = TensorProto.INT4 if bits == "w4a4" else TensorProto.INT8
    weights = [i for i in proto.graph.initializer if i.name.endswith("/weight_q")]
    assert len(weights) == 32 and all(w.data_type == container for w in weights)
    assert all(o.domain in ("", "ai.onnx") for o in proto.opset_import)
    report = check_parity(model, result.onnx_path, [_images(f, seed=f) for f in (1, 3)], float_model=float_model)
    assert report.passed, report.to_dict()


@pytest.mark.slow
def test_w4_export_is_smaller(tmp_path):
    sizes = {}
    for bits in ("fp32", "w8a8", "w4a4"):
        model = build_vggt("tiny")
        if bits != "fp32":
            quantize_model(model, QuantConfig(bits=bits))
        sizes[bits] = export_onnx(model, tmp_path / f"{bits}.onnx", _images(2)).size_bytes
    # aggregator linears are ~25 % of tiny's weights; INT4 packs them 8x, INT8 4x
    assert sizes["w4a4"] < sizes["w8a8"] < sizes["fp32"]


@pytest.mark.slow
def test_corrupted_scale_fails_parity(tmp_path):
    """A wrong weight scale in one layer must not pass the quantized parity criterion."""
    float_model = build_vggt("tiny")
    model = build_vggt("tiny")
    quantize_model(model, QuantConfig(bits="w8a8"))
    path = export_onnx(model, tmp_path / "model.onnx", _images(2)).onnx_path
    proto = onnx.load(str(path))
    target = next(i for i in proto.graph.initializer if i.name == "aggregator.frame_blocks.1.mlp.fc2/weight_step")
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.5, target.name))
    onnx.save(proto, str(path))
    report = check_parity(model, path, [_images(2)], float_model=float_model)
    assert not report.passed
    layers = localize_divergence(model, path, _images(2))
    assert layers.first_failing == "aggregator.frame_blocks.1.mlp.fc2"
    assert all(layer.passed for layer in layers.layers[:layers.layers.index(
        next(x for x in layers.layers if not x.passed))])


def test_layer_checker_passes_a_correct_graph(tmp_path):
    from qvggt_export.quant.calibrate import calibrate

    model = build_vggt("tiny-outliers")
    calibrate(model, QuantConfig(bits="w4a4", method="dsfq"), [_images(2, seed=0)])
    path = export_onnx(model, tmp_path / "model.onnx", _images(2, seed=1)).onnx_path
    layers = localize_divergence(model, path, _images(3, seed=2))
    assert len(layers.layers) == 32 and layers.first_failing is None
    assert max(layer.transform_rel for layer in layers.layers) < 1e-5
    assert max(layer.output_rel for layer in layers.layers) < 1e-5


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(QVGGTError, match="cannot create output folder"):
        export_onnx(build_vggt("tiny"), blocker / "out" / "model.onnx", _images(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_failed_export_leaves_no_partial_file(tmp_path, monkeypatch):
    import qvggt_export.export.onnx_export as module

    def boom(*args, **kwargs):
        raise QVGGTError("simulated failure after tracing")

    monkeypatch.setattr(module, "lower_qlinear_placeholders", boom)
    model = build_vggt("tiny")
    quantize_model(model, QuantConfig(bits="w4a4"))
    with pytest.raises(QVGGTError, match="simulated"):
        export_onnx(model, tmp_path / "model.onnx", _images(1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_bytes_are_deterministic(tmp_path):
    """Same seed and inputs -> byte-identical ONNX (DSFQ signs, steps and initializer order included)."""
    from qvggt_export.quant.calibrate import calibrate

    digests = []
    for run in range(2):
        model = build_vggt("tiny-outliers")
        calibrate(model, QuantConfig(bits="w4a4", method="dsfq"), [_images(2, seed=0)])
        path = export_onnx(model, tmp_path / f"run{run}.onnx", _images(2, seed=1)).onnx_path
        digests.append(path.read_bytes())
    assert digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["function", "dense", "plugin"])
def test_dsfq_rotation_forms(tmp_path, form):
    """DSFQ's online rotation exports as the O(d log d) function (default), a dense MatMul, or a plugin node."""
    from qvggt_export.quant.calibrate import calibrate

    float_model, model = build_vggt("tiny-outliers"), build_vggt("tiny-outliers")
    calibrate(model, QuantConfig(bits="w4a4", method="dsfq"), [_images(2, seed=0)])
    path = export_onnx(model, tmp_path / "model.onnx", _images(2, seed=1), hadamard=form).onnx_path
    proto = onnx.load(str(path))
    custom = [n for n in proto.graph.node if n.domain == "qvggt"]
    dense = [i for i in proto.graph.initializer if i.name.startswith("qvggt/hadamard_")]
    if form == "function":
        assert len(custom) == 32 and {n.op_type for n in custom} == {"Hadamard_64", "Hadamard_256"}
        assert sorted(f.name for f in proto.functions) == ["Hadamard_256", "Hadamard_64"] and not dense
    elif form == "dense":
        assert not custom and sorted(i.name for i in dense) == ["qvggt/hadamard_256", "qvggt/hadamard_64"]
    else:
        assert len(custom) == 32 and {n.op_type for n in custom} == {"Hadamard"} and not proto.functions
        assert all(helper.get_attribute_value(a) == b"qvggt" for n in custom for a in n.attribute
                   if a.name == "plugin_namespace")
        return  # ONNX Runtime has no Hadamard kernel: this form is for TensorRT with the plugin
    report = check_parity(model, path, [_images(2, seed=2), _images(3, seed=3)], float_model=float_model)
    assert report.passed, report.to_dict()
