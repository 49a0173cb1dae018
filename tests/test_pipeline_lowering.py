"""Pipeline: the engine graph's per-target lowering (validated before anything is written, recorded with its
measured accuracy in the report) and the fp16 reference export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest

from qvggt_export.errors import QVGGTError
from qvggt_export.pipeline import PipelineConfig, run_pipeline

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
SMALL = {"frames": 2, "calib_pool": 3, "calib_size": 2, "nfds_k": 2, "progress": False}


@pytest.mark.parametrize(("bits", "backend", "expected"), [
    ("w4a4", "auto", "w4a16"), ("w8a8", "auto", "as-written"), ("w8a8", "trt", "int8-static"),
    ("w6a6", "rtx", "as-written"), ("fp8", "auto", "as-written"), ("fp32", "auto", "as-written"),
])
def test_default_lowering_per_format(bits: str, backend: str, expected: str, tmp_path: Path) -> None:
    config = PipelineConfig(out_dir=tmp_path, bits=bits, backend=backend, engine_profile="rtx-sm120")
    assert config.resolved_engine_lowering() == expected


def test_incompatible_lowerings_are_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(QVGGTError, match="'int8-static' rewrites w8a8 / w6a6 graphs, not w4a4"):
        PipelineConfig(out_dir=out, bits="w4a4", engine_lowering="int8-static")
    with pytest.raises(QVGGTError, match="'w4a16' rewrites w4a4 graphs, not fp32"):
        PipelineConfig(out_dir=out, bits="fp32", engine_lowering="w4a16")
    with pytest.raises(QVGGTError, match="engine_lowering must be one of"):
        PipelineConfig(out_dir=out, engine_lowering="int4")
    with pytest.raises(QVGGTError, match="underflows in FP16"):
        PipelineConfig(out_dir=out, bits="w8a8", engine_fp16=True)
    with pytest.raises(QVGGTError, match="already in TensorRT's own form"):
        PipelineConfig(out_dir=out, bits="fp8", engine_fp16=True)
    PipelineConfig(out_dir=out, bits="w4a4", engine_fp16=True)  # w4a16 by default: fine
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RTX, reason="needs TensorRT-RTX (pip install 'qvggt-export[rtx]')")
def test_int8_static_engine(tmp_path: Path) -> None:
    out = tmp_path / "w8a8"
    report = run_pipeline(PipelineConfig(out_dir=out, bits="w8a8", engine_lowering="int8-static",
                                         engine_profile="rtx-sm89", **SMALL))
    engine = report["engine"]
    lowering = engine["lowering"]
    assert lowering["target"] == "int8-static" and lowering["layers"] == 32
    scales = lowering["static_scales"]
    assert scales["count"] == 32 and 0 < scales["min"] <= scales["max"]
    assert lowering["accuracy"]["in_sample"] is True
    assert set(lowering["accuracy"]["lowered_vs_float"]) >= {"depth", "world_points", "pose_enc"}
    # The engine is built from the lowered graph (plugin copy of it), whose activation scales are constants.
    assert engine["onnx"].endswith("model.plugin.onnx") and (out / "model.lowered.onnx").is_file()
    lowered = onnx.load(str(out / "model.lowered.onnx"))
    assert not any(n.op_type == "ReduceMax" and "act_absmax" in n.name for n in lowered.graph.node)
    assert engine["gemm_precisions"].get("Int8 x Int8", 0) >= 32
    assert Path(engine["path"]).is_file() and engine["target_sms"] == ["SM89"]


def test_fp16_reference_export(tmp_path: Path) -> None:
    report = run_pipeline(PipelineConfig(out_dir=tmp_path / "fp16", bits="fp16", engine=False, **SMALL))
    assert report["onnx"]["precision"] == "fp16" and report["parity"]["passed"]
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
