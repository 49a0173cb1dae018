"""Calibration readers and the lazy candidate pool: layouts, windows, determinism, bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from qvggt_export.calib import (
    CandidatePool,
    SampleRef,
    SyntheticSequenceConfig,
    build_candidate_pool,
    generate_sequence,
    list_file_sequences,
    video_frame_count,
)
from qvggt_export.calib import readers as readers_module
from qvggt_export.errors import QVGGTError
from tests.conftest import require_shared_data

ID = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+):(?P<stride>\d+)\]$")


def _write_images(folder, count, size=(84, 70), value=None):
    """``count`` PNGs; frame i has mean colour ``value(i)`` (default: random noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    for i in range(count):
        if value is None:
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        else:
            pixels = np.full((size[1], size[0], 3), value(i), dtype=np.uint8)
        path = folder / f"{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _window(sample_id):
    match = ID.match(sample_id)
    assert match, sample_id
    return match["name"], int(match["start"]), int(match["stop"]), int(match["stride"])


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def test_folder_windows_order_and_shapes(tmp_path):
    _write_images(tmp_path / "a", 6, value=lambda i: 20 * i + 10)
    _write_images(tmp_path / "b", 4, size=(70, 98))
    pool = build_candidate_pool(tmp_path, frames=3, target_size=70, pool_size=None, seed=0)
    # Every (start, stride): a has 6 frames -> stride 1: 4 windows, stride 2: 2; b has 4 -> stride 1: 2.
    assert len(pool) == 8
    assert sorted({_window(i)[0] for i in pool.ids}) == ["a", "b"]
    for ref in pool.refs:
        name, start, stop, stride = _window(ref.id)
        expected = [tmp_path / name / f"{k:03d}.png" for k in range(start, stop, stride)]
        assert [str(p) for p in expected] == list(ref.paths)  # first frame first, increasing frame order
    by_id = dict(zip(pool.ids, pool.refs, strict=True))
    sample = by_id["a[1:6:2]"].load()
    assert sample.shape == (3, 3, 56, 70) == by_id["a[1:6:2]"].shape
    np.testing.assert_allclose(sample.mean(dim=(1, 2, 3)).numpy(), np.array([30, 70, 110]) / 255, atol=1e-3)
    assert by_id["b[0:3:1]"].load().shape == (3, 3, 70, 70) == by_id["b[0:3:1]"].shape  # portrait: cropped


def test_pool_is_lazy(tmp_path, monkeypatch):
    _write_images(tmp_path, 5)

    def refuse(*args, **kwargs):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(readers_module, "load_and_preprocess_images", refuse)
    pool = build_candidate_pool(tmp_path, frames=2, target_size=70, pool_size=3)  # builds without decoding
    assert len(pool) == 3
    with pytest.raises(AssertionError, match="pixels decoded"):
        pool[0]
    assert isinstance(pool[1:], CandidatePool) and len(pool[1:]) == 2
    assert pool.subset([2, 0]).ids == [pool.ids[2], pool.ids[0]]


def test_deterministic_per_seed_and_balanced(tmp_path):
    for name in ("s0", "s1", "s2"):
        _write_images(tmp_path / name, 12, size=(28, 28))
    first = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=9, seed=4)
    again = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=9, seed=4)
    other = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=9, seed=5)
    assert first.ids == again.ids
    assert first.ids != other.ids
    counts = {name: sum(_window(i)[0] == name for i in first.ids) for name in ("s0", "s1", "s2")}
    assert counts == {"s0": 3, "s1": 3, "s2": 3}  # spread evenly over sequences
    # Windows rotate over strides: 3 windows of a 12-frame sequence use 3 different strides.
    assert len({_window(i)[3] for i in first.ids if i.startswith("s0")}) == 3
    one = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=7, seed=4)
    assert sorted(sum(_window(i)[0] == n for i in one.ids) for n in ("s0", "s1", "s2")) == [2, 2, 3]
    strided = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=6, seed=0, strides=[2, 5])
    assert {_window(i)[3] for i in strided.ids} == {2, 5}


