"""Reconstruction metrics, as the VGGT / DUSt3R line of work reports them: arrays in, numbers out.

Camera pose (VGGT's ``evaluation/test_co3d.py``):

* over every unordered frame pair (i < j), the relative pose of the prediction and of the reference;
* RRA: the geodesic angle between the two relative rotations, in degrees;
* RTA: the angle between the two relative translation *directions*, taken as ``min(theta, 180 - theta)``
  (the sign of a direction is ambiguous in two-view geometry); a zero-length translation has no direction
  and scores 90 degrees, as upstream's ``compare_translation_by_angle`` scores it;
* per pair ``max(RRA, RTA)``; AUC@T = the mean, over the integer thresholds 1..T degrees, of the fraction
  of pairs whose error falls below the threshold (upstream: ``np.histogram`` with bins ``0, 1, ..., T`` (the
  last bin closed), cumulative sum, mean). Reported in percent.

Relative-pose convention. Extrinsics are camera-from-world ``E = [R | t]`` (OpenCV, VGGT's output). The
default ``convention="camera"`` compares ``E_j E_i^-1``, the motion from camera i to camera j: it does not
depend on the world frame or its scale, so a prediction (first camera at the origin) can be compared with
ground truth in any world frame (DTU, 7-Scenes, CO3Dv2) without aligning them first. ``convention="vggt"``
reproduces upstream's script exactly: both pose sets are first re-expressed in their first camera's frame
(``E_k E_0^-1``) and the pair pose is ``E_i^-1 E_j``; use it to compare numbers with published tables.

Depth: per frame, the prediction is scaled by the median ratio ``median(gt / pred)`` over valid pixels
(the monocular-depth protocol of the DUSt3R / MASt3R / VGGT evaluations; ``align="none"`` skips it), then
``abs_rel = mean(|pred - gt| / gt)`` and ``delta_1.25 = fraction of max(pred / gt, gt / pred) < 1.25``.

Point maps: the prediction is aligned to the reference with a similarity transform (Umeyama, closed form,
scale included) over corresponding valid points, as DUSt3R / VGGT align before the 7-Scenes / NRGBD /
DTU point-map metrics. Then, by nearest neighbours (``scipy.spatial.cKDTree``): Accuracy = mean distance
from each predicted point to the reference cloud, Completion = mean distance from each reference point to
the predicted cloud, Normal Consistency = mean ``|n_pred . n_ref|`` between each point's normal and its
nearest neighbour's normal (normals from the image grid of each point map: the cross product of the
horizontal and vertical differences; DUSt3R estimates them with Open3D instead, which needs no grid).
Accuracy and Completion are also given as medians, with the reference cloud's ``extent`` (median distance to
its centroid) to read them against (fidelity references are in the float model's arbitrary units).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AUC_THRESHOLDS = (30, 15, 5, 3)
CONVENTIONS = ("camera", "vggt")


def as_se3(extrinsics: np.ndarray) -> np.ndarray:
    """[N, 3, 4] or [N, 4, 4] camera-from-world matrices -> [N, 4, 4] (float64)."""
    extrinsics = np.asarray(extrinsics, dtype=np.float64)
    if extrinsics.ndim != 3 or extrinsics.shape[1:] not in ((3, 4), (4, 4)):
        raise ValueError(f"expected extrinsics of shape [N, 3, 4] or [N, 4, 4], got {extrinsics.shape}")
    if extrinsics.shape[1] == 4:
        return extrinsics.copy()
    se3 = np.tile(np.eye(4), (extrinsics.shape[0], 1, 1))
    se3[:, :3, :] = extrinsics
    return se3


def invert_se3(se3: np.ndarray) -> np.ndarray:
    """Closed-form inverse of rigid transforms [N, 4, 4] (``R^T, -R^T t``): exact where ``inv`` rounds."""
    rotation, translation = se3[:, :3, :3], se3[:, :3, 3:]
    inverse = np.tile(np.eye(4), (se3.shape[0], 1, 1))
    inverse[:, :3, :3] = rotation.transpose(0, 2, 1)
    inverse[:, :3, 3:] = -rotation.transpose(0, 2, 1) @ translation
    return inverse


def rotation_angle_deg(rotation_a: np.ndarray, rotation_b: np.ndarray) -> np.ndarray:
    """Geodesic angle in degrees between rotation matrices [N, 3, 3] (the angle of ``R_a^T R_b``)."""
    relative = rotation_a.transpose(0, 2, 1) @ rotation_b
    cosine = (np.trace(relative, axis1=1, axis2=2) - 1.0) / 2.0
    skew = relative - relative.transpose(0, 2, 1)
    sine = np.linalg.norm(np.stack([skew[:, 2, 1], skew[:, 0, 2], skew[:, 1, 0]], -1), axis=-1) / 2.0
    # atan2 of both: arccos alone loses half the digits near 0 degrees, where quantization errors live.
    return np.degrees(np.arctan2(sine, cosine))


def translation_angle_deg(translation_a: np.ndarray, translation_b: np.ndarray) -> np.ndarray:
    """Angle in degrees between translation directions [N, 3], folded to ``min(theta, 180 - theta)``.

    A zero-length vector has no direction: 90 degrees (what upstream's normalisation with an epsilon gives)."""
    norm_a = np.linalg.norm(translation_a, axis=-1)
    norm_b = np.linalg.norm(translation_b, axis=-1)
    valid = (norm_a > 1e-12) & (norm_b > 1e-12)
    theta = np.full(len(translation_a), 90.0)
    dot = (translation_a[valid] * translation_b[valid]).sum(-1)
    cross = np.linalg.norm(np.cross(translation_a[valid], translation_b[valid]), axis=-1)
    theta[valid] = np.degrees(np.arctan2(cross, dot))  # stable near 0 and 180, unlike arccos
    return np.minimum(theta, 180.0 - theta)


def relative_pose_errors(pred_extrinsics: np.ndarray, ref_extrinsics: np.ndarray, convention: str = "camera"
                         ) -> tuple[np.ndarray, np.ndarray]:
    """RRA and RTA in degrees for every pair ``i < j`` (``itertools.combinations`` order).

    Args:
        pred_extrinsics, ref_extrinsics: [N, 3, 4] or [N, 4, 4] camera-from-world, same frame order.
        convention: ``"camera"`` (``E_j E_i^-1``, world-frame free) or ``"vggt"`` (upstream's script); see the
            module docstring.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    pred, ref = as_se3(pred_extrinsics), as_se3(ref_extrinsics)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction has {pred.shape[0]} cameras, reference {ref.shape[0]}")
    first, second = np.triu_indices(pred.shape[0], k=1)
    if convention == "camera":
        rel_pred = pred[second] @ invert_se3(pred[first])
        rel_ref = ref[second] @ invert_se3(ref[first])
    else:
        pred = pred @ invert_se3(pred[:1])
        ref = ref @ invert_se3(ref[:1])
        rel_pred = invert_se3(pred[first]) @ pred[second]
        rel_ref = invert_se3(ref[first]) @ ref[second]
    rra = rotation_angle_deg(rel_ref[:, :3, :3], rel_pred[:, :3, :3])
    rta = translation_angle_deg(rel_ref[:, :3, 3], rel_pred[:, :3, 3])
    return rra, rta


def pose_auc(rra: np.ndarray, rta: np.ndarray, max_threshold: int) -> float:
    """AUC@``max_threshold`` in percent, upstream's ``calculate_auc_np`` definition (integer-degree bins)."""
    errors = np.maximum(np.asarray(rra, dtype=np.float64), np.asarray(rta, dtype=np.float64))
    if errors.size == 0:
        return float("nan")
    histogram, _ = np.histogram(errors, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(histogram / errors.size)) * 100.0)


