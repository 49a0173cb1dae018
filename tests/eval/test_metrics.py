"""Evaluation metrics on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from qvggt_export.eval.metrics import (
    depth_metrics,
    point_metrics,
    pose_auc,
    pose_metrics,
    relative_pose_errors,
    umeyama,
)


def _cameras(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(count, random_state=seed).as_matrix()
    translations = rng.normal(size=(count, 3)) * 2.0
    return np.concatenate([rotations, translations[:, :, None]], axis=-1)


@pytest.mark.parametrize("convention", ["camera", "vggt"])
def test_identical_poses_score_auc_100(convention):
    cameras = _cameras(6)
    rra, rta = relative_pose_errors(cameras, cameras, convention)
    assert rra.shape == (15,) and np.allclose(rra, 0, atol=1e-5) and np.allclose(rta, 0, atol=1e-5)
    metrics = pose_metrics(rra, rta)
    assert metrics["auc@30"] == metrics["auc@3"] == 100.0


def test_camera_convention_ignores_world_frame_and_scale():
    """E_j E_i^-1 does not change when the world is moved, rotated and scaled."""
    cameras = _cameras(5)
    world = np.eye(4)
    world[:3, :3] = Rotation.from_euler("xyz", [30, -50, 10], degrees=True).as_matrix()
    world[:3, 3] = [4.0, -1.0, 2.5]
    moved = cameras @ np.linalg.inv(world)  # camera-from-world' = camera-from-world . world-from-world'
    moved[:, :, 3] *= 3.0  # a global scale scales every translation
    rra, rta = relative_pose_errors(moved, cameras)
    assert np.abs(rra).max() < 1e-9 and np.abs(rta).max() < 1e-9


def test_known_rotation_offset_gives_known_rra():
    """Rotating camera 1 by 7 degrees (about its own axis) leaves every other pair exact: RRA 7 on its pairs."""
    cameras = _cameras(4)
    offset = Rotation.from_euler("y", 7, degrees=True).as_matrix()
    moved = cameras.copy()
    moved[1, :, :] = offset @ cameras[1]  # rotates the camera frame: R and t both
    rra, rta = relative_pose_errors(moved, cameras)
    pairs = list(zip(*np.triu_indices(4, k=1), strict=True))
    for (i, j), rotation_error, translation_error in zip(pairs, rra, rta, strict=True):
        expected = 7.0 if 1 in (i, j) else 0.0
        assert rotation_error == pytest.approx(expected, abs=1e-6)
        if expected == 0.0:
            assert translation_error == pytest.approx(0.0, abs=1e-4)


def test_translation_angle_is_folded():
    """A relative translation pointing the opposite way is 0 degrees (direction sign ambiguity), 90 stays 90."""
    cameras = np.tile(np.eye(4)[:3], (2, 1, 1))
    cameras[1, :, 3] = [1.0, 0.0, 0.0]
    flipped = cameras.copy()
    flipped[1, :, 3] = [-1.0, 0.0, 0.0]
    _, rta = relative_pose_errors(flipped, cameras)
    assert rta[0] == pytest.approx(0.0, abs=1e-9)
    sideways = cameras.copy()
    sideways[1, :, 3] = [0.0, 1.0, 0.0]
    _, rta = relative_pose_errors(sideways, cameras)
    assert rta[0] == pytest.approx(90.0)


def test_auc_follows_integer_histogram():
    """Upstream's definition by hand: errors 0.5, 2.5, 10, 40 at T=3: bins [0,1), [1,2), [2,3] hold 1, 0, 1 of
    4 pairs: cumulative 0.25, 0.25, 0.5 -> mean 1/3. At T=30 the 40-degree pair never counts."""
    errors = np.array([0.5, 2.5, 10.0, 40.0])
    assert pose_auc(errors, np.zeros(4), 3) == pytest.approx(100 / 3)
    expected_30 = np.mean([0.25] * 2 + [0.5] * 8 + [0.75] * 20) * 100
    assert pose_auc(np.zeros(4), errors, 30) == pytest.approx(expected_30)
    assert pose_auc(np.full(3, 3.0), np.zeros(3), 3) == pytest.approx(100 / 3)  # the last bin is closed


def test_depth_scaled_is_exact_after_median_alignment():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 5, size=(2, 20, 30))
    metrics = depth_metrics(depth * 0.37, depth)
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-12) and metrics["delta_1.25"] == 1.0
    assert metrics["scale"] == pytest.approx(1 / 0.37)
    raw = depth_metrics(depth * 0.37, depth, align="none")
    assert raw["abs_rel"] == pytest.approx(0.63) and raw["delta_1.25"] == 0.0


def test_depth_known_error_and_mask():
    ref = np.full((4, 4), 2.0)
    pred = ref.copy()
    pred[0, 0] = 3.0  # 50 % off, ratio 1.5 > 1.25; the median ratio stays 1
    metrics = depth_metrics(pred, ref)
    assert metrics["abs_rel"] == pytest.approx(0.5 / 16) and metrics["delta_1.25"] == pytest.approx(15 / 16)
    ref[0, 0] = 0.0  # no reference there: not counted
    assert depth_metrics(pred, ref)["abs_rel"] == 0.0 and depth_metrics(pred, ref)["pixels"] == 15


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(100, 3))
    rotation = Rotation.from_euler("zyx", [20, 45, -10], degrees=True).as_matrix()
    target = 2.5 * source @ rotation.T + np.array([1.0, -2.0, 0.5])
    scale, found, translation = umeyama(source, target)
    assert scale == pytest.approx(2.5) and np.allclose(found, rotation) and np.allclose(translation, [1, -2, 0.5])


def _plane_grid(size: int = 40) -> np.ndarray:
    v, u = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    return np.stack([u, v, np.zeros_like(u)], axis=-1)  # z = 0 plane, spacing 1/39


def test_point_metrics_similarity_copy_is_exact():
    grid = _plane_grid()
    grid[..., 2] = 0.3 * np.sin(3 * grid[..., 0])  # not flat: normals vary
    rotation = Rotation.from_euler("x", 30, degrees=True).as_matrix()
    moved = 0.5 * grid @ rotation.T + 1.0
    metrics = point_metrics(moved, grid)
    assert metrics["accuracy"] < 1e-9 and metrics["completion"] < 1e-9
    assert metrics["normal_consistency"] == pytest.approx(1.0)


def test_shifted_point_cloud_gives_known_accuracy_and_completion():
    """Without alignment, a plane shifted 0.1 along its normal is 0.1 from the reference everywhere."""
    grid = _plane_grid()
    shifted = grid + np.array([0.0, 0.0, 0.1])
    metrics = point_metrics(shifted, grid, align=False)
    assert metrics["accuracy"] == pytest.approx(0.1) and metrics["completion"] == pytest.approx(0.1)
    assert metrics["extent"] == pytest.approx(np.median(np.linalg.norm(grid.reshape(-1, 3) - [0.5, 0.5, 0.0], axis=-1)))
    assert metrics["normal_consistency"] == pytest.approx(1.0)
    assert point_metrics(shifted, grid)["accuracy"] < 1e-9  # alignment removes a pure shift


def test_point_metrics_partial_prediction_hurts_completion_only():
    """Half of the prediction missing: accuracy stays 0, completion grows (reference points far from it)."""
    grid = _plane_grid()
    valid = np.ones(grid.shape[:2], bool)
    pred = grid.copy()
    pred[:, 20:] = pred[:, :1]  # the right half collapses onto the left edge column
    metrics = point_metrics(pred, grid, valid, align=False)
    assert metrics["accuracy"] < metrics["completion"]
