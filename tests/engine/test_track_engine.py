"""Tracking engines: the points range of build profiles, engines with a ``query_points`` input, and the runtime's
second input (on CPU stand-ins).

The builds use a tiny graph with the tracking graph's interface (``images`` [1, S, 3, 14, 14] and
``query_points`` [1, N, 2] -> ``track`` [1, S, N, 2], ``vis`` [1, S, N]), so each takes well under a second;
the real ``track.onnx`` of the tiny VGGT is built by ``tests/test_pipeline_track.py``. Nothing here runs an
engine (that needs a GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.engine import build_engine, list_profiles, load_profile
from qvggt_export.engine import runtime as rt
from qvggt_export.engine.profiles import EngineProfile, PointRange
from qvggt_export.engine.runtime import EngineSpec, QVGGTEngine, TensorSpec, check_points_shape
from qvggt_export.errors import QVGGTError

RTX_REASON = "needs TensorRT-RTX to build engines: pip install 'qvggt-export[rtx]'"
SIZE = 14


def _require_rtx() -> None:
    pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)


def tiny_track_onnx(path: Path, points: int | str = "N", extra_input: bool = False) -> Path:
    """track = query_points + mean(images) per frame (broadcast over points); vis = sum over (x, y) of track.

    ``extra_input`` adds a third input ``mask`` [1, K] with a dynamic axis no profile range covers.
    """
    inits = [numpy_helper.from_array(np.array([2, 3, 4], np.int64), "chw"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "two_three"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = [
        helper.make_node("ReduceMean", ["images", "chw"], ["m"], keepdims=0),  # [1, S]
        helper.make_node("Unsqueeze", ["m", "two_three"], ["m4"]),  # [1, S, 1, 1]
        helper.make_node("Unsqueeze", ["query_points", "one"], ["q4"]),  # [1, 1, N, 2]
        helper.make_node("Add", ["q4", "m4"], ["track"]),  # [1, S, N, 2]
        helper.make_node("ReduceSum", ["track", "last"], ["vis_raw"], keepdims=0),  # [1, S, N]
    ]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, "S", 3, SIZE, SIZE]),
              helper.make_tensor_value_info("query_points", TensorProto.FLOAT, [1, points, 2])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, "K"]))
        inits.append(numpy_helper.from_array(np.array([0, 1], np.int64), "both"))
        nodes += [helper.make_node("ReduceSum", ["mask", "both"], ["mask_sum"], keepdims=0),
                  helper.make_node("Add", ["vis_raw", "mask_sum"], ["vis"])]
    else:
        nodes.append(helper.make_node("Identity", ["vis_raw"], ["vis"]))
    graph = helper.make_graph(
        nodes, "tiny_track", inputs,
        [helper.make_tensor_value_info("track", TensorProto.FLOAT, [1, "S", points, 2]),
         helper.make_tensor_value_info("vis", TensorProto.FLOAT, [1, "S", points])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _profile(points: dict | None = None, **kwargs: object) -> EngineProfile:
    return EngineProfile(name="track-test", backend="rtx", compute_capabilities=("SM89",),
                         frames={"min": 1, "opt": 2, "max": 4},
                         points=points if points is not None else {"min": 1, "opt": 8, "max": 64}, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Profiles: the points range (no TensorRT needed)
# --------------------------------------------------------------------------------------------------------


def test_shipped_profiles_have_the_default_points_range() -> None:
    for name in list_profiles():
        assert load_profile(name).points == PointRange(1, 256, 4096), name
    assert EngineProfile(name="x").points == PointRange()
    assert EngineProfile(name="x", points={"min": 2, "opt": 3, "max": 5}).points == PointRange(2, 3, 5)
    assert PointRange.static(7).as_tuple() == (7, 7, 7)


def test_points_null_round_trips(tmp_path: Path) -> None:
    profile = EngineProfile(name="no-points", points=None)
    assert profile.to_dict()["points"] is None
    path = tmp_path / "no-points.json"
    path.write_text(profile.to_json())
    assert load_profile(path) == profile


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ({"min": 8, "opt": 4, "max": 16}, r"points must satisfy 1 <= min <= opt <= max, got min=8, opt=4, max=16"),
        ({"min": 0, "opt": 1, "max": 1}, r"points must satisfy 1 <= min"),
        ({"min": 1, "opt": 2.5, "max": 4}, r"points.opt must be an integer, got 2.5"),
        ({"min": True, "opt": 2, "max": 4}, r"points.min must be an integer"),
        ({"min": 1, "max": 4}, r"points must have exactly the keys min, opt, max; missing: opt"),
        ({"min": 1, "opt": 2, "max": 4, "step": 1}, r"unknown: step"),
        ([1, 2, 4], r"points must be an object \{min, opt, max\} or null"),
    ],
)
def test_bad_points_range_is_refused(points: object, expected: str) -> None:
    with pytest.raises(QVGGTError, match=expected):
        EngineProfile(name="x", points=points)  # type: ignore[arg-type]


def test_bad_points_range_in_a_profile_file_writes_nothing(tmp_path: Path) -> None:
    model = tiny_track_onnx(tmp_path / "track.onnx")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "backend": "rtx", "compute_capabilities": ["SM89"],
                               "points": {"min": 64, "opt": 8, "max": 16}}))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QVGGTError, match=r"bad.json: profile 'bad': points must satisfy 1 <= min <= opt <= max"):
        build_engine(model, tmp_path / "out" / "track.engine", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no engine, log, profile or folder


# --------------------------------------------------------------------------------------------------------
# Builds with TensorRT-RTX
# --------------------------------------------------------------------------------------------------------


@pytest.mark.rtx
def test_track_graph_builds_with_frames_and_points_profiles(tmp_path: Path) -> None:
    _require_rtx()
    engine = tmp_path / "track.engine"
    result = build_engine(tiny_track_onnx(tmp_path / "track.onnx"), engine, _profile())
    assert engine.is_file() and engine.stat().st_size == result.size_bytes > 0
    assert result.target_sms == ("SM89",)
    assert result.frames == (1, 2, 4) and result.points == (1, 8, 64)
    assert result.input_shapes == {"images": (1, -1, 3, SIZE, SIZE), "query_points": (1, -1, 2)}
    assert result.input_shape == (1, -1, 3, SIZE, SIZE)
    written = json.loads(result.profile_path.read_text())
    assert written["frames"] == {"min": 1, "opt": 2, "max": 4}
    assert written["points"] == {"min": 1, "opt": 8, "max": 64}
    assert load_profile(result.profile_path).to_dict() == result.profile
    assert result.to_dict()["input_shapes"]["query_points"] == [1, -1, 2]
    log = result.log_path.read_text()
    assert "# result: built" in log and '"points": {"min": 1, "opt": 8, "max": 64}' in log


@pytest.mark.rtx
def test_image_only_engine_records_no_points_range(tmp_path: Path) -> None:
    _require_rtx()
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    graph = helper.make_graph([helper.make_node("ReduceMean", ["images", "axes"], ["depth"], keepdims=0)], "images",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, "S", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("depth", TensorProto.FLOAT, None)], [axes])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(model))
    result = build_engine(model, tmp_path / "model.engine", _profile())
    assert result.points is None and result.input_shapes == {"images": (1, -1, 3, SIZE, SIZE)}
    assert json.loads(result.profile_path.read_text())["points"] is None  # the range did not apply
    assert load_profile(result.profile_path).points is None


@pytest.mark.rtx
def test_static_points_axis_is_used_as_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _require_rtx()
    model = tiny_track_onnx(tmp_path / "track.onnx", points=5)
    with caplog.at_level(logging.WARNING, logger="qvggt_export.engine.build"):
        result = build_engine(model, tmp_path / "track.engine", _profile())
    assert result.points == (5, 5, 5)
    assert result.input_shapes["query_points"] == (1, 5, 2)
    assert "static point count of 5" in caplog.text


def test_unknown_dynamic_axis_names_input_and_axis(tmp_path: Path) -> None:
    model = tiny_track_onnx(tmp_path / "track.onnx", extra_input=True)
    with pytest.raises(QVGGTError, match=r"input 'mask' has a dynamic axis 1 \(shape \[1, \?\]\) that no "
                                         r"build-profile range covers.*No engine was built"):
        build_engine(model, tmp_path / "track.engine", _profile())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["track.onnx"]


def test_points_input_shape_is_checked(tmp_path: Path) -> None:
    model = tiny_track_onnx(tmp_path / "track.onnx")
    proto = onnx.load(str(model))
    dims = proto.graph.input[1].type.tensor_type.shape.dim
    dims[2].dim_value = 3  # [1, N, 3]
    onnx.save(proto, str(model))
    with pytest.raises(QVGGTError, match=r"input 'query_points' .* has shape \[1, \?, 3\]; expected \[1, N, 2\]"):
        build_engine(model, tmp_path / "track.engine", _profile())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["track.onnx"]


@pytest.mark.rtx
def test_dynamic_points_with_a_null_points_range_is_refused(tmp_path: Path) -> None:
    _require_rtx()
    profile = EngineProfile(name="no-points", backend="rtx", compute_capabilities=("SM89",), points=None)
    with pytest.raises(QVGGTError, match=r"dynamic points axis but profile 'no-points' has no points range"):
        build_engine(tiny_track_onnx(tmp_path / "track.onnx"), tmp_path / "track.engine", profile)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["track.onnx"]


# --------------------------------------------------------------------------------------------------------
# Runtime: the query_points input (CPU stand-ins; running an engine needs a GPU)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 2), (1, 5, 2)])
def test_check_points_shape_accepts_both_ranks(shape: tuple[int, ...]) -> None:
    assert check_points_shape(shape, (1, 8, 64)) == 5
    assert check_points_shape(shape, (5, 5)) == 5


@pytest.mark.parametrize(
    ("shape", "points", "message"),
    [
        ((5, 3), (1, 64), r"shape \[1, 5, 3\]; expected \[N, 2\] or \[1, N, 2\] .* with 1 <= N <= 64"),
        ((5,), (1, 64), r"shape \[5\]; expected"),
        ((2, 5, 2), (1, 64), "a batch of 2"),
        ((100, 2), (1, 8, 64), "got 100 query points; .* accepts 1 to 64 points. Split them into calls of at most 64"),
        ((4, 2), (5, 5), "accepts exactly 5 points"),
    ],
)
def test_check_points_shape_errors(shape: tuple[int, ...], points: tuple[int, ...], message: str) -> None:
    with pytest.raises(QVGGTError, match=message):
        check_points_shape(shape, points)


class _FakeDtype:
    def __init__(self, name: str) -> None:
        self.name = name


_FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"))


class _FakeEngine:
    """Answers the ICudaEngine tensor API calls that _read_spec makes."""

    def __init__(self, tensors: list[tuple[str, str, tuple[int, ...]]], profiles: dict[str, list]) -> None:
        self.tensors = tensors
        self.profiles = profiles
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index][0]

    def get_tensor_mode(self, name: str) -> str:
        return next(t[1] for t in self.tensors if t[0] == name)

    def get_tensor_dtype(self, name: str) -> _FakeDtype:
        return _FakeDtype("FLOAT")

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return next(t[2] for t in self.tensors if t[0] == name)

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        assert index == 0
        return self.profiles[name]


_TRACK_TENSORS = [("images", "in", (1, -1, 3, SIZE, SIZE)), ("query_points", "in", (1, -1, 2)),
                  ("track", "out", (1, -1, -1, 2)), ("vis", "out", (1, -1, -1))]
_TRACK_PROFILES = {"images": [(1, 1, 3, SIZE, SIZE), (1, 2, 3, SIZE, SIZE), (1, 4, 3, SIZE, SIZE)],
                   "query_points": [(1, 1, 2), (1, 8, 2), (1, 64, 2)]}


def test_read_spec_of_a_tracking_engine() -> None:
    spec = rt._read_spec(_FakeEngine(_TRACK_TENSORS, _TRACK_PROFILES), _FAKE_TRT)
    assert spec.frames == (1, 2, 4) and spec.points == (1, 8, 64)
    assert spec.points_input == TensorSpec("query_points", "FLOAT", (1, -1, 2))
    assert spec.output_names == ("track", "vis")
    static = [("images", "in", (1, 3, 3, SIZE, SIZE)), ("query_points", "in", (1, 5, 2)), ("vis", "out", (1, 3, 5))]
    spec = rt._read_spec(_FakeEngine(static, {}), _FAKE_TRT)
    assert spec.frames == (3, 3, 3) and spec.points == (5, 5, 5)


@pytest.mark.parametrize(
    ("tensors", "profiles", "message"),
    [
        ([("images", "in", (1, -1, 3, SIZE, SIZE)), ("query_points", "in", (1, -1, 3)), ("o", "out", (1,))],
         _TRACK_PROFILES, r"'query_points' has shape \[1, -1, 3\]; expected \[1, N, 2\]"),
        ([("images", "in", (1, -1, 3, SIZE, SIZE)), ("query_points", "in", (-1, -1, 2)), ("o", "out", (1,))],
         {**_TRACK_PROFILES, "query_points": [(1, 1, 2), (2, 8, 2), (2, 64, 2)]}, "batches of 1 to 2"),
        ([("images", "in", (1, -1, 3, SIZE, SIZE)), ("query_points", "in", (1, -1, 2)), ("mask", "in", (1, 4)),
          ("o", "out", (1,))], _TRACK_PROFILES, "a VGGT engine has one, images"),
    ],
)
def test_read_spec_refuses_bad_tracking_engines(tensors: list, profiles: dict, message: str) -> None:
    with pytest.raises(QVGGTError, match=message):
        rt._read_spec(_FakeEngine(tensors, profiles), _FAKE_TRT)


class _FakeStream:
    cuda_stream = 0

    def wait_stream(self, other: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _FakeTrackContext:
    """An IExecutionContext stand-in computing the tiny track graph from the buffers bound to it by address."""

    def __init__(self, buffers: dict[int, torch.Tensor]) -> None:
        self.buffers = buffers
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls = 0

    def set_input_shape(self, name: str, shape: list[int]) -> bool:
        assert name in ("images", "query_points")
        self.shapes[name], self.shape_calls = tuple(shape), self.shape_calls + 1
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        frames, points = self.shapes["images"][1], self.shapes["query_points"][1]
        return {"track": (1, frames, points, 2), "vis": (1, frames, points)}[name]

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def execute_async_v3(self, stream: int) -> bool:
        images = self.buffers[self.addresses["images"]]
        points = self.buffers[self.addresses["query_points"]]
        assert tuple(images.shape) == self.shapes["images"] and tuple(points.shape) == self.shapes["query_points"]
        track = points[:, None] + images.mean((2, 3, 4))[:, :, None, None]
        self.buffers[self.addresses["track"]].copy_(track)
        self.buffers[self.addresses["vis"]].copy_(track.sum(-1))
        return True


def _expected(images: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
    track = points.reshape(1, 1, -1, 2) + images.reshape(1, -1, 3, SIZE, SIZE).mean((2, 3, 4))[:, :, None, None]
    return {"track": track, "vis": track.sum(-1)}


def _stand_in_tracking_engine(monkeypatch: pytest.MonkeyPatch) -> tuple[QVGGTEngine, _FakeTrackContext]:
    """A QVGGTEngine around a stand-in context, with torch.cuda's stream/device plumbing as no-ops and buffers on
    the CPU (as tests/engine/test_runtime.py does for the image-only engine)."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    buffers: dict[int, torch.Tensor] = {}
    context = _FakeTrackContext(buffers)
    engine = QVGGTEngine.__new__(QVGGTEngine)
    engine.__dict__.update(
        _path=Path("track.engine"), _backend=SimpleNamespace(name="rtx", display_name="fake", version="0", trt=None),
        _capture=SimpleNamespace(count=0, since=lambda mark, level=3: []), _runtime=None, _engine=None,
        _context=context, _device=torch.device("cpu"), _stream=_FakeStream(), _cuda_graph=False,
        _manual_graph=False, _scratch=None, _spare_context=None, _bindings={}, _active=None,
        _lock=threading.Lock(), _closed=False,
        _spec=EngineSpec(TensorSpec("images", "FLOAT", (1, -1, 3, SIZE, SIZE)),
                         (TensorSpec("track", "FLOAT", (1, -1, -1, 2)), TensorSpec("vis", "FLOAT", (1, -1, -1))),
                         (1, 2, 4), TensorSpec("query_points", "FLOAT", (1, -1, 2)), (1, 8, 64)),
    )
    real_bindings_for = engine._bindings_for

    def bindings_for(key: object) -> object:  # tell the stand-in where the new buffers are
        bindings = real_bindings_for(key)
        for tensor in (bindings.input, bindings.points_input, *bindings.outputs.values()):
            buffers[tensor.data_ptr()] = tensor
        return bindings

    engine._bindings_for = bindings_for
    return engine, context


