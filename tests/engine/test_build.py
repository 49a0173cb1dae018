"""Engine stage: build profiles, backend loading, the RTX parser workaround and TensorRT-RTX builds.

Builds run with TensorRT-RTX, which serializes engines on a CPU-only machine; nothing here executes an
engine (that needs a GPU). The ONNX models are tiny and made in the tests with ``onnx.helper``: an image
input ``images`` [1, S, 3, 14, 14], a mean over the channels, and a 14x16 matmul in float, INT8 (static
weights, dynamic per-token activations) and INT4 (weights only) forms.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.engine import (
    EngineProfile,
    FrameRange,
    build_engine,
    ensure_rtx_parser_symlink,
    list_profiles,
    load_backend,
    load_profile,
)
from qvggt_export.engine import build as build_module
from qvggt_export.errors import MissingDependencyError, QVGGTError

RTX_REASON = "needs TensorRT-RTX to build engines: pip install 'qvggt-export[rtx]'"
TOKEN_DIM, OUT_DIM = 14, 16


def _require_rtx() -> None:
    pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)


# --------------------------------------------------------------------------------------------------------
# Tiny ONNX models
# --------------------------------------------------------------------------------------------------------


def _save_model(
    path: Path,
    nodes: list,
    initializers: list,
    frames: int | str = "S",
    image_shape: list | None = None,
    opsets: list | None = None,
) -> Path:
    shape = image_shape if image_shape is not None else [1, frames, 3, TOKEN_DIM, TOKEN_DIM]
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "tiny", [images], [out], initializers)
    model = helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 21)])
    onnx.save(model, str(path))
    return path


def _mean_over_channels() -> tuple[list, list]:
    # images [1, S, 3, 14, 14] -> m [1, S, 14, 14]: S*14 "tokens" of width 14 for the matmuls below.
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    return [helper.make_node("ReduceMean", ["images", "axes"], ["m"], keepdims=0)], [axes]


def float_model(path: Path, frames: int | str = "S") -> Path:
    """ReduceMean + MatMul in float32."""
    rng = np.random.default_rng(0)
    nodes, inits = _mean_over_channels()
    inits.append(numpy_helper.from_array(rng.standard_normal((TOKEN_DIM, OUT_DIM)).astype(np.float32), "w"))
    nodes.append(helper.make_node("MatMul", ["m", "w"], ["out"]))
    return _save_model(path, nodes, inits, frames)


def w8a8_model(path: Path) -> Path:
    """INT8 per-channel weight DQ and per-token dynamic INT8 activations.

    The activation quantizer is written as ``DQ(Q(x / s, 1.0), 1.0) -> MatMul -> * s`` with ``s`` the
    token's max|x| / 127: its Q/DQ scales are constants (what TensorRT fuses into an INT8 GEMM) while the
    per-token scale is applied outside the GEMM.
    """
    rng = np.random.default_rng(1)
    nodes, inits = _mean_over_channels()
    inits += [
        numpy_helper.from_array(rng.integers(-127, 128, (TOKEN_DIM, OUT_DIM)).astype(np.int8), "w_q"),
        numpy_helper.from_array(((rng.random(OUT_DIM) + 0.5) / 127).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(127, np.float32), "qmax"),
        numpy_helper.from_array(np.array(1, np.float32), "one"),
        numpy_helper.from_array(np.array(0, np.int8), "zero_i8"),
    ]
    nodes += [
        helper.make_node("Abs", ["m"], ["m_abs"]),
        helper.make_node("ReduceMax", ["m_abs", "last_axis"], ["m_amax"], keepdims=1),
        helper.make_node("Div", ["m_amax", "qmax"], ["token_scale"]),
        helper.make_node("Div", ["m", "token_scale"], ["m_scaled"]),
        helper.make_node("QuantizeLinear", ["m_scaled", "one", "zero_i8"], ["m_q"]),
        helper.make_node("DequantizeLinear", ["m_q", "one", "zero_i8"], ["m_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
        helper.make_node("MatMul", ["m_dq", "w"], ["acc"]),
        helper.make_node("Mul", ["acc", "token_scale"], ["out"]),
    ]
    return _save_model(path, nodes, inits)


def w4_model(path: Path) -> Path:
    """INT4 per-channel weight DQ, float activations (opset 21 INT4 tensors)."""
    rng = np.random.default_rng(2)
    nodes, inits = _mean_over_channels()
    weights = rng.integers(-8, 8, (TOKEN_DIM, OUT_DIM))
    inits += [
        helper.make_tensor("w_q", TensorProto.INT4, [TOKEN_DIM, OUT_DIM], weights.flatten().tolist()),
        numpy_helper.from_array(((rng.random(OUT_DIM) + 0.5) / 7).astype(np.float32), "w_scale"),
    ]
    nodes += [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
        helper.make_node("MatMul", ["m", "w"], ["out"]),
    ]
    return _save_model(path, nodes, inits)


def blocked_runtime_scale_model(path: Path) -> Path:
    """A graph TensorRT-RTX 1.7 rejects: blocked INT8 Q/DQ whose per-token scale is computed at run time.

    Myelin fails with ``CHECK(is_constant())`` when such activations feed an INT8-weight GEMM.
    """
    rng = np.random.default_rng(3)
    nodes, inits = _mean_over_channels()
    inits += [
        numpy_helper.from_array(rng.integers(-127, 128, (TOKEN_DIM, OUT_DIM)).astype(np.int8), "w_q"),
        numpy_helper.from_array(((rng.random(OUT_DIM) + 0.5) / 127).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(127, np.float32), "qmax"),
    ]
    nodes += [
        helper.make_node("Abs", ["m"], ["m_abs"]),
        helper.make_node("ReduceMax", ["m_abs", "last_axis"], ["m_amax"], keepdims=1),
        helper.make_node("Div", ["m_amax", "qmax"], ["token_scale"]),  # [1, S, 14, 1], known only at run time
        helper.make_node(
            "QuantizeLinear", ["m", "token_scale"], ["m_q"], axis=-1, block_size=TOKEN_DIM,
            output_dtype=TensorProto.INT8,
        ),
        helper.make_node("DequantizeLinear", ["m_q", "token_scale"], ["m_dq"], axis=-1, block_size=TOKEN_DIM),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
        helper.make_node("MatMul", ["m_dq", "w"], ["out"]),
    ]
    return _save_model(path, nodes, inits, frames=2)


def plugin_model(path: Path) -> Path:
    """A custom-domain node, which the TensorRT ONNX parser maps to a plugin."""
    nodes = [helper.make_node("Hadamard", ["images"], ["out"], domain="qvggt.test")]
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("qvggt.test", 1)]
    return _save_model(path, nodes, [], frames=2, opsets=opsets)


def _profile(*ccs: str, frames: tuple[int, int, int] = (1, 2, 4), **kwargs) -> EngineProfile:
    return EngineProfile(
        name="test", backend="rtx", compute_capabilities=ccs, frames=FrameRange(*frames), **kwargs
    )


def _assert_no_engine_or_temp(directory: Path, engine: Path) -> None:
    assert not engine.exists()
    assert not engine.with_name(engine.name + ".profile.json").exists()
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------------------------------------
# Profiles (no TensorRT needed)
# --------------------------------------------------------------------------------------------------------


def test_shipped_profiles_load_and_round_trip(tmp_path: Path) -> None:
    names = list_profiles()
    assert {"rtx-default", "trt-server"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        path = tmp_path / f"{name}.json"
        path.write_text(profile.to_json())
        assert load_profile(path) == profile
    rtx = load_profile("rtx-default")
    assert rtx.backend == "rtx"
    # SM75 (Turing) rejects FP32 GEMMs, which VGGT's float parts need.
    assert "SM75" not in rtx.compute_capabilities
    assert load_profile("trt-server").backend == "trt"


def test_profile_defaults_and_normalisation() -> None:
    profile = EngineProfile(name="x", compute_capabilities=["sm89", " SM120 "], frames={"min": 1, "opt": 3, "max": 5})
    assert profile.compute_capabilities == ("SM89", "SM120")
    assert profile.frames == FrameRange(1, 3, 5)
    assert profile.strongly_typed is True
    assert EngineProfile(name="y").compute_capabilities == ("CURRENT",)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"name": "bad name"}, "profile name"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"compute_capabilities": ()}, "is empty"),
        ({"compute_capabilities": "SM89"}, "must be a list"),
        ({"compute_capabilities": ("SM89", "Ada")}, "'Ada'"),
        ({"compute_capabilities": ("SM89", "SM89")}, "more than once"),
        ({"compute_capabilities": ("CURRENT", "SM89")}, "cannot be combined"),
        ({"frames": {"min": 4, "opt": 2, "max": 8}}, "1 <= min <= opt <= max"),
        ({"frames": {"min": 0, "opt": 1, "max": 1}}, "1 <= min <= opt <= max"),
        ({"frames": {"min": 1, "max": 2}}, "missing: opt"),
        ({"workspace_mib": 0}, "workspace_mib"),
        ({"builder_optimization_level": 6}, "builder_optimization_level"),
        ({"strongly_typed": "yes"}, "strongly_typed"),
    ],
)
def test_profile_validation_errors(kwargs: dict, expected: str) -> None:
    with pytest.raises(QVGGTError, match=expected.replace("(", r"\(")):
        EngineProfile(**{"name": "x", **kwargs})


def test_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(QVGGTError, match="unknown build profile 'no-such-profile'.*rtx-default"):
        load_profile("no-such-profile")
    with pytest.raises(QVGGTError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(QVGGTError, match="not valid JSON"):
        load_profile(bad_json)
    unknown_key = tmp_path / "typo.json"
    unknown_key.write_text(json.dumps({"name": "typo", "frame": {"min": 1, "opt": 1, "max": 1}}))
    with pytest.raises(QVGGTError, match="unknown profile key.*frame"):
        load_profile(unknown_key)
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"backend": "rtx", "compute_capabilities": ["SM89"]}))
    assert load_profile(str(unnamed)).name == "unnamed"


# --------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------


def test_importing_the_engine_package_does_not_import_tensorrt() -> None:
    code = (
        "import sys, qvggt_export.engine\n"
        "loaded = [m for m in sys.modules if m.startswith(('tensorrt', 'onnx'))]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_full_tensorrt_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A None entry makes `import tensorrt` fail as if it were not installed, also on hosts that have it.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"qvggt-export\[trt\]"):
        load_backend("trt")
    onnx_path = float_model(tmp_path / "model.onnx", frames=2)
    with pytest.raises(MissingDependencyError, match=r"qvggt-export\[trt\]"):
        build_engine(onnx_path, tmp_path / "model.engine", "trt-server")
    assert not (tmp_path / "model.engine.build.log").exists()


def test_unknown_backend_name() -> None:
    with pytest.raises(QVGGTError, match="unknown TensorRT backend 'cuda'"):
        load_backend("cuda")


@pytest.mark.rtx
def test_rtx_backend_capabilities() -> None:
    _require_rtx()
    backend = load_backend("rtx")
    assert backend.name == "rtx"
    assert backend.version.startswith(tuple("0123456789"))
    assert {"SM86", "SM89", "SM120", "CURRENT"} <= set(backend.compute_capability_names())
    assert "NONE" not in backend.compute_capability_names()
    assert load_backend("auto").name == "rtx"
    with pytest.raises(QVGGTError, match="'SM90' is not supported.*SM89"):
        backend.compute_capability("SM90")


# --------------------------------------------------------------------------------------------------------
# The tensorrt-rtx wheel's missing libtensorrt_rtx.so (on a fake library directory)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_rtx_libs(tmp_path: Path) -> Path:
    libs = tmp_path / "tensorrt_rtx_libs"
    libs.mkdir()
    (libs / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF fake")
    (libs / "libtensorrt_onnxparser_rtx.so.1").write_bytes(b"\x7fELF fake")
    return libs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's library naming bug is Linux-only")
def test_symlink_created_when_missing_and_idempotent(fake_rtx_libs: Path) -> None:
    link = ensure_rtx_parser_symlink(libs_dir=fake_rtx_libs)
    assert link == fake_rtx_libs / "libtensorrt_rtx.so"
    assert link.is_symlink()
    assert os.readlink(link) == "libtensorrt_rtx.so.1"  # relative: survives moving the environment
    assert ensure_rtx_parser_symlink(libs_dir=fake_rtx_libs) == link
    assert sorted(p.name for p in fake_rtx_libs.iterdir()) == [
        "libtensorrt_onnxparser_rtx.so.1", "libtensorrt_rtx.so", "libtensorrt_rtx.so.1",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's library naming bug is Linux-only")
def test_symlink_dangling_link_is_replaced(fake_rtx_libs: Path) -> None:
    os.symlink("libtensorrt_rtx.so.0", fake_rtx_libs / "libtensorrt_rtx.so")
    link = ensure_rtx_parser_symlink(libs_dir=fake_rtx_libs)
    assert link is not None and link.exists() and os.readlink(link) == "libtensorrt_rtx.so.1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's library naming bug is Linux-only")
def test_symlink_problem_reported_with_command(fake_rtx_libs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected_command = f"ln -sf libtensorrt_rtx.so.1 {fake_rtx_libs / 'libtensorrt_rtx.so'}"
    with pytest.raises(QVGGTError) as not_fixing:
        ensure_rtx_parser_symlink(fix=False, libs_dir=fake_rtx_libs)
    assert expected_command in str(not_fixing.value)

    # A read-only site-packages (chmod does not stop root, so the failure is simulated).
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "symlink", refuse)
    with pytest.raises(QVGGTError, match="Permission denied") as unwritable:
        ensure_rtx_parser_symlink(libs_dir=fake_rtx_libs)
    assert expected_command in str(unwritable.value)
    assert not (fake_rtx_libs / "libtensorrt_rtx.so").exists()
    assert [p.name for p in fake_rtx_libs.iterdir() if p.name.endswith(".tmp")] == []


def test_symlink_nothing_to_do_without_the_wheel_layout(tmp_path: Path) -> None:
    assert ensure_rtx_parser_symlink(libs_dir=tmp_path) is None  # no parser library there


# --------------------------------------------------------------------------------------------------------
# Input checks before any build (TensorRT-RTX needed only to get past backend loading)
# --------------------------------------------------------------------------------------------------------


def test_missing_onnx(tmp_path: Path) -> None:
    with pytest.raises(QVGGTError, match="does not exist"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "nope.engine", _profile("SM89"))
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(QVGGTError, match="ONNX model"):
        build_engine(garbage, tmp_path / "garbage.engine", _profile("SM89"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx"]


def test_input_problems(tmp_path: Path) -> None:
    model = float_model(tmp_path / "model.onnx")
    with pytest.raises(QVGGTError, match="no input named 'pixels'; its inputs are: images"):
        build_engine(model, tmp_path / "m.engine", _profile("SM89"), input_name="pixels")

    nodes, inits = _mean_over_channels()
    rank4 = _save_model(tmp_path / "rank4.onnx", nodes, inits, image_shape=[1, 3, TOKEN_DIM, TOKEN_DIM])
    with pytest.raises(QVGGTError, match=r"shape \[1, 3, 14, 14\]; expected \[1, S, 3, H, W\]"):
        build_engine(rank4, tmp_path / "m.engine", _profile("SM89"))

    dynamic_hw = _save_model(tmp_path / "dyn_hw.onnx", nodes, inits, image_shape=[1, "S", 3, "H", "W"])
    with pytest.raises(QVGGTError, match="dynamic resolution"):
        build_engine(dynamic_hw, tmp_path / "m.engine", _profile("SM89"))

    four_channels = _save_model(tmp_path / "c4.onnx", nodes, inits, image_shape=[1, "S", 4, 14, 14])
    with pytest.raises(QVGGTError, match="4 channels"):
        build_engine(four_channels, tmp_path / "m.engine", _profile("SM89"))
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.rtx
def test_unknown_compute_capability(tmp_path: Path) -> None:
    _require_rtx()
    model = float_model(tmp_path / "model.onnx")
    # SM90 (Hopper) is a valid architecture name, but TensorRT-RTX does not target it.
    with pytest.raises(QVGGTError, match="'SM90' is not supported by TensorRT-RTX.*SM86, SM89"):
        build_engine(model, tmp_path / "m.engine", _profile("SM89", "SM90"))
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.rtx
def test_current_without_gpu_is_explained(tmp_path: Path) -> None:
    _require_rtx()
    from qvggt_export.engine import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("this machine has a GPU: CURRENT is a valid target here")
    model = float_model(tmp_path / "model.onnx")
    with pytest.raises(QVGGTError, match="CURRENT.*no CUDA GPU is visible.*SM89"):
        build_engine(model, tmp_path / "m.engine", _profile("CURRENT"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# --------------------------------------------------------------------------------------------------------
# Builds with TensorRT-RTX
# --------------------------------------------------------------------------------------------------------


def _check_built(result, engine: Path, expected_sms: set[str]) -> None:
    assert result.engine_path == engine
    assert engine.is_file() and engine.stat().st_size == result.size_bytes > 0
    assert set(result.target_sms) == expected_sms
    assert result.num_layers is not None and result.num_layers > 0
    assert sum(result.layer_types.values()) == result.num_layers
    assert result.log_path.is_file() and "# result: built" in result.log_path.read_text()
    assert load_profile(result.profile_path).to_dict() == result.profile
    assert result.backend == "rtx"
    assert [p.name for p in engine.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.rtx
def test_build_float_dynamic_frames_sm89(tmp_path: Path) -> None:
    _require_rtx()
    model = float_model(tmp_path / "model.onnx")
    engine = tmp_path / "out" / "float.engine"  # parent directory is created
    result = build_engine(model, engine, _profile("SM89", frames=(1, 3, 6)))
    _check_built(result, engine, {"SM89"})
    assert result.input_shape == (1, -1, 3, TOKEN_DIM, TOKEN_DIM)
    assert result.frames == (1, 3, 6)
    assert result.profile["backend"] == "rtx"
    assert "gemm" in result.layer_types


@pytest.mark.rtx
def test_build_w8a8_per_token_multi_sm(tmp_path: Path) -> None:
    _require_rtx()
    model = w8a8_model(tmp_path / "w8a8.onnx")
    engine = tmp_path / "w8a8.engine"
    result = build_engine(model, engine, "rtx-default")
    _check_built(result, engine, set(load_profile("rtx-default").compute_capabilities))
    # The GEMM reads INT8 activations and weights: the per-token pattern fused into an INT8 GEMM.
    gemm_lines = [line for line in result.log_path.read_text().splitlines() if ", LayerType: gemm," in line]
    assert gemm_lines and "Datatype: Int8" in gemm_lines[0]


@pytest.mark.rtx
def test_build_w4_weight_only(tmp_path: Path) -> None:
    _require_rtx()
    engine = tmp_path / "w4.engine"
    result = build_engine(w4_model(tmp_path / "w4.onnx"), engine, _profile("SM89", "SM120"))
    _check_built(result, engine, {"SM89", "SM120"})


@pytest.mark.rtx
def test_static_frame_count_overrides_profile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _require_rtx()
    model = float_model(tmp_path / "static.onnx", frames=3)
    with caplog.at_level(logging.WARNING, logger="qvggt_export.engine.build"):
        result = build_engine(model, tmp_path / "static.engine", _profile("SM89", frames=(1, 2, 4)))
    assert result.frames == (3, 3, 3)
    assert result.input_shape == (1, 3, 3, TOKEN_DIM, TOKEN_DIM)
    assert "static frame count of 3" in caplog.text


@pytest.mark.rtx
def test_rejected_graph_leaves_no_engine(tmp_path: Path) -> None:
    _require_rtx()
    model = blocked_runtime_scale_model(tmp_path / "blocked.onnx")
    engine = tmp_path / "blocked.engine"
    # A stale engine from an earlier build must not survive a failed rebuild.
    engine.write_bytes(b"old engine")
    with pytest.raises(QVGGTError, match="failed to build an engine") as failure:
        build_engine(model, engine, _profile("SM89", frames=(2, 2, 2)))
    message = str(failure.value)
    assert "is_constant" in message and "blocked.engine.build.log" in message
    _assert_no_engine_or_temp(tmp_path, engine)
    log = (tmp_path / "blocked.engine.build.log").read_text()
    assert "# result: FAILED" in log and "[E]" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.engine.build.log", "blocked.onnx"]


@pytest.mark.rtx
def test_plugin_models_get_the_parser_fix_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_rtx()
    calls: list[str] = []

    def stop(*_args: object, **_kwargs: object) -> None:
        # Stand-in for the real fix, so the test neither parses a plugin nor touches site-packages.
        calls.append("called")
        raise QVGGTError("parser fix requested")

    monkeypatch.setattr(build_module, "ensure_rtx_parser_symlink", stop)
    with pytest.raises(QVGGTError, match="parser fix requested"):
        build_engine(plugin_model(tmp_path / "plugin.onnx"), tmp_path / "plugin.engine", _profile("SM89"))
    assert calls == ["called"]
    build_engine(float_model(tmp_path / "plain.onnx", frames=2), tmp_path / "plain.engine", _profile("SM89"))
    assert calls == ["called"]  # standard-domain models do not need it


@pytest.mark.rtx
def test_rtx_ignores_timing_cache_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _require_rtx()
    model = float_model(tmp_path / "model.onnx", frames=2)
    with caplog.at_level(logging.WARNING, logger="qvggt_export.engine.build"):
        build_engine(model, tmp_path / "m.engine", _profile("SM89", frames=(2, 2, 2), timing_cache="t.cache"))
    assert "does not use timing caches" in caplog.text
    assert not (tmp_path / "t.cache").exists()
