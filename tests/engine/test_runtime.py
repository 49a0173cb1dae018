"""Engine runtime: QVGGTEngine's checks (CPU) and inference against ONNX Runtime (GPU).

Without a GPU this covers everything before deserialization: missing, empty and non-engine files, an engine of
another TensorRT-RTX version, the "needs an NVIDIA GPU" error on a real engine built here with TensorRT-RTX,
backend selection from ``<engine>.profile.json``, and the pure pieces (image shape checks, engine I/O reading on
a stand-in engine object, log classification, device parsing, target architectures, dtype mapping).

The ``gpu`` tests build engines for the GPU they run on (TensorRT-RTX when it targets that GPU, full TensorRT
when installed) and compare QVGGTEngine with ONNX Runtime on the same ONNX model, including CUDA graphs, buffer
reuse and the Hadamard plugin.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.engine import EngineProfile, FrameRange, build_engine, cuda_device_count, load_backend
from qvggt_export.engine import runtime as rt
from qvggt_export.engine.runtime import EngineSpec, QVGGTEngine, TensorSpec, check_images_shape, polygraphy_runner
from qvggt_export.errors import MissingDependencyError, QVGGTError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
RTX_REASON = "needs TensorRT-RTX to build engines: pip install 'qvggt-export[rtx]'"
GPU_REASON = "needs a CUDA GPU (run on a GPU host)"
requires_rtx = pytest.mark.skipif(not HAS_RTX, reason=RTX_REASON)
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON)

SIZE = 14  # H = W
POSE_DIM = 9
_RTX_VERSION_OFFSET = 0x18  # major, minor, patch bytes in a TensorRT-RTX 1.x engine header (observed on 1.7.1)


# --------------------------------------------------------------------------------------------------------
# A tiny "VGGT": images [1, S, 3, 14, 14] -> pose_enc [1, S, 9], depth [1, S, 14, 14, 1]
# --------------------------------------------------------------------------------------------------------


def tiny_vggt_onnx(path: Path, frames: int | str = "S") -> Path:
    """pose_enc = mean over (C, H, W) times a ramp; depth = channel mean, channels-last, scaled and shifted."""
    inits = [
        numpy_helper.from_array(np.array([2, 3, 4], np.int64), "chw"),
        numpy_helper.from_array(np.array([2], np.int64), "c"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.linspace(0.5, 2.0, POSE_DIM, dtype=np.float32), "ramp"),
        numpy_helper.from_array(np.array(3.0, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.25, np.float32), "shift"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["images", "chw"], ["m"], keepdims=0),  # [1, S]
        helper.make_node("Unsqueeze", ["m", "last"], ["m1"]),  # [1, S, 1]
        helper.make_node("Mul", ["m1", "ramp"], ["pose_enc"]),  # [1, S, 9]
        helper.make_node("ReduceMean", ["images", "c"], ["g"], keepdims=0),  # [1, S, 14, 14]
        helper.make_node("Unsqueeze", ["g", "last"], ["g1"]),  # [1, S, 14, 14, 1]
        helper.make_node("Mul", ["g1", "scale"], ["g2"]),
        helper.make_node("Add", ["g2", "shift"], ["depth"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_vggt",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, frames, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("pose_enc", TensorProto.FLOAT, [1, frames, POSE_DIM]),
         helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, frames, SIZE, SIZE, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def rtx_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SM89 TensorRT-RTX engine of the tiny model, built on this machine (no GPU needed)."""
    pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)
    folder = tmp_path_factory.mktemp("rtx_engine")
    result = build_engine(tiny_vggt_onnx(folder / "tiny.onnx"), folder / "tiny.engine", "rtx-sm89")
    assert result.target_sms == ("SM89",)
    return result.engine_path


def _copy_engine(engine: Path, folder: Path, data: bytes | None = None, name: str = "copy.engine") -> Path:
    target = folder / name
    target.write_bytes(engine.read_bytes() if data is None else data)
    return target


# --------------------------------------------------------------------------------------------------------
# CPU: import and file checks
# --------------------------------------------------------------------------------------------------------


