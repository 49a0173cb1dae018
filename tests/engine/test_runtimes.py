"""Which runtimes can load which engine (qvggt_export.engine.runtimes): the table, the refusals, the defaults.

Real engines (a TensorRT-RTX plugin engine and its plugin-free twin) are classified in
tests/serve/test_triton_repo.py, which builds them; here the classification logic runs on small stand-in files
that carry the same markers (a TensorRT-RTX header, the plugin's NUL-terminated creator name and namespace).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvggt_export.engine.runtimes import (
    RUNTIMES,
    EngineKind,
    build_flavour,
    check_runtime,
    default_engine_hadamard,
    engine_kind,
    loadable_by,
)
from qvggt_export.errors import QVGGTError


def test_loadable_by_follows_flavour_and_plugin() -> None:
    assert loadable_by("trt", plugin=False) == ["python", "triton-python", "serve", "triton-tensorrt", "trtexec",
                                                "cpp"]
    assert loadable_by("trt", plugin=True) == ["python", "triton-python", "serve"]
    assert loadable_by("rtx", plugin=False) == ["python", "triton-python", "serve", "rtx-cpp"]
    assert loadable_by("rtx", plugin=True) == ["python", "triton-python", "serve"]
    with pytest.raises(QVGGTError, match="flavour"):
        loadable_by("onnx", plugin=False)


@pytest.mark.parametrize(("kind", "runtime", "reason"), [
    (EngineKind("trt", True), "trtexec", "Python Hadamard plugin"),
    (EngineKind("trt", True), "triton-tensorrt", "--engine-hadamard function"),
    (EngineKind("rtx", False), "triton-tensorrt", "loads only full TensorRT engines"),
    (EngineKind("rtx", True), "trtexec", "full TensorRT engines and it cannot load the Python Hadamard plugin; "
                                        "rebuild with --backend trt --engine-hadamard function"),
    (EngineKind("trt", False), "rtx-cpp", "loads only TensorRT-RTX engines"),
    (EngineKind("trt", False), "onnxruntime", "unknown runtime"),
])
def test_check_runtime_refuses_with_one_line(kind: EngineKind, runtime: str, reason: str) -> None:
    with pytest.raises(QVGGTError, match=reason) as info:
        check_runtime(kind, runtime, "x.engine")
    assert "\n" not in str(info.value)


def test_check_runtime_accepts_every_listed_pairing() -> None:
    for flavour in ("trt", "rtx"):
        for plugin in (False, True):
            for runtime in RUNTIMES:
                if runtime in loadable_by(flavour, plugin):
                    check_runtime(EngineKind(flavour, plugin), runtime)
                else:
                    with pytest.raises(QVGGTError):
                        check_runtime(EngineKind(flavour, plugin), runtime)


def test_default_hadamard_per_flavour(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_engine_hadamard("trt") == "function"
    assert default_engine_hadamard("rtx") == "plugin"
    assert build_flavour("trt", "rtx") == "trt"
    assert build_flavour("auto", "trt") == "trt"


def test_pipeline_default_hadamard_per_profile() -> None:
    from qvggt_export.pipeline import PipelineConfig

    server = PipelineConfig(out_dir="unused", bits="w8a8", backend="trt", engine_profile="trt-server")
    assert server.resolved_engine_hadamard() == "function"
    edge = PipelineConfig(out_dir="unused", bits="w8a8", engine_profile="rtx-sm89")
    assert edge.resolved_engine_hadamard() == "plugin"
    forced = PipelineConfig(out_dir="unused", bits="w8a8", backend="trt", engine_profile="trt-server",
                            engine_hadamard="plugin")
    assert forced.resolved_engine_hadamard() == "plugin"


def _stand_in(folder: Path, name: str, body: bytes, backend: str | None) -> Path:
    path = folder / name
    path.write_bytes(body)
    if backend is not None:
        (folder / f"{name}.profile.json").write_text(json.dumps({"backend": backend}))
    return path


def test_engine_kind_reads_profile_header_and_plugin_markers(tmp_path: Path) -> None:
    plugin_layer = b"\x00Hadamard\x00\x01qvggt\x001\x00"
    function_layer = b"[ONNX Layer: Hadamard_64/pre_scale | blocks.0.attn.qkv/input_hadamard (Hadamard_64)]"
    assert engine_kind(_stand_in(tmp_path, "a.engine", b"vtrt" + b"\x00" * 60 + plugin_layer, None)) == \
        EngineKind("rtx", True)
    assert engine_kind(_stand_in(tmp_path, "b.engine", b"vtrt" + b"\x00" * 60 + function_layer, None)) == \
        EngineKind("rtx", False)
    assert engine_kind(_stand_in(tmp_path, "c.engine", b"ftrt" + function_layer, "trt")) == EngineKind("trt", False)
    with pytest.raises(QVGGTError, match="profile.json"):
        engine_kind(_stand_in(tmp_path, "d.engine", b"ftrt" + function_layer, None))
    with pytest.raises(QVGGTError, match="does not exist or is empty"):
        engine_kind(_stand_in(tmp_path, "e.engine", b"", None))
