"""Pure comparison metrics between two arrays of one output (no models, no runtimes, no files)."""

from __future__ import annotations

import numpy as np
import torch

from qvggt_export.model.pose import pose_angle_errors


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    """``||got - ref||_2 / ||ref||_2`` over all elements (float64 accumulation)."""
    diff = got.astype(np.float64).ravel() - ref.astype(np.float64).ravel()
    return float(np.linalg.norm(diff) / max(float(np.linalg.norm(ref.astype(np.float64).ravel())), 1e-30))


def cosine(got: np.ndarray, ref: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays (1.0 when both are zero)."""
    a, b = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    return float(a @ b / max(na * nb, 1e-300))


def output_metrics(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """``max_abs``, ``max_rel`` (max|diff| / max|ref|), ``rel_l2`` and ``cosine`` of ``got`` against ``ref``.

    Non-finite values anywhere make ``max_abs``/``max_rel``/``rel_l2`` infinite and ``cosine`` NaN, so that no
    tolerance can pass them.
    """
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} vs reference {ref.shape}")
    if not (np.isfinite(got).all() and np.isfinite(ref).all()):
        return {"max_abs": float("inf"), "max_rel": float("inf"), "rel_l2": float("inf"), "cosine": float("nan")}
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-30), "rel_l2": rel_l2(got, ref),
            "cosine": cosine(got, ref)}


def pose_metrics(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Largest per-frame camera rotation and translation-direction differences, in degrees, between two
    pose encodings [..., 9] (``absT_quaR_FoV``), and the largest field-of-view difference."""
    errors = pose_angle_errors(torch.from_numpy(np.ascontiguousarray(got)),
                               torch.from_numpy(np.ascontiguousarray(ref)))
    fov = np.abs(got[..., 7:9].astype(np.float64) - ref[..., 7:9].astype(np.float64))
    return {"rotation_deg_max": float(errors["rotation"].max()),
            "translation_deg_max": float(errors["translation"].max()),
            "fov_deg_max": float(np.rad2deg(fov.max())) if fov.size else 0.0}