def test_short_sequences_skipped_and_all_short_is_an_error(tmp_path, caplog):
    _write_images(tmp_path / "long", 5, size=(28, 28))
    _write_images(tmp_path / "short", 2, size=(28, 28))
    with caplog.at_level(logging.WARNING):
        pool = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=None)
    assert "skipping sequence short: 2 frame(s), fewer than frames=3" in caplog.text
    assert all(i.startswith("long[") for i in pool.ids) and len(pool) == 4
    with pytest.raises(QVGGTError, match="no sequence .* has at least 6 readable frames \\(longest: 5\\)"):
        build_candidate_pool(tmp_path, frames=6, target_size=28)
    with caplog.at_level(logging.WARNING):
        small = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=50)
    assert len(small) == 4 and "the pool has 4 candidates, not 50" in caplog.text


def test_empty_missing_and_bad_arguments(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QVGGTError, match="no images"):
        build_candidate_pool(tmp_path / "empty", frames=2, target_size=28)
    with pytest.raises(QVGGTError, match="not found"):
        build_candidate_pool(tmp_path / "missing", frames=2, target_size=28)
    with pytest.raises(QVGGTError, match="no calibration source"):
        build_candidate_pool([], frames=2, target_size=28)
    _write_images(tmp_path / "ok", 3, size=(28, 28))
    with pytest.raises(QVGGTError, match="multiple of the patch size 14, got 30; nearest valid values: 28 or 42"):
        build_candidate_pool(tmp_path / "ok", frames=2, target_size=30)
    with pytest.raises(QVGGTError, match="frames must be an integer >= 1"):
        build_candidate_pool(tmp_path / "ok", frames=0, target_size=28)
    with pytest.raises(QVGGTError, match="mode must be one of"):
        build_candidate_pool(tmp_path / "ok", frames=2, target_size=28, mode="stretch")
    with pytest.raises(QVGGTError, match="layout must be one of"):
        build_candidate_pool(tmp_path / "ok", frames=2, target_size=28, layout="kitti")
    with pytest.raises(QVGGTError, match="cannot tell what"):
        build_candidate_pool(tmp_path / "ok" / "000.png", frames=2, target_size=28)


def test_corrupt_image_with_and_without_skip_bad(tmp_path, caplog):
    _write_images(tmp_path, 5, size=(28, 28))
    (tmp_path / "002.png").write_bytes(b"not an image")
    with pytest.raises(QVGGTError, match=r"cannot read image .*002\.png"):
        build_candidate_pool(tmp_path, frames=2, target_size=28, pool_size=None)
    with caplog.at_level(logging.WARNING):
        pool = build_candidate_pool(tmp_path, frames=2, target_size=28, pool_size=None, skip_bad=True)
    assert "002.png" in caplog.text
    assert not any(p.endswith("002.png") for r in pool.refs for p in r.paths)
    assert len(pool) == 6  # 4 good frames: stride 1 gives 3 windows, 2 gives 2, 3 gives 1
    assert all(sample.shape == (2, 3, 28, 28) for _, sample in pool.iter_samples())


def test_truncated_image_found_on_load(tmp_path, caplog):
    paths = _write_images(tmp_path, 3, size=(56, 56))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(paths[1], "JPEG")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 3])  # a valid header, most pixels missing
    pool = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=None)  # headers pass
    assert len(pool) == 1
    with pytest.raises(QVGGTError, match=r"cannot read image .*001\.png"):
        list(pool.iter_samples())
    lenient = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=None, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        assert list(lenient.iter_samples()) == []
    assert lenient.skipped == [f"{tmp_path.name}[0:3:1]"]
    assert "skipping candidate" in caplog.text