def test_import_loads_neither_tensorrt_nor_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import json, sys
        import qvggt_export.engine.runtime
        print(json.dumps({m: m in sys.modules for m in ("tensorrt_rtx", "tensorrt", "torch")}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"tensorrt_rtx": False, "tensorrt": False,
                                                               "torch": False}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QVGGTError, match="does not exist"):
        QVGGTEngine(tmp_path / "nope.engine")


def test_directory_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(QVGGTError, match="is not a file"):
        QVGGTEngine(tmp_path)
    empty = tmp_path / "empty.engine"
    empty.write_bytes(b"")
    with pytest.raises(QVGGTError, match="is empty"):
        QVGGTEngine(empty)


@requires_rtx
@pytest.mark.parametrize("content", ["random", "onnx"])
def test_non_engine_file_is_refused(tmp_path: Path, content: str) -> None:
    if content == "random":
        path = tmp_path / "random.engine"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    else:
        path = tiny_vggt_onnx(tmp_path / "model.onnx")
    with pytest.raises(QVGGTError, match=r"is not a TensorRT-RTX \S+ engine") as info:
        QVGGTEngine(path, backend="rtx")
    assert "TensorRT says" in str(info.value)  # the header check's own message is quoted


@requires_rtx
def test_engine_of_another_version_names_both_versions(rtx_engine: Path, tmp_path: Path) -> None:
    be = load_backend("rtx")
    data = bytearray(rtx_engine.read_bytes())
    major, minor, patch = (int(part) for part in be.version.split(".")[:3])
    header_version = tuple(data[_RTX_VERSION_OFFSET:_RTX_VERSION_OFFSET + 3])
    if header_version != (major, minor, patch):
        pytest.skip(f"engine header layout of TensorRT-RTX {be.version} unknown (found {header_version} at 0x18)")
    data[_RTX_VERSION_OFFSET + 1] = (minor - 1) % 256  # as if built by the previous minor release
    old = _copy_engine(rtx_engine, tmp_path, bytes(data), "old.engine")
    with pytest.raises(QVGGTError, match="by another version") as info:
        QVGGTEngine(old)
    assert be.version in str(info.value) and "created with TensorRT-RTX version" in str(info.value)

    # With the build log beside it, the message names the version that built the engine.
    (tmp_path / "old.engine.build.log").write_text("# qvggt-export engine build log\n"
                                                  "# backend: TensorRT-RTX 0.9.0.7\n")
    with pytest.raises(QVGGTError, match=r"built by TensorRT-RTX 0\.9\.0\.7 \(per its build log\)") as info:
        QVGGTEngine(old)
    assert "pip install 'tensorrt-rtx==0.9.0.7'" in str(info.value)


