"""Device choice (``--device``, ``--calib-dtype``) and the out-of-memory message, as far as a CPU machine allows.

The CUDA paths themselves run in ``benchmarks/gpu_check.py`` (results in ``benchmarks/results/gpu_check.md``) and
in the ``gpu``-marked tests, which skip here.
"""

from __future__ import annotations

import pytest
import torch

from qvggt_export.cli import main
from qvggt_export.device import autocast, check_device_spec, out_of_memory_guard, resolve_device
from qvggt_export.errors import QVGGTError
from qvggt_export.pipeline import PipelineConfig


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_spec_forms_are_accepted(spec: str) -> None:
    assert check_device_spec(spec) == spec


@pytest.mark.parametrize("spec", ["gpu", "cuda0", "cuda:", "cuda:x", "cpu:0", "auto:1", "", "mps"])
def test_malformed_device_specs_are_refused_naming_the_choices(spec: str) -> None:
    with pytest.raises(QVGGTError, match="auto, cpu, cuda, cuda:N"):
        check_device_spec(spec)


def test_auto_and_cpu_resolve_to_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QVGGTError, match=r"--device cuda:1: no CUDA GPU is visible .*use --device cpu"):
        resolve_device("cuda:1")


def test_a_device_index_beyond_the_gpus_present_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(QVGGTError, match=r"has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_reduced_calibration_dtype_is_a_cuda_option() -> None:
    assert isinstance(autocast(torch.device("cpu"), "fp32"), type(autocast(torch.device("cpu"), "fp32")))
    with pytest.raises(QVGGTError, match="applies to CUDA runs"):
        autocast(torch.device("cpu"), "bf16")
    with pytest.raises(QVGGTError, match="calib_dtype must be one of"):
        autocast(torch.device("cpu"), "int8")
    with pytest.raises(QVGGTError, match="applies to CUDA runs"):
        PipelineConfig(out_dir="unused", device="cpu", calib_dtype="bf16")


def test_a_simulated_cuda_oom_becomes_one_line_naming_the_knobs() -> None:
    with pytest.raises(QVGGTError) as info, out_of_memory_guard("NFDS statistics", torch.device("cpu"),
                                                                 "--frames, --nfds-batch or --calib-dtype bf16"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("out of memory on cpu during NFDS statistics; reduce --frames, --nfds-batch or "
                              "--calib-dtype bf16")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


def test_other_errors_pass_through_the_oom_guard() -> None:
    with pytest.raises(ValueError, match="not memory"), out_of_memory_guard("x", torch.device("cpu"), "y"):
        raise ValueError("not memory")


def test_cli_refuses_a_bad_device_before_any_work(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--bits", "w4a4", "--device", "gpu0", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "auto, cpu, cuda, cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_cuda_on_a_machine_without_one_exits_2_with_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["--bits", "w4a4", "--device", "cuda", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no CUDA GPU is visible" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_device_and_calib_dtype_are_in_the_written_config() -> None:
    config = PipelineConfig(out_dir="unused", device="cuda:0", calib_dtype="bf16", engine=False)
    data = config.to_dict()
    assert data["device"] == "cuda:0" and data["calib_dtype"] == "bf16"
