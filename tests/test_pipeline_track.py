"""Pipeline: the optional tracking graph (`--export-track`) is exported and checked in ONNX Runtime, and built
into ``track.engine`` beside ``model.engine`` (same profile, lowering and Hadamard form); a model without a
tracking head is refused before anything is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qvggt_export.engine import load_profile
from qvggt_export.engine.stage import _lowered_track_graph
from qvggt_export.errors import QVGGTError
from qvggt_export.pipeline import PipelineConfig, engine_target, run_pipeline

SMALL = {"frames": 2, "calib_pool": 3, "calib_size": 2, "nfds_k": 2, "progress": False, "engine": False}
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def test_track_graph_is_exported_and_checked(tmp_path: Path) -> None:
    report = run_pipeline(PipelineConfig(out_dir=tmp_path / "out", bits="w8a8", export_track=True, **SMALL))
    track = report["track"]
    assert track["parity"]["passed"] is True and set(track["parity"]["outputs"]) >= {"track", "vis"}
    graph = onnx.load(track["path"])
    assert [i.name for i in graph.graph.input] == ["images", "query_points"]
    assert [o.name for o in graph.graph.output][:2] == ["track", "vis"]
    assert "export_track" in report["timings_s"]
    assert track["engine"] == {"path": None, "reason": "engine build disabled (--no-engine)"}
    assert not (tmp_path / "out" / "track.engine").exists()


def test_model_without_track_head_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(QVGGTError, match="has no tracking head"):
        run_pipeline(PipelineConfig(out_dir=out, model="tiny-dino", export_track=True, **SMALL))
    assert not out.exists()


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """W4A4 DSFQ (plugin Hadamard, W4A16 lowering by default) with both engines, from a profile file for SM89
    only, with small ranges and builder level 0 (keeps the two TensorRT-RTX builds near 20 s together)."""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX to build engines: pip install 'qvggt-export[rtx]'")
    folder = tmp_path_factory.mktemp("track_engine")
    profile = folder / "sm89-small.json"
    profile.write_text(json.dumps({"name": "sm89-small", "backend": "rtx", "compute_capabilities": ["SM89"],
                                   "frames": {"min": 1, "opt": 2, "max": 4}, "points": {"min": 1, "opt": 16, "max": 64},
                                   "builder_optimization_level": 0}))
    config = {**SMALL, "engine": True}
    report = run_pipeline(PipelineConfig(out_dir=folder / "out", bits="w4a4", export_track=True,
                                         engine_profile=str(profile), **config))
    return folder / "out", report


@pytest.mark.slow
@pytest.mark.rtx
def test_track_engine_is_built_beside_the_main_engine(w4a4_run: tuple[Path, dict]) -> None:
    out, report = w4a4_run
    main, track = report["engine"], report["track"]["engine"]
    assert main["path"] == str(out / "model.engine") and track["path"] == str(out / "track.engine")
    assert track["size_bytes"] == (out / "track.engine").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["track"]["engine"]["path"] == track["path"]
    # Same profile, targets, lowering and Hadamard form as the main engine.
    assert track["profile_name"] == main["profile_name"] and main["profile_name"].endswith("sm89-small.json")
    assert track["target_sms"] == main["target_sms"] == ["SM89"]
    assert track["lowering"]["target"] == main["lowering"]["target"] == "w4a16"
    assert track["hadamard"] == main["hadamard"] == "plugin" and track["plugin_ops"] == ["qvggt::Hadamard"]
    assert track["hadamard_plugin_nodes"] == main["hadamard_plugin_nodes"] > 0
    assert track["onnx"] == str(out / "track.plugin.onnx")
    assert track["input_shapes"] == {"images": [1, -1, 3, 70, 70], "query_points": [1, -1, 2]}
    # The resolved profiles: both ranges for the track engine; no points axis in the main engine.
    track_profile = json.loads((out / "track.engine.profile.json").read_text())
    assert track_profile["frames"] == {"min": 1, "opt": 2, "max": 4}
    assert track_profile["points"] == {"min": 1, "opt": 16, "max": 64}
    assert load_profile(out / "track.engine.profile.json").to_dict() == track["profile"]
    assert json.loads((out / "model.engine.profile.json").read_text())["points"] is None
    assert "# result: built" in (out / "track.engine.build.log").read_text()
    assert {"lower_track_for_engine", "build_track_engine"} <= set(report["timings_s"])
    # The lowering's accuracy in ONNX Runtime (lowered vs exported track graph) is reported.
    assert set(track["lowering"]["accuracy"]["lowered_vs_canonical"]) == {"track", "vis", "conf"}


@pytest.mark.slow
@pytest.mark.rtx
def test_static_track_lowering_matches_the_canonical_scales(w4a4_run: tuple[Path, dict], tmp_path: Path) -> None:
    """The track graph is lowered with its query points held fixed; the static scales must be exactly those of
    the canonical graph on the same images (the quantized layers never see the points), and the lowered graph
    must take any point count again."""
    from qvggt_export.engine.lowering import lower_for_target

    out, _ = w4a4_run
    config = PipelineConfig(out_dir=tmp_path, bits="w4a4", engine_lowering="w4a8", **SMALL)
    batches = [torch.rand(1, 2, 3, 70, 70, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    path, info = _lowered_track_graph(engine_target(config), out / "track.onnx", "w4a8", batches,
                                      tmp_path / "track.lowered.onnx")
    canonical, _ = lower_for_target(onnx.load(str(out / "model.onnx")), "w4a8", calibration_inputs=batches,
                                    measure=False)
    lowered = onnx.load(str(path))

    def scales(model: onnx.ModelProto) -> dict[str, float]:
        return {i.name: float(numpy_helper.to_array(i)) for i in model.graph.initializer
                if i.name.endswith("/act_static_scale")}

    assert info["static_scales"]["count"] == 32 and scales(lowered) == scales(canonical)  # bit for bit
    assert len(scales(lowered)) == 32
    assert [i.name for i in lowered.graph.input] == ["images", "query_points"]
    assert "query_points" not in {init.name for init in lowered.graph.initializer}
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for points in (3, 21):
        track, *_ = session.run(None, {"images": batches[0].numpy(),
                                       "query_points": np.random.default_rng(points).uniform(0, 69, (1, points, 2))
                                       .astype(np.float32)})
        assert track.shape == (1, 2, points, 2) and np.isfinite(track).all()
