"""Engine-side bad input and build reports: formats vs target architectures, plugins not registered at parse
time, and what the per-layer report says about GEMM precisions and attention fusion (TensorRT-RTX, no GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.engine import (
    EngineProfile,
    FrameRange,
    attention_report,
    build_engine,
    check_format_targets,
    gemm_precision_report,
)
from qvggt_export.engine import targets as targets_module
from qvggt_export.errors import QVGGTError

RTX_REASON = "needs TensorRT-RTX to build engines: pip install 'qvggt-export[rtx]'"


def _profile(*ccs: str) -> EngineProfile:
    return EngineProfile(name="t", backend="rtx", compute_capabilities=ccs, frames=FrameRange(1, 2, 2))


# --------------------------------------------------------------------------------------------------------
# check_format_targets (no TensorRT)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, sms", [("nvfp4", ["SM120", "SM121"]), ("nvfp4", ["SM100"]), ("fp8", ["SM89", "SM120"]),
                                      ("fp8", ["SM90"]), ("w8a8", ["SM75", "SM86"]), ("w4a4", ["SM86", "SM89"]),
                                      ("mxfp8", ["SM89"]), ("fp32", ["sm86"])])
def test_formats_accept_their_architectures(fmt, sms):
    assert check_format_targets(fmt, sms) == tuple(s.upper() for s in sms)


@pytest.mark.parametrize("fmt, sms, message", [
    ("nvfp4", ["SM89"], "format 'nvfp4' cannot target SM89: it needs compute capability SM100 or newer"),
    ("nvfp4", ["SM86", "SM89", "SM120"], "cannot target SM86, SM89:.*SM120/SM121"),
    ("fp8", ["SM86"], "format 'fp8' cannot target SM86.*SM89 or newer; use w8a8 there"),
    ("w8a8", ["SM70"], "cannot target SM70"),
    ("int3", ["SM89"], "unknown format 'int3'"),
    ("fp8", ["ada"], "compute capability 'ada' is not an 'SM<major><minor>' name"),
    ("fp8", [], "no target compute capabilities"),
    ("fp8", "SM89", "must be a list"),
])
def test_formats_refuse_other_architectures(fmt, sms, message):
    with pytest.raises(QVGGTError, match=message):
        check_format_targets(fmt, sms)


def test_current_is_resolved_through_the_driver(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(targets_module, "cuda_compute_capabilities", lambda: ["SM86"])
    with pytest.raises(QVGGTError, match=r"cannot target SM86 \(the GPU of this machine, from 'CURRENT'\)"):
        check_format_targets("fp8", ["CURRENT"])
    monkeypatch.setattr(targets_module, "cuda_compute_capabilities", lambda: [])
    assert check_format_targets("fp8", ["CURRENT"]) == ()  # no GPU: nothing to check, the builder decides


def _float_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([2], np.int64), "axes"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("ReduceMean", ["images", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["out"])]
    graph = helper.make_graph(nodes, "f", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 2, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 8, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_build_engine_checks_the_format_before_anything(tmp_path: Path):
    model = _float_model(tmp_path / "m.onnx")
    with pytest.raises(QVGGTError, match="format 'nvfp4' cannot target SM89"):
        build_engine(model, tmp_path / "m.engine", _profile("SM89"), format_name="nvfp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no engine, log or profile


# --------------------------------------------------------------------------------------------------------
# Plugins not registered at parse time
# --------------------------------------------------------------------------------------------------------


def _plugin_model(path: Path, op: str, domain: str, **attrs: str) -> Path:
    nodes = [helper.make_node(op, ["images"], ["out"], domain=domain, **attrs)]
    graph = helper.make_graph(nodes, "p", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 2, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 3, 8, 8])])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


@pytest.mark.rtx
def test_unregistered_plugin_is_refused_before_parsing(tmp_path: Path):
    pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)
    model = _plugin_model(tmp_path / "p.onnx", "Mystery", "acme.ops")
    with pytest.raises(QVGGTError, match=r"acme.ops::Mystery v1 that are not registered.*No engine was built"):
        build_engine(model, tmp_path / "p.engine", _profile("SM89"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx"]


@pytest.mark.rtx
def test_unregistered_hadamard_plugin_names_the_registration_call(tmp_path: Path):
    pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)
    # Version 9 is never registered (the shipped plugin is version 1), whatever other tests registered.
    model = _plugin_model(tmp_path / "h.onnx", "Hadamard", "qvggt", plugin_version="9")
    with pytest.raises(QVGGTError, match=r"qvggt::Hadamard v9 .*qvggt_export.plugins.register\(\)"):
        build_engine(model, tmp_path / "h.engine", _profile("SM89"))
    assert not (tmp_path / "h.engine").exists()


def test_parser_native_trt_ops_are_not_taken_for_plugins(tmp_path: Path):
    from qvggt_export.engine.build import _plugin_identities

    nodes = [helper.make_node("TRT_FP4DynamicQuantize", ["x", "s"], ["q", "bs"], domain="trt"),
             helper.make_node("Hadamard", ["q"], ["y"], domain="qvggt")]
    graph = helper.make_graph(nodes, "g", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1),
                                                    helper.make_opsetid("qvggt", 1)])
    assert _plugin_identities(model) == (("Hadamard", "1", "qvggt"),)


# --------------------------------------------------------------------------------------------------------
# Per-layer report: GEMM precisions and attention
# --------------------------------------------------------------------------------------------------------


_REPORT = "\n".join([
    "Name: a/gemm_myl0_1, LayerType: gemm, Inputs: [ { Name: x, Dimensions: [-1,64], Datatype: Int8, Format: x }], "
    "Constants: [ { Name: w, Dimensions: [64,192], Datatype: Int8, Format: x }], Outputs: [ { Name: y, "
    "Datatype: Float }], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: a/gemm]",
    "Name: b/MatMul_myl0_2, LayerType: gemm, Inputs: [ { Name: q, Datatype: Float }, { Name: k, Datatype: Float }], "
    "Constants: [], Outputs: [ { Name: s, Datatype: Float }], Metadata: [ONNX Layer: b/attn/MatMul]",
    "Name: __myl_MaxrSubExpSumDivMul_myl0_3, LayerType: kgen, Inputs: [ { Name: s, Datatype: Float }], Constants: [], "
    "Outputs: [ { Name: p, Datatype: Float }], Metadata: [ONNX Layer: /model/b/attn/Softmax]",
    "Name: _gemm_mha_v2_myl0_4, LayerType: kgen, Inputs: [ { Name: q, Datatype: Half }], Constants: [], Outputs: [], "
    "Metadata: [ONNX Layer: c/attn/MatMul_1][ONNX Layer: c/attn/Softmax][ONNX Layer: c/attn/MatMul]",
])


def test_report_parsers_on_a_report_excerpt():
    assert gemm_precision_report(_REPORT) == {"Float x Float": 1, "Int8 x Int8": 1}
    assert attention_report(_REPORT) == {"fused_mha_layers": 1, "unfused_softmax_layers": 1,
                                         "unfused_softmax_layer_types": {"kgen": 1}}
    assert attention_report("Layer(CaskGemm): full TensorRT format") == {}


def _attention_model(path: Path, half: bool) -> Path:
    """images -> tokens [1, S*64, 3] -> q, k, v (2 heads of 32) -> MatMul -> Softmax -> MatMul, named as the
    exporter names VGGT's attention nodes."""
    dtype, np_dtype = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    heads, dim = 2, 32
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((3, 3 * heads * dim)) * 0.1).astype(np_dtype), "wqkv"),
             numpy_helper.from_array(np.array([1, -1, 3], np.int64), "tokens"),
             numpy_helper.from_array(np.array([1, -1, 3 * heads, dim], np.int64), "split_heads"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
             numpy_helper.from_array(np.array(dim ** -0.5, np_dtype), "scale")]
    p = "/model/blk/attn/"
    nodes = [helper.make_node("Transpose", ["images"], ["t"], perm=[0, 1, 3, 4, 2], name=p + "Transpose_in"),
             helper.make_node("Cast", ["t"], ["tc"], to=dtype, name=p + "Cast_in"),
             helper.make_node("Reshape", ["tc", "tokens"], ["tok"], name=p + "Reshape"),
             helper.make_node("MatMul", ["tok", "wqkv"], ["qkv"], name=p + "qkv"),
             helper.make_node("Reshape", ["qkv", "split_heads"], ["qkv4"], name=p + "Reshape_1"),
             helper.make_node("Transpose", ["qkv4"], ["qkvT"], perm=[0, 2, 1, 3], name=p + "Transpose"),
             helper.make_node("Split", ["qkvT"], ["q", "k", "v"], axis=1, num_outputs=3, name=p + "Split"),
             helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 1, 3, 2], name=p + "Transpose_1"),
             helper.make_node("MatMul", ["q", "kT"], ["s"], name=p + "MatMul"),
             helper.make_node("Mul", ["s", "scale"], ["ss"], name=p + "Mul"),
             helper.make_node("Softmax", ["ss"], ["probs"], axis=-1, name=p + "Softmax"),
             helper.make_node("MatMul", ["probs", "v"], ["o"], name=p + "MatMul_1"),
             helper.make_node("Transpose", ["o"], ["oT"], perm=[0, 2, 1, 3], name=p + "Transpose_2"),
             helper.make_node("Reshape", ["oT", "flat"], ["oh"], name=p + "Reshape_2"),
             helper.make_node("Cast", ["oh"], ["out"], to=TensorProto.FLOAT, name=p + "Cast_out")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            [1, "S", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "n"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.rtx
@pytest.mark.parametrize("half", [False, True])
def test_attention_fuses_into_mha_only_in_fp16(tmp_path: Path, half: bool):
    """Measured finding reported with every build: MatMul -> Softmax -> MatMul becomes one ``_gemm_mha_v2``
    kernel in FP16 and stays two gemm layers around a generated softmax kernel in FP32."""
    pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)
    model = _attention_model(tmp_path / "attn.onnx", half)
    result = build_engine(model, tmp_path / "attn.engine", _profile("SM89"))
    if half:
        assert result.attention == {"fused_mha_layers": 1, "unfused_softmax_layers": 0,
                                    "unfused_softmax_layer_types": {}}
    else:
        assert result.attention == {"fused_mha_layers": 0, "unfused_softmax_layers": 1,
                                    "unfused_softmax_layer_types": {"kgen": 1}}
        assert result.gemm_precisions == {"Float x Float": 2}
    assert result.to_dict()["attention"] == result.attention
