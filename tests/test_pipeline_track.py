"""Pipeline: the optional tracking graph (`--export-track`) is exported and checked in ONNX Runtime; a model
without a tracking head is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from qvggt_export.errors import QVGGTError
from qvggt_export.pipeline import PipelineConfig, run_pipeline

SMALL = {"frames": 2, "calib_pool": 3, "calib_size": 2, "nfds_k": 2, "progress": False, "engine": False}


def test_track_graph_is_exported_and_checked(tmp_path: Path) -> None:
    report = run_pipeline(PipelineConfig(out_dir=tmp_path / "out", bits="w8a8", export_track=True, **SMALL))
    track = report["track"]
    assert track["parity"]["passed"] is True and set(track["parity"]["outputs"]) >= {"track", "vis"}
    graph = onnx.load(track["path"])
    assert [i.name for i in graph.graph.input] == ["images", "query_points"]
    assert [o.name for o in graph.graph.output][:2] == ["track", "vis"]
    assert "export_track" in report["timings_s"]


def test_model_without_track_head_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(QVGGTError, match="has no tracking head"):
        run_pipeline(PipelineConfig(out_dir=out, model="tiny-dino", export_track=True, **SMALL))
    assert not out.exists()
