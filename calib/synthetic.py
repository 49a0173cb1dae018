"""Generated pseudo multi-view sequences: zero-setup calibration data for VGGT.

VGGT consumes ``S`` views of one scene. Calibration only needs activations that look like those of
real multi-view input, so instead of downloading a dataset we synthesise sequences from the sample
photos that ship *inside* the scikit-image wheel:

* the scene is a textured plane (the photo) and, optionally, a nearer textured card (a second photo)
  that occludes part of it, so frames show parallax between two depths;
* a pinhole camera moves on a smooth random trajectory (a walk with partial re-centring on the scene
  plus a slow pan); frame 0 is the reference view with the identity pose;
* each view of a plane ``n^T X = d`` (reference-camera coordinates) is the homography
  ``H_k = K (R_k + t_k n^T / d) K^-1`` from frame-0 pixels to frame-k pixels, computed in float64 and
  rendered with :func:`torch.nn.functional.grid_sample`;
* every frame gets mild photometric jitter (gain, offset, gamma, white balance) and sensor noise.

Everything derives from ``config.seed`` through :class:`numpy.random.SeedSequence` streams keyed by the
sequence index, so sequence ``i`` is bit-identical whatever ``num_sequences`` is, and disabling the
jitter, the noise or the occluder leaves the camera motion unchanged.

Conventions: pixel ``(row, col)`` has its centre at ``(x, y) = (col, row)``; cameras follow OpenCV
(x right, y down, z forward); extrinsics are world-to-camera with the world frame = frame-0 camera.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qvggt_export.errors import QVGGTError

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticSequence",
    "SyntheticSequenceConfig",
    "available_source_images",
    "generate_sequence",
    "generate_sequences",
    "generate_sequences_with_metadata",
    "iter_sequences",
    "load_source_image",
]

# VGGT's patch embedder is a ViT with 14-pixel patches; its inputs must tile exactly.
PATCH_SIZE = 14

# Photos bundled in the scikit-image wheel (``skimage/data``), by file stem. Loaders such as
# ``skimage.data.eagle()`` would download through pooch, so we read these files directly and never
# call a loader. Colour photos of natural scenes make the backgrounds (VGGT sees colour photos).
_COLOR_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
}
# Grayscale photos and surface textures (converted to RGB) only texture the occluding card by
# default: a fully grey frame would be an unusual VGGT input, a grey object in a colour scene is not.
_GRAY_PHOTOS: dict[str, str] = {
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "camera": "camera.png",
    "coins": "coins.png",
}
_CATALOGUE: dict[str, str] = {**_COLOR_PHOTOS, **_GRAY_PHOTOS}

# Scene and camera ranges. They are fixed (not config fields) because the validity of the planar
# model depends on them jointly: with the bounds below every corner ray of every view hits both
# planes in front of the camera (worst case ~82 degrees between ray and plane normal).
_FOV_DEG = (45.0, 65.0)  # horizontal field of view of the larger image side
_PLANE_TILT_DEG = 20.0  # background plane normal vs. the reference optical axis
_CARD_TILT_DEG = 10.0
_CARD_DISTANCE = (0.45, 0.75)  # card plane distance, relative to the background plane's (= 1)
_CARD_SIZE = (0.2, 0.4)  # card extent in the reference view, fraction of the image side
_BACKGROUND_ZOOM = (0.55, 0.85)  # reference crop side / largest crop of the output aspect
_CARD_ZOOM = (0.4, 0.8)
_MAX_POSE_TRIES = 64
_DEPTH_RATIO = (0.2, 5.0)  # allowed z_0 / z_k at view corners: rejects grazing, smeared views

# Bounds validated on the config: translation stays below the nearest card distance, so the camera
# never crosses a plane; the rotation bound keeps rays away from grazing incidence.
_MAX_TRANSLATION = 0.3
_MAX_ROTATION_DEG = 20.0

# Independent RNG streams per sequence, so switching one effect off leaves the others unchanged.
_STREAM_GEOMETRY, _STREAM_OCCLUDER, _STREAM_PHOTOMETRIC, _STREAM_NOISE = range(4)
_KEY_SEQUENCE, _KEY_SOURCE_ORDER = 0, 1


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise QVGGTError(f"SyntheticSequenceConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise QVGGTError(f"SyntheticSequenceConfig.{name} must be >= {minimum}, got {value}")


def _require_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise QVGGTError(f"SyntheticSequenceConfig.{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise QVGGTError(f"SyntheticSequenceConfig.{name} must be in [{low}, {high}], got {value}")


def _require_image_side(name: str, value: object) -> None:
    _require_int(name, value, 1)
    if value < PATCH_SIZE or value % PATCH_SIZE:
        below = max(PATCH_SIZE, value // PATCH_SIZE * PATCH_SIZE)
        raise QVGGTError(
            f"SyntheticSequenceConfig.{name} must be a positive multiple of {PATCH_SIZE} (VGGT's patch size), "
            f"got {value}; nearest valid values: {below} or {below + PATCH_SIZE}"
        )


@dataclass(frozen=True)
class SyntheticSequenceConfig:
    """How to generate pseudo multi-view calibration sequences.

    Attributes:
        num_sequences: Number of sequences (scenes).
        frames: Views per sequence (``S``); frame 0 is the reference view.
        height: Image height in pixels, a multiple of 14.
        width: Image width in pixels, a multiple of 14.
        seed: Root seed; sequence ``i`` depends only on ``(seed, i)`` and the other fields.
        max_rotation_deg: Largest camera rotation of any frame relative to frame 0, in degrees
            (at most 20).
        max_translation: Largest camera displacement from frame 0, as a fraction of the distance
            from the reference camera to the background plane (at most 0.3).
        photometric_jitter: Strength of the per-frame gain/offset/gamma/white-balance jitter; 0
            disables it (at most 0.5).
        noise_std: Standard deviation of additive Gaussian pixel noise; 0 disables it (at most 0.1).
        occluder: Add a nearer textured card that occludes part of the background, giving parallax.
        sources: Restrict the photos used (names from :func:`available_source_images`); ``None``
            uses the colour photos as backgrounds and all bundled photos for the cards.
    """

    num_sequences: int = 8
    frames: int = 4
    height: int = 518
    width: int = 518
    seed: int = 0
    max_rotation_deg: float = 8.0
    max_translation: float = 0.15
    photometric_jitter: float = 0.1
    noise_std: float = 0.01
    occluder: bool = True
    sources: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        _require_int("num_sequences", self.num_sequences, 1)
        _require_int("frames", self.frames, 1)
        _require_image_side("height", self.height)
        _require_image_side("width", self.width)
        _require_int("seed", self.seed, 0)  # SeedSequence accepts only non-negative entropy
        _require_float("max_rotation_deg", self.max_rotation_deg, 0.0, _MAX_ROTATION_DEG)
        _require_float("max_translation", self.max_translation, 0.0, _MAX_TRANSLATION)
        _require_float("photometric_jitter", self.photometric_jitter, 0.0, 0.5)
        _require_float("noise_std", self.noise_std, 0.0, 0.1)
        if not isinstance(self.occluder, bool):
            raise QVGGTError(f"SyntheticSequenceConfig.occluder must be a bool, got {self.occluder!r}")
        if self.sources is not None:
            if isinstance(self.sources, str) or not isinstance(self.sources, Sequence):
                raise QVGGTError(
                    f"SyntheticSequenceConfig.sources must be a sequence of image names, got {self.sources!r}"
                )
            names = tuple(self.sources)
            unknown = [name for name in names if name not in _CATALOGUE]
            if unknown or not names or len(set(names)) != len(names):
                raise QVGGTError(
                    "SyntheticSequenceConfig.sources must be distinct names from "
                    f"{sorted(_CATALOGUE)}, got {self.sources!r}"
                )
            # Normalise lists to a tuple so the frozen config stays hashable.
            object.__setattr__(self, "sources", names)

    @classmethod
    def square(cls, image_size: int, **overrides: object) -> SyntheticSequenceConfig:
        """Config with ``image_size`` x ``image_size`` frames (the usual VGGT input shape)."""
        return cls(height=image_size, width=image_size, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class SyntheticSequence:
    """One generated sequence and the geometry that produced it.

    Attributes:
        images: ``[S, 3, H, W]`` float32 in ``[0, 1]``.
        source: Name of the background photo.
        homographies: ``[S, 3, 3]`` float64; ``homographies[k]`` maps frame-0 pixel coordinates of
            background-plane points to frame-k pixel coordinates (``homographies[0]`` is identity).
        seed: The config's root seed.
        index: Position of this sequence in the stream; ``(seed, index)`` reproduces it.
        intrinsics: ``[3, 3]`` float64 pinhole matrix shared by all frames.
        extrinsics: ``[S, 3, 4]`` float64 world-to-camera ``[R | t]``, world = frame-0 camera.
        plane: ``[4]`` float64 ``(n_x, n_y, n_z, d)`` of the background plane ``n^T X = d``.
        source_transform: ``[3, 3]`` float64 affine map from frame-0 pixels to background-photo pixels
            (crop, zoom and mirror of the original photo).
        occluder_source: Name of the card's photo, or ``None`` without an occluder.
        occluder_homographies: ``[S, 3, 3]`` float64 homographies of the card plane, or ``None``.
        occluder_box: Card extent ``(x0, y0, x1, y1)`` in frame-0 pixel coordinates, or ``None``.
    """

    images: torch.Tensor
    source: str
    homographies: np.ndarray
    seed: int
    index: int
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    plane: np.ndarray
    source_transform: np.ndarray
    occluder_source: str | None = None
    occluder_homographies: np.ndarray | None = None
    occluder_box: tuple[float, float, float, float] | None = None

    def relative_homography(self, src: int, dst: int) -> np.ndarray:
        """Background-plane homography from frame ``src`` pixels to frame ``dst`` pixels (float64)."""
        relative = self.homographies[dst] @ np.linalg.inv(self.homographies[src])
        return relative / relative[2, 2]


# --------------------------------------------------------------------------------------------------
# Source photos
# --------------------------------------------------------------------------------------------------


def _bundled_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def available_source_images() -> list[str]:
    """Names of the bundled scikit-image photos this module can use (no download ever happens)."""
    data_dir = _bundled_dir()
    return [name for name, filename in _CATALOGUE.items() if (data_dir / filename).is_file()]


@lru_cache(maxsize=len(_CATALOGUE))
def _read_bundled(name: str) -> np.ndarray:
    """Decode one bundled photo to a read-only ``[H, W, 3]`` uint8 array (cached: decoding is slow)."""
    if name not in _CATALOGUE:
        raise QVGGTError(f"unknown source image {name!r}; expected one of {sorted(_CATALOGUE)}")
    path = _bundled_dir() / _CATALOGUE[name]
    if not path.is_file():
        # Newer scikit-image releases may move photos to the pooch download registry; we never fetch.
        raise QVGGTError(
            f"source image {name!r} is not bundled with this scikit-image install (looked for {path}); "
            f"use one of {available_source_images()}"
        )
    from skimage.io import imread  # slow import (~0.5 s), only needed when decoding

    pixels = np.asarray(imread(path))
    if pixels.dtype != np.uint8:
        raise QVGGTError(f"bundled image {path} has dtype {pixels.dtype}, expected uint8")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels = np.ascontiguousarray(pixels[:, :, :3])  # drop alpha where present
    pixels.setflags(write=False)
    return pixels


def load_source_image(name: str) -> torch.Tensor:
    """Load a bundled photo as ``[3, H, W]`` float32 RGB in ``[0, 1]`` (grayscale replicated to RGB).

    Args:
        name: One of :func:`available_source_images`.

    Returns:
        A new tensor (callers may modify it).

    Raises:
        QVGGTError: If the name is unknown or the photo is not bundled with this scikit-image.
    """
    pixels = _read_bundled(name)
    return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)


# --------------------------------------------------------------------------------------------------
# Geometry (float64 numpy)
# --------------------------------------------------------------------------------------------------


def _rotation(vector: np.ndarray) -> np.ndarray:
    """Rodrigues: rotation matrix of an axis-angle vector (radians)."""
    angle = float(np.linalg.norm(vector))
    if angle < 1e-12:
        return np.eye(3)
    x, y, z = vector / angle
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * (cross @ cross)


def _look_at_vector(direction: np.ndarray) -> np.ndarray:
    """Axis-angle of the roll-free rotation that turns the optical axis +z onto ``direction``."""
    direction = direction / np.linalg.norm(direction)
    axis = np.cross([0.0, 0.0, 1.0], direction)
    sin_angle = float(np.linalg.norm(axis))
    if sin_angle < 1e-12:
        return np.zeros(3)
    return axis / sin_angle * math.atan2(sin_angle, float(direction[2]))


def _clip_norm(vector: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector if norm <= bound else vector * (bound / norm)


def _random_unit(rng: np.random.Generator, scale: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    vector = rng.standard_normal(3) * np.asarray(scale)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _tilted_normal(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    axis = _random_unit(rng, (1.0, 1.0, 0.0))  # tilt about an in-image-plane axis
    return _rotation(axis * math.radians(rng.uniform(0.0, max_tilt_deg))) @ np.array([0.0, 0.0, 1.0])


def _plane_homography(k: np.ndarray, rotation: np.ndarray, translation: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """``K (R + t n^T / d) K^-1``: frame-0 pixels of points on ``n^T X = d`` -> pixels of camera ``[R | t]``."""
    normal, distance = plane[:3], plane[3]
    return k @ (rotation + np.outer(translation, normal) / distance) @ np.linalg.inv(k)


def _corner_depth_ratios(
    k: np.ndarray, rotation: np.ndarray, centre: np.ndarray, plane: np.ndarray, height: int, width: int
) -> np.ndarray:
    """``z_0 / z_k`` of the plane points seen through the four corner pixels of camera k (<= 0: invalid).

    For points of one plane, both ``1 / z_k`` and ``z_0 / z_k`` are affine in camera-k pixel coordinates
    (the latter is the third row of ``H^-1 p``), so bounds that hold at the corners hold for every pixel.
    """
    normal, distance = plane[:3], plane[3]
    right, bottom = width - 0.5, height - 0.5  # outer pixel edges
    corners = np.array([[-0.5, -0.5, 1.0], [right, -0.5, 1.0], [-0.5, bottom, 1.0], [right, bottom, 1.0]])
    rays_world = (rotation.T @ np.linalg.inv(k) @ corners.T).T  # camera-k rays with z_k = 1
    facing = rays_world @ normal
    # Ray parameter where X = C + s * ray meets the plane; s is also the depth z_k of the hit.
    with np.errstate(divide="ignore", invalid="ignore"):
        depth_k = (distance - normal @ centre) / facing
    depth_0 = centre[2] + depth_k * rays_world[:, 2]
    ratio = np.where((facing > 1e-9) & (depth_k > 0), depth_0 / depth_k, -1.0)
    return ratio


def _crop_transform(
    rng: np.random.Generator,
    source_hw: tuple[int, int],
    box: tuple[float, float, float, float],
    zoom: tuple[float, float],
) -> np.ndarray:
    """Affine map from the continuous pixel box ``box`` (x0, y0, x1, y1) to a random crop of the photo.

    The crop has the box's aspect ratio, covers a random fraction ``zoom`` of the largest such crop
    and is mirrored horizontally with probability 1/2 (cheap extra diversity from few photos).
    """
    src_h, src_w = source_hw
    x0, y0, x1, y1 = box
    aspect = (x1 - x0) / (y1 - y0)
    largest_w = min(src_w, src_h * aspect)
    crop_w = largest_w * rng.uniform(*zoom)
    crop_h = crop_w / aspect
    # Continuous crop origin in edge coordinates (pixel i spans [i - 0.5, i + 0.5]).
    left = rng.uniform(0.0, src_w - crop_w) - 0.5
    top = rng.uniform(0.0, src_h - crop_h) - 0.5
    scale = crop_w / (x1 - x0)
    mirror = rng.random() < 0.5
    sx = -scale if mirror else scale
    tx = (left + crop_w + scale * x0) if mirror else (left - scale * x0)
    return np.array([[sx, 0.0, tx], [0.0, scale, top - scale * y0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class _Trajectory:
    intrinsics: np.ndarray
    rotations: np.ndarray  # [S, 3, 3] world-to-camera
    centres: np.ndarray  # [S, 3] camera centres in world (= frame-0 camera) coordinates
    plane: np.ndarray  # [4]


def _sample_trajectory(
    config: SyntheticSequenceConfig, rng: np.random.Generator, cards: Sequence[np.ndarray]
) -> _Trajectory:
    """Sample intrinsics, background plane and a smooth camera path; retry poses that view a plane badly."""
    height, width = config.height, config.width
    focal = 0.5 * max(height, width) / math.tan(math.radians(rng.uniform(*_FOV_DEG)) / 2.0)
    intrinsics = np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
    plane = np.append(_tilted_normal(rng, _PLANE_TILT_DEG), 1.0)
    # The scene point on the reference optical axis; a photographer keeps it roughly centred.
    target = np.array([0.0, 0.0, plane[3] / plane[2]])
    max_rotation = math.radians(config.max_rotation_deg)
    steps = np.linspace(0.0, 1.0, config.frames) if config.frames > 1 else np.zeros(1)

    for _ in range(_MAX_POSE_TRIES):
        # Camera centre: a walk towards an end point with a sideways bulge (smooth, starts at 0).
        end = _random_unit(rng, (1.0, 1.0, 0.5)) * config.max_translation * rng.uniform(0.5, 1.0)
        bulge = rng.standard_normal(3) * 0.25 * config.max_translation
        # Orientation: partial re-centring on the target plus a slow pan and a wobble (roll damped).
        recentre = rng.uniform(0.5, 1.0)
        pan = _random_unit(rng, (1.0, 1.0, 0.3)) * max_rotation * rng.uniform(0.0, 0.5)
        wobble = _random_unit(rng, (1.0, 1.0, 0.3)) * max_rotation * rng.uniform(0.0, 0.25)

        rotations, centres = [], []
        for u in steps:
            centre = _clip_norm(u * end + math.sin(math.pi * u) * bulge, config.max_translation)
            turn = recentre * _look_at_vector(target - centre) + u * pan + math.sin(math.pi * u) * wobble
            # Camera-to-world orientation; clipping keeps the stated rotation budget exact.
            orientation = _rotation(_clip_norm(turn, max_rotation))
            rotations.append(orientation.T)
            centres.append(centre)
        ok = True
        for rotation, centre in zip(rotations, centres, strict=True):
            for scene_plane in (plane, *cards):
                ratio = _corner_depth_ratios(intrinsics, rotation, centre, scene_plane, height, width)
                ok &= bool(np.all((ratio > _DEPTH_RATIO[0]) & (ratio < _DEPTH_RATIO[1])))
        if ok:
            return _Trajectory(intrinsics, np.stack(rotations), np.stack(centres), plane)
    raise RuntimeError(  # unreachable with the validated bounds; a bug if it happens
        f"could not sample a valid camera path in {_MAX_POSE_TRIES} tries for {config}"
    )


# --------------------------------------------------------------------------------------------------
# Rendering (float32 torch)
# --------------------------------------------------------------------------------------------------


def _prefilter(photo: torch.Tensor, transform: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Downscale the photo (antialiased) when views would minify it, so bilinear sampling does not alias.

    Returns the photo to sample and ``transform`` rewritten for its pixel coordinates.
    """
    scale = abs(transform[0, 0])  # source pixels per view pixel
    if scale <= 1.0:
        return photo, transform
    src_h, src_w = photo.shape[-2:]
    new_h, new_w = max(2, round(src_h / scale)), max(2, round(src_w / scale))
    small = F.interpolate(photo[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    # Pixel-centre coordinates under an align_corners=False resize: x' = (x + 0.5) * s - 0.5.
    sx, sy = new_w / src_w, new_h / src_h
    rescale = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return small, rescale @ transform


def _project(transforms: np.ndarray, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map every pixel centre of an ``height`` x ``width`` view through each of ``transforms`` ([S, 3, 3]).

    Returns the Cartesian ``x`` and ``y`` coordinates, each ``[S, H, W]`` float64. Written as
    elementwise broadcasts rather than a matmul so results never depend on BLAS blocking or threads.
    """
    m = torch.from_numpy(np.ascontiguousarray(transforms, dtype=np.float64))
    xs = torch.arange(width, dtype=torch.float64).view(1, 1, width)
    ys = torch.arange(height, dtype=torch.float64).view(1, height, 1)

    def row(i: int) -> torch.Tensor:
        return m[:, i, 0].view(-1, 1, 1) * xs + m[:, i, 1].view(-1, 1, 1) * ys + m[:, i, 2].view(-1, 1, 1)

    w = row(2)
    return row(0) / w, row(1) / w


def _sample(photo: torch.Tensor, transforms: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Render ``[S, 3, H, W]`` views; view pixel p shows ``photo`` at ``transforms[s] @ p`` (bilinear)."""
    x, y = _project(transforms, height, width)
    src_h, src_w = photo.shape[-2:]
    # grid_sample with align_corners=False puts -1 / +1 on the outer pixel edges.
    grid = torch.stack([(2.0 * x + 1.0) / src_w - 1.0, (2.0 * y + 1.0) / src_h - 1.0], dim=-1).float()
    batch = photo[None].expand(len(transforms), -1, -1, -1)
    # Reflection keeps plausible texture where strong motion looks past the photo's border.
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _box_coverage(
    transforms: np.ndarray, box: tuple[float, float, float, float], height: int, width: int
) -> torch.Tensor:
    """Soft (one-pixel ramp) coverage ``[S, 1, H, W]`` of ``box``, given view -> reference-frame maps."""
    x, y = _project(transforms, height, width)
    x0, y0, x1, y1 = box
    inside = torch.minimum(torch.minimum(x - x0, x1 - x), torch.minimum(y - y0, y1 - y))
    return (inside + 0.5).clamp_(0.0, 1.0).float().unsqueeze(1)


def _photometric(frames: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Per-frame gamma, contrast about mid-grey, brightness offset and white-balance gains."""
    count = frames.shape[0]
    # Always draw the same numbers, scaled by the strength, so the stream does not depend on it.
    draws = rng.uniform(-1.0, 1.0, size=(count, 6))
    gamma = np.exp(strength * draws[:, 0])
    contrast = 1.0 + strength * draws[:, 1]
    offset = 0.5 * strength * draws[:, 2]
    white = 1.0 + 0.25 * strength * draws[:, 3:6]
    if strength == 0.0:
        return frames

    def per_frame(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values.astype(np.float32)).view(count, -1, 1, 1)

    # In place on the freshly rendered frames: these are the largest tensors in the pipeline.
    out = frames.clamp_(0.0, 1.0).pow_(per_frame(gamma)).sub_(0.5).mul_(per_frame(contrast))
    return out.add_(per_frame(0.5 + offset)).mul_(per_frame(white)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Public generation API
# --------------------------------------------------------------------------------------------------


def _source_pools(config: SyntheticSequenceConfig) -> tuple[list[str], list[str]]:
    available = set(available_source_images())
    if config.sources is not None:
        missing = [name for name in config.sources if name not in available]
        if missing:
            raise QVGGTError(
                f"source images {missing} are not bundled with this scikit-image install; "
                f"available: {sorted(available)}"
            )
        return list(config.sources), list(config.sources)
    backgrounds = [name for name in _COLOR_PHOTOS if name in available]
    if not backgrounds:
        raise QVGGTError(
            "no bundled colour photo found in the scikit-image install "
            f"({_bundled_dir()}); expected some of {sorted(_COLOR_PHOTOS)}"
        )
    return backgrounds, [name for name in _CATALOGUE if name in available]


def _background_for(config: SyntheticSequenceConfig, index: int, pool: list[str]) -> str:
    # Each block of len(pool) consecutive sequences uses every photo once, in a seeded order, so small
    # sets are balanced and sequence i still depends only on (seed, i).
    block, position = divmod(index, len(pool))
    order = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(_KEY_SOURCE_ORDER, block)))
    return pool[int(order.permutation(len(pool))[position])]


def generate_sequence(config: SyntheticSequenceConfig, index: int) -> SyntheticSequence:
    """Generate sequence number ``index`` of the stream described by ``config``.

    Args:
        config: Generation settings.
        index: Sequence position, ``0 <= index``; need not be below ``config.num_sequences``.

    Returns:
        The images with the geometry that produced them.

    Raises:
        QVGGTError: If ``index`` is negative or a requested photo is not bundled.
    """
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise QVGGTError(f"sequence index must be a non-negative integer, got {index!r}")
    height, width = config.height, config.width
    backgrounds, cards = _source_pools(config)
    streams = np.random.SeedSequence(config.seed, spawn_key=(_KEY_SEQUENCE, int(index))).spawn(4)
    rng_geometry, rng_occluder, rng_photometric, rng_noise = (np.random.default_rng(s) for s in streams)

    source = _background_for(config, index, backgrounds)
    photo = load_source_image(source)
    view_box = (-0.5, -0.5, width - 0.5, height - 0.5)  # the whole reference view, edge to edge
    source_transform = _crop_transform(rng_geometry, tuple(photo.shape[-2:]), view_box, _BACKGROUND_ZOOM)

    # The card is drawn (and checked by the pose sampler) even when it is not rendered, so that turning
    # the occluder off leaves the camera path exactly as it was.
    choices = [name for name in cards if name != source] or cards
    card_source = choices[int(rng_occluder.integers(len(choices)))]
    card_plane = np.append(_tilted_normal(rng_occluder, _CARD_TILT_DEG), rng_occluder.uniform(*_CARD_DISTANCE))
    box_w, box_h = (rng_occluder.uniform(*_CARD_SIZE) * width, rng_occluder.uniform(*_CARD_SIZE) * height)
    x0 = rng_occluder.uniform(0.1 * width, 0.9 * width - box_w) - 0.5
    y0 = rng_occluder.uniform(0.1 * height, 0.9 * height - box_h) - 0.5
    card_box = (x0, y0, x0 + box_w, y0 + box_h)

    path = _sample_trajectory(config, rng_geometry, [card_plane])
    translations = -np.einsum("sij,sj->si", path.rotations, path.centres)
    extrinsics = np.concatenate([path.rotations, translations[:, :, None]], axis=2)

    def homographies_of(plane: np.ndarray) -> np.ndarray:
        poses = zip(path.rotations, translations, strict=True)
        stack = np.stack([_plane_homography(path.intrinsics, r, t, plane) for r, t in poses])
        stack /= stack[:, 2:3, 2:3]
        # Frame 0 has the identity pose by construction; K K^-1 only rounds to it, so state it exactly.
        stack[0] = np.eye(3)
        return stack

    homographies = homographies_of(path.plane)
    photo, sample_transform = _prefilter(photo, source_transform)
    # View pixel -> reference pixel (inverse homography) -> photo pixel, composed in float64.
    frames = _sample(photo, sample_transform @ np.linalg.inv(homographies), height, width)

    card_homographies = None
    if config.occluder:
        card_photo = load_source_image(card_source)
        card_transform = _crop_transform(rng_occluder, tuple(card_photo.shape[-2:]), card_box, _CARD_ZOOM)
        card_photo, card_transform = _prefilter(card_photo, card_transform)
        card_homographies = homographies_of(card_plane)
        to_reference = np.linalg.inv(card_homographies)
        coverage = _box_coverage(to_reference, card_box, height, width)
        frames.lerp_(_sample(card_photo, card_transform @ to_reference, height, width), coverage)

    frames = _photometric(frames, rng_photometric, config.photometric_jitter)
    if config.noise_std > 0.0:
        noise = rng_noise.standard_normal(size=frames.shape, dtype=np.float32) * np.float32(config.noise_std)
        frames = (frames + torch.from_numpy(noise)).clamp_(0.0, 1.0)

    card_name = card_source if config.occluder else None
    logger.debug("synthetic sequence %d: %s, card %s, %d frames", index, source, card_name, config.frames)
    return SyntheticSequence(
        images=frames.contiguous(),
        source=source,
        homographies=homographies,
        seed=config.seed,
        index=int(index),
        intrinsics=path.intrinsics,
        extrinsics=extrinsics,
        plane=path.plane,
        source_transform=source_transform,
        occluder_source=card_name,
        occluder_homographies=card_homographies,
        occluder_box=card_box if config.occluder else None,
    )


def generate_sequences_with_metadata(config: SyntheticSequenceConfig) -> list[SyntheticSequence]:
    """Generate all ``config.num_sequences`` sequences with their geometry (see :class:`SyntheticSequence`)."""
    return [generate_sequence(config, index) for index in range(config.num_sequences)]


def iter_sequences(config: SyntheticSequenceConfig) -> Iterator[torch.Tensor]:
    """Lazily yield ``config.num_sequences`` image tensors ``[frames, 3, H, W]``, one at a time.

    Use this for large candidate pools (e.g. NFDS's 400 sequences) to hold one sequence in memory.
    """
    for index in range(config.num_sequences):
        yield generate_sequence(config, index).images


def generate_sequences(config: SyntheticSequenceConfig) -> list[torch.Tensor]:
    """Generate ``config.num_sequences`` tensors ``[frames, 3, H, W]``, float32 in ``[0, 1]``.

    Args:
        config: Generation settings.

    Returns:
        One tensor per sequence; frame 0 of each is the reference view.
    """
    return list(iter_sequences(config))