def _case(frames: int, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, frames, 3, SIZE, SIZE, generator=g), torch.rand(1, points, 2, generator=g) * (SIZE - 1)


def test_tracking_engine_binds_query_points(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, context = _stand_in_tracking_engine(monkeypatch)
    assert engine.points == (1, 8, 64)
    images, points = _case(2, 5, 0)
    out = engine.infer(images, points)
    assert set(out) == {"track", "vis"} and out["track"].shape == (1, 2, 5, 2)
    for name, expected in _expected(images, points).items():
        torch.testing.assert_close(out[name], expected)
    assert context.shapes == {"images": (1, 2, 3, SIZE, SIZE), "query_points": (1, 5, 2)}
    assert list(engine._bindings) == [(2, 5)]

    # Same (S, N): buffers reused, no new shapes set; [N, 2] points and double input converted.
    calls = context.shape_calls
    images2, points2 = _case(2, 5, 1)
    raw = engine.infer(images2[0].double(), points2[0].double(), copy=False)
    assert context.shape_calls == calls
    torch.testing.assert_close(raw["track"], _expected(images2, points2)["track"])

    # Another point count with the same frames: new shapes and buffers.
    images3, points3 = _case(2, 11, 2)
    out3 = engine.infer(images3, points3)
    assert context.shapes["query_points"] == (1, 11, 2) and list(engine._bindings) == [(2, 11)]
    torch.testing.assert_close(out3["vis"], _expected(images3, points3)["vis"])


def test_tracking_engine_input_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = _stand_in_tracking_engine(monkeypatch)
    images, points = _case(2, 5, 0)
    with pytest.raises(QVGGTError, match=r"is a tracking engine: infer\(images, query_points\) needs"):
        engine.infer(images)
    with pytest.raises(QVGGTError, match="accepts 1 to 64 points"):
        engine.infer(images, torch.rand(1, 65, 2))
    with pytest.raises(QVGGTError, match="floating-point torch.Tensor"):
        engine.infer(images, points.to(torch.int32))
    with pytest.raises(QVGGTError, match="floating-point torch.Tensor"):
        engine.infer(images, points.numpy())  # type: ignore[arg-type]
    assert engine._bindings == {}  # nothing allocated for refused calls

    image_only = QVGGTEngine.__new__(QVGGTEngine)
    image_only.__dict__.update(_path=Path("model.engine"), _closed=False, _spec=EngineSpec(
        TensorSpec("images", "FLOAT", (1, -1, 3, SIZE, SIZE)), (TensorSpec("depth", "FLOAT", (1, -1)),), (1, 2, 4)))
    with pytest.raises(QVGGTError, match="has no query_points input"):
        image_only.infer(images, points)


# --------------------------------------------------------------------------------------------------------
# GPU: a tracking engine against ONNX Runtime (not run in this project's CI: no GPU)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU host)")
def test_gpu_tracking_engine_matches_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime for the reference outputs")
    from qvggt_export.engine import load_backend

    major, minor = torch.cuda.get_device_capability(0)
    backend = "rtx" if f"SM{major}{minor}" in load_backend("rtx").compute_capability_names() else "trt"
    model = tiny_track_onnx(tmp_path / "track.onnx")
    profile = EngineProfile(name="gpu-track", backend=backend, compute_capabilities=("CURRENT",),
                            frames={"min": 1, "opt": 2, "max": 4}, points={"min": 1, "opt": 8, "max": 64})
    result = build_engine(model, tmp_path / "track.engine", profile)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with QVGGTEngine(result.engine_path) as engine:
        assert engine.points == (1, 8, 64)
        for frames, points, seed in ((2, 5, 0), (4, 64, 1), (1, 1, 2), (2, 5, 3)):
            images, query = _case(frames, points, seed)
            track, vis = session.run(["track", "vis"], {"images": images.numpy(), "query_points": query.numpy()})
            out = engine.infer(images, query)
            np.testing.assert_allclose(out["track"].cpu().numpy(), track, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out["vis"].cpu().numpy(), vis, rtol=1e-5, atol=1e-5)
