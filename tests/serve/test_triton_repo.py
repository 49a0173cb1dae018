"""``qvggt-export serve-repo``: Triton model repositories, each config.pbtxt parsed with Triton's protobuf schema.

One pipeline run of ``tiny`` W8A8 builds a real TensorRT-RTX engine with the Hadamard plugin (the default on
TensorRT-RTX); its plugin-free twin is built from the same graph with ``build_engine``. A full-TensorRT engine
needs a GPU to build, so the ``tensorrt_plan`` path runs on a stand-in: the plugin-free engine's bytes with a
profile that says ``trt`` (the repository writer only reads the flavour and the plugin markers). Loading the
repositories in Triton is not run here (no Triton server, no GPU).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qvggt_export.cli import main
from qvggt_export.errors import QVGGTError
from qvggt_export.serve.triton_repo import TritonRepoConfig, write_model_repository

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="Triton's model-config schema comes with tritonclient[grpc] "
    "(pip install 'qvggt-export[dev]')")
text_format = pytest.importorskip("google.protobuf.text_format")
pytest.importorskip("tensorrt_rtx", reason="building the engines needs TensorRT-RTX (pip install 'qvggt-export[rtx]')")

pytestmark = pytest.mark.slow  # one export and two engine builds: ~60 s on 2 shared cores

OUTPUTS = ["pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``plugin``: the pipeline's export and engine; ``function``: the same export with a plugin-free engine;
    ``trt_stand_in``: that engine labelled full TensorRT; ``no_engine``: the export without an engine."""
    from qvggt_export.engine import build_engine
    from qvggt_export.pipeline import PipelineConfig, run_pipeline

    root = tmp_path_factory.mktemp("repo")
    plugin = root / "plugin"
    report = run_pipeline(PipelineConfig(out_dir=plugin, bits="w8a8", progress=False, calib_size=2, calib_pool=4,
                                         frames=2))
    assert report["engine"]["hadamard"] == "plugin"
    folders = {"plugin": plugin}
    for name in ("function", "trt_stand_in", "no_engine"):
        folders[name] = root / name
        folders[name].mkdir()
        shutil.copy2(plugin / "model.onnx", folders[name] / "model.onnx")
    build_engine(plugin / "model.onnx", folders["function"] / "model.engine", "rtx-default", format_name="w8a8")
    shutil.copy2(folders["function"] / "model.engine", folders["trt_stand_in"] / "model.engine")
    profile = json.loads((folders["function"] / "model.engine.profile.json").read_text())
    (folders["trt_stand_in"] / "model.engine.profile.json").write_text(json.dumps({**profile, "backend": "trt"}))
    folders["report"] = plugin / "report.json"
    return folders


def _parse(path: Path) -> object:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)  # raises on any field or value Triton's schema does not have
    return config


def _check_io(config: object, frames_max: str) -> None:
    assert config.max_batch_size == 0
    (image,) = config.input
    assert (image.name, list(image.dims), image.data_type) == ("images", [1, -1, 3, 70, 70],
                                                               model_config_pb2.TYPE_FP32)
    assert [o.name for o in config.output] == OUTPUTS
    assert all(o.data_type == model_config_pb2.TYPE_FP32 and -1 in o.dims for o in config.output[1:])
    assert config.parameters["frames_max"].string_value == frames_max


def test_report_records_loadable_runtimes(exports: dict[str, Path]) -> None:
    engine = json.loads(exports["report"].read_text())["engine"]
    assert engine["loadable_by"] == ["python", "triton-python", "serve"]  # the plugin: Python runtimes only


def test_engine_kinds_of_real_engines(exports: dict[str, Path]) -> None:
    from qvggt_export.engine.runtimes import EngineKind, engine_kind

    assert engine_kind(exports["plugin"] / "model.engine") == EngineKind("rtx", True)
    assert engine_kind(exports["function"] / "model.engine") == EngineKind("rtx", False)


def test_plugin_engine_gets_a_python_backend_model(exports: dict[str, Path], tmp_path: Path) -> None:
    summary = write_model_repository(TritonRepoConfig(exports["plugin"], tmp_path, gpu_instances=2))
    assert [(m["name"], m["kind"]) for m in summary["models"]] == [("vggt_onnx", "onnxruntime"),
                                                                   ("vggt_trt", "python")]
    onnx_config = _parse(tmp_path / "vggt_onnx" / "config.pbtxt")
    assert onnx_config.platform == "onnxruntime_onnx"
    assert onnx_config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    _check_io(onnx_config, "32")
    assert (tmp_path / "vggt_onnx" / "1" / "model.onnx").is_file()

    config = _parse(tmp_path / "vggt_trt" / "config.pbtxt")
    assert config.backend == "python" and not config.platform
    assert (config.instance_group[0].kind, config.instance_group[0].count) == (
        model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)
    _check_io(config, "32")  # rtx-default's frame range
    assert config.parameters["hadamard_plugin"].string_value == "true"
    assert config.parameters["engine_backend"].string_value == "rtx"
    version = tmp_path / "vggt_trt" / "1"
    assert {p.name for p in version.iterdir()} == {"model.py", "model.engine", "model.engine.profile.json",
                                                   "model.engine.build.log"}
    assert (version / "model.engine").read_bytes() == (exports["plugin"] / "model.engine").read_bytes()


