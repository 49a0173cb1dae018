"""Tiny dataset folders in the CO3Dv2 / 7-Scenes / DTU layouts, with known cameras and depth."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation


def orbit_cameras(count: int) -> list[np.ndarray]:
    """Camera-from-world [3, 4] (OpenCV) on an arc around the origin, looking at it from 4 units away."""
    cameras = []
    for angle in np.linspace(-20, 20, count):
        rotation = Rotation.from_euler("y", angle, degrees=True).as_matrix()
        cameras.append(np.concatenate([rotation, np.array([[0.0], [0.0], [4.0]])], axis=1))
    return cameras


def _image(path: Path, seed: int, size: tuple[int, int] = (80, 60)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_co3d(root: Path, frames: int = 4, with_depth: bool = True) -> Path:
    """<root>/teddybear/seq_a/images/frameNNNNNN.jpg, <root>/teddybear_test.jgz as VGGT's preprocessing writes."""
    entries = []
    for index, camera in enumerate(orbit_cameras(frames)):
        rel = f"teddybear/seq_a/images/frame{index:06d}.jpg"
        _image(root / rel, index)
        # OpenCV [R | t] -> PyTorch3D (R_p3d, T_p3d): inverse of qvggt_export.eval.datasets.pytorch3d_to_opencv.
        flip = np.diag([-1.0, -1.0, 1.0])
        r_p3d = (flip @ camera[:, :3]).T
        t_p3d = flip @ camera[:, 3]
        entries.append({"filepath": rel, "R": r_p3d.tolist(), "T": t_p3d.tolist(),
                        "focal_length": [2.0, 2.0], "principal_point": [0.0, 0.0]})
        if with_depth:
            depth = np.full((60, 80), 3.5, dtype=np.float16)
            path = root / "teddybear/seq_a/depths" / f"frame{index:06d}.jpg.geometric.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(depth.view(np.uint16)).save(path)
    with gzip.open(root / "teddybear_test.jgz", "wt") as handle:
        json.dump({"seq_a": entries}, handle)
    return root


def make_seven_scenes(root: Path, frames: int = 3) -> Path:
    folder = root / "chess" / "seq-01"
    folder.mkdir(parents=True)
    for index, camera in enumerate(orbit_cameras(frames)):
        stem = folder / f"frame-{index:06d}"
        _image(Path(f"{stem}.color.png"), index, (64, 48))
        se3 = np.eye(4)
        se3[:3] = camera
        np.savetxt(f"{stem}.pose.txt", np.linalg.inv(se3))  # 7-Scenes stores camera-to-world
        depth = np.full((48, 64), 2500, dtype=np.uint16)
        depth[0, 0] = 65535  # invalid
        Image.fromarray(depth).save(f"{stem}.depth.png")
    return root


def make_dtu(root: Path, frames: int = 3) -> Path:
    scan = root / "scan1"
    for index, camera in enumerate(orbit_cameras(frames)):
        _image(scan / "images" / f"{index:08d}.jpg", index)
        se3 = np.eye(4)
        se3[:3] = camera
        intrinsic = np.array([[100.0, 0, 40], [0, 100.0, 30], [0, 0, 1]])
        (scan / "cams").mkdir(parents=True, exist_ok=True)
        text = ("extrinsic\n" + "\n".join(" ".join(f"{v:.9f}" for v in row) for row in se3) + "\n\nintrinsic\n"
                + "\n".join(" ".join(f"{v:.9f}" for v in row) for row in intrinsic) + "\n\n425 2.5\n")
        (scan / "cams" / f"{index:08d}_cam.txt").write_text(text)
    return root


@pytest.fixture
def co3d_root(tmp_path) -> Path:
    return make_co3d(tmp_path / "co3d")
