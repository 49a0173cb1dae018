"""The ONNX Runtime CPU serving session: the canonical Q/DQ export fuses into integer kernels, and its outputs
stay within the parity tolerance of the fake-quant model.

If the exporter's Q/DQ pattern changes so that ONNX Runtime no longer fuses it, the kernel counts here fail
(the CPU would silently fall back to float MatMuls on dequantized operands)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qvggt_export.engine.ort_cpu import cpu_session_options, onnxruntime_cpu_session
from qvggt_export.errors import QVGGTError
from qvggt_export.export import export_onnx
from qvggt_export.model import build_vggt
from qvggt_export.parity.compare import tolerance_for
from qvggt_export.quant import QuantConfig
from qvggt_export.quant.calibrate import calibrate

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

KERNEL = {"w8a8": "MatMulIntegerToFloat", "w4a4": "MatMulNBits"}


def _rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


# accuracy_level concerns MatMulNBits (4-bit weights) only.
@pytest.mark.parametrize(("bits", "level"), [("w8a8", None), ("w4a4", None), ("w4a4", 4)])
def test_canonical_export_fuses_into_integer_kernels(tmp_path: Path, bits: str, level: int | None) -> None:
    float_model = build_vggt("tiny")
    images = torch.rand(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(float_model)
    calibrate(model, QuantConfig(bits=bits, method="dsfq"), [images])
    exported = export_onnx(model, tmp_path / "model.onnx", images)

    session = onnxruntime_cpu_session(tmp_path / "model.onnx", accuracy_level=level,
                                      optimized_model_path=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = [node.op_type for node in optimized.graph.node]
    assert ops.count(KERNEL[bits]) == exported.num_qlinear == 32, sorted(set(ops))

    held_out = torch.rand(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, fake_quant = float_model(held_out), model(held_out)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"images": held_out.numpy()}), strict=True))
    for name in ("depth", "world_points", "pose_enc"):
        noise = _rel_l2(fake_quant[name].numpy(), reference[name].numpy())
        _, tolerance, description = tolerance_for("quantized", noise=noise)
        error = _rel_l2(outputs[name], fake_quant[name].numpy())
        assert error <= tolerance, f"{bits} {name}: rel L2 {error:.3g} vs fake quant, {description} = {tolerance:.3g}"


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(QVGGTError, match="no such ONNX file"):
        onnxruntime_cpu_session(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(QVGGTError, match="broken.onnx: ONNX Runtime could not load it"):
        onnxruntime_cpu_session(tmp_path / "broken.onnx")
    with pytest.raises(QVGGTError, match="accuracy_level"):
        cpu_session_options(accuracy_level=7)
    with pytest.raises(QVGGTError, match="threads"):
        cpu_session_options(threads=0)
