"""Transactional run folders through the CLI (issue 16): a refused, failed or interrupted rerun leaves the finished
folder byte-identical; a successful rerun replaces it whole (no stale engine after --no-engine); `check` refuses a
folder whose files do not belong to one run; input that needs no model is refused before the model is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qvggt_export.cli import EXIT_OK, EXIT_USAGE, main
from qvggt_export.rundir import MANIFEST, verify_run_folder

SMALL = ["--bits", "w4a4", "--frames", "2", "--calib-size", "2", "--calib-pool", "4", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished small W4A4 run (no engine)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*SMALL, "--no-engine", "--out", str(out)]) == EXIT_OK
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    assert _snapshot(out) == before, "the previous run changed"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "a staging folder was left beside --out"


def _one_line_error(capsys: pytest.CaptureFixture, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err, err
    return err


def test_finished_folder_has_a_manifest_and_run_ids(finished: Path) -> None:
    manifest = json.loads((finished / MANIFEST).read_text())
    assert {"model.onnx", "quantized_model.safetensors", "report.json", "config.json"} <= set(manifest["files"])
    for name in ("report.json", "config.json"):
        assert json.loads((finished / name).read_text())["run_id"] == manifest["run_id"]
    report = json.loads((finished / "report.json").read_text())
    assert report["onnx"]["path"] == str(finished / "model.onnx"), "paths name --out, not the staging folder"
    assert verify_run_folder(finished) == manifest["run_id"]


def test_refused_reruns_leave_the_previous_run_byte_identical(finished, tmp_path, capsys) -> None:
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    # The README: an explicit profile that targets SM86 is refused for fp8 (the default would pick rtx-sm89-sm120).
    assert main([*SMALL, "--bits", "fp8", "--engine-profile", "rtx-default", "--out", str(out)]) == EXIT_USAGE
    _one_line_error(capsys, "'rtx-default' targets SM86, which cannot run fp8")
    assert main([*SMALL, "--calib-data", str(tmp_path / "missing"), "--out", str(out)]) == EXIT_USAGE
    _one_line_error(capsys, "calibration data not found")
    _assert_untouched(out, before)


def test_fp8_default_profile_is_still_chosen_when_none_is_given(tmp_path, capsys) -> None:
    assert main(["--bits", "fp8", "--out", str(tmp_path / "x"), "--print-config"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["engine_profile"] is None  # None = the format's default
    from qvggt_export.pipeline import PipelineConfig

    assert PipelineConfig(out_dir=tmp_path / "x", bits="fp8").resolved_engine_profile() == "rtx-sm89-sm120"


def test_failed_rerun_leaves_the_previous_run_byte_identical(finished, tmp_path, monkeypatch, capsys) -> None:
    import qvggt_export.quant.calibrate as calibrate_module
    from qvggt_export.errors import QVGGTError

    def failing(*args, **kwargs):
        raise QVGGTError("non-finite activation (NaN/Inf) entering aggregator.frame_blocks.0.attn.qkv")

    monkeypatch.setattr(calibrate_module, "calibrate", failing)
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    assert main([*SMALL, "--seed", "1", "--no-engine", "--out", str(out)]) == EXIT_USAGE
    _one_line_error(capsys, "non-finite activation")
    _assert_untouched(out, before)


def test_interrupted_rerun_leaves_the_previous_run_byte_identical(finished, tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C after the new run has written files into its staging folder: exit 130, one line."""
    import qvggt_export.export as export_module

    def interrupted(model, onnx_path, *args, **kwargs):
        Path(onnx_path).write_bytes(b"half an export")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "export_onnx", interrupted)
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    assert main([*SMALL, "--seed", "1", "--no-engine", "--out", str(out)]) == 130
    assert _one_line_error(capsys, "interrupted") == "qvggt-export: interrupted"
    _assert_untouched(out, before)


def test_interrupt_during_start_up_is_exit_130_without_traceback(tmp_path, monkeypatch, capsys) -> None:
    import qvggt_export.cli as cli

    def interrupted_imports():
        raise KeyboardInterrupt  # e.g. Ctrl-C while torch is being imported

    monkeypatch.setattr(cli, "build_parser", interrupted_imports)
    assert main(["--out", str(tmp_path / "x")]) == 130
    assert _one_line_error(capsys, "interrupted") == "qvggt-export: interrupted"


