"""``--method auto`` through the whole job: quantized, exported, parity-checked, built, re-checked and reported like
any other method, with its choices in report.json, report.md and the config that reproduces the run."""

from __future__ import annotations

import json

import pytest

from qvggt_export.cli import main
from qvggt_export.methods import METHODS
from qvggt_export.quant.state import load_quantized

CANDIDATES = ("rtn", "smooth_rotate", "dsfq")

pytestmark = pytest.mark.slow  # one full run with an engine build and a check: about a minute on 2 cores


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "run"
    code = main(["--bits", "w4a4", "--method", "auto", "--auto-methods", ",".join(CANDIDATES),
                 "--auto-granularity", "layer", "--model", "tiny-outliers", "--calib-pool", "4", "--calib-size", "2",
                 "--frames", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_auto_run_is_exported_checked_and_built(auto_run):
    report = json.loads((auto_run / "report.json").read_text())
    assert report["method"] == "auto" and report["parity"]["passed"]
    assert report["parity"]["layers"]["first_failing_layer"] is None
    selection = report["quantization"]["method_selection"]
    assert selection["candidates"] == list(CANDIDATES) and selection["granularity"] == "layer"
    assert sum(selection["layer_counts"].values()) == report["quantization"]["layers"] == 32
    # The saved model holds exactly the recorded per-layer choices.
    model, config = load_quantized(auto_run / "quantized_model")
    assert config.method == "auto" and config.auto_methods == CANDIDATES
    for block, record in selection["blocks"].items():
        assert record["method"] in CANDIDATES and set(record["errors"]) == set(CANDIDATES)
        for local, method in record["layers"].items():
            assert model.get_submodule(f"{block}.{local}").rotate == METHODS[method].rotates
    rotates = any(METHODS[m].rotates for m, n in selection["layer_counts"].items() if n)
    engine = report["engine"]
    assert engine["path"] and engine["hadamard"] == ("plugin" if rotates else "none")
    assert main(["check", str(auto_run)]) == 0


def test_auto_choices_in_the_visual_report(auto_run):
    markdown = (auto_run / "report.md").read_text()
    assert "## Method choice (--method auto)" in markdown
    assert "report/method_selection.png" in markdown and (auto_run / "report" / "method_selection.png").is_file()
    assert "| block | chosen | rtn | smooth_rotate | dsfq | chosen: special / patch tokens | layers |" in markdown
    chosen = json.loads((auto_run / "report.json").read_text())["quantization"]["method_selection"]["blocks"]
    first = chosen["aggregator.frame_blocks.0"]
    parts = first["token_errors"][first["method"]]
    assert f"{parts['special']:.3e} / {parts['patch']:.3e}" in markdown
    assert "method_selection.png" not in (auto_run / "report.html").read_text()  # embedded, not linked


def test_auto_settings_round_trip_and_bad_values(auto_run, tmp_path, capsys):
    assert main(["--config", str(auto_run / "config.json"), "--out", str(tmp_path / "again"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "auto" and printed["auto_methods"] == list(CANDIDATES)
    assert printed["auto_granularity"] == "layer"
    (tmp_path / "bad.toml").write_text('method = "auto"\nauto_methods = "dsfq"\nout_dir = "x"\n')
    assert main(["--config", str(tmp_path / "bad.toml"), "--print-config"]) == 2
    assert "auto_methods = 'dsfq'" in capsys.readouterr().err
    (tmp_path / "unknown.toml").write_text('method = "auto"\nauto_methods = ["dsfq", "gptq"]\nout_dir = "x"\n')
    assert main(["--config", str(tmp_path / "unknown.toml"), "--print-config"]) == 2
    assert "auto_methods must be distinct names" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--method", "auto", "--auto-methods", "dsfq,gptq", "--out", "x", "--print-config"])
    assert "expected distinct names" in capsys.readouterr().err
