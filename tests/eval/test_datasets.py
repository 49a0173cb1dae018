"""Ground-truth readers on tiny CO3Dv2 / 7-Scenes / DTU folders made here."""

from __future__ import annotations

import numpy as np
import pytest

from qvggt_export.errors import QVGGTError
from qvggt_export.eval.datasets import (
    detect_dataset,
    load_ground_truth,
    preprocess_depth,
    pytorch3d_to_opencv,
    read_pfm,
    unproject_depth,
)
from tests.eval.conftest import make_dtu, make_seven_scenes, orbit_cameras


def test_pytorch3d_to_opencv_flips_x_and_y():
    """PyTorch3D X_cam = X_world R + T with +X left, +Y up: the world origin sits at T, i.e. (-Tx, -Ty, Tz) in
    OpenCV camera coordinates."""
    extrinsic = pytorch3d_to_opencv(np.eye(3), [1.0, 2.0, 3.0])
    assert np.allclose(extrinsic[:, 3], [-1.0, -2.0, 3.0])
    point = np.array([0.5, -0.2, 1.0])  # world point -> PyTorch3D camera -> OpenCV axes
    p3d = point @ np.eye(3) + np.array([1.0, 2.0, 3.0])
    assert np.allclose(extrinsic[:, :3] @ point + extrinsic[:, 3], p3d * [-1, -1, 1])


def test_co3d_reader_round_trips_cameras_and_depth(co3d_root):
    assert detect_dataset(co3d_root) == "co3d"
    (sequence,) = load_ground_truth(co3d_root)
    assert sequence.name == "seq_a" and len(sequence.frames) == 4
    for frame, camera in zip(sequence.frames, orbit_cameras(4), strict=True):
        assert frame.image.is_file() and np.allclose(frame.extrinsic, camera)
        assert np.allclose(frame.intrinsic, [[60, 0, 40], [0, 60, 30], [0, 0, 1]])  # NDC 2.0 x min(80, 60) / 2
        assert frame.depth().shape == (60, 80) and np.allclose(frame.depth(), 3.5)


def test_seven_scenes_reader(tmp_path):
    root = make_seven_scenes(tmp_path / "7s")
    assert detect_dataset(root) == "7scenes"
    (sequence,) = load_ground_truth(root)
    assert sequence.name == "chess/seq-01" and len(sequence.frames) == 3
    assert np.allclose(sequence.frames[2].extrinsic, orbit_cameras(3)[2])
    depth = sequence.frames[0].depth()
    assert depth[0, 0] == 0.0 and np.allclose(depth.reshape(-1)[1:], 2.5)


def test_dtu_reader_and_pfm(tmp_path):
    root = make_dtu(tmp_path / "dtu")
    assert detect_dataset(root) == "dtu"
    (sequence,) = load_ground_truth(root)
    assert len(sequence.frames) == 3 and sequence.frames[0].depth is None
    assert np.allclose(sequence.frames[1].extrinsic, orbit_cameras(3)[1], atol=1e-8)
    assert sequence.frames[1].intrinsic[0, 0] == 100.0
    values = np.arange(6, dtype="<f4").reshape(2, 3)
    pfm = tmp_path / "d.pfm"
    pfm.write_bytes(b"Pf\n3 2\n-1.0\n" + np.flipud(values).tobytes())
    assert np.array_equal(read_pfm(pfm), values)


def test_folder_without_ground_truth_suggests_fidelity(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(QVGGTError, match=r"no ground truth.*--fidelity"):
        load_ground_truth(tmp_path / "photos")
    with pytest.raises(QVGGTError, match="not found"):
        detect_dataset(tmp_path / "missing")


def test_malformed_co3d_annotation_names_the_file(tmp_path):
    (tmp_path / "apple_test.jgz").write_bytes(b"not gzip")
    with pytest.raises(QVGGTError, match="apple_test.jgz"):
        load_ground_truth(tmp_path)


def test_preprocess_depth_matches_the_image_geometry():
    """Crop: 80x60 -> width 28, height round(21/14)*14 = 28 (no crop); pad of a portrait image pads width."""
    depth = np.arange(60 * 80, dtype=np.float32).reshape(60, 80)
    intrinsic = np.array([[60.0, 0, 40], [0, 60.0, 30], [0, 0, 1]])
    out, k = preprocess_depth(depth, intrinsic, (80, 60), 28, "crop", 14)
    assert out.shape == (28, 28) and np.isclose(k[0, 0], 60 * 28 / 80) and np.isclose(k[1, 1], 60 * 28 / 60)
    tall = np.ones((80, 40), np.float32)
    out, k = preprocess_depth(tall, np.eye(3), (40, 80), 28, "pad", 14)
    assert out.shape == (28, 28) and (out[:, :7] == 0).all() and (out[:, 7:21] == 1).all()
    assert k[0, 2] == 7.0


def test_unproject_depth_inverts_projection():
    camera = orbit_cameras(3)[2]
    intrinsic = np.array([[50.0, 0, 16], [0, 50.0, 12], [0, 0, 1]])
    points = unproject_depth(np.full((24, 32), 2.0), camera, intrinsic)
    in_camera = points @ camera[:, :3].T + camera[:, 3]
    assert np.allclose(in_camera[..., 2], 2.0)
    pixels = in_camera @ intrinsic.T
    assert np.allclose(pixels[5, 7, :2] / pixels[5, 7, 2], [7, 5])
