"""Pure comparison metrics and the stated per-output criteria."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qvggt_export.errors import QVGGTError
from qvggt_export.parity.compare import FLOAT_MAX_REL, FP16_REL_FLOOR, NOISE_RATIO, tolerance_for
from qvggt_export.parity.metrics import cosine, output_metrics, pose_metrics, rel_l2


def test_output_metrics_values():
    ref = np.array([[1.0, -2.0], [4.0, 0.0]], dtype=np.float32)
    got = ref + np.array([[0.0, 0.5], [0.0, 0.0]], dtype=np.float32)
    m = output_metrics(got, ref)
    assert m["max_abs"] == 0.5 and m["max_rel"] == pytest.approx(0.5 / 4.0)
    assert m["rel_l2"] == pytest.approx(0.5 / math.sqrt(21.0))
    assert m["cosine"] == pytest.approx(float(got.ravel() @ ref.ravel()) / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert output_metrics(ref, ref) == {"max_abs": 0.0, "max_rel": 0.0, "rel_l2": 0.0, "cosine": pytest.approx(1.0)}
    assert cosine(-ref, ref) == pytest.approx(-1.0) and cosine(ref * 0, ref * 0) == 1.0
    assert rel_l2(np.zeros(3), np.zeros(3)) == 0.0


def test_non_finite_values_never_pass():
    ref = np.ones(4, dtype=np.float32)
    for bad in (np.nan, np.inf):
        got = ref.copy()
        got[1] = bad
        m = output_metrics(got, ref)
        assert m["max_abs"] == m["rel_l2"] == m["max_rel"] == float("inf") and math.isnan(m["cosine"])
        assert not m["rel_l2"] <= 1e30
    with pytest.raises(ValueError, match="shape"):
        output_metrics(ref[:2], ref)


def _pose(angle_deg: float, axis: int, translation: tuple[float, float, float]) -> np.ndarray:
    half = math.radians(angle_deg) / 2
    quat = [0.0, 0.0, 0.0, math.cos(half)]
    quat[axis] = math.sin(half)
    return np.array([[[*translation, *quat, 0.9, 1.1]]], dtype=np.float32)


def test_pose_metrics_in_degrees():
    ref = _pose(0.0, 2, (1.0, 0.0, 0.0))
    got = _pose(10.0, 2, (1.0, 1.0, 0.0))
    got[..., 8] += np.float32(math.radians(2.0))
    m = pose_metrics(got, ref)
    assert m["rotation_deg_max"] == pytest.approx(10.0, abs=1e-3)
    assert m["translation_deg_max"] == pytest.approx(45.0, abs=1e-3)
    assert m["fov_deg_max"] == pytest.approx(2.0, abs=1e-4)
    assert pose_metrics(ref, ref)["rotation_deg_max"] < 1e-3


def test_stated_criteria():
    assert tolerance_for("fp32") == ("max_rel", FLOAT_MAX_REL, "max_abs / max|torch| <= 1e-05")
    metric, tol, _ = tolerance_for("quantized", 0.1)
    assert metric == "rel_l2" and tol == pytest.approx(NOISE_RATIO * 0.1)
    assert tolerance_for("quantized", 0.0)[1] == FLOAT_MAX_REL  # floor: float noise
    assert tolerance_for("fp16", 1e-3)[1] == pytest.approx(2e-3)
    assert tolerance_for("fp16", 1e-6)[1] == FP16_REL_FLOOR == 2.0**-11  # floor: float16's unit roundoff
    with pytest.raises(QVGGTError, match="noise"):
        tolerance_for("fp16")
    with pytest.raises(QVGGTError, match="unknown parity kind"):
        tolerance_for("int3")