def test_mixed_resolutions_warn_and_pad_is_square(tmp_path, caplog):
    _write_images(tmp_path / "wide", 3, size=(140, 70))
    _write_images(tmp_path / "tall", 3, size=(70, 140))
    with caplog.at_level(logging.WARNING):
        crop = build_candidate_pool(tmp_path, frames=2, target_size=70, pool_size=None)
    # 140x70 -> 70 wide, 35 high, rounded (half to even, as upstream) to 2 patches = 28.
    assert crop.resolutions() == {(28, 70), (70, 70)}
    assert {tuple(s.shape[2:]) for s in crop} == crop.resolutions()
    assert "2 resolutions" in caplog.text and "mode='pad'" in caplog.text
    pad = build_candidate_pool(tmp_path, frames=2, target_size=70, mode="pad", pool_size=None)
    assert pad.resolutions() == {(70, 70)}
    assert {tuple(s.shape) for s in pad} == {(2, 3, 70, 70)}
    # Frames of different sizes inside one sample are padded to the largest (preprocessing's rule).
    mixed = tmp_path / "mixed"
    _write_images(mixed, 1, size=(140, 70))
    Image.new("RGB", (70, 140)).save(mixed / "001.png")
    ref = build_candidate_pool(mixed, frames=2, target_size=70, pool_size=None).refs[0]
    assert ref.shape == (2, 3, 70, 70) == tuple(ref.load().shape)


# --------------------------------------------------------------------------------------------------
# CO3D and list files
# --------------------------------------------------------------------------------------------------


def test_co3d_layout(tmp_path):
    for category, sequence, count in (("apple", "110_13051_23361", 4), ("apple", "189_20393_38136", 3),
                                      ("bench", "415_57112_110099", 5)):
        folder = tmp_path / category / sequence
        _write_images(folder / "images", count, size=(28, 28))
        (folder / "masks").mkdir()
        (folder / "pointcloud.ply").write_bytes(b"ignored")
    (tmp_path / "apple" / "frame_annotations.jgz").write_bytes(b"ignored")
    pool = build_candidate_pool(tmp_path, frames=3, target_size=28, pool_size=6, seed=0)
    names = {_window(i)[0] for i in pool.ids}
    assert names == {"apple/110_13051_23361", "apple/189_20393_38136", "bench/415_57112_110099"}
    assert all("/images/" in p for r in pool.refs for p in r.paths)
    assert len(pool) == 6 and pool[0].shape == (3, 3, 28, 28)
    one_category = build_candidate_pool(tmp_path / "bench", frames=3, target_size=28, pool_size=None)
    assert {_window(i)[0] for i in one_category.ids} == {"415_57112_110099"}
    with pytest.raises(QVGGTError, match="no CO3D sequences"):
        build_candidate_pool(tmp_path / "apple" / "110_13051_23361" / "masks", frames=2, target_size=28,
                             layout="co3d")