def pose_metrics(rra: np.ndarray, rta: np.ndarray, thresholds: Sequence[int] = AUC_THRESHOLDS) -> dict[str, float]:
    """AUC at each threshold plus mean / median RRA and RTA over the given pairs."""
    rra, rta = np.asarray(rra, dtype=np.float64), np.asarray(rta, dtype=np.float64)
    result = {f"auc@{t}": pose_auc(rra, rta, t) for t in thresholds}
    result.update(rra_mean=float(rra.mean()), rra_median=float(np.median(rra)), rta_mean=float(rta.mean()),
                  rta_median=float(np.median(rta)), pairs=int(rra.size))
    return result


def depth_metrics(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None, align: str = "median"
                  ) -> dict[str, float]:
    """abs-rel and delta < 1.25 of one depth map (any shape) against a reference, after median scaling.

    Args:
        valid: pixels with a reference (default: reference > 0 and both finite).
        align: ``"median"`` (scale the prediction by ``median(ref / pred)``) or ``"none"``.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    mask = (ref > 0) & np.isfinite(ref) & np.isfinite(pred) & (pred > 0)
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool).reshape(-1)
    if not mask.any():
        return {"abs_rel": float("nan"), "delta_1.25": float("nan"), "scale": float("nan"), "pixels": 0}
    pred, ref = pred[mask], ref[mask]
    if align == "median":
        scale = float(np.median(ref / pred))
    elif align == "none":
        scale = 1.0
    else:
        raise ValueError(f"align must be 'median' or 'none', got {align!r}")
    pred = pred * scale
    ratio = np.maximum(pred / ref, ref / pred)
    return {"abs_rel": float(np.mean(np.abs(pred - ref) / ref)), "delta_1.25": float(np.mean(ratio < 1.25)),
            "scale": scale, "pixels": int(mask.sum())}


def umeyama(source: np.ndarray, target: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``target ~ s R source + t`` (Umeyama 1991) for corresponding points [N, 3].

    Returns ``(s, R, t)``."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0  # a reflection is not a rotation
    rotation = u @ sign @ vt
    variance = (centred_s ** 2).sum() / len(source)
    scale = float(np.trace(np.diag(singular) @ sign) / variance) if with_scale and variance > 0 else 1.0
    translation = mean_t - scale * rotation @ mean_s
    return scale, rotation, translation


def grid_normals(points: np.ndarray) -> np.ndarray:
    """Unit normals [..., H, W, 3] of a point map on its image grid (central differences; zero where undefined)."""
    points = np.asarray(points, dtype=np.float64)
    d_x = np.gradient(points, axis=-2)
    d_y = np.gradient(points, axis=-3)
    normals = np.cross(d_x, d_y)
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.where(norm > 1e-12, normals / np.maximum(norm, 1e-12), 0.0)


def point_metrics(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None, align: bool = True,
                  max_points: int | None = 200_000, seed: int = 0) -> dict[str, float]:
    """Accuracy, Completion and Normal Consistency of a point map against a reference.

    Args:
        pred, ref: [..., H, W, 3] point maps in one-to-one pixel correspondence (the same frames).
        valid: [..., H, W] pixels with a reference point (default: finite reference points).
        align: similarity-align the prediction to the reference first (Umeyama over the valid pixels).
        max_points: subsample this many valid points (seeded) for the neighbour search; ``None`` keeps all.
    """
    from scipy.spatial import cKDTree

    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape or pred.shape[-1] != 3:
        raise ValueError(f"point maps must have the same [..., H, W, 3] shape, got {pred.shape} and {ref.shape}")
    mask = np.isfinite(ref).all(-1) & np.isfinite(pred).all(-1)
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool)
    normals_pred, normals_ref = grid_normals(pred), grid_normals(ref)
    pred_points, ref_points = pred[mask], ref[mask]
    normals_pred, normals_ref = normals_pred[mask], normals_ref[mask]
    if len(ref_points) < 3:
        nan = float("nan")
        return {"accuracy": nan, "completion": nan, "normal_consistency": nan, "points": int(len(ref_points))}
    scale = 1.0
    if align:
        scale, rotation, translation = umeyama(pred_points, ref_points)
        pred_points = scale * pred_points @ rotation.T + translation
        normals_pred = normals_pred @ rotation.T
    if max_points is not None and len(ref_points) > max_points:
        keep = np.random.default_rng(seed).choice(len(ref_points), max_points, replace=False)
        pred_points, ref_points = pred_points[keep], ref_points[keep]
        normals_pred, normals_ref = normals_pred[keep], normals_ref[keep]
    to_ref, nearest_ref = cKDTree(ref_points).query(pred_points)
    to_pred, nearest_pred = cKDTree(pred_points).query(ref_points)
    consistency_acc = np.abs((normals_pred * normals_ref[nearest_ref]).sum(-1))
    consistency_comp = np.abs((normals_ref * normals_pred[nearest_pred]).sum(-1))
    return {"accuracy": float(to_ref.mean()), "accuracy_median": float(np.median(to_ref)),
            "completion": float(to_pred.mean()), "completion_median": float(np.median(to_pred)),
            "normal_consistency": float((consistency_acc.mean() + consistency_comp.mean()) / 2.0),
            "alignment_scale": float(scale), "points": int(len(ref_points)),
            # The reference cloud's size (median distance to its centroid): Acc / Comp have its units.
            "extent": float(np.median(np.linalg.norm(ref_points - ref_points.mean(0), axis=-1)))}
