"""Tests for the generated pseudo multi-view calibration sequences (``qvggt_export.calib.synthetic``)."""

from __future__ import annotations

import dataclasses
import socket
import types
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
import torch.nn.functional as F

from qvggt_export.calib import (
    SyntheticSequence,
    SyntheticSequenceConfig,
    available_source_images,
    generate_sequence,
    generate_sequences,
    generate_sequences_with_metadata,
    iter_sequences,
    load_source_image,
    synthetic,
)
from qvggt_export.errors import QVGGTError

# Geometry-only rendering: no jitter, no noise, no card, so pixel values depend on geometry alone.
CLEAN = {"photometric_jitter": 0.0, "noise_std": 0.0, "occluder": False}


def _sample_at(image: torch.Tensor, xs: np.ndarray, ys: np.ndarray) -> torch.Tensor:
    """Bilinear samples of ``image`` [3, h, w] at pixel-centre coordinates (arrays of equal shape)."""
    h, w = image.shape[-2:]
    grid = np.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], axis=-1).astype(np.float32)
    grid_t = torch.from_numpy(grid).reshape(1, *xs.shape, 2)
    return F.grid_sample(image[None], grid_t, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _warp_by(image: torch.Tensor, dst_to_src: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Render ``image`` into the same-size view where pixel p shows ``image`` at ``dst_to_src @ p``.

    Returns the warped image and a mask of pixels whose source point lies at least one pixel inside
    ``image`` (outside it the content is unknown).
    """
    h, w = image.shape[-2:]
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    mapped = np.einsum("ij,jhw->ihw", dst_to_src, np.stack([xs, ys, np.ones_like(xs)]))
    sx, sy = mapped[0] / mapped[2], mapped[1] / mapped[2]
    valid = (sx >= 1) & (sx <= w - 2) & (sy >= 1) & (sy <= h - 2)
    return _sample_at(image, sx, sy), valid


def _mean_abs(a: torch.Tensor, b: torch.Tensor, mask: np.ndarray) -> float:
    mask_t = torch.from_numpy(mask)
    return float((a - b).abs().mean(dim=0)[mask_t].mean())


def _rotation_angle_deg(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))


# ------------------------------------------------------------------------------------------------
# Shapes, API, determinism
# ------------------------------------------------------------------------------------------------


def test_default_config_gives_vggt_sized_sequences() -> None:
    sequences = generate_sequences(SyntheticSequenceConfig())
    assert len(sequences) == 8
    for images in sequences:
        assert images.shape == (4, 3, 518, 518)
        assert images.dtype == torch.float32
        assert images.is_contiguous()
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        assert float(images.std()) > 0.05  # real picture content, not a flat fill


@pytest.mark.parametrize(("height", "width", "frames"), [(70, 70, 3), (42, 84, 1), (98, 56, 5)])
def test_shapes_and_range_for_small_and_non_square_sizes(height: int, width: int, frames: int) -> None:
    config = SyntheticSequenceConfig(num_sequences=3, frames=frames, height=height, width=width)
    sequences = generate_sequences(config)
    assert [tuple(s.shape) for s in sequences] == [(frames, 3, height, width)] * 3
    stacked = torch.stack(sequences)
    assert stacked.dtype == torch.float32
    assert torch.isfinite(stacked).all()
    assert float(stacked.min()) >= 0.0 and float(stacked.max()) <= 1.0


def test_square_helper_sets_both_sides() -> None:
    config = SyntheticSequenceConfig.square(70, frames=2)
    assert (config.height, config.width, config.frames) == (70, 70, 2)


def test_iter_sequences_is_lazy_and_matches_generate() -> None:
    config = SyntheticSequenceConfig(num_sequences=3, frames=2, height=42, width=42, seed=5)
    stream = iter_sequences(config)
    assert isinstance(stream, types.GeneratorType)
    streamed = list(stream)
    eager = generate_sequences(config)
    assert len(streamed) == 3
    assert all(torch.equal(a, b) for a, b in zip(streamed, eager, strict=True))


def test_same_seed_is_bit_identical_and_different_seed_differs() -> None:
    config = SyntheticSequenceConfig(num_sequences=3, frames=3, height=56, width=56, seed=11)
    first = generate_sequences_with_metadata(config)
    second = generate_sequences_with_metadata(config)
    other = generate_sequences_with_metadata(dataclasses.replace(config, seed=12))
    for a, b, c in zip(first, second, other, strict=True):
        assert torch.equal(a.images, b.images)
        assert np.array_equal(a.homographies, b.homographies)
        assert a.source == b.source and a.occluder_source == b.occluder_source
        assert not torch.equal(a.images, c.images)
        assert not np.allclose(a.homographies[1:], c.homographies[1:])


def test_sequence_i_does_not_depend_on_pool_size() -> None:
    small = generate_sequences(SyntheticSequenceConfig(num_sequences=2, frames=2, height=42, width=42))
    large = generate_sequences(SyntheticSequenceConfig(num_sequences=6, frames=2, height=42, width=42))
    assert all(torch.equal(a, b) for a, b in zip(small, large[:2], strict=True))
    single = generate_sequence(SyntheticSequenceConfig(num_sequences=1, frames=2, height=42, width=42), 4)
    assert torch.equal(single.images, large[4])


def test_each_block_of_sequences_uses_every_background_once() -> None:
    config = SyntheticSequenceConfig(num_sequences=5, frames=1, height=28, width=28, seed=3)
    sources = [s.source for s in generate_sequences_with_metadata(config)]
    backgrounds = [name for name in available_source_images() if name in synthetic._COLOR_PHOTOS]
    assert sorted(sources) == sorted(backgrounds)


def test_restricting_sources_is_honoured() -> None:
    config = SyntheticSequenceConfig(num_sequences=4, frames=1, height=28, width=28, sources=["coffee", "brick"])
    assert config.sources == ("coffee", "brick")  # normalised to a tuple: the config stays hashable
    for sequence in generate_sequences_with_metadata(config):
        assert sequence.source in {"coffee", "brick"}
        assert sequence.occluder_source in {"coffee", "brick"}
        assert sequence.occluder_source != sequence.source  # the card shows a different photo


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


def test_reference_frame_has_identity_pose_and_frames_differ() -> None:
    config = SyntheticSequenceConfig(num_sequences=3, frames=4, height=70, width=70, **CLEAN)
    for sequence in generate_sequences_with_metadata(config):
        assert sequence.homographies.dtype == np.float64 and sequence.homographies.shape == (4, 3, 3)
        assert np.array_equal(sequence.homographies[0], np.eye(3))
        assert np.allclose(sequence.extrinsics[0], np.hstack([np.eye(3), np.zeros((3, 1))]))
        for k in range(1, 4):
            assert not np.allclose(sequence.homographies[k], np.eye(3), atol=1e-3)
            # Geometry alone (no jitter or noise here) makes views visibly different.
            assert float((sequence.images[k] - sequence.images[0]).abs().mean()) > 0.005


def test_camera_motion_respects_budgets_and_homographies_follow_from_poses() -> None:
    config = SyntheticSequenceConfig(
        num_sequences=6, frames=5, height=56, width=84, max_rotation_deg=5.0, max_translation=0.1, **CLEAN
    )
    for sequence in generate_sequences_with_metadata(config):
        k_inv = np.linalg.inv(sequence.intrinsics)
        normal, distance = sequence.plane[:3], sequence.plane[3]
        assert np.isclose(np.linalg.norm(normal), 1.0)
        for k in range(config.frames):
            rotation, translation = sequence.extrinsics[k, :, :3], sequence.extrinsics[k, :, 3]
            assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
            assert _rotation_angle_deg(rotation) <= 5.0 + 1e-6
            assert np.linalg.norm(-rotation.T @ translation) <= 0.1 + 1e-9  # camera centre
            # The plane-induced homography K (R + t n^T / d) K^-1, up to scale.
            expected = sequence.intrinsics @ (rotation + np.outer(translation, normal) / distance) @ k_inv
            assert np.allclose(sequence.homographies[k], expected / expected[2, 2], atol=1e-9)


def _supersampled(photo: torch.Tensor, view_to_photo: np.ndarray, size: int) -> torch.Tensor:
    """Render ``photo`` into a ``size`` x ``size`` view, averaging n x n samples per output pixel.

    An antialiasing method independent of the generator's (which pre-filters with a resize).
    """
    n = max(1, round(abs(view_to_photo[0, 0])) + 1)
    offsets = (np.arange(n) + 0.5) / n - 0.5
    ys, xs = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    sub_x = (xs[:, :, None, None] + offsets[None, None, None, :]).repeat(n, axis=2)
    sub_y = (ys[:, :, None, None] + offsets[None, None, :, None]).repeat(n, axis=3)
    mapped = view_to_photo @ np.stack([sub_x.ravel(), sub_y.ravel(), np.ones(sub_x.size)])
    samples = _sample_at(photo, mapped[0].reshape(size, -1), mapped[1].reshape(size, -1))
    return samples.reshape(3, size, size, n * n).mean(dim=-1)


@pytest.mark.parametrize(("size", "tolerance"), [(518, 0.005), (70, 0.04)])
def test_frame0_is_the_recorded_crop_of_the_source_photo(size: int, tolerance: float) -> None:
    config = SyntheticSequenceConfig(num_sequences=2, frames=1, height=size, width=size, seed=2, **CLEAN)
    everywhere = np.ones((size, size), dtype=bool)
    for sequence in generate_sequences_with_metadata(config):
        photo = load_source_image(sequence.source)
        errors = {}
        for dx, dy in [(0.0, 0.0), (0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5)]:
            shift = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])
            reference = _supersampled(photo, sequence.source_transform @ shift, size)
            errors[(dx, dy)] = _mean_abs(sequence.images[0], reference, everywhere)
        # Observed ~0.001 at 518 (bilinear magnification) and ~0.01-0.03 at 70 (filter shapes differ).
        assert errors[(0.0, 0.0)] < tolerance, errors
        # The recorded transform is aligned to sub-pixel accuracy: half a pixel either way is worse.
        assert min(errors, key=errors.get) == (0.0, 0.0), errors


def test_consecutive_frames_are_related_by_the_recorded_homography() -> None:
    config = SyntheticSequenceConfig(
        num_sequences=3, frames=4, height=112, width=112, seed=7, max_rotation_deg=12.0, max_translation=0.25, **CLEAN
    )
    for sequence in generate_sequences_with_metadata(config):
        for k in range(1, config.frames):
            previous, current = sequence.images[k - 1], sequence.images[k]
            relative = sequence.relative_homography(k - 1, k)
            chained = sequence.homographies[k] @ np.linalg.inv(sequence.homographies[k - 1])
            assert np.allclose(relative, chained / chained[2, 2])
            predicted, valid = _warp_by(previous, np.linalg.inv(relative))
            assert valid.mean() > 0.5  # the views overlap substantially
            error = _mean_abs(predicted, current, valid)
            unwarped = _mean_abs(previous, current, valid)
            # Residual is resampling blur only (observed 0.005-0.014); without the warp it is 0.015-0.13.
            assert error < 0.02, f"sequence {sequence.index} frame {k}: {error:.4f}"
            assert error < 0.5 * unwarped, (error, unwarped)


def test_occluder_card_moves_with_its_own_plane() -> None:
    config = SyntheticSequenceConfig(
        num_sequences=1, frames=3, height=112, width=112, seed=1, max_rotation_deg=6.0, max_translation=0.3,
        photometric_jitter=0.0, noise_std=0.0, occluder=True,
    )
    sequence = generate_sequence(config, 0)
    clean = generate_sequence(dataclasses.replace(config, occluder=False), 0)
    # The card does not perturb the camera path or the background.
    assert np.array_equal(sequence.homographies, clean.homographies)
    assert sequence.occluder_homographies is not None and sequence.occluder_box is not None
    x0, y0, x1, y1 = sequence.occluder_box
    last = config.frames - 1
    card_h, bg_h = sequence.occluder_homographies[last], sequence.homographies[last]

    # Pixels of the last frame that see the card's interior (two pixels away from its edges).
    ys, xs = np.meshgrid(np.arange(112.0), np.arange(112.0), indexing="ij")
    ref = np.einsum("ij,jhw->ihw", np.linalg.inv(card_h), np.stack([xs, ys, np.ones_like(xs)]))
    rx, ry = ref[0] / ref[2], ref[1] / ref[2]
    on_card = (rx > x0 + 2) & (rx < x1 - 2) & (ry > y0 + 2) & (ry < y1 - 2)
    assert on_card.sum() > 100

    # Parallax: the nearer card moves differently from the background plane (in pixels).
    bg_ref = np.einsum("ij,jhw->ihw", np.linalg.inv(bg_h), np.stack([xs, ys, np.ones_like(xs)]))
    parallax = np.hypot(bg_ref[0] / bg_ref[2] - rx, bg_ref[1] / bg_ref[2] - ry)[on_card].mean()
    assert parallax > 2.0

    card_pred, card_valid = _warp_by(sequence.images[0], np.linalg.inv(card_h))
    bg_pred, _ = _warp_by(sequence.images[0], np.linalg.inv(bg_h))
    mask = on_card & card_valid
    card_error = _mean_abs(card_pred, sequence.images[last], mask)
    bg_error = _mean_abs(bg_pred, sequence.images[last], mask)
    assert card_error < 0.03, card_error  # observed 0.016 (vs 0.23 with the background homography)
    assert card_error < 0.5 * bg_error, (card_error, bg_error, parallax)
    # Outside the card the image equals the card-free rendering.
    away = torch.from_numpy(~((xs > x0 - 1) & (xs < x1 + 1) & (ys > y0 - 1) & (ys < y1 + 1)))
    assert torch.equal(sequence.images[0][:, away], clean.images[0][:, away])


def test_jitter_and_noise_change_pixels_but_not_geometry() -> None:
    base = SyntheticSequenceConfig(num_sequences=2, frames=3, height=42, width=42, seed=4, **CLEAN)
    jittered = dataclasses.replace(base, photometric_jitter=0.3, noise_std=0.02)
    for clean, noisy in zip(
        generate_sequences_with_metadata(base), generate_sequences_with_metadata(jittered), strict=True
    ):
        assert np.array_equal(clean.homographies, noisy.homographies)
        assert np.array_equal(clean.source_transform, noisy.source_transform)
        assert clean.source == noisy.source
        difference = (clean.images - noisy.images).abs().mean(dim=(1, 2, 3))
        assert bool((difference > 0.01).all()), difference  # every frame, frame 0 included, is jittered


# ------------------------------------------------------------------------------------------------
# Source photos and the no-download guarantee
# ------------------------------------------------------------------------------------------------


def test_available_sources_are_files_inside_the_installed_wheel() -> None:
    names = available_source_images()
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= set(names)
    data_dir = Path(skimage.__file__).parent / "data"
    for name in names:
        assert (data_dir / synthetic._CATALOGUE[name]).is_file()


def test_load_source_image_gives_rgb_floats_and_fresh_tensors() -> None:
    astronaut = load_source_image("astronaut")
    assert astronaut.shape == (3, 512, 512) and astronaut.dtype == torch.float32
    assert float(astronaut.min()) >= 0.0 and float(astronaut.max()) <= 1.0
    assert not torch.equal(astronaut[0], astronaut[2])  # a colour photo
    brick = load_source_image("brick")
    assert brick.shape[0] == 3 and torch.equal(brick[0], brick[1]) and torch.equal(brick[1], brick[2])
    astronaut.zero_()  # callers may modify their copy without corrupting the cache
    assert float(load_source_image("astronaut").max()) > 0.5


def test_generation_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[tuple[object, ...]] = []

    class NoNetwork(socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            attempts.append(args)
            raise OSError("network access attempted during synthetic generation")

    def no_connection(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted during synthetic generation")

    synthetic._read_bundled.cache_clear()  # force every photo to be read from disk again
    monkeypatch.setattr(socket, "socket", NoNetwork)
    monkeypatch.setattr(socket, "create_connection", no_connection)
    config = SyntheticSequenceConfig(num_sequences=len(available_source_images()), frames=2, height=28, width=28)
    sequences = generate_sequences_with_metadata(config)
    assert len(sequences) == config.num_sequences
    assert synthetic._read_bundled.cache_info().currsize >= 5  # the photos really were loaded here
    assert attempts == []


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_sequences", 0),
        ("frames", 0),
        ("frames", 2.5),
        ("frames", True),
        ("height", 500),
        ("height", 0),
        ("width", 7),
        ("width", -14),
        ("seed", -1),
        ("max_rotation_deg", -1.0),
        ("max_rotation_deg", 45.0),
        ("max_rotation_deg", float("nan")),
        ("max_translation", -0.1),
        ("max_translation", 0.9),
        ("photometric_jitter", -0.1),
        ("noise_std", -0.01),
        ("occluder", 1),
        ("sources", ("eagle",)),
        ("sources", "astronaut"),
        ("sources", ()),
        ("sources", ("coffee", "coffee")),
    ],
)
def test_invalid_config_raises_with_field_and_value(field: str, value: object) -> None:
    with pytest.raises(QVGGTError) as caught:
        SyntheticSequenceConfig(**{field: value})
    message = str(caught.value)
    assert field in message
    assert repr(value) in message or str(value) in message


def test_size_error_suggests_valid_sizes() -> None:
    with pytest.raises(QVGGTError, match="490 or 504"):
        SyntheticSequenceConfig(height=500)


def test_bad_index_and_unknown_photo_raise() -> None:
    with pytest.raises(QVGGTError, match="index"):
        generate_sequence(SyntheticSequenceConfig(height=28, width=28), -1)
    with pytest.raises(QVGGTError, match="eagle"):
        load_source_image("eagle")


def test_metadata_types() -> None:
    sequence = generate_sequence(SyntheticSequenceConfig(frames=3, height=28, width=28, seed=9), 2)
    assert isinstance(sequence, SyntheticSequence)
    assert (sequence.seed, sequence.index) == (9, 2)
    assert sequence.intrinsics.shape == (3, 3) and sequence.extrinsics.shape == (3, 3, 4)
    assert sequence.occluder_homographies is not None and sequence.occluder_homographies.shape == (3, 3, 3)
    assert np.array_equal(sequence.occluder_homographies[0], np.eye(3))
