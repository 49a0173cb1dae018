"""``--config FILE``: TOML / JSON settings under the command-line flags; a run's config.json reproduces it."""

from __future__ import annotations

import json

import pytest

from qvggt_export.cli import main
from qvggt_export.config_file import validate_settings
from qvggt_export.errors import QVGGTError
from qvggt_export.pipeline import PipelineConfig


def _printed(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_config_json_of_a_run_reproduces_it(tmp_path, capsys):
    original = PipelineConfig(out_dir=tmp_path / "run", bits="w8a8", method="smooth_rotate", alpha=0.35,
                              calib_size=3, calib_pool=9, frames=4, seed=7, engine=False, preprocess="pad",
                              progress=False)
    # As a run writes it: the settings plus the run id that qvggt_export.rundir stamps in (not a setting).
    (tmp_path / "config.json").write_text(json.dumps({**original.to_dict(), "run_id": "9f3c"}))
    assert _printed(capsys, ["--config", str(tmp_path / "config.json"), "--print-config"]) == original.to_dict()


def test_toml_under_flags(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('bits = "w8a8"\ncalib-size = 2\nalpha = 0.25\nengine = false\n'
                                       'out_dir = "from_file"\n')
    printed = _printed(capsys, ["--config", str(tmp_path / "run.toml"), "--alpha", "0.75", "--out", "flag_out",
                                "--print-config"])
    assert printed["bits"] == "w8a8" and printed["calib_size"] == 2 and printed["engine"] is False
    assert printed["alpha"] == 0.75 and printed["out_dir"] == "flag_out"  # typed flags win over the file
    # A flag left at its default does not override the file.
    printed = _printed(capsys, ["--config", str(tmp_path / "run.toml"), "--print-config"])
    assert printed["alpha"] == 0.25 and printed["out_dir"] == "from_file"
    # --no-engine / --no-progress map onto engine / progress.
    (tmp_path / "engine.toml").write_text('engine = true\nout_dir = "x"\n')
    assert _printed(capsys, ["--config", str(tmp_path / "engine.toml"), "--no-engine", "--print-config"])["engine"] \
        is False


def test_all_problems_listed_at_once_with_suggestions(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('bitz = "w4a4"\ncalib_sise = 3\nframes = "three"\nrecon_iters = 1.5\n'
                                       'zzz = 1\nout_dir = "x"\n')
    assert main(["--config", str(tmp_path / "bad.toml"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "4 problems" not in err and "5 problems" in err
    assert "'bitz' (did you mean 'bits'?)" in err and "'calib_sise' (did you mean 'calib_size'?)" in err
    assert "frames = 'three'" in err and "recon_iters = 1.5" in err and "unknown key 'zzz'" in err


@pytest.mark.parametrize(("name", "text", "message"), [
    ("broken.toml", "bits = ", "does not parse"),
    ("list.json", "[1, 2]", "expected a table"),
    ("run.yaml", "bits: w4a4", "expected a .toml or .json"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert main(["--config", str(tmp_path / name), "--out", "x", "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_out_required_without_config(capsys):
    assert main(["--print-config"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_range_errors_come_from_the_typed_config(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"out_dir": "x", "calib_size": 0}))
    with pytest.raises(QVGGTError, match="calib_size must be >= 1"):
        PipelineConfig(**validate_settings(json.loads((tmp_path / "run.json").read_text()), PipelineConfig, "f"))
