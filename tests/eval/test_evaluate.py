"""``evaluate`` and ``qvggt-export eval`` end to end on a quick tiny export made here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qvggt_export.cli import main
from qvggt_export.errors import QVGGTError
from qvggt_export.eval.evaluate import EvalConfig, evaluate
from qvggt_export.pipeline import PipelineConfig, run_pipeline
from tests.conftest import require_shared_data
from tests.eval.conftest import make_co3d


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "w4a4"
    run_pipeline(PipelineConfig(out_dir=out, bits="w4a4", model="tiny", engine=False, calib_pool=4, calib_size=2,
                                frames=3, progress=False))
    return out


def test_ground_truth_mode_on_a_co3d_folder(export_dir, tmp_path, capsys):
    root = make_co3d(tmp_path / "co3d", frames=4)
    code = main(["eval", "--data", str(root), "--frames", "3", "--no-progress", str(export_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((export_dir / "eval.json").read_text())
    assert report["mode"] == "ground_truth" and report["dataset"] == "co3d" and report["sequences"] == 1
    for row in ("float", "quantized"):
        result = report["results"][row]
        assert result["pose"]["pairs"] == 3 and 0.0 <= result["pose"]["auc@30"] <= 100.0
        assert result["depth"]["frames"] == 3 and np.isfinite(result["depth"]["abs_rel"])
        assert np.isfinite(result["points"]["accuracy"]) and 0 <= result["points"]["normal_consistency"] <= 1
    assert "AUC@30" in out and "float" in out and "quantized" in out


def test_fidelity_mode_on_generated_folder_and_runtimes_agree(export_dir, tmp_path):
    """PyTorch fake quant and ONNX Runtime on model.onnx give the same fidelity numbers (parity), and the float
    model compared with itself would be perfect: the quantized model's numbers are not."""
    from PIL import Image

    scene = tmp_path / "scene"
    scene.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    for index in range(4):
        Image.fromarray(np.roll(base, 6 * index, axis=1)).save(scene / f"{index:02d}.png")
    torch_report = evaluate(EvalConfig(out_dir=export_dir, data=scene, fidelity=True, max_sequences=2,
                                       progress=False))
    result = torch_report["results"]["quantized_vs_float"]
    assert torch_report["sequences"] == 2 and result["pose"]["pairs"] == 6
    assert result["depth"]["abs_rel"] > 0 and result["points"]["accuracy"] > 0
    with pytest.raises(QVGGTError, match="--preprocess pad"):  # a square graph, 4:3 photos cropped to 56x70
        evaluate(EvalConfig(out_dir=export_dir, data=scene, fidelity=True, runtime="onnxruntime", progress=False))
    torch_report = evaluate(EvalConfig(out_dir=export_dir, data=scene, fidelity=True, max_sequences=2,
                                       preprocess="pad", progress=False))
    result = torch_report["results"]["quantized_vs_float"]
    onnx_report = evaluate(EvalConfig(out_dir=export_dir, data=scene, fidelity=True, max_sequences=2,
                                      runtime="onnxruntime", preprocess="pad", progress=False))
    other = onnx_report["results"]["quantized_vs_float"]
    assert other["pose"]["rra_mean"] == pytest.approx(result["pose"]["rra_mean"], rel=0.05, abs=1e-3)
    assert other["depth"]["abs_rel"] == pytest.approx(result["depth"]["abs_rel"], rel=0.05)


def test_fidelity_on_shared_sequences(export_dir, capsys):
    data = require_shared_data() / "sequences"
    code = main(["eval", "--fidelity", "--data", str(data), "--max-sequences", "2", "--no-progress",
                 str(export_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "quantized vs float" in out and "AUC@30" in out


def test_no_ground_truth_is_a_one_line_error(export_dir, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["eval", "--data", str(tmp_path / "photos"), str(export_dir)]) == 2
    err = capsys.readouterr().err
    assert "--fidelity" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(QVGGTError, match="export folder not found"):
        EvalConfig(out_dir=tmp_path / "nope", data=tmp_path)