@requires_rtx
@pytest.mark.parametrize("cut", ["half", "last_byte", "trailing"])
def test_truncated_or_padded_engine_is_refused_before_the_gpu_check(rtx_engine: Path, tmp_path: Path, cut: str) -> None:
    data = rtx_engine.read_bytes()
    changed = {"half": data[: len(data) // 2], "last_byte": data[:-1], "trailing": data + bytes(16)}[cut]
    broken = _copy_engine(rtx_engine, tmp_path, changed, "broken.engine")
    expected = r"longer than its header says \(trailing bytes\)" if cut == "trailing" else "is truncated"
    with pytest.raises(QVGGTError, match=f"{expected}: its header records {len(data)} bytes but the file has "
                                         f"{len(changed)}"):
        QVGGTEngine(broken, backend="rtx")


@requires_rtx
def test_recorded_length_matches_multi_architecture_engines(tmp_path: Path) -> None:
    profile = EngineProfile(name="t", backend="rtx", compute_capabilities=("SM86", "SM120"), frames=FrameRange(1, 2, 2))
    result = build_engine(tiny_vggt_onnx(tmp_path / "tiny.onnx"), tmp_path / "multi.engine", profile)
    rt._check_rtx_length(result.engine_path)  # the header's length is the file's: no error
    header = result.engine_path.read_bytes()[:24]
    assert header[:4] == b"vtrt" and int.from_bytes(header[16:24], "little") == result.size_bytes


@requires_rtx
@pytest.mark.skipif(cuda_device_count() > 0, reason="a CUDA GPU is visible: the engine would load")
def test_real_engine_without_gpu_says_a_gpu_is_needed(rtx_engine: Path) -> None:
    with pytest.raises(QVGGTError, match="needs an NVIDIA GPU with its driver") as info:
        QVGGTEngine(rtx_engine)
    assert "Building engines works without one" in str(info.value)


@requires_rtx
def test_gpu_check_runs_before_deserializing(rtx_engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also on a GPU host: with the driver reporting no device, the header passes and the GPU check refuses
    before any plugin is registered or anything is deserialized."""
    scanned = []
    monkeypatch.setattr(rt, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(rt, "_uses_plugin", lambda path: scanned.append(path) or False)
    with pytest.raises(QVGGTError, match="needs an NVIDIA GPU"):
        QVGGTEngine(rtx_engine)
    assert scanned == []


@pytest.mark.skipif(HAS_TRT, reason="full TensorRT is installed: the engine would be handed to it")
def test_auto_backend_follows_the_profile_beside_the_engine(tmp_path: Path) -> None:
    engine = tmp_path / "server.engine"
    engine.write_bytes(b"ftrt" + bytes(4092))
    (tmp_path / "server.engine.profile.json").write_text(json.dumps({"name": "trt-server", "backend": "trt"}))
    with pytest.raises(MissingDependencyError) as info:
        QVGGTEngine(engine)
    assert info.value.extra == "trt"


# --------------------------------------------------------------------------------------------------------
# CPU: pure pieces
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3, SIZE, SIZE), (1, 3, 3, SIZE, SIZE)])
def test_check_images_shape_accepts_both_ranks(shape: tuple[int, ...]) -> None:
    assert check_images_shape(shape, (SIZE, SIZE), (1, 8, 32)) == 3
    assert check_images_shape(shape, (SIZE, SIZE), (3, 3)) == 3


@pytest.mark.parametrize(
    ("shape", "frames", "message"),
    [
        ((3, SIZE, SIZE), (1, 32), r"expected \[S, 3, 14, 14\] or \[1, S, 3, 14, 14\] with 1 <= S <= 32"),
        ((2, 3, 3, SIZE, SIZE), (1, 32), "a batch of 2 sequences"),
        ((3, 4, SIZE, SIZE), (1, 32), "4 channels"),
        ((3, 3, SIZE, 16), (1, 32), "images are 14x16 .* built for 14x14, its only resolution"),
        ((40, 3, SIZE, SIZE), (1, 8, 32), "got 40 frames; the engine's optimization profile accepts 1 to 32 frames"),
        ((1, 3, SIZE, SIZE), (2, 4, 8), "got 1 frames; .* accepts 2 to 8 frames"),
        ((5, 3, SIZE, SIZE), (4, 4), "accepts exactly 4 frames"),
    ],
)
def test_check_images_shape_errors(shape: tuple[int, ...], frames: tuple[int, ...], message: str) -> None:
    with pytest.raises(QVGGTError, match=message):
        check_images_shape(shape, (SIZE, SIZE), frames)


class _FakeDtype:
    def __init__(self, name: str) -> None:
        self.name = name


_FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"))


class _FakeEngine:
    """Answers the ICudaEngine tensor API calls that _read_spec makes."""

    def __init__(self, tensors: list[tuple[str, str, str, tuple[int, ...]]], profile: list[tuple[int, ...]]) -> None:
        self.tensors = tensors
        self.profile = profile
        self.num_io_tensors = len(tensors)

    def _find(self, name: str) -> tuple[str, str, str, tuple[int, ...]]:
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index][0]

    def get_tensor_mode(self, name: str) -> str:
        return self._find(name)[1]

    def get_tensor_dtype(self, name: str) -> _FakeDtype:
        return _FakeDtype(self._find(name)[2])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._find(name)[3]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        assert index == 0
        return self.profile


def test_read_spec_takes_frames_from_the_profile() -> None:
    engine = _FakeEngine(
        [("images", "in", "FLOAT", (-1, -1, 3, 518, 392)), ("pose_enc", "out", "FLOAT", (1, -1, 9)),
         ("depth", "out", "HALF", (1, -1, 518, 392, 1))],
        [(1, 1, 3, 518, 392), (1, 8, 3, 518, 392), (1, 32, 3, 518, 392)],
    )
    spec = rt._read_spec(engine, _FAKE_TRT)
    assert spec.frames == (1, 8, 32)
    assert spec.resolution == (518, 392)
    assert spec.output_names == ("pose_enc", "depth")
    assert spec.outputs[1] == TensorSpec("depth", "HALF", (1, -1, 518, 392, 1))


def test_read_spec_static_frames() -> None:
    engine = _FakeEngine([("images", "in", "FLOAT", (1, 4, 3, 14, 14)), ("depth", "out", "FLOAT", (1, 4, 14, 14, 1))],
                         [])
    assert rt._read_spec(engine, _FAKE_TRT).frames == (4, 4, 4)


@pytest.mark.parametrize(
    ("tensors", "profile", "message"),
    [
        ([("a", "in", "FLOAT", (1, -1, 3, 14, 14)), ("b", "in", "FLOAT", (1, 2)), ("o", "out", "FLOAT", (1,))],
         [], "a VGGT engine has one"),
        ([("images", "in", "FLOAT", (1, -1, 3, -1, -1)), ("o", "out", "FLOAT", (1,))], [], "dynamic resolution"),
        ([("images", "in", "FLOAT", (1, -1, 1, 14, 14)), ("o", "out", "FLOAT", (1,))], [], "expected"),
        ([("images", "in", "FLOAT", (1, -1, 3, 14, 14))], [], "no outputs"),
        ([("images", "in", "FLOAT", (-1, -1, 3, 14, 14)), ("o", "out", "FLOAT", (1,))],
         [(1, 1, 3, 14, 14), (2, 2, 3, 14, 14), (4, 8, 3, 14, 14)], "batches of 1 to 4"),
    ],
)
def test_read_spec_refuses_non_vggt_engines(tensors: list, profile: list, message: str) -> None:
    with pytest.raises(QVGGTError, match=message):
        rt._read_spec(_FakeEngine(tensors, profile), _FAKE_TRT)


@pytest.mark.parametrize(
    ("messages", "verdict"),
    [
        # TensorRT-RTX 1.7.1 header check on random bytes and on a version-patched engine (logged here).
        (["The engine header does not conform to the expected format for TensorRT-RTX. Ensure that the engine was "
          "created with the same version of TensorRT-RTX as the current runtime."], "malformed"),
        (["The engine has been created with TensorRT-RTX version 1.6.0, but the current runtime is TensorRT-RTX "
          "version 1.7.1. Rebuild the engine with the same version of TensorRT-RTX as the current runtime."],
         "version"),
        # Full TensorRT 8 / 10 deserialization errors (from TensorRT issue reports).
        (["[stdArchiveReader.cpp::StdArchiveReader::40] Error Code 1: Serialization (Serialization assertion "
          "stdVersionRead == serializationVersion failed.Version tag does not match. Note: Current Version: 213, "
          "Serialized Engine Version: 205)"], "version"),
        (["Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)"], "malformed"),
        (["Loaded engine size: 0 MiB", "Error Code 1: Cuda Runtime (cudaError 35: CUDA driver version is "
          "insufficient for CUDA runtime version)"], None),
    ],
)
def test_classify_log(messages: list[str], verdict: str | None) -> None:
    found = rt._classify_log(messages)
    assert (found[0] if found else None) == verdict


def test_device_index() -> None:
    assert rt._device_index(0) == 0
    assert rt._device_index("cuda") == 0
    assert rt._device_index("cuda:1") == 1
    assert rt._device_index(torch.device("cuda", 2)) == 2
    for bad, message in (("cpu", "run on CUDA devices"), (-1, ">= 0"), (True, "index or name"),
                         ("gpu?", "index or name")):
        with pytest.raises(QVGGTError, match=message):
            rt._device_index(bad)


def test_torch_dtype_mapping() -> None:
    assert rt._torch_dtype("FLOAT") is torch.float32
    assert rt._torch_dtype("HALF") is torch.float16
    assert rt._torch_dtype("BF16") is torch.bfloat16
    with pytest.raises(QVGGTError, match="FP4 have no torch equivalent"):
        rt._torch_dtype("FP4")


@requires_rtx
def test_engine_bytes_scans(rtx_engine: Path, tmp_path: Path) -> None:
    assert rt.read_target_sms(rtx_engine) == ("SM89",)
    assert not rt._uses_plugin(rtx_engine)
    marked = _copy_engine(rtx_engine, tmp_path, rtx_engine.read_bytes() + b"qvggt\0Hadamard\0")
    assert rt._uses_plugin(marked)
    rt._check_target(rtx_engine, ("SM86", "SM89"), "SM89", "RTX 4090")
    with pytest.raises(QVGGTError, match="compiled for SM89 but this GPU \\(H100\\) is SM90"):
        rt._check_target(rtx_engine, ("SM89",), "SM90", "H100")


class _FakeStream:
    cuda_stream = 0

    def wait_stream(self, other: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _FakeContext:
    """An IExecutionContext stand-in that computes the tiny model from the buffers bound to it by address."""

    def __init__(self, buffers: dict[int, torch.Tensor]) -> None:
        self.buffers = buffers  # data_ptr -> tensor, filled by the test
        self.shape: tuple[int, ...] = ()
        self.addresses: dict[str, int] = {}
        self.shape_calls = 0

    def set_input_shape(self, name: str, shape: list[int]) -> bool:
        assert name == "images"
        self.shape, self.shape_calls = tuple(shape), self.shape_calls + 1
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        frames = self.shape[1]
        return {"pose_enc": (1, frames, POSE_DIM), "depth": (1, frames, SIZE, SIZE, 1)}[name]

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)

    def execute_async_v3(self, stream: int) -> bool:
        images = self.buffers[self.addresses["images"]]
        assert tuple(images.shape) == self.shape
        self.buffers[self.addresses["pose_enc"]].copy_(images.mean((2, 3, 4))[..., None] * 2)
        self.buffers[self.addresses["depth"]].copy_(images.mean(2)[..., None] * 3 + 0.25)
        return True


def _stand_in_engine(monkeypatch: pytest.MonkeyPatch, graphs: bool) -> tuple[QVGGTEngine, list[_FakeContext]]:
    """A QVGGTEngine around stand-in contexts: torch.cuda's stream/device plumbing becomes no-ops and buffers
    live on the CPU. With ``graphs``, the manual CUDA-graph mode, where a "graph" replays its own context."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    buffers: dict[int, torch.Tensor] = {}
    contexts = [_FakeContext(buffers)]

    def new_context(strategy: object = None) -> _FakeContext:
        assert strategy == "USER_MANAGED"
        contexts.append(_FakeContext(buffers))
        return contexts[-1]

    engine = QVGGTEngine.__new__(QVGGTEngine)
    engine.__dict__.update(
        _path=Path("fake.engine"),
        _backend=SimpleNamespace(name="trt", display_name="fake", version="0", trt=SimpleNamespace(
            ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="USER_MANAGED"))),
        _capture=SimpleNamespace(count=0, since=lambda mark, level=3: []), _runtime=None,
        _engine=SimpleNamespace(create_execution_context=new_context, device_memory_size_v2=4096),
        _context=contexts[0], _device=torch.device("cpu"), _stream=_FakeStream(), _cuda_graph=graphs,
        _manual_graph=graphs, _scratch=None, _spare_context=contexts[0] if graphs else None, _bindings={},
        _active=None, _lock=threading.Lock(), _closed=False,
        _spec=EngineSpec(TensorSpec("images", "FLOAT", (1, -1, 3, SIZE, SIZE)),
                         (TensorSpec("pose_enc", "FLOAT", (1, -1, POSE_DIM)),
                          TensorSpec("depth", "FLOAT", (1, -1, SIZE, SIZE, 1))), (1, 2, 4)),
    )
    real_bindings_for = engine._bindings_for

    def bindings_for(frames: int) -> object:  # tell the stand-ins where the new buffers are
        bindings = real_bindings_for(frames)
        for tensor in (bindings.input, *bindings.outputs.values()):
            buffers[tensor.data_ptr()] = tensor
        return bindings

    engine._bindings_for = bindings_for
    engine._capture_graph = lambda context: SimpleNamespace(replay=lambda: context.execute_async_v3(0))
    return engine, contexts


def _stand_in_expected(images: torch.Tensor) -> dict[str, torch.Tensor]:
    images = images.reshape(1, -1, 3, SIZE, SIZE)
    pose = images.mean((2, 3, 4))[..., None].expand(-1, -1, POSE_DIM) * 2
    return {"pose_enc": pose, "depth": images.mean(2)[..., None] * 3 + 0.25}


def test_infer_binds_reuses_and_copies_on_a_stand_in_context(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, contexts = _stand_in_engine(monkeypatch, graphs=False)
    a, b, c = _images(2, 0), _images(2, 1)[0], _images(3, 2)
    out_a = engine.infer(a)
    raw_b = engine.infer(b, copy=False)  # [S, 3, H, W] input
    raw_b2 = engine.infer(b.double(), copy=False)  # converted to the engine's float32
    assert list(out_a) == ["pose_enc", "depth"]
    for name in out_a:
        torch.testing.assert_close(out_a[name], _stand_in_expected(a)[name])  # the copy survived later calls
        torch.testing.assert_close(raw_b[name], _stand_in_expected(b)[name])
        assert raw_b[name].data_ptr() == raw_b2[name].data_ptr() != out_a[name].data_ptr()
    assert contexts[0].shape_calls == 2  # set once to allocate, once to bind; not again for the same S
    out_c = engine.infer(c)
    assert contexts[0].shape == (1, 3, 3, SIZE, SIZE) and list(engine._bindings) == [3]  # one S's buffers kept
    torch.testing.assert_close(out_c["depth"], _stand_in_expected(c)["depth"])
    assert len(contexts) == 1
    engine.close()
    with pytest.raises(QVGGTError, match="is closed"):
        engine.infer(a)


def test_manual_cuda_graphs_get_one_context_per_frame_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A captured graph bakes in its context's shape: switching S must not re-shape a captured context."""
    engine, contexts = _stand_in_engine(monkeypatch, graphs=True)
    for frames, seed in ((2, 0), (3, 1), (2, 2), (3, 3), (2, 4)):  # first call per S runs, later ones replay
        images = _images(frames, seed)
        out = engine.infer(images)
        for name in out:
            torch.testing.assert_close(out[name], _stand_in_expected(images)[name])
    assert sorted(engine._bindings) == [2, 3] and all(b.graph is not None for b in engine._bindings.values())
    assert len(contexts) == 2 and [c.shape[1] for c in contexts] == [2, 3]
    assert [c.shape_calls for c in contexts] == [1, 1]
    assert contexts[1].memory == (engine._scratch.data_ptr(), 4096)  # shared activation memory


def test_polygraphy_runner_without_polygraphy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tmp_path / "server.engine"
    engine.write_bytes(bytes(64))
    monkeypatch.setitem(sys.modules, "polygraphy", None)  # makes `import polygraphy...` fail
    with pytest.raises(MissingDependencyError) as info:
        polygraphy_runner(engine)
    assert info.value.extra == "trt" and "polygraphy" in str(info.value)
    with pytest.raises(QVGGTError, match="does not exist"):
        polygraphy_runner(tmp_path / "missing.engine")


# --------------------------------------------------------------------------------------------------------
# GPU: inference against ONNX Runtime
# --------------------------------------------------------------------------------------------------------


def _gpu_backends() -> list:
    params = []
    for name, installed in (("rtx", HAS_RTX), ("trt", HAS_TRT)):
        marks = [pytest.mark.gpu, requires_gpu]
        if not installed:
            marks.append(pytest.mark.skip(reason=f"the {name!r} backend is not installed"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _current_sm() -> str:
    major, minor = torch.cuda.get_device_capability(0)
    return f"SM{major}{minor}"


@pytest.fixture(scope="module", params=_gpu_backends())
def gpu_build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(onnx, engine, backend): the tiny model built for this machine's GPU, frames 1..4."""
    backend = request.param
    if backend == "rtx" and _current_sm() not in load_backend("rtx").compute_capability_names():
        pytest.skip(f"TensorRT-RTX does not target this GPU ({_current_sm()})")
    folder = tmp_path_factory.mktemp(f"gpu_{backend}")
    onnx_path = tiny_vggt_onnx(folder / "tiny.onnx")
    profile = EngineProfile(name="runtime-test", backend=backend, compute_capabilities=("CURRENT",),
                            frames=FrameRange(1, 2, 4))
    result = build_engine(onnx_path, folder / "tiny.engine", profile)
    return onnx_path, result.engine_path, backend


def _onnxruntime(onnx_path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime for the reference outputs")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images}), strict=True))


def _images(frames: int, seed: int) -> torch.Tensor:
    return torch.rand(1, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _assert_matches(outputs: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> None:
    assert set(outputs) == set(reference)  # the official names, as the ONNX graph declares them
    for name, expected in reference.items():
        got = outputs[name]
        assert got.is_cuda and got.dtype == torch.float32 and tuple(got.shape) == expected.shape, name
        # Observed: float32 means reordered on the GPU differ by ~1e-7.
        np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.gpu
@requires_gpu
def test_gpu_matches_onnxruntime(gpu_build: tuple[Path, Path, str]) -> None:
    onnx_path, engine_path, backend = gpu_build
    with QVGGTEngine(engine_path) as engine:
        assert engine.backend == backend
        assert engine.frames == (1, 2, 4) and engine.resolution == (SIZE, SIZE)
        assert engine.output_names == ("pose_enc", "depth")
        for frames, seed in ((2, 0), (1, 1), (4, 2), (2, 3)):
            images = _images(frames, seed)
            reference = _onnxruntime(onnx_path, images.numpy())
            _assert_matches(engine.infer(images), reference)  # [1, S, 3, H, W] on the CPU
            _assert_matches(engine.infer(images[0].cuda()), reference)  # [S, 3, H, W] on the GPU


@pytest.mark.gpu
@requires_gpu
def test_gpu_buffers_are_reused_and_copies_are_not(gpu_build: tuple[Path, Path, str]) -> None:
    onnx_path, engine_path, _ = gpu_build
    first, second = _images(3, 10), _images(3, 11)
    with QVGGTEngine(engine_path) as engine:
        kept = engine.infer(first)
        raw_a = engine.infer(first, copy=False)
        raw_b = engine.infer(second, copy=False)
        assert raw_a["depth"].data_ptr() == raw_b["depth"].data_ptr()  # fixed addresses for one S
        assert kept["depth"].data_ptr() != raw_a["depth"].data_ptr()
        _assert_matches(kept, _onnxruntime(onnx_path, first.numpy()))  # not overwritten by later calls
        _assert_matches(raw_a, _onnxruntime(onnx_path, second.numpy()))  # the shared buffer holds the last call


@pytest.mark.gpu
@requires_gpu
def test_gpu_cuda_graphs(gpu_build: tuple[Path, Path, str]) -> None:
    onnx_path, engine_path, _ = gpu_build
    with QVGGTEngine(engine_path, cuda_graph=True) as engine:
        for frames, seed in ((2, 20), (2, 21), (3, 22), (2, 23), (3, 24), (3, 25)):
            images = _images(frames, seed)
            _assert_matches(engine.infer(images), _onnxruntime(onnx_path, images.numpy()))


@pytest.mark.gpu
@requires_gpu
def test_gpu_shape_errors_and_close(gpu_build: tuple[Path, Path, str]) -> None:
    _, engine_path, _ = gpu_build
    engine = QVGGTEngine(engine_path, device="cuda:0")
    with pytest.raises(QVGGTError, match="accepts 1 to 4 frames"):
        engine.infer(_images(5, 0))
    with pytest.raises(QVGGTError, match="built for 14x14"):
        engine.infer(torch.rand(2, 3, SIZE, SIZE + 2))
    with pytest.raises(QVGGTError, match="floating point"):
        engine.infer((_images(2, 0) * 255).to(torch.uint8))
    engine.close()
    with pytest.raises(QVGGTError, match="is closed"):
        engine.infer(_images(2, 0))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.skipif(not HAS_RTX, reason=RTX_REASON)
def test_gpu_refuses_an_engine_for_another_architecture(tmp_path: Path) -> None:
    current = _current_sm()
    other = next(name for name in load_backend("rtx").compute_capability_names() if name not in ("CURRENT", current))
    profile = EngineProfile(name="other-gpu", backend="rtx", compute_capabilities=(other,), frames=FrameRange(1, 1, 2))
    result = build_engine(tiny_vggt_onnx(tmp_path / "tiny.onnx"), tmp_path / "other.engine", profile)
    with pytest.raises(QVGGTError, match=f"compiled for {other} but this GPU .* is {current}"):
        QVGGTEngine(result.engine_path)


@pytest.mark.gpu
@requires_gpu
def test_gpu_hadamard_plugin_engine(gpu_build: tuple[Path, Path, str], tmp_path: Path) -> None:
    """An engine with the plugin-form Hadamard op runs (the runtime registers the plugin) and matches ONNX
    Runtime on the function form of the same op."""
    from qvggt_export.export.hadamard_onnx import add_to_model, emit_hadamard
    from qvggt_export.plugins import register

    _, _, backend = gpu_build
    d = 16  # images [1, S, 3, 14, 16]: the transform runs over W
    shape = [1, "S", 3, SIZE, d]
    rng = np.random.default_rng(0)
    pre = numpy_helper.from_array((rng.integers(0, 2, d) * 2 - 1).astype(np.float32), "pre")
    post = numpy_helper.from_array(rng.uniform(0.5, 2.0, d).astype(np.float32), "post")
    paths = {}
    for variant in ("plugin", "function"):
        graph = helper.make_graph([], "hadamard", [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("depth", TensorProto.FLOAT, shape)],
                                  initializer=[pre, post])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        add_to_model(model, emit_hadamard("images", "depth", d, "pre", "post", prefix="h/", variant=variant))
        paths[variant] = tmp_path / f"{variant}.onnx"
        onnx.save(model, str(paths[variant]))
    register(backend)
    profile = EngineProfile(name="plugin-test", backend=backend, compute_capabilities=("CURRENT",),
                            frames=FrameRange(1, 2, 4))
    result = build_engine(paths["plugin"], tmp_path / "plugin.engine", profile)
    assert result.plugin_ops == ("qvggt::Hadamard",)
    images = torch.rand(1, 3, 3, SIZE, d, generator=torch.Generator().manual_seed(5))
    with QVGGTEngine(result.engine_path) as engine:
        _assert_matches(engine.infer(images), _onnxruntime(paths["function"], images.numpy()))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.skipif(not HAS_TRT or importlib.util.find_spec("polygraphy") is None,
                    reason="needs full TensorRT and Polygraphy: pip install 'qvggt-export[trt]'")
def test_gpu_polygraphy_runner(gpu_build: tuple[Path, Path, str], tmp_path: Path) -> None:
    onnx_path, engine_path, backend = gpu_build
    if backend != "trt":
        with pytest.raises(QVGGTError, match="Polygraphy runs full TensorRT engines only"):
            polygraphy_runner(engine_path)
        return
    images = _images(2, 30)
    with polygraphy_runner(engine_path) as runner:
        outputs = runner.infer({"images": images.numpy()})
    for name, expected in _onnxruntime(onnx_path, images.numpy()).items():
        got = outputs[name]
        got = got.cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