@pytest.mark.slow
def test_no_engine_rerun_leaves_no_stale_engine(tmp_path, monkeypatch) -> None:
    """A first run with an engine (the build replaced by a stand-in: no GPU toolchain needed), then a --no-engine
    rerun: the folder holds exactly the second run, and `check`'s verification accepts it."""
    import qvggt_export.pipeline as pipeline

    def fake_engine(config, onnx_path, timer, reference_model, batches, track=False, rotates=None):
        path = config.out_dir / ("track.engine" if track else "model.engine")
        path.write_bytes(b"engine of the first run")
        return {"path": str(path), "size_bytes": path.stat().st_size}

    monkeypatch.setattr(pipeline, "_engine_stage", fake_engine)
    out = tmp_path / "out"
    assert main([*SMALL, "--out", str(out)]) == EXIT_OK
    first = json.loads((out / MANIFEST).read_text())
    assert "model.engine" in first["files"]
    assert json.loads((out / "report.json").read_text())["engine"]["path"] == str(out / "model.engine")
    monkeypatch.undo()
    assert main([*SMALL, "--no-engine", "--out", str(out)]) == EXIT_OK
    assert not (out / "model.engine").exists()
    second = json.loads((out / MANIFEST).read_text())
    assert second["run_id"] != first["run_id"] and "model.engine" not in second["files"]
    assert verify_run_folder(out) == second["run_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_refuses_a_folder_mixing_runs(finished, tmp_path, capsys) -> None:
    out = _copy(finished, tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "seed": 1, "run_id": "another"}, indent=2) + "\n")
    assert main(["check", str(out)]) == EXIT_USAGE
    _one_line_error(capsys, f"{out} mixes runs: config.json is not the file run")
    assert not (out / "check.json").exists()

    out = _copy(finished, tmp_path / "b")
    (out / "model.engine").write_bytes(b"an engine of an older run")
    assert main(["check", str(out)]) == EXIT_USAGE
    _one_line_error(capsys, "mixes runs: model.engine is not part of run")

    out = _copy(finished, tmp_path / "c")
    (out / "quantized_model.safetensors").unlink()
    assert main(["check", str(out)]) == EXIT_USAGE
    _one_line_error(capsys, "quantized_model.safetensors of run")


def test_output_folder_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys) -> None:
    import qvggt_export.model as model_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(model_module, "build_vggt", no_model)
    regular = tmp_path / "file"
    regular.write_text("x")
    assert main([*SMALL, "--no-engine", "--out", str(regular)]) == EXIT_USAGE
    _one_line_error(capsys, "is a regular file, not a folder")
    assert main([*SMALL, "--no-engine", "--out", str(regular / "sub")]) == EXIT_USAGE
    _one_line_error(capsys, "is a regular file, not a folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*SMALL, "--no-engine", "--out", str(mine)]) == EXIT_USAGE
    _one_line_error(capsys, "holds files that are not from a qvggt-export run (notes.txt)")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert main([*SMALL, "--no-engine", "--out", str(link)]) == EXIT_USAGE
    _one_line_error(capsys, "is a symbolic link; pass the folder it points to")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys) -> None:
    import qvggt_export.model as model_module

    monkeypatch.setattr(model_module, "build_vggt", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main([*SMALL, "--no-engine", "--out", str(locked / "run")]) == EXIT_USAGE
        _one_line_error(capsys, "is not writable")
    finally:
        locked.chmod(0o755)


def test_frames_above_the_engine_profile_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys) -> None:
    import qvggt_export.model as model_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(model_module, "build_vggt", no_model)
    out = tmp_path / "out"
    assert main(["--bits", "w4a4", "--frames", "1000", "--out", str(out), "--no-progress"]) == EXIT_USAGE
    _one_line_error(capsys, "--frames 1000 is outside engine profile 'rtx-default''s frame range 1..32; use "
                            "--frames 1..32")
    assert not out.exists()


def test_unreadable_checkpoints_are_named_with_their_cause(tmp_path, monkeypatch, capsys) -> None:
    import pickle

    import torch

    import qvggt_export.model as model_module

    monkeypatch.setattr(model_module, "build_vggt", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"w": 1}))
    text = tmp_path / "notes.safetensors"
    text.write_text("these are notes, not weights")
    cases = [(empty, "is an empty file (0 bytes)"),
             (legacy, "is a legacy pickled PyTorch file (not torch's zip format): refused for safety"),
             (raw, "is a legacy pickled PyTorch file"), (text, "is not a safetensors file")]
    for path, expected in cases:
        assert main([*SMALL, "--no-engine", "--checkpoint", str(path), "--out", str(tmp_path / "o")]) == EXIT_USAGE
        err = _one_line_error(capsys, expected)
        assert str(path) in err and "weights_only" not in err and "_use_new_zipfile" not in err
    assert not (tmp_path / "o").exists()


