"""``qvggt-export check``: an export folder re-checked against its PyTorch model, a corrupted scale localised
to its layer, fp16 graphs, and bad input (exit 2, one line, no report written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from qvggt_export.cli import EXIT_OK, EXIT_PARITY_FAILED, EXIT_USAGE, main
from qvggt_export.export import export_onnx
from qvggt_export.model import build_vggt

CORRUPTED = "aggregator.frame_blocks.1.mlp.fc2"


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory) -> Path:
    """One small default-method (DSFQ) W4A4 run of the main command, without an engine."""
    out = tmp_path_factory.mktemp("check") / "w4a4"
    assert main(["--bits", "w4a4", "--frames", "2", "--calib-size", "2", "--calib-pool", "4", "--no-engine",
                 "--out", str(out), "--no-progress"]) == EXIT_OK
    return out


def test_check_passes_on_a_fresh_export(w4a4_run, capsys):
    assert main(["check", str(w4a4_run)]) == EXIT_OK
    report = json.loads((w4a4_run / "check.json").read_text())
    assert report["passed"] is True and report["bits"] == "w4a4" and report["first_failing_layer"] is None
    assert [x["shape"] for x in report["inputs"]] == [[1, 2, 3, 70, 70], [1, 1, 3, 70, 70]]
    outputs = report["runtimes"]["onnxruntime"]["outputs"]
    assert set(outputs) == {"pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"}
    for entry in outputs.values():
        assert {"max_abs", "max_rel", "rel_l2", "cosine", "tolerance", "criterion", "noise_rel_l2"} <= set(entry)
        assert entry["passed"] and entry["rel_l2"] <= entry["tolerance"] and entry["cosine"] > 0.9999
        assert entry["noise_rel_l2"] > 0  # W4A4 fake-quant differs from float: the tolerance scales with it
    assert set(outputs["pose_enc"]["pose"]) == {"rotation_deg_max", "translation_deg_max", "fov_deg_max"}
    assert outputs["pose_enc"]["pose"]["rotation_deg_max"] < 0.01
    layers = report["layers"]
    assert layers["checked"] and len(layers["layers"]) == 32 and all(x["passed"] for x in layers["layers"])
    assert "onnxruntime" in capsys.readouterr().out


def test_corrupted_scale_is_localised_to_its_layer(w4a4_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(w4a4_run, broken)
    path = broken / "model.onnx"
    proto = onnx.load(str(path))
    target = next(i for i in proto.graph.initializer if i.name == f"{CORRUPTED}/weight_step")
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.5, target.name))
    onnx.save(proto, str(path))
    (broken / "run.json").unlink()  # a hand-edited folder: checked as it is (with a manifest, refused as mixed)
    assert main(["check", str(broken), "--frames", "2", "--report", str(tmp_path / "broken.json")]) == \
        EXIT_PARITY_FAILED
    assert CORRUPTED in capsys.readouterr().err
    report = json.loads((tmp_path / "broken.json").read_text())
    assert report["passed"] is False and report["first_failing_layer"] == CORRUPTED
    layers = report["layers"]["layers"]
    first = next(i for i, layer in enumerate(layers) if not layer["passed"])
    assert layers[first]["name"] == CORRUPTED and first > 0
    assert layers[first]["output_rel"] > 0.1  # a wrong scale is an O(1) error, not a rounding tie


def test_image_folder_inputs(w4a4_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "scene"
    folder.mkdir()
    generator = torch.Generator().manual_seed(5)
    for i in range(3):
        pixels = (torch.rand(70, 70, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    report_path = tmp_path / "images.json"
    assert main(["check", str(w4a4_run), "--images", str(folder), "--localize", "never",
                 "--report", str(report_path)]) == EXIT_OK
    report = json.loads(report_path.read_text())
    assert report["inputs"] == [{"shape": [1, 3, 3, 70, 70], "source": f"{folder} (3 frames, crop)"}]
    assert report["layers"] == {"checked": False, "reason": "localize=never"}
    (folder / "03.png").write_bytes(b"not a png")
    assert main(["check", str(w4a4_run), "--images", str(folder), "--report", str(report_path)]) == EXIT_USAGE


def test_fp16_graph_checked_from_explicit_paths(tmp_path):
    path = tmp_path / "fp16.onnx"
    export_onnx(build_vggt("tiny"), path, torch.rand(1, 2, 3, 70, 70), precision="fp16")
    assert main(["check", "--onnx", str(path), "--bits", "fp16", "--model", "tiny", "--frames", "2"]) == EXIT_OK
    report = json.loads((tmp_path / "fp16.check.json").read_text())
    assert report["passed"] and report["layers"]["checked"] is False
    assert all(o["criterion"].startswith("rel_l2 <= max(") for o in report["runtimes"]["onnxruntime"]["outputs"]
               .values())
    assert "MatMul" in report["onnxruntime_fp32_fallback_ops"]
    # the same graph is not a float32 export: named for what it is
    assert main(["check", "--onnx", str(path), "--bits", "fp32", "--model", "tiny"]) == EXIT_USAGE


def _assert_usage_error(capsys, argv: list[str], match: str, no_report: Path | None = None) -> None:
    assert main(["check", *argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if no_report is not None:
        assert not no_report.exists()


def test_bad_input_is_exit_2_with_one_line(w4a4_run, tmp_path, capsys):
    _assert_usage_error(capsys, [str(tmp_path / "missing")], "export folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_usage_error(capsys, [str(empty)], "not a qvggt-export output folder", empty / "check.json")
    _assert_usage_error(capsys, [], "give an export folder or an ONNX file")
    onnx_path = str(w4a4_run / "model.onnx")
    report = tmp_path / "r.json"
    # a quantized format checked against an unquantized (float) model
    _assert_usage_error(capsys, ["--onnx", onnx_path, "--bits", "w4a4", "--model", "tiny", "--report", str(report)],
                        "needs the fake-quant PyTorch model", report)
    # the saved model is W4A4, the claimed format is not
    _assert_usage_error(capsys, ["--onnx", onnx_path, "--bits", "w8a8", "--model", "tiny", "--quantized",
                                 str(w4a4_run / "quantized_model.json"), "--report", str(report)],
                        "does not match the saved model", report)
    _assert_usage_error(capsys, ["--onnx", onnx_path, "--bits", "fp32", "--model", "tiny", "--report", str(report)],
                        "which is a quantized export", report)
    _assert_usage_error(capsys, [str(w4a4_run), "--bits", "w3a3"], "w3a3")
    _assert_usage_error(capsys, [str(w4a4_run), "--images", str(tmp_path / "nope")], "image folder not found")
    assert not (tmp_path / "r.json").exists()