def test_python_model_wiring_with_stand_ins(exports: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """model.py against stand-ins for Triton's pb_utils and for QVGGTEngine (which needs a GPU): it registers
    the plugin, opens the engine it was given, maps each request's images to the configured outputs, and turns
    a QVGGTError into an error response. Not Triton, not an engine run."""
    import torch

    import qvggt_export.engine.runtime as runtime
    import qvggt_export.plugins as plugins

    write_model_repository(TritonRepoConfig(exports["plugin"], tmp_path))
    calls: dict[str, object] = {}

    class FakeEngine:
        def __init__(self, path: Path, device: str, backend: str) -> None:
            calls["engine"] = (Path(path), device, backend)

        def infer(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            if images.shape[1] > 3:
                raise QVGGTError("got 4 frames; the engine's optimization profile accepts 1 to 3 frames")
            return {name: images.sum() * (i + 1) * torch.ones(1, images.shape[1]) for i, name in enumerate(OUTPUTS)}

        def close(self) -> None:
            calls["closed"] = True

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list | None = None, error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    pb_utils = types.SimpleNamespace(Tensor=Tensor, InferenceResponse=InferenceResponse, TritonError=str,
                                     get_input_tensor_by_name=lambda request, name: request[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    monkeypatch.setattr(runtime, "QVGGTEngine", FakeEngine)
    monkeypatch.setattr(plugins, "register", lambda backend="auto": calls.setdefault("register", backend))
    spec = importlib.util.spec_from_file_location("triton_model", tmp_path / "vggt_trt" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    model = module.TritonPythonModel()
    config_json = json.dumps({"input": [{"name": "images"}], "output": [{"name": n} for n in OUTPUTS],
                              "parameters": {"engine_backend": {"string_value": "rtx"},
                                             "hadamard_plugin": {"string_value": "true"}}})
    model.initialize({"model_config": config_json, "model_repository": str(tmp_path / "vggt_trt"),
                      "model_version": "1", "model_instance_device_id": "1"})
    assert calls["register"] == "rtx"
    assert calls["engine"] == (tmp_path / "vggt_trt" / "1" / "model.engine", "cuda:1", "rtx")
    good = {"images": Tensor("images", np.full((1, 2, 3, 70, 70), 0.5, np.float32))}
    bad = {"images": Tensor("images", np.zeros((1, 4, 3, 70, 70), np.float32))}
    ok, refused = model.execute([good, bad])
    assert [t.name for t in ok.output_tensors] == OUTPUTS and ok.error is None
    assert float(ok.output_tensors[1].array[0, 0]) == pytest.approx(2 * 0.5 * 2 * 3 * 70 * 70)
    assert refused.output_tensors is None and "accepts 1 to 3 frames" in refused.error
    model.finalize()
    assert calls["closed"]


def test_plugin_free_full_tensorrt_engine_gets_tensorrt_plan(exports: dict[str, Path], tmp_path: Path) -> None:
    summary = write_model_repository(TritonRepoConfig(exports["trt_stand_in"], tmp_path, name="server"))
    assert [(m["name"], m["kind"]) for m in summary["models"]] == [("server_onnx", "onnxruntime"),
                                                                   ("server_trt", "tensorrt")]
    config = _parse(tmp_path / "server_trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    _check_io(config, "32")
    assert sorted(p.name for p in (tmp_path / "server_trt" / "1").iterdir()) == ["model.plan"]


def test_refusals_are_one_line_and_write_nothing(exports: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    for export, reason in ((exports["plugin"], "Python Hadamard plugin"),
                           (exports["function"], "loads only full TensorRT engines")):
        assert main(["serve-repo", str(export), str(repo), "--engine-model", "tensorrt"]) == 2
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1
        assert not (repo / "vggt_onnx").exists() and not (repo / "vggt_trt").exists()
    assert main(["serve-repo", str(exports["no_engine"]), str(repo)]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["vggt_onnx"]
    _parse(repo / "vggt_onnx" / "config.pbtxt")
    assert main(["serve-repo", str(exports["no_engine"]), str(repo)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_check_refuses_engine_runtime_pairing_before_running(exports: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    engine = exports["plugin"] / "model.engine"
    assert main(["check", str(exports["plugin"]), "--engine", str(engine), "--runtime", "trtexec"]) == 2
    err = capsys.readouterr().err
    assert "Python Hadamard plugin" in err and "--engine-hadamard function" in err and err.count("\n") == 1
    assert not (exports["plugin"] / "check.json").exists()
    assert main(["check", str(exports["plugin"]), "--runtime", "python"]) == 2
    assert "--engine" in capsys.readouterr().err