def test_list_files_txt_and_json(tmp_path):
    frames = _write_images(tmp_path / "imgs", 6, size=(28, 28), value=lambda i: 40 * i)
    text = tmp_path / "calib.txt"
    text.write_text("# two samples\nimgs/000.png imgs/002.png imgs/004.png\n\n"
                    f"imgs/005.png, {frames[1]} ,imgs/003.png\n")
    assert list_file_sequences(text) == [[frames[0], frames[2], frames[4]], [frames[5], frames[1], frames[3]]]
    pool = build_candidate_pool(text, frames=3, target_size=28, pool_size=None)
    assert [list(r.paths) for r in pool.refs] == [[str(frames[i]) for i in (0, 2, 4)],
                                                  [str(frames[i]) for i in (5, 1, 3)]]  # as written, first first
    np.testing.assert_allclose(pool[1].mean(dim=(1, 2, 3)).numpy(), np.array([200, 40, 120]) / 255, atol=1e-3)

    listing = tmp_path / "calib.json"
    listing.write_text(json.dumps([["imgs/000.png", "imgs/001.png"], {"frames": ["imgs/003.png", "imgs/002.png"]}]))
    pool = build_candidate_pool(listing, frames=2, target_size=28, pool_size=None)
    assert [[p.split("/")[-1] for p in r.paths] for r in pool.refs] == [["000.png", "001.png"], ["003.png", "002.png"]]
    # A longer line is a sequence: windows are drawn from it like from a folder.
    (tmp_path / "long.lst").write_text(" ".join(f"imgs/{i:03d}.png" for i in range(6)))
    assert len(build_candidate_pool(tmp_path / "long.lst", frames=3, target_size=28, pool_size=None)) == 6

    (tmp_path / "bad.json").write_text(json.dumps({"frames": 3}))
    with pytest.raises(QVGGTError, match="JSON list of lists"):
        build_candidate_pool(tmp_path / "bad.json", frames=2, target_size=28)
    (tmp_path / "bad2.json").write_text("[[1, 2]]")
    with pytest.raises(QVGGTError, match="entry 0 must be a list of frame paths"):
        list_file_sequences(tmp_path / "bad2.json")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(QVGGTError, match="names no frames"):
        build_candidate_pool(tmp_path / "empty.txt", frames=2, target_size=28)
    (tmp_path / "missing.txt").write_text("imgs/000.png imgs/999.png\n")
    with pytest.raises(QVGGTError, match=r"image not found: .*999\.png"):
        build_candidate_pool(tmp_path / "missing.txt", frames=2, target_size=28)


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------


