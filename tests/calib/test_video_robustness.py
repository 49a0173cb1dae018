"""Videos are read by what actually decodes (issue 16): a file whose header lists more frames than decode (a cut
download) calibrates on the frames it has; variable-frame-rate streams give their frames in presentation order;
zero-byte images count as unreadable, not as frames; messages count readable frames and name --skip-bad."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from qvggt_export.calib import build_candidate_pool
from qvggt_export.calib.readers import video_frame_count
from qvggt_export.cli import EXIT_OK, EXIT_USAGE, main

av = pytest.importorskip("av", reason="PyAV (the [calib] extra) reads videos")
FRAMES = 40


def _frame(index: int, size: int) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = (index * 6) % 256  # the frame's index, readable back from its red channel
    image[index % size, :, 1] = 255
    return image


def _write(path: Path, *, variable_rate: bool = False, size: int = 64) -> Path:
    options = {} if variable_rate or path.suffix != ".mp4" else {"movflags": "faststart"}  # header first
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if variable_rate:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        stamp = 0
        for index in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(_frame(index, size), format="rgb24")
            if variable_rate:  # 33 ms and 170 ms gaps: no constant rate describes the stream
                frame.pts, frame.time_base = stamp, Fraction(1, 1000)
                stamp += 33 if index % 3 else 170
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory) -> Path:
    """An mp4 whose header (written first) lists 40 frames, cut at 60 % of its bytes like a broken download."""
    folder = tmp_path_factory.mktemp("videos")
    full = _write(folder / "full.mp4")
    cut = folder / "cut.mp4"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    return cut


def test_header_over_count_is_not_trusted(cut_video: Path) -> None:
    with av.open(str(cut_video)) as container:
        listed = container.streams.video[0].frames
    decodable = video_frame_count(cut_video)
    assert listed == FRAMES and 0 < decodable < FRAMES
    pool = build_candidate_pool(cut_video, 3, 70, "pad", pool_size=8, seed=0)
    samples = [sample for _, sample in pool.iter_samples()]
    assert samples and all(s.shape == (3, 3, 70, 70) for s in samples)


def test_over_counting_video_calibrates_through_the_cli(cut_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--bits", "w8a8", "--no-engine", "--calib-data", str(cut_video), "--frames", "2", "--calib-size",
                 "2", "--calib-pool", "4", "--out", str(out), "--no-progress"]) == EXIT_OK
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_streams_give_frames_in_order(tmp_path: Path, suffix: str) -> None:
    video = _write(tmp_path / f"vfr{suffix}", variable_rate=True)
    assert video_frame_count(video) == FRAMES
    pool = build_candidate_pool(video, 4, 70, "pad", pool_size=6, seed=0)
    for ref, sample in pool.iter_samples():
        red = (sample[:, 0].mean(dim=(1, 2)) * 255).round().numpy()  # each frame's red level = 6 x its index
        steps = np.diff(red)
        assert (steps > 0).all(), (ref.id, red)  # later frames come later (presentation order)


def test_zero_byte_images_are_unreadable_not_missing_frames(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "scene"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(b"")
    command = ["--bits", "w8a8", "--no-engine", "--calib-data", str(folder), "--frames", "2", "--calib-size", "1",
               "--calib-pool", "1", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(command) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert f"image {folder / 'a.jpg'} is an empty file (0 bytes) (and 1 more): unreadable; pass --skip-bad" in err
    assert main([*command, "--skip-bad"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has at least 2 readable frames (longest: 0)" in err
