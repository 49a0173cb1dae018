"""Pipeline with the floating-point formats: per-format default engine profiles, incompatible profiles
refused before anything is written, and an nvfp4 run end to end (report: format, lowering, checks, engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvggt_export.cli import main
from qvggt_export.errors import QVGGTError
from qvggt_export.pipeline import PipelineConfig, run_pipeline


@pytest.mark.parametrize(("bits", "requested", "resolved"), [
    ("fp8", None, "rtx-sm89-sm120"), ("nvfp4", None, "rtx-sm120"), ("w4a4", None, "rtx-default"),
    ("w4a4", "rtx-default", "rtx-default"), ("fp32", "rtx-default", "rtx-default"),
    ("fp8", "rtx-sm120", "rtx-sm120"), ("fp8", "rtx-sm89", "rtx-sm89"), ("nvfp4", "trt-server", "trt-server"),
])
def test_engine_profile_per_format(bits: str, requested: str | None, resolved: str, tmp_path: Path) -> None:
    config = PipelineConfig(out_dir=tmp_path / "out", bits=bits, engine_profile=requested)
    assert config.resolved_engine_profile() == resolved


def test_incompatible_profiles_are_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(QVGGTError, match=r"'rtx-sm89' targets SM89, which cannot run nvfp4.*rtx-sm120"):
        PipelineConfig(out_dir=out, bits="nvfp4", engine_profile="rtx-sm89")
    # rtx-default given explicitly is a choice too (the README: refused), not silently replaced.
    with pytest.raises(QVGGTError, match=r"'rtx-default' targets SM86, which cannot run fp8.*rtx-sm89-sm120"):
        PipelineConfig(out_dir=out, bits="fp8", engine_profile="rtx-default")
    custom = tmp_path / "ampere.json"
    custom.write_text(json.dumps({"name": "ampere", "backend": "rtx", "compute_capabilities": ["SM86", "SM89"]}))
    with pytest.raises(QVGGTError, match=r"'ampere' targets SM86, which cannot run fp8 \(needs SM89"):
        PipelineConfig(out_dir=out, bits="fp8", engine_profile=str(custom))
    with pytest.raises(QVGGTError, match="does not exist"):
        PipelineConfig(out_dir=out, bits="fp8", engine_profile=str(tmp_path / "missing.json"))
    PipelineConfig(out_dir=out, bits="nvfp4", engine_profile="rtx-sm89", engine=False)  # no engine: fine
    PipelineConfig(out_dir=out, bits="w4a4", engine_profile="rtx-sm89")  # integer formats build everywhere
    with pytest.raises(QVGGTError, match="integer formats"):
        PipelineConfig(out_dir=out, bits="fp8", recon_iters=2)
    with pytest.raises(QVGGTError, match="unsupported format 'fp4'"):
        PipelineConfig(out_dir=out, bits="fp4")
    assert not out.exists()


def test_cli_refuses_an_incompatible_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["--bits", "nvfp4", "--out", str(out), "--print-config"]) == 0
    assert main(["--bits", "nvfp4", "--engine-profile", "rtx-default", "--out", str(out), "--print-config"]) == 2
    assert main(["--bits", "nvfp4", "--engine-profile", "rtx-sm89", "--out", str(out)]) == 2
    assert "cannot run nvfp4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--bits", "fp4", "--out", str(out)])
    assert exit_info.value.code == 2
    assert not out.exists()


@pytest.mark.slow
def test_nvfp4_end_to_end(tmp_path: Path) -> None:
    try:
        import tensorrt_rtx  # noqa: F401
        has_rtx = True
    except ImportError:
        has_rtx = False
    out = tmp_path / "nvfp4"
    report = run_pipeline(PipelineConfig(out_dir=out, bits="nvfp4", method="rotate", calib_pool=1, calib_size=1,
                                         frames=2, progress=False, engine=has_rtx))
    assert report["format"]["family"] == "nvfp4" and "TRT_FP4DynamicQuantize" in report["format"]["lowering"]
    assert report["onnx"]["opset"] == 23 and report["onnx"]["quantized_linears"] == 32
    parity = report["parity"]
    assert parity["passed"] and parity["method"] == "structural + reference evaluator"
    assert parity["structure"] == {"passed": True, "layers": 32, "failures": []}
    assert all(o["rel_l2"] < 1e-5 for o in parity["outputs"].values())  # observed ~1e-7
    assert len(report["quantization"]["input_amax"]) == 32
    assert json.loads((out / "report.json").read_text())["bits"] == "nvfp4"
    engine = report["engine"]
    if not has_rtx:
        assert engine["path"] is None
        return
    assert engine["path"] and Path(engine["path"]).is_file(), engine.get("reason")
    assert engine["target_sms"] == ["SM120"] and engine["profile_name"] == "rtx-sm120"
    assert "profile_reason" in engine and engine["profile"]["compute_capabilities"] == ["SM120"]
    # The builder's per-layer report: 32 GEMMs with FP4 activations (their second input is the FP8 block-scale
    # tensor; the constant FP4 weights are listed separately in the log).
    fp4 = sum(n for kind, n in engine["gemm_precisions"].items() if kind.startswith("FP4E2M1"))
    assert fp4 == 32, engine["gemm_precisions"]
    assert engine["hadamard"] == "plugin" and engine["hadamard_plugin_nodes"] == 32
    assert "qvggt::Hadamard" in engine["plugin_ops"]