def _write_video(path, count=12, size=(64, 48)):
    """A small MPEG-4 video whose frame i is uniform grey 10 + 20 i, with a key frame every 4 frames."""
    av = pytest.importorskip("av", reason="PyAV (pip install av) is needed to write and read test videos")
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = 4_000_000
            stream.codec_context.gop_size = 4
            for i in range(count):
                pixels = np.full((size[1], size[0], 3), 10 + 20 * i, dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (ValueError, OSError, av.error.FFmpegError) as exc:
        pytest.skip(f"this PyAV build cannot encode an MPEG-4 test video: {exc}")
    return path


def test_video_windows_decode_the_right_frames(tmp_path):
    video = _write_video(tmp_path / "orbit.mp4")
    assert video_frame_count(video) == 12
    pool = build_candidate_pool(video, frames=3, target_size=70, pool_size=5, seed=1)
    assert len(pool) == 5 and all(r.kind == "video" for r in pool.refs)
    for ref in pool.refs:
        _, start, stop, stride = _window(ref.id)
        assert ref.id.startswith("orbit.mp4[") and list(ref.frame_indices) == list(range(start, stop, stride))
        sample = ref.load()
        assert tuple(sample.shape) == ref.shape == (3, 3, 56, 70)
        expected = (10 + 20 * np.array(ref.frame_indices)) / 255
        np.testing.assert_allclose(sample.mean(dim=(1, 2, 3)).numpy(), expected, atol=4 / 255)
        # Seeking (with timestamps) and decoding from the start give the same pixels.
        assert torch.equal(sample, dataclasses.replace(ref, frame_pts=None).load())


def test_video_folder_and_corrupt_video(tmp_path, caplog):
    _write_video(tmp_path / "a.mp4", count=8)
    _write_video(tmp_path / "b.mov", count=5)
    pool = build_candidate_pool(tmp_path, frames=4, target_size=28, pool_size=4, seed=0)
    assert sorted({_window(i)[0] for i in pool.ids}) == ["a.mp4", "b.mov"]
    (tmp_path / "c.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(QVGGTError, match=r"cannot read video .*c\.mp4"):
        build_candidate_pool(tmp_path, frames=4, target_size=28, pool_size=4)
    with caplog.at_level(logging.WARNING):
        lenient = build_candidate_pool(tmp_path, frames=4, target_size=28, pool_size=4, skip_bad=True)
    assert "c.mp4" in caplog.text and len(lenient) == 4
    ref = lenient.refs[0]
    (tmp_path / "a.mp4").unlink()
    (tmp_path / "b.mov").unlink()
    with pytest.raises(QVGGTError, match="video not found"):
        ref.load()


# --------------------------------------------------------------------------------------------------
# Generated sequences and descriptors
# --------------------------------------------------------------------------------------------------


def test_synthetic_pool_matches_the_generator():
    pool = build_candidate_pool("synthetic", frames=2, target_size=28, pool_size=3, seed=7)
    assert pool.ids == ["synthetic/seed7/0000", "synthetic/seed7/0001", "synthetic/seed7/0002"]
    config = SyntheticSequenceConfig(num_sequences=3, frames=2, height=28, width=28, seed=7)
    assert torch.equal(pool[2], generate_sequence(config, 2).images)
    assert pool.resolutions() == {(28, 28)}
    custom = build_candidate_pool(SyntheticSequenceConfig(height=42, width=28, seed=1, noise_std=0.0), frames=3,
                                  target_size=28, pool_size=2)
    assert custom[1].shape == (3, 3, 42, 28) and custom.refs[0].synthetic.noise_std == 0.0
    with pytest.raises(QVGGTError, match="multiple of the patch size 14"):
        build_candidate_pool("synthetic", frames=2, target_size=30)
    with pytest.raises(QVGGTError, match="cannot be mixed"):
        build_candidate_pool(["synthetic", "elsewhere"], frames=2, target_size=28)


def test_sample_ref_round_trip(tmp_path):
    _write_images(tmp_path, 3, size=(28, 28))
    refs = [*build_candidate_pool(tmp_path, frames=2, target_size=28, pool_size=1).refs,
            *build_candidate_pool("synthetic", frames=2, target_size=28, pool_size=1).refs,
            SampleRef(id="v[0:3:2]", kind="video", paths=("x.mp4",), frame_indices=(0, 2), frame_pts=(0, 1024)),
            SampleRef(id="t", kind="tensor", shape=(2, 3, 28, 28))]
    for ref in refs:
        again = SampleRef.from_dict(json.loads(json.dumps(ref.to_dict())))
        assert again == ref
    assert torch.equal(SampleRef.from_dict(refs[0].to_dict()).load(), refs[0].load())
    with pytest.raises(QVGGTError, match="sample kind"):
        SampleRef(id="x", kind="audio")
    with pytest.raises(QVGGTError, match="malformed sample descriptor"):
        SampleRef.from_dict({"kind": "images"})
    with pytest.raises(QVGGTError, match="ids must be unique"):
        CandidatePool([refs[0], refs[0]])


# --------------------------------------------------------------------------------------------------
# Real data (../shared/data): videos and photo sequences
# --------------------------------------------------------------------------------------------------


def test_real_sequences_and_videos():
    data = require_shared_data()
    pool = build_candidate_pool([data / "sequences", data / "videos"], frames=4, target_size=70, mode="pad",
                                pool_size=10, seed=0)
    names = {_window(i)[0] for i in pool.ids}
    assert names == {"kitchen", "llff_fern", "room", "colosseum.mp4", "great_wall.mp4"}  # 2 windows each
    assert pool.resolutions() == {(70, 70)}
    videos = [r for r in pool.refs if r.kind == "video"]
    assert video_frame_count(videos[0].paths[0]) > 100
    for ref in (pool.refs[0], videos[0], videos[-1]):
        sample = ref.load()
        assert tuple(sample.shape) == (4, 3, 70, 70) and 0.0 <= float(sample.min()) <= float(sample.max()) <= 1.0
        assert float(sample.std()) > 0.05  # real pictures, not padding
    assert torch.equal(videos[0].load(), dataclasses.replace(videos[0], frame_pts=None).load())
    crop = build_candidate_pool(data / "sequences", frames=10, target_size=518, pool_size=6, seed=0)
    assert len(crop) == 6 and crop.resolutions() == {(350, 518), (392, 518)}  # 518x346 and 518x388 photos
    assert all(int(_window(i)[2]) - int(_window(i)[1]) >= 10 for i in crop.ids if not i.startswith("room"))


# --------------------------------------------------------------------------------------------------
# Frame reuse across overlapping windows (iter_samples)
# --------------------------------------------------------------------------------------------------


def _count_opens(monkeypatch):
    """Record every image file opened, by the shared reads and by per-sample loads alike."""
    from qvggt_export.model import preprocess

    opened = []
    real = preprocess.open_image

    def counting(path):
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(preprocess, "open_image", counting)
    monkeypatch.setattr(readers_module, "open_image", counting)
    return opened


def test_shared_frame_reads_match_per_sample_loads(tmp_path, monkeypatch):
    _write_images(tmp_path / "scene", 6, size=(42, 28))
    video = _write_video(tmp_path / "clip.mp4", count=12)
    pool = build_candidate_pool([tmp_path / "scene", video], frames=3, target_size=28, pool_size=None, seed=0)
    refs = pool.refs
    assert len(refs) > 12
    expected = [ref.load() for ref in refs]
    opened = _count_opens(monkeypatch)
    shared = list(pool.iter_samples())
    assert [r.id for r, _ in shared] == [r.id for r in refs]
    assert all(torch.equal(got, want) for (_, got), want in zip(shared, expected, strict=True))  # bit for bit
    assert sorted(opened) == sorted({p for r in refs for p in r.paths if p.endswith(".png")})  # each file once
    opened.clear()
    # No reuse (or a cache too small for two frames): every sample is read on its own, same tensors.
    for kwargs in ({"reuse_frames": False}, {"frame_cache_bytes": 0}):
        alone = list(pool.iter_samples(**kwargs))
        assert all(torch.equal(got, want) for (_, got), want in zip(alone, expected, strict=True))
        assert len(opened) == sum(len(r.paths) for r in refs if r.kind == "images")
        opened.clear()
    with pytest.raises(QVGGTError, match="frame_cache_bytes"):
        list(pool.iter_samples(frame_cache_bytes=-1))


def test_shared_reads_cost_only_the_samples_of_a_bad_frame(tmp_path, caplog):
    paths = _write_images(tmp_path, 5, size=(28, 28))
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # header fine, pixels truncated: found only on load
    pool = build_candidate_pool(tmp_path, frames=2, target_size=28, pool_size=None, skip_bad=True)
    bad = {r.id for r in pool.refs if str(paths[2]) in r.paths}
    assert bad and len(bad) < len(pool)
    with caplog.at_level(logging.WARNING):
        loaded = list(pool.iter_samples())
    assert sorted(pool.skipped) == sorted(bad) and "002.png" in caplog.text
    assert [r.id for r, _ in loaded] == [r.id for r in pool.refs if r.id not in bad]
    assert all(torch.equal(sample, ref.load()) for ref, sample in loaded)
    strict = build_candidate_pool(tmp_path, frames=2, target_size=28, pool_size=None)
    with pytest.raises(QVGGTError, match=r"cannot read image .*002\.png"):
        list(strict.iter_samples())


# --------------------------------------------------------------------------------------------------
# Streaming runs and the reading thread pool
# --------------------------------------------------------------------------------------------------


def _count_video_frames(monkeypatch):
    """Record every video frame index the shared (streamed) decode hands out."""
    decoded = []
    real = readers_module._iter_video_frames

    def counting(path, indices, pts):
        for index, frame in real(path, indices, pts):
            decoded.append(index)
            yield index, frame

    monkeypatch.setattr(readers_module, "_iter_video_frames", counting)
    return decoded


@pytest.mark.parametrize("workers", [0, 2])
def test_first_window_arrives_before_the_run_is_read(tmp_path, monkeypatch, workers):
    _write_images(tmp_path / "scene", 30, size=(28, 28))
    video = _write_video(tmp_path / "clip.mp4", count=12)
    images = build_candidate_pool(tmp_path / "scene", frames=3, target_size=28, pool_size=None, seed=0)
    clip = build_candidate_pool(video, frames=3, target_size=28, pool_size=None, seed=0)
    assert len(images) > 100 and len(clip) == 30  # one run each
    ahead = 4 * workers if workers > 1 else 0
    opened = _count_opens(monkeypatch)
    stream = images.iter_samples(workers=workers)
    ref, sample = next(stream)
    # Only the first window's frames (plus what the workers read ahead) are read before it is yielded.
    assert set(ref.paths) <= set(opened) and len(opened) <= len(ref.paths) + ahead < 30
    assert torch.equal(sample, ref.load())
    stream.close()
    decoded = _count_video_frames(monkeypatch)
    stream = clip.iter_samples(workers=workers)
    ref, sample = next(stream)
    assert set(ref.frame_indices) <= set(decoded) and len(decoded) <= max(ref.frame_indices) + 1 + ahead < 12
    assert torch.equal(sample, ref.load())
    stream.close()
    assert not any(t.name.startswith("calib-read") for t in threading.enumerate())  # pool shut down on close


def test_streamed_frames_are_released_after_their_last_window(tmp_path, monkeypatch):
    _write_images(tmp_path / "scene", 40, size=(28, 28))
    pool = build_candidate_pool(tmp_path / "scene", frames=3, target_size=28, pool_size=60, seed=0, strides=[1, 2])
    held = []
    real = readers_module._stack_from

    def recording(ref, frames):
        held.append(len(frames))
        return real(ref, frames)

    monkeypatch.setattr(readers_module, "_stack_from", recording)
    opened = _count_opens(monkeypatch)
    samples = list(pool.iter_samples(workers=0))
    assert len(samples) == 60 and len(opened) == len(set(opened))  # each frame read once
    # Windows come sorted by start: held frames span at most one window (stride 2: 5 frames), not the run.
    span = max(int(_window(i)[2]) - int(_window(i)[1]) for i in pool.ids)
    assert max(held) <= span < len(set(opened))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_reading_threads_give_identical_samples_in_order(tmp_path, workers):
    _write_images(tmp_path / "scene", 8, size=(42, 28))
    _write_images(tmp_path / "other", 5, size=(28, 42))
    video = _write_video(tmp_path / "clip.mp4", count=12)
    pool = build_candidate_pool([tmp_path / "scene", tmp_path / "other", video], frames=3, target_size=28,
                                pool_size=None, seed=0)
    serial = list(pool.iter_samples(workers=0))
    threaded = list(pool.iter_samples(workers=workers))
    assert [r.id for r, _ in threaded] == [r.id for r in pool.refs] == [r.id for r, _ in serial]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(serial, threaded, strict=True))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(QVGGTError, match="workers must be"):
            list(pool.iter_samples(workers=bad))


def test_a_video_that_ends_early_costs_only_its_windows(tmp_path, monkeypatch, caplog):
    video = _write_video(tmp_path / "clip.mp4", count=12)
    pool = build_candidate_pool(video, frames=3, target_size=28, pool_size=None, seed=0, skip_bad=True)
    real = readers_module._iter_video_frames

    def truncated(path, indices, pts):  # the shared decode (more than one window's frames) fails after frame 7
        for index, frame in real(path, indices, pts):
            if len(indices) > 3 and index > 7:
                raise QVGGTError(f"cannot decode video {path}: broken after frame 7")
            yield index, frame

    monkeypatch.setattr(readers_module, "_iter_video_frames", truncated)
    got = list(pool.iter_samples(workers=2))
    monkeypatch.undo()
    # Windows past frame 7 load alone (and succeed here: only the shared decode was broken), same tensors.
    assert [r.id for r, _ in got] == pool.ids and not pool.skipped
    assert all(torch.equal(sample, ref.load()) for ref, sample in got)
