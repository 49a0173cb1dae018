"""The command line end to end (tiny preset, generated data) and its error paths."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qvggt_export.cli import EXIT_ENGINE_FAILED, EXIT_OK, EXIT_PARITY_FAILED, EXIT_USAGE, main
from qvggt_export.model import build_vggt
from tests.conftest import require_shared_data

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def test_help_shows_examples():
    out = subprocess.run([sys.executable, "-m", "qvggt_export", "--help"], capture_output=True, text=True, check=True)
    assert "examples:" in out.stdout and "qvggt-export --bits w4a4 --out" in out.stdout


@pytest.mark.slow
def test_main_command_writes_complete_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--bits", "w4a4", "--out", str(out), "--no-progress"]) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["bits"] == "w4a4" and report["model"]["preset"] == "tiny"
    assert Path(report["onnx"]["path"]).is_file() and report["onnx"]["quantized_linears"] == 32
    assert report["parity"]["passed"] is True
    assert set(report["parity"]["outputs"]) == {"pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"}
    for entry in report["parity"]["outputs"].values():
        assert {"max_abs", "rel_l2", "tolerance", "passed"} <= set(entry)
    assert {"load_model", "calibration_data", "quantize", "export_onnx", "parity", "total"} <= set(report["timings_s"])
    assert json.loads((out / "config.json").read_text())["bits"] == "w4a4"
    if HAVE_RTX:
        engine = report["engine"]
        assert Path(engine["path"]).is_file() and engine["size_bytes"] > 0
        assert engine["target_sms"] == ["SM86", "SM89", "SM120"]
        # DSFQ's 32 online rotations run as the qvggt::Hadamard TensorRT plugin in the engine
        assert engine["hadamard"] == "plugin" and engine["hadamard_plugin_nodes"] == 32
        assert engine["plugin_ops"] == ["qvggt::Hadamard"] and b"Hadamard" in Path(engine["path"]).read_bytes()
    else:
        assert report["engine"]["path"] is None and "qvggt-export[rtx]" in report["engine"]["reason"]
    assert "parity pose_enc" in capsys.readouterr().out


def test_w8a8_dino_without_engine(tmp_path):
    out = tmp_path / "w8"
    assert main(["--bits", "w8a8", "--model", "tiny-dino", "--frames", "2", "--calib-size", "2", "--calib-pool", "4",
                 "--no-engine", "--out", str(out), "--no-progress"]) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["path"] is None and "disabled" in report["engine"]["reason"]
    assert report["quantization"]["layers"] == 16
    assert not (out / "model.engine").exists()


@pytest.mark.slow
def test_real_photos_as_calibration_data(tmp_path):
    data = require_shared_data()
    out = tmp_path / "real"
    assert main(["--bits", "w4a4", "--calib-data", str(data / "sequences" / "llff_fern"), "--calib-size", "2",
                 "--calib-pool", "4",
                 "--no-engine", "--out", str(out), "--no-progress"]) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["kind"] == "files" and report["calibration"]["selected"] == 2


def _assert_clean_failure(capsys, out: Path, argv: list[str], match: str) -> None:
    assert main([*argv, "--out", str(out), "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "a failed run must not leave an output folder"


def test_bad_inputs_fail_cleanly(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_clean_failure(capsys, out, ["--model", "huge"], "unknown model preset 'huge'")
    _assert_clean_failure(capsys, out, ["--checkpoint", str(tmp_path / "none.pt")], "checkpoint not found")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"not.a.vggt.key": torch.zeros(2)}, str(wrong))
    _assert_clean_failure(capsys, out, ["--checkpoint", str(wrong)], "missing keys")
    _assert_clean_failure(capsys, out, ["--calib-data", str(tmp_path / "no_such_dir")], "not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.jpg").write_bytes(b"not an image")
    _assert_clean_failure(capsys, out, ["--calib-data", str(broken)], "cannot read image")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_failure(capsys, out, ["--calib-data", str(empty)], "no images")


def test_unsupported_bits_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--bits", "w3a3", "--out", str(tmp_path / "x")])
    assert exc.value.code == EXIT_USAGE
    assert "invalid choice: 'w3a3'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_parity_failure_gives_exit_code_1(tmp_path, monkeypatch):
    import qvggt_export.parity as parity
    from qvggt_export.parity.compare import OutputParity, ParityReport

    def failing(*args, **kwargs):
        return ParityReport("fake", [[1]], [OutputParity("depth", 1.0, 1.0, 1.0, None, 1e-5, "test", False)])

    monkeypatch.setattr(parity, "check_parity", failing)
    out = tmp_path / "p"
    assert main(["--bits", "w4a4", "--no-engine", "--out", str(out), "--no-progress"]) == EXIT_PARITY_FAILED
    assert json.loads((out / "report.json").read_text())["parity"]["passed"] is False


@pytest.mark.slow
def test_failed_track_engine_gives_exit_code_3(tmp_path, monkeypatch, capsys):
    """A track engine that fails to build is an engine failure even when the main engine built."""
    import qvggt_export.pipeline as pipeline

    def engine_stage(*args, track=False, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if track:
            return {"path": None, "reason": "build failed: test", "failed": True}
        return {"path": str(tmp_path / "model.engine"), "size_bytes": 1}

    monkeypatch.setattr(pipeline, "_engine_stage", engine_stage)
    out = tmp_path / "t"
    assert main(["--bits", "w8a8", "--export-track", "--out", str(out), "--no-progress"]) == EXIT_ENGINE_FAILED
    assert "track engine: none (build failed: test)" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["track"]["engine"]["failed"] is True


def test_print_config_runs_nothing(tmp_path, capsys):
    assert main(["--bits", "w8a8", "--out", str(tmp_path / "c"), "--nfds-batch", "3", "--print-config"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["bits"] == "w8a8" and printed["nfds_batch"] == 3
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as exc:
        main(["--nfds-batch", "0", "--out", str(tmp_path / "c")])
    assert exc.value.code == EXIT_USAGE and not (tmp_path / "c").exists()


def test_checkpoint_option_loads_weights(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file(build_vggt("tiny", seed=7).state_dict(), str(weights))
    out = tmp_path / "ck"
    assert main(["--bits", "w8a8", "--checkpoint", str(weights), "--no-engine", "--out", str(out),
                 "--no-progress", "--calib-size", "1", "--calib-pool", "2"]) == EXIT_OK
    assert json.loads((out / "report.json").read_text())["model"]["checkpoint"] == str(weights)


def test_failure_after_outputs_started_removes_them(tmp_path, monkeypatch, capsys):
    """A failure mid-run (here: calibration hitting a NaN activation) leaves no partial output folder."""
    import qvggt_export.quant.calibrate as calibrate_module
    from qvggt_export.errors import QVGGTError

    def nan_failure(*args, **kwargs):
        raise QVGGTError("non-finite activation (NaN/Inf) entering aggregator.frame_blocks.0.attn.qkv")

    monkeypatch.setattr(calibrate_module, "calibrate", nan_failure)
    out = tmp_path / "nan"
    _assert_clean_failure(capsys, out, ["--bits", "w4a4", "--no-engine"], "non-finite activation")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert main(["--bits", "w4a4", "--no-engine", "--out", str(existing), "--no-progress"]) == EXIT_USAGE
    assert [p.name for p in existing.iterdir()] == ["notes.txt"], "a folder of the user's is never replaced"