def test_pickled_objects_in_a_torch_zip_are_refused_without_torch_advice(tmp_path, capsys) -> None:
    import torch

    path = tmp_path / "whole_model.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    assert main([*SMALL, "--no-engine", "--checkpoint", str(path), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    err = _one_line_error(capsys, f"checkpoint {path} holds pickled Python objects besides tensors")
    assert "refused for safety" in err and "weights_only" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_stale_reconstruction_checkpoint_names_the_option(tmp_path, capsys) -> None:
    stale = tmp_path / "stale.safetensors"
    args = [*SMALL, "--no-engine", "--recon-iters", "1", "--recon-checkpoint", str(stale)]
    assert main([*args, "--out", str(tmp_path / "a")]) == EXIT_OK
    assert stale.is_file()
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "b")]) == EXIT_USAGE
    _one_line_error(capsys, "give this run its own file with --recon-checkpoint PATH")


@pytest.mark.slow
def test_failed_run_keeps_reconstruction_progress_and_the_same_command_resumes(tmp_path, monkeypatch) -> None:
    import qvggt_export.export as export_module
    from qvggt_export.errors import QVGGTError

    real_export = export_module.export_onnx

    def failing(*args, **kwargs):
        raise QVGGTError("disk full (test)")

    out = tmp_path / "out"
    command = [*SMALL, "--no-engine", "--recon-iters", "1", "--out", str(out)]
    monkeypatch.setattr(export_module, "export_onnx", failing)
    assert main(command) == EXIT_USAGE
    assert not out.exists()
    resume = tmp_path / ".out.resume"
    assert (resume / "reconstruction_checkpoint.safetensors").is_file()
    monkeypatch.setattr(export_module, "export_onnx", real_export)
    assert main(command) == EXIT_OK
    reconstruction = json.loads((out / "report.json").read_text())["quantization"]["reconstruction"]
    blocks = [v for v in reconstruction.values() if isinstance(v, dict) and "resumed" in v]
    assert blocks and all(b["resumed"] == 1.0 for b in blocks), "every block came from the kept checkpoint"
    assert not resume.exists() and (out / "reconstruction_checkpoint.safetensors").is_file()


@pytest.mark.slow
def test_same_command_gives_byte_identical_onnx_and_weights(finished, tmp_path) -> None:
    """What the README calls byte-deterministic: the ONNX graph and the quantized weights (not engines, not
    report.json with its timings and run id)."""
    again = tmp_path / "again"
    assert main([*SMALL, "--no-engine", "--out", str(again)]) == EXIT_OK
    first, second = (json.loads((d / MANIFEST).read_text())["files"] for d in (finished, again))
    for name in ("model.onnx", "quantized_model.safetensors", "quantized_model.json"):
        assert first[name]["sha256"] == second[name]["sha256"], name
    assert first["report.json"]["sha256"] != second["report.json"]["sha256"]  # run id and timings differ


def test_staging_folder_of_a_killed_run_is_removed_by_the_next_run(tmp_path) -> None:
    import subprocess
    import sys

    from qvggt_export.rundir import RunFolder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)  # a process that has exited (as after kill -9)
    left = tmp_path / f".out.staging-{pid}-0123456789ab"
    left.mkdir()
    (left / "model.onnx").write_bytes(b"half")
    run = RunFolder(tmp_path / "out", {"bits": "w4a4"})
    assert not left.exists() and run.staging.is_dir()
    run.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_views_redrawn_after_the_run_and_eval_results_do_not_make_a_folder_mixed(tmp_path: Path) -> None:
    # `qvggt-export eval` writes eval.json and redraws report.html / report.md / report/*.png into a finished
    # folder: derived views, not another run's artifacts. A changed artifact still is.
    from qvggt_export.errors import QVGGTError
    from qvggt_export.rundir import RunFolder

    run = RunFolder(tmp_path / "out", {"bits": "w4a4"})
    (run.staging / "model.onnx").write_bytes(b"graph")
    (run.staging / "report.json").write_text("{}")
    (run.staging / "report.html").write_text("<html>run</html>")
    (run.staging / "report").mkdir()
    (run.staging / "report" / "layers.png").write_bytes(b"png")
    run.commit()
    folder = tmp_path / "out"
    run_id = verify_run_folder(folder)
    assert "report.html" not in json.loads((folder / MANIFEST).read_text())["files"]
    (folder / "report.html").write_text("<html>redrawn with the eval table</html>")
    (folder / "report" / "eval.png").write_bytes(b"png")
    (folder / "eval.json").write_text("{}")
    assert verify_run_folder(folder) == run_id
    (folder / "model.onnx").write_bytes(b"another graph")
    with pytest.raises(QVGGTError, match="mixes runs: model.onnx"):
        verify_run_folder(folder)
