"""Ground-truth readers for local copies of CO3Dv2, DTU and 7-Scenes (nothing is downloaded).

Every reader returns :class:`GroundTruthSequence` objects: frames in order, each with its image, its
camera-from-world extrinsic ``[3, 4]`` in the OpenCV convention (VGGT's output convention), and where the
dataset has them its pixel intrinsics and a depth-map reader. :func:`preprocess_depth` applies to a depth
map (and intrinsics) the geometry the image loader applies to its image, so that ground truth and
prediction line up pixel for pixel.

Layouts (detected by :func:`detect_dataset`):

* **CO3Dv2**, annotations as VGGT's ``evaluation/preprocess_co3d.py`` writes them: gzip JSON files
  ``<category>_test.jgz`` / ``<category>_train.jgz`` mapping each sequence name to its frames
  ``{"filepath", "R", "T", "focal_length", "principal_point"}`` (PyTorch3D convention, NDC intrinsics),
  ``filepath`` relative to the CO3Dv2 root. The annotation files sit in the root itself or in
  ``<root>/annotations``. Depth, where present: ``<category>/<sequence>/depths/<frame>.jpg.geometric.png``
  (CO3Dv2's float16 bits in a 16-bit PNG), scaled by a frame's ``depth_scale_adjustment`` when the
  annotation has it.
* **7-Scenes**: ``<scene>/seq-XX/frame-NNNNNN.color.png`` with ``.pose.txt`` (4x4 camera-to-world) and
  ``.depth.png`` (millimetres, 0 and 65535 invalid); the dataset's nominal intrinsics (585 px focal length,
  principal point (320, 240)).
* **DTU** as the MVSNet test set lays it out (the form DUSt3R / VGGT evaluate): ``<scan>/images/*.jpg`` and
  ``<scan>/cams/<stem>_cam.txt`` (``extrinsic`` 4x4 camera-from-world, ``intrinsic`` 3x3 in pixels); depth
  from ``<scan>/depths/<stem>.pfm`` or ``.npy`` where present.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvggt_export.errors import QVGGTError

logger = logging.getLogger(__name__)

DATASETS = ("co3d", "7scenes", "dtu")
SEVEN_SCENES_INTRINSIC = np.array([[585.0, 0.0, 320.0], [0.0, 585.0, 240.0], [0.0, 0.0, 1.0]])
NO_GROUND_TRUTH = ("{path} has no ground truth this tool can read (CO3Dv2 *.jgz annotations, 7-Scenes "
                   "*.pose.txt, DTU cams/*_cam.txt); compare the quantized model with the float model "
                   "instead: qvggt-export eval --fidelity --data {path} OUT_DIR")


@dataclass(frozen=True)
class GroundTruthFrame:
    """One frame: its image, camera-from-world extrinsic [3, 4] (OpenCV), pixel intrinsic [3, 3] of the
    original image (or ``None``) and a depth reader (metres or the dataset's unit; ``None``: no depth)."""

    image: Path
    extrinsic: np.ndarray
    intrinsic: np.ndarray | None = None
    depth: Callable[[], np.ndarray] | None = None


@dataclass(frozen=True)
class GroundTruthSequence:
    name: str
    dataset: str
    frames: tuple[GroundTruthFrame, ...]


# ------------------------------------------------------------------------------------------------ detection


def _co3d_annotation_files(root: Path, split: str) -> list[Path]:
    for folder in (root, root / "annotations"):
        files = sorted(folder.glob(f"*_{split}.jgz"))
        if files:
            return files
    return []


def detect_dataset(path: str | Path) -> str:
    """``"co3d"``, ``"7scenes"`` or ``"dtu"``; a :class:`QVGGTError` suggesting ``--fidelity`` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise QVGGTError(f"dataset folder not found: {path}")
    if _co3d_annotation_files(path, "test") or _co3d_annotation_files(path, "train"):
        return "co3d"
    if next(path.glob("**/*.pose.txt"), None) is not None:
        return "7scenes"
    if next(path.glob("**/cams/*_cam.txt"), None) is not None:
        return "dtu"
    raise QVGGTError(NO_GROUND_TRUTH.format(path=path))


def load_ground_truth(path: str | Path, dataset: str = "auto", split: str = "test") -> list[GroundTruthSequence]:
    """Every sequence of a local dataset copy, with its ground truth (see the module notes for layouts).

    Raises:
        QVGGTError: no readable ground truth (the message suggests ``--fidelity``), a malformed file (named).
    """
    path = Path(path)
    dataset = detect_dataset(path) if dataset == "auto" else dataset
    if dataset not in DATASETS:
        raise QVGGTError(f"dataset must be one of {DATASETS} or auto, got {dataset!r}")
    reader = {"co3d": lambda: _co3d(path, split), "7scenes": lambda: _seven_scenes(path), "dtu": lambda: _dtu(path)}
    sequences = [s for s in reader[dataset]() if s.frames]
    if not sequences:
        raise QVGGTError(NO_GROUND_TRUTH.format(path=path))
    return sequences


# ------------------------------------------------------------------------------------------------ CO3Dv2


def pytorch3d_to_opencv(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """A PyTorch3D camera (``X_cam = X_world R + T``, +X left, +Y up) -> OpenCV camera-from-world [3, 4]."""
    rotation = np.array(rotation, dtype=np.float64).copy()
    translation = np.array(translation, dtype=np.float64).copy()
    rotation[:, :2] *= -1.0  # flip x and y axes of the camera
    translation[:2] *= -1.0
    return np.concatenate([rotation.T, translation[:, None]], axis=1)  # row-vector R -> column-vector R^T


def co3d_intrinsic(focal_ndc: list[float], principal_ndc: list[float], width: int, height: int) -> np.ndarray:
    """CO3Dv2's NDC (isotropic, PyTorch3D) focal length and principal point -> pixel intrinsic [3, 3]."""
    half = min(width, height) / 2.0
    fx, fy = focal_ndc[0] * half, focal_ndc[1] * half
    cx, cy = width / 2.0 - principal_ndc[0] * half, height / 2.0 - principal_ndc[1] * half
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def read_co3d_depth(path: Path, scale: float = 1.0) -> np.ndarray:
    """A CO3Dv2 depth PNG: float16 bit patterns stored as 16-bit integers."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            raw = np.array(image, dtype=np.uint16)
    except OSError as exc:
        raise QVGGTError(f"cannot read depth map {path}: {exc}") from exc
    return raw.view(np.float16).astype(np.float32) * scale


def _co3d(root: Path, split: str) -> list[GroundTruthSequence]:
    files = _co3d_annotation_files(root, split)
    if not files:
        other = "train" if split == "test" else "test"
        files = _co3d_annotation_files(root, other)
        if files:
            logger.warning("no CO3Dv2 %s annotations under %s; using the %s split", split, root, other)
    sequences = []
    for file in files:
        try:
            with gzip.open(file, "rt") as handle:
                annotation = json.load(handle)
        except (OSError, json.JSONDecodeError, EOFError) as exc:
            raise QVGGTError(f"cannot read CO3Dv2 annotations {file}: {exc}") from exc
        if not isinstance(annotation, dict):
            raise QVGGTError(f"CO3Dv2 annotations {file}: expected {{sequence: [frames]}}, got "
                             f"{type(annotation).__name__}")
        for name, frames in annotation.items():
            out = []
            for index, data in enumerate(frames):
                try:
                    image = root / data["filepath"]
                    extrinsic = pytorch3d_to_opencv(data["R"], data["T"])
                    focal, principal = data.get("focal_length"), data.get("principal_point")
                except (KeyError, TypeError, ValueError) as exc:
                    raise QVGGTError(f"CO3Dv2 annotations {file}, sequence {name}, frame {index}: missing or "
                                     f"malformed field ({exc}); expected filepath, R, T") from exc
                if not np.isfinite(extrinsic).all() or np.abs(extrinsic[:, 3]).sum() > 1e5:
                    continue  # upstream drops sequences with absurd translations; we drop the frame
                depth_path = image.parent.parent / "depths" / f"{image.name}.geometric.png"
                depth = None
                if depth_path.is_file():
                    scale = float(data.get("depth_scale_adjustment", 1.0))
                    depth = functools.partial(read_co3d_depth, depth_path, scale)
                intrinsic = None
                if focal is not None and principal is not None and image.is_file():
                    from PIL import Image

                    with Image.open(image) as im:
                        width, height = im.size
                    intrinsic = co3d_intrinsic(focal, principal, width, height)
                out.append(GroundTruthFrame(image, extrinsic, intrinsic, depth))
            sequences.append(GroundTruthSequence(name, "co3d", tuple(out)))
    return sequences


# ------------------------------------------------------------------------------------------------ 7-Scenes


def _read_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        matrix = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise QVGGTError(f"cannot read matrix file {path}: {exc}") from exc
    if matrix.shape != shape:
        raise QVGGTError(f"{path}: expected a {shape[0]}x{shape[1]} matrix, found shape {matrix.shape}")
    return matrix


def read_millimetre_png(path: Path) -> np.ndarray:
    """A 16-bit depth PNG in millimetres -> metres (0 and 65535 invalid -> 0)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            raw = np.array(image, dtype=np.float64)
    except OSError as exc:
        raise QVGGTError(f"cannot read depth map {path}: {exc}") from exc
    raw[raw >= 65535] = 0.0
    return (raw / 1000.0).astype(np.float32)


def _seven_scenes(root: Path) -> list[GroundTruthSequence]:
    by_folder: dict[Path, list[Path]] = {}
    for pose in sorted(root.glob("**/*.pose.txt")):
        by_folder.setdefault(pose.parent, []).append(pose)
    sequences = []
    for folder, poses in sorted(by_folder.items()):
        frames = []
        for pose in poses:
            stem = pose.name[: -len(".pose.txt")]
            image = folder / f"{stem}.color.png"
            if not image.is_file():
                continue
            camera_to_world = _read_matrix(pose, (4, 4))
            if not np.isfinite(camera_to_world).all():
                continue  # 7-Scenes marks a few lost frames with inf
            extrinsic = np.linalg.inv(camera_to_world)[:3]
            depth_path = folder / f"{stem}.depth.png"
            depth = functools.partial(read_millimetre_png, depth_path) if depth_path.is_file() else None
            frames.append(GroundTruthFrame(image, extrinsic, SEVEN_SCENES_INTRINSIC.copy(), depth))
        name = folder.relative_to(root).as_posix() if folder != root else root.name
        sequences.append(GroundTruthSequence(name, "7scenes", tuple(frames)))
    return sequences


# ------------------------------------------------------------------------------------------------ DTU


def read_pfm(path: Path) -> np.ndarray:
    """A single-channel PFM image (the format of DTU / MVSNet depth maps), top row first."""
    try:
        with open(path, "rb") as handle:
            header = handle.readline().strip()
            if header != b"Pf":
                raise QVGGTError(f"{path}: not a single-channel PFM file (header {header!r})")
            width, height = map(int, handle.readline().split())
            scale = float(handle.readline())
            data = np.fromfile(handle, dtype="<f4" if scale < 0 else ">f4", count=width * height)
    except (OSError, ValueError) as exc:
        raise QVGGTError(f"cannot read PFM depth map {path}: {exc}") from exc
    if data.size != width * height:
        raise QVGGTError(f"{path}: truncated PFM ({data.size} of {width * height} values)")
    return np.flipud(data.reshape(height, width)).astype(np.float32)  # PFM stores the bottom row first


def read_mvsnet_cam(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An MVSNet ``*_cam.txt``: (extrinsic [3, 4] camera-from-world, intrinsic [3, 3] in pixels)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise QVGGTError(f"cannot read camera file {path}: {exc}") from exc
    blocks = {}
    for key in ("extrinsic", "intrinsic"):
        match = re.search(rf"{key}\s+((?:[-+0-9.eE]+\s+){{{16 if key == 'extrinsic' else 9}}})", text + "\n")
        if match is None:
            raise QVGGTError(f"{path}: no '{key}' block of {16 if key == 'extrinsic' else 9} numbers")
        blocks[key] = np.array(match.group(1).split(), dtype=np.float64)
    return blocks["extrinsic"].reshape(4, 4)[:3], blocks["intrinsic"].reshape(3, 3)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise QVGGTError(f"cannot read depth map {path}: {exc}") from exc


def _dtu(root: Path) -> list[GroundTruthSequence]:
    sequences = []
    for cams in sorted(root.glob("**/cams")):
        scan = cams.parent
        frames = []
        for cam in sorted(cams.glob("*_cam.txt")):
            stem = cam.name[: -len("_cam.txt")]
            image = next((p for ext in (".jpg", ".png") if (p := scan / "images" / f"{stem}{ext}").is_file()), None)
            if image is None:
                continue
            extrinsic, intrinsic = read_mvsnet_cam(cam)
            depth = None
            for candidate in (scan / "depths" / f"{stem}.pfm", scan / "depths" / f"{stem}.npy"):
                if candidate.is_file():
                    depth = functools.partial(read_pfm if candidate.suffix == ".pfm" else _read_npy, candidate)
                    break
            frames.append(GroundTruthFrame(image, extrinsic, intrinsic, depth))
        name = scan.relative_to(root).as_posix() if scan != root else root.name
        sequences.append(GroundTruthSequence(name, "dtu", tuple(frames)))
    return sequences


# ------------------------------------------------------------------------------------------------ geometry


def preprocess_depth(depth: np.ndarray, intrinsic: np.ndarray | None, image_size: tuple[int, int],
                     target_size: int, mode: str, patch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A depth map (and the image's pixel intrinsic) through the image loader's geometry
    (:func:`~qvggt_export.model.preprocess.preprocess_image`): resize (nearest, so no depth is invented
    across edges), then the centre crop or the padding; padded pixels get depth 0 (invalid).

    Args:
        depth: [h, w] (resized to the image's size first when it differs, as 7-Scenes / DTU depths may).
        image_size: the original image's ``(width, height)``.
    """
    from PIL import Image

    from qvggt_export.model.preprocess import resized_size

    width, height = image_size
    new_width, new_height = resized_size(width, height, target_size, mode, patch_size)
    resized = np.asarray(Image.fromarray(np.asarray(depth, dtype=np.float32), mode="F")
                         .resize((new_width, new_height), Image.Resampling.NEAREST))
    out_intrinsic = None
    if intrinsic is not None:
        out_intrinsic = np.array(intrinsic, dtype=np.float64).copy()
        out_intrinsic[0] *= new_width / width
        out_intrinsic[1] *= new_height / height
    if mode == "crop" and new_height > target_size:
        top = (new_height - target_size) // 2
        resized = resized[top:top + target_size]
        if out_intrinsic is not None:
            out_intrinsic[1, 2] -= top
    if mode == "pad":
        pad_h, pad_w = target_size - resized.shape[0], target_size - resized.shape[1]
        if pad_h > 0 or pad_w > 0:
            resized = np.pad(resized, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
            if out_intrinsic is not None:
                out_intrinsic[0, 2] += pad_w // 2
                out_intrinsic[1, 2] += pad_h // 2
    return resized.astype(np.float32), out_intrinsic


def unproject_depth(depth: np.ndarray, extrinsic: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """Depth [H, W] -> world points [H, W, 3] (pixel centres at integer coordinates, as VGGT's utilities)."""
    height, width = depth.shape
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1) * depth[..., None]
    camera = pixels @ np.linalg.inv(intrinsic).T
    rotation, translation = extrinsic[:3, :3], extrinsic[:3, 3]
    return (camera - translation) @ rotation  # X_world = R^T (X_cam - t)
