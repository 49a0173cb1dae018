"""Calibration candidate readers and the lazy candidate pool NFDS selects from.

Sources (``layout="auto"`` detects the first four from the path):

* **image folders** -- a folder of images (one scene) or a folder of such folders, exactly the layout of
  :func:`qvggt_export.calib.folders.scene_folders`;
* **CO3Dv2** -- ``<root>/<category>/<sequence>/images/*.jpg`` (also ``<root>/<sequence>/images`` for one
  category and ``<root>/images`` for one sequence); annotation files are ignored;
* **videos** -- one video file or a folder of video files (decoded with PyAV, ``pip install av``);
* **list files** -- ``.txt``/``.lst``/``.csv``: one sequence per line, frame paths separated by commas
  (if the line has one) or else by whitespace, blank lines and ``#`` comments ignored; ``.json``: a list
  of lists of paths, or of ``{"frames": [...]}`` objects. Relative paths are relative to the list file;
* **generated sequences** -- the string ``"synthetic"`` or a
  :class:`~qvggt_export.calib.synthetic.SyntheticSequenceConfig`: the zero-setup default.

Every source becomes a set of ordered frame sequences. A **sample** is a window of ``frames`` frames
of one sequence taken at a stride: frames ``start, start + s, ..., start + (frames - 1) s``, so the
first frame of the window stays first (VGGT treats frame 0 as the reference view). By default every
stride that fits is allowed (1 up to the one that spreads the window over the whole sequence); pass
``strides`` to restrict them (e.g. skip stride 1 on 30 fps video, whose neighbours are near-duplicates).
A list-file line with exactly ``frames`` paths is therefore one sample as written. Generated sequences
are one sample each.

**Sampling** is deterministic per ``seed``: the pool's ``pool_size`` samples are spread over the
sequences round-robin (in a seed-shuffled order, so every sequence gets its share before any gets a
second one, and short sequences hand their quota to the others); inside a sequence the windows
rotate over the allowed strides (seed-shuffled) and take seed-drawn start positions without
repetition. A sequence's windows depend on ``(seed, sequence name)`` only, so adding a scene does not
change the windows drawn from the others (it may change how many each gives).

**Laziness**: the pool holds :class:`SampleRef` descriptors (id + how to load) and loads one sample
when asked, so 400 candidates of 10 frames at 518 never sit in memory together. Iterating the pool
(:meth:`CandidatePool.iter_samples`) streams each run of windows of one clip: every frame is decoded and
preprocessed once (400 windows of a few clips share most of their frames), a window is yielded as soon
as its frames are ready, and a frame is dropped once no later window of the run uses it, so what is held
is about one window's span of frames. The PIL conversion and the model's resize/pad (most of the reading
time; PIL and PyAV release the GIL there) run in a small thread pool while the calling thread decodes.
Samples are bit-identical to :meth:`SampleRef.load`'s.

**Bad input**: image headers (and every video, fully demuxed) are checked when the pool is built, for
the files the drawn windows use; an unreadable file raises :class:`~qvggt_export.errors.QVGGTError`
naming it, or with ``skip_bad=True`` is dropped from its sequence with a warning and the windows are
drawn again without it. A file whose header is fine but whose pixels are corrupt (a truncated JPEG) is
only found when the sample loads: :meth:`CandidatePool.iter_samples` then raises naming the file, or
skips the sample with a warning when the pool was built with ``skip_bad=True``.

**Resolution**: preprocessing is the model's own (:func:`~qvggt_export.model.preprocess.preprocess_image`,
frames of different sizes inside one sample are padded with white to the largest by
:func:`~qvggt_export.model.preprocess.stack_frames`). In ``mode="crop"`` the width is ``target_size``
and the height follows each source's aspect ratio, so samples from differently shaped sources have
different resolutions. NFDS itself copes (its statistics are per candidate), but block reconstruction
batches samples and an engine profile has one resolution: the pool predicts every sample's shape from
the file headers, logs a warning when they differ, and :meth:`CandidatePool.resolutions` lists them.
Use ``mode="pad"`` to get square ``target_size`` x ``target_size`` samples from any mix of sources.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import logging
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.model.preprocess import (
    PREPROCESS_MODES,
    load_and_preprocess_images,
    open_image,
    preprocess_image,
    stack_frames,
)

from .folders import IMAGE_SUFFIXES, scene_folders
from .synthetic import SyntheticSequenceConfig, generate_sequence

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "LIST_SUFFIXES",
    "SAMPLE_KINDS",
    "VIDEO_SUFFIXES",
    "CandidatePool",
    "SampleRef",
    "build_candidate_pool",
    "list_file_sequences",
    "video_frame_count",
]

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".json")
LAYOUTS = ("auto", "folders", "co3d", "video", "list", "synthetic")
SAMPLE_KINDS = ("images", "video", "synthetic", "tensor")
SYNTHETIC = "synthetic"

# Stream keys of the seeded generators (allocation over sequences vs. windows inside a sequence).
_KEY_ALLOCATION = 0x5EED
_KEY_WINDOWS = 0xF00D

# Cap on the distinct frames of one streamed run of windows (see CandidatePool.iter_samples): 330 frames at 518.
DEFAULT_FRAME_CACHE_BYTES = 1 << 30
# Threads that convert + resize/pad frames in CandidatePool.iter_samples (0 or 1: in the calling thread).
# 2: in the NFDS pass on `tiny` 2, 3 and 4 were equal and 12-31 % faster than serial (nfds_findings.md).
DEFAULT_READ_WORKERS = 2
# Frames submitted to the workers ahead of the window being assembled, per worker (bounds memory).
_READ_AHEAD_PER_WORKER = 4


# --------------------------------------------------------------------------------------------------
# Sample descriptors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRef:
    """How to load one candidate sample; JSON-serialisable, so a saved selection can be reloaded.

    Attributes:
        id: Unique, human-readable id, e.g. ``"kitchen[3:22:2]"`` (sequence, then the frame slice
            ``start:stop:stride`` in that sequence) or ``"synthetic/seed0/0007"``.
        kind: One of :data:`SAMPLE_KINDS`: ``"images"`` (``paths`` are the frames), ``"video"``
            (``paths[0]`` is the video, ``frame_indices`` the decoded frames), ``"synthetic"`` (a
            generated sequence) or ``"tensor"`` (an in-memory candidate; it cannot be reloaded).
        paths: Image files in frame order, or the one video file.
        frame_indices: Video frame indices (presentation order, from 0), in frame order.
        frame_pts: The video frames' presentation timestamps (for seeking), or ``None`` to decode
            sequentially from the start.
        target_size: Preprocessing size (see :func:`~qvggt_export.model.preprocess.preprocess_image`).
        mode: Preprocessing mode, ``"crop"`` or ``"pad"``.
        patch_size: The model's patch size.
        synthetic: The generator config (kind ``"synthetic"``).
        synthetic_index: The sequence index within that config.
        shape: The predicted ``(frames, 3, H, W)`` of the loaded sample, or ``None`` if unknown.
    """

    id: str
    kind: str
    paths: tuple[str, ...] = ()
    frame_indices: tuple[int, ...] = ()
    frame_pts: tuple[int, ...] | None = None
    target_size: int = 518
    mode: str = "crop"
    patch_size: int = 14
    synthetic: SyntheticSequenceConfig | None = None
    synthetic_index: int | None = None
    shape: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SAMPLE_KINDS:
            raise QVGGTError(f"sample kind must be one of {SAMPLE_KINDS}, got {self.kind!r}")
        if self.kind == "synthetic" and (self.synthetic is None or self.synthetic_index is None):
            raise QVGGTError(f"synthetic sample {self.id!r} needs its generator config and index")
        if self.kind == "video" and (len(self.paths) != 1 or not self.frame_indices):
            raise QVGGTError(f"video sample {self.id!r} needs one video path and its frame indices")
        if self.kind == "images" and not self.paths:
            raise QVGGTError(f"image sample {self.id!r} has no frames")

    @property
    def frames(self) -> int:
        """Number of frames the sample loads as."""
        if self.kind == "images":
            return len(self.paths)
        if self.kind == "video":
            return len(self.frame_indices)
        if self.kind == "synthetic":
            return self.synthetic.frames  # type: ignore[union-attr]
        return self.shape[0] if self.shape is not None else 0

    def load(self) -> torch.Tensor:
        """Load and preprocess the sample: ``[frames, 3, H, W]`` float32 in ``[0, 1]``.

        Raises:
            QVGGTError: If a file cannot be read (the message names it), or for in-memory candidates.
        """
        if self.kind == "images":
            return load_and_preprocess_images(list(self.paths), mode=self.mode, target_size=self.target_size,
                                              patch_size=self.patch_size)
        if self.kind == "video":
            images = _decode_video_frames(Path(self.paths[0]), self.frame_indices, self.frame_pts)
            return stack_frames([preprocess_image(im, self.target_size, self.mode, self.patch_size) for im in images])
        if self.kind == "synthetic":
            return generate_sequence(self.synthetic, self.synthetic_index).images  # type: ignore[arg-type]
        raise QVGGTError(f"candidate {self.id!r} was an in-memory tensor and cannot be reloaded; "
                         "pass the tensors again (index them with the selection's selected_indices)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (inverse: :meth:`from_dict`)."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind}
        if self.paths:
            out["paths"] = list(self.paths)
        if self.frame_indices:
            out["frame_indices"] = list(self.frame_indices)
        if self.frame_pts is not None:
            out["frame_pts"] = list(self.frame_pts)
        if self.kind in ("images", "video"):
            out.update(target_size=self.target_size, mode=self.mode, patch_size=self.patch_size)
        if self.synthetic is not None:
            config = dataclasses.asdict(self.synthetic)
            config["sources"] = list(config["sources"]) if config["sources"] is not None else None
            out["synthetic"] = config
            out["synthetic_index"] = self.synthetic_index
        if self.shape is not None:
            out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleRef:
        """Rebuild a descriptor written by :meth:`to_dict`."""
        try:
            synthetic = data.get("synthetic")
            pts = data.get("frame_pts")
            shape = data.get("shape")
            return cls(
                id=str(data["id"]),
                kind=str(data["kind"]),
                paths=tuple(str(p) for p in data.get("paths", ())),
                frame_indices=tuple(int(i) for i in data.get("frame_indices", ())),
                frame_pts=tuple(int(p) for p in pts) if pts is not None else None,
                target_size=int(data.get("target_size", 518)),
                mode=str(data.get("mode", "crop")),
                patch_size=int(data.get("patch_size", 14)),
                synthetic=SyntheticSequenceConfig(**synthetic) if synthetic is not None else None,
                synthetic_index=data.get("synthetic_index"),
                shape=tuple(int(s) for s in shape) if shape is not None else None,  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QVGGTError(f"malformed sample descriptor {data!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------


class CandidatePool(Sequence[torch.Tensor]):
    """A lazy, ordered pool of calibration candidates: descriptors in memory, pixels on demand.

    ``pool[i]`` loads sample ``i`` (``[frames, 3, H, W]``); ``pool[a:b]`` is a sub-pool; iteration loads
    one sample at a time. :meth:`iter_samples` pairs samples with their descriptors and applies the
    pool's ``skip_bad`` policy.
    """

    def __init__(self, refs: Sequence[SampleRef], *, skip_bad: bool = False) -> None:
        refs = list(refs)
        ids = [r.id for r in refs]
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise QVGGTError(f"candidate ids must be unique; duplicated: {duplicates[:5]}")
        self._refs = refs
        self.skip_bad = bool(skip_bad)
        self.skipped: list[str] = []

    @property
    def refs(self) -> list[SampleRef]:
        """The sample descriptors, in pool order."""
        return list(self._refs)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self._refs]

    def __len__(self) -> int:
        return len(self._refs)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> CandidatePool: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | CandidatePool:
        if isinstance(index, slice):
            return CandidatePool(self._refs[index], skip_bad=self.skip_bad)
        return self._refs[index].load()

    def __repr__(self) -> str:
        kinds = sorted({r.kind for r in self._refs})
        return f"CandidatePool({len(self)} samples, kinds={kinds}, resolutions={sorted(self.resolutions())})"

    def subset(self, indices: Sequence[int]) -> CandidatePool:
        """A pool of the samples at ``indices`` (in that order)."""
        return CandidatePool([self._refs[i] for i in indices], skip_bad=self.skip_bad)

    def shapes(self) -> list[tuple[int, int, int, int] | None]:
        """Predicted ``(frames, 3, H, W)`` of each sample (``None`` where unknown), without loading."""
        return [r.shape for r in self._refs]

    def resolutions(self) -> set[tuple[int, int]]:
        """The distinct predicted ``(H, W)`` of the samples (more than one: see the module notes)."""
        return {(s[2], s[3]) for s in self.shapes() if s is not None}

    def iter_samples(self, *, reuse_frames: bool = True, frame_cache_bytes: int = DEFAULT_FRAME_CACHE_BYTES,
                     workers: int | None = None) -> Iterator[tuple[SampleRef, torch.Tensor]]:
        """Yield ``(descriptor, sample)`` pairs, one sample at a time, in pool order.

        Windows of one sequence overlap (400 windows from a few clips share most frames), so with
        ``reuse_frames`` each run of consecutive samples from one video or image folder is streamed in one
        pass: every frame it uses is decoded and preprocessed once, a sample is yielded as soon as its
        frames are ready (not after the whole run), and a frame is released once no later sample of the run
        needs it, so memory is bounded by a window's span of frames (plus the frames read ahead), not by
        the run. Runs are also cut where their distinct frames pass ``frame_cache_bytes``. The samples are
        the tensors :meth:`SampleRef.load` gives, bit for bit (same decoder, same per-frame
        preprocessing, same stacking).

        Args:
            reuse_frames: Share frames between the samples of a run (``False``: read each sample alone).
            frame_cache_bytes: Cap on the distinct frames of one run (``0``: every sample alone).
            workers: Threads that convert and resize/pad frames while this thread decodes video (image
                files are also opened in them); up to ``4 * workers`` frames are read ahead, and they keep
                working while the caller holds a sample. ``None``: :data:`DEFAULT_READ_WORKERS`; ``0`` or
                ``1``: everything in the calling thread, on demand.

        A sample that fails to load raises :class:`QVGGTError` naming the file, or, if the pool was built
        with ``skip_bad=True``, is skipped with a warning and its id appended to :attr:`skipped`. (If a
        run's shared video decode fails, its remaining samples are read one by one, so one bad frame costs
        only its samples.)
        """
        if isinstance(frame_cache_bytes, bool) or not isinstance(frame_cache_bytes, int) or frame_cache_bytes < 0:
            raise QVGGTError(f"frame_cache_bytes must be an integer >= 0, got {frame_cache_bytes!r}")
        if workers is None:
            workers = DEFAULT_READ_WORKERS
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise QVGGTError(f"workers must be None or an integer >= 0 (reading threads), got {workers!r}")
        chunks = _frame_sharing_chunks(self._refs, frame_cache_bytes) if reuse_frames else [[r] for r in self._refs]
        executor = ThreadPoolExecutor(workers, thread_name_prefix="calib-read") if workers > 1 else None
        ahead = _READ_AHEAD_PER_WORKER * workers if executor is not None else 0
        try:
            for chunk in chunks:
                results = _stream_chunk(chunk, executor, ahead) if _group_key(chunk[0]) is not None else (
                    (ref, _load_or_error(ref)) for ref in chunk)
                with closing(results):  # type: ignore[arg-type]
                    for ref, sample in results:
                        if isinstance(sample, QVGGTError):
                            if not self.skip_bad:
                                raise sample
                            logger.warning("skipping candidate %s: %s", ref.id, sample)
                            if ref.id not in self.skipped:
                                self.skipped.append(ref.id)
                            continue
                        yield ref, sample
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Frame reuse across overlapping windows (internal)
# --------------------------------------------------------------------------------------------------


def _frame_keys(ref: SampleRef) -> list[Any]:
    """One hashable key per frame of ``ref`` (file or video frame index), in frame order."""
    if ref.kind == "images":
        return list(ref.paths)
    return list(ref.frame_indices)


def _group_key(ref: SampleRef) -> tuple[Any, ...] | None:
    """Samples with equal keys read their frames from one source with one preprocessing; ``None``: alone."""
    if ref.kind == "video":
        return ("video", ref.paths[0], ref.target_size, ref.mode, ref.patch_size, ref.frame_pts is None)
    if ref.kind == "images":
        return ("images", str(Path(ref.paths[0]).parent), ref.target_size, ref.mode, ref.patch_size)
    return None


def _frame_bytes(ref: SampleRef) -> int:
    if ref.shape is not None:
        return 3 * ref.shape[2] * ref.shape[3] * 4
    return 3 * ref.target_size * ref.target_size * 4  # float32; the largest a square crop/pad can be


def _frame_sharing_chunks(refs: Sequence[SampleRef], limit_bytes: int) -> list[list[SampleRef]]:
    """Runs of consecutive samples with one :func:`_group_key`, cut where their distinct frames pass the limit."""
    chunks: list[list[SampleRef]] = []
    key: tuple[Any, ...] | None = None
    seen: set[Any] = set()
    used = 0
    for ref in refs:
        group = _group_key(ref)
        new = set(_frame_keys(ref)) - seen if group is not None else set()
        cost = len(new) * _frame_bytes(ref)
        if group is None or group != key or not chunks or used + cost > limit_bytes:
            chunks.append([ref])
            key, seen = group, set(_frame_keys(ref)) if group is not None else set()
            used = len(seen) * _frame_bytes(ref)
        else:
            chunks[-1].append(ref)
            seen |= new
            used += cost
    return chunks


def _load_or_error(ref: SampleRef) -> torch.Tensor | QVGGTError:
    try:
        return ref.load()
    except QVGGTError as exc:
        return exc


def _image_frame(path: str, target_size: int, mode: str, patch_size: int) -> torch.Tensor | QVGGTError:
    """Open + preprocess one image file; a read error is returned (it belongs to the samples using the file)."""
    try:
        return preprocess_image(open_image(Path(path)), target_size, mode, patch_size)
    except QVGGTError as exc:
        return exc


def _video_frame(frame: Any, target_size: int, mode: str, patch_size: int) -> torch.Tensor | QVGGTError:
    """Convert + preprocess one decoded video frame (the work :meth:`SampleRef.load` does per frame)."""
    try:
        return preprocess_image(frame.to_image(), target_size, mode, patch_size)
    except QVGGTError as exc:
        return exc


def _frame_jobs(chunk: Sequence[SampleRef]) -> Iterator[tuple[Any, Callable[[], torch.Tensor | QVGGTError]]]:
    """``(frame key, preprocessing job)`` for every distinct frame of ``chunk``, in reading order.

    Image files come in the order the samples first use them; video frames in decoding order (ascending),
    decoded here, in the calling thread (PyAV's decoder is sequential). Raises :class:`QVGGTError` if the
    video cannot be decoded.
    """
    first = chunk[0]
    size, mode, patch = first.target_size, first.mode, first.patch_size
    if first.kind == "images":
        for path in dict.fromkeys(p for ref in chunk for p in ref.paths):
            yield path, lambda path=path: _image_frame(path, size, mode, patch)
        return
    pts_of: dict[int, int] | None = {}
    for ref in chunk:
        if ref.frame_pts is None or len(ref.frame_pts) != len(ref.frame_indices):
            pts_of = None
            break
        pts_of.update(zip(ref.frame_indices, ref.frame_pts, strict=True))  # type: ignore[union-attr]
    indices = sorted({i for ref in chunk for i in ref.frame_indices})
    pts = [pts_of[i] for i in indices] if pts_of is not None else None
    with closing(_iter_video_frames(Path(first.paths[0]), indices, pts)) as frames:
        for index, frame in frames:
            yield index, lambda frame=frame: _video_frame(frame, size, mode, patch)


def _stream_chunk(chunk: Sequence[SampleRef], executor: ThreadPoolExecutor | None,
                  ahead: int) -> Iterator[tuple[SampleRef, torch.Tensor | QVGGTError]]:
    """Yield each sample of ``chunk`` (one source, one preprocessing) as soon as its frames are read.

    Each distinct frame is read once (by ``executor``'s threads, keeping ``ahead`` frames in flight, or
    here on demand) and dropped after the last sample that uses it. A failed load is yielded as the error;
    if the shared decode fails or ends early, the samples it cannot serve load alone (each reports its own
    error).
    """
    keys = [_frame_keys(ref) for ref in chunk]
    last_use = {key: j for j, frame_keys in enumerate(keys) for key in frame_keys}
    frames: dict[Any, torch.Tensor | QVGGTError] = {}
    queue: deque[tuple[Any, Future[torch.Tensor | QVGGTError] | None]] = deque()
    jobs = _frame_jobs(chunk)
    exhausted = False

    def submit(limit: int) -> None:
        """Take jobs from the decoder until ``limit`` frames are queued (serial: queue one, run it later)."""
        nonlocal exhausted
        while not exhausted and len(queue) < limit:
            try:
                item = next(jobs, None)
            except QVGGTError as exc:
                logger.debug("shared read of %s failed (%s); loading its samples one by one", chunk[0].paths[0], exc)
                item = None
            if item is None:
                exhausted = True
            elif executor is not None:
                queue.append((item[0], executor.submit(item[1])))
            else:
                frames[item[0]] = item[1]()
                queue.append((item[0], None))

    try:
        for j, ref in enumerate(chunk):
            while any(key not in frames for key in keys[j]):
                submit(max(ahead, 1))
                if not queue:
                    break
                key, future = queue.popleft()
                if future is not None:
                    frames[key] = future.result()
            if all(key in frames for key in keys[j]):
                try:
                    sample: torch.Tensor | QVGGTError = _stack_from(ref, frames)
                except QVGGTError as exc:
                    sample = exc
            else:
                sample = _load_or_error(ref)
            submit(ahead)  # keep the workers busy while the caller uses the sample
            yield ref, sample
            for key in keys[j]:
                if last_use[key] == j:
                    frames.pop(key, None)
    finally:
        for _, future in queue:
            if future is not None:
                future.cancel()
        jobs.close()


def _stack_from(ref: SampleRef, frames: dict[Any, torch.Tensor | QVGGTError]) -> torch.Tensor:
    stack = []
    for key in _frame_keys(ref):
        frame = frames[key]
        if isinstance(frame, QVGGTError):
            raise frame
        stack.append(frame)
    return stack_frames(stack)


# --------------------------------------------------------------------------------------------------
# Sequences (internal): an ordered list of frames from some source, before windows are drawn
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sequence:
    name: str
    kind: str  # "images" or "video"
    paths: list[Path]  # frames, or [video]
    length: int
    pts: list[int] | None = None  # video: presentation timestamps in frame order
    video_hw: tuple[int, int] | None = None  # video: (height, width)
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)  # image: (width, height) after probing


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise QVGGTError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _videos_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise QVGGTError("reading calibration videos needs PyAV, which is not installed. "
                         "Install it with: pip install av") from exc
    return av


def _av_errors(av: Any) -> tuple[type[BaseException], ...]:
    ffmpeg_error = getattr(getattr(av, "error", None), "FFmpegError", None)
    return tuple(e for e in (ffmpeg_error, OSError, ValueError, EOFError) if e is not None)


def _decode_robust(container: Any, stream: Any) -> Iterator[Any]:
    """``container.decode(stream)`` that ends at a damaged packet instead of raising, after flushing the frames
    the decoder still holds (reordered B-frames): a cut file gives every frame before the cut."""
    errors = _av_errors(_import_av())
    try:
        for packet in container.demux(stream):
            yield from packet.decode()
    except errors:
        with contextlib.suppress(*errors):
            yield from stream.codec_context.decode(None)


def _decodable_from(path: Path, start: int | None) -> list[int | None]:
    """Timestamps of the frames that actually decode from the key frame at ``start`` (``None``: from the
    beginning) to the end; a decoding error ends the list there (a cut or damaged tail)."""
    av = _import_av()
    errors = _av_errors(av)
    decoded: list[int | None] = []
    with contextlib.suppress(*errors), av.open(str(path)) as container:
        stream = container.streams.video[0]
        if start is not None:
            container.seek(start, stream=stream, backward=True, any_frame=False)
        decoded = [frame.pts for frame in _decode_robust(container, stream)]  # timestamps only: no frame kept
    return [pts for pts in decoded if start is None or (pts is not None and pts >= start)]


def _probe_video(path: Path) -> tuple[list[int] | None, int, tuple[int, int]]:
    """The first video stream's decodable frames: (sorted frame pts or None, frame count, (H, W)).

    The container's frame count is never trusted (headers of phone and web videos often list frames that
    cannot be decoded): packets are demuxed without decoding, then the last group of pictures (from the last
    key frame on) is decoded to see where the video really ends; without usable timestamps the whole stream
    is decoded once and counted."""
    av = _import_av()
    if not path.is_file():
        raise QVGGTError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise QVGGTError(f"{path} has no video stream")
            stream = container.streams.video[0]
            hw = (int(stream.codec_context.height), int(stream.codec_context.width))
            stamps: list[int | None] = []
            keyframes: list[int] = []
            with contextlib.suppress(*_av_errors(av)):  # a damaged container: what demuxed so far
                for packet in container.demux(stream):
                    if packet.size:
                        stamps.append(packet.pts)
                        if packet.is_keyframe and packet.pts is not None:
                            keyframes.append(packet.pts)
    except QVGGTError:
        raise
    except _av_errors(av) as exc:
        raise QVGGTError(f"cannot read video {path}: {exc}") from exc
    if not stamps:
        raise QVGGTError(f"video {path} has no frames")
    listed = len(stamps)
    if any(s is None for s in stamps) or len(set(stamps)) != len(stamps):
        count = len(_decodable_from(path, None))  # no usable timestamps: decode sequentially
        if count < listed:
            logger.warning("video %s lists %d frames, %d decode: using those", path, listed, count)
        if not count:
            raise QVGGTError(f"video {path} has no decodable frame ({listed} listed)")
        return None, count, hw
    ordered = sorted(s for s in stamps if s is not None)
    last_key = max(keyframes) if keyframes else None
    tail = set(_decodable_from(path, last_key))
    decodable = [s for s in ordered if (last_key is not None and s < last_key) or s in tail]
    if len(decodable) < listed:
        logger.warning("video %s lists %d frames, %d decode: using those", path, listed, len(decodable))
    if not decodable:
        raise QVGGTError(f"video {path} has no decodable frame ({listed} listed)")
    return decodable, len(decodable), hw


def video_frame_count(path: str | os.PathLike[str]) -> int:
    """Number of frames in the first video stream of ``path`` (counted by demuxing, not from metadata)."""
    return _probe_video(Path(path))[1]


class _SeekMissError(Exception):
    """Seeking did not deliver the wanted frames; fall back to decoding from the start."""


def _iter_video_frames(path: Path, indices: Sequence[int], pts: Sequence[int] | None) -> Iterator[tuple[int, Any]]:
    """Decode the frames at ``indices`` (presentation order) of ``path``: ``(index, av.VideoFrame)`` as decoded.

    With timestamps, seeks to the key frame before each wanted frame; if seeking misses a frame, the rest
    are decoded sequentially from the start. Raises :class:`QVGGTError` naming the file if it cannot be
    decoded or ends before a wanted frame.
    """
    av = _import_av()
    if not path.is_file():
        raise QVGGTError(f"video not found: {path}")
    wanted = set(indices)
    done: set[int] = set()
    try:
        if pts is not None and len(pts) == len(indices):
            try:
                with av.open(str(path)) as container:
                    stream = container.streams.video[0]
                    stream.thread_type = "AUTO"
                    for index, frame in _seek_frames(container, stream, dict(zip(pts, indices, strict=True))):
                        done.add(index)
                        yield index, frame
            except _SeekMissError:
                logger.debug("seeking in %s missed frames; decoding the rest sequentially", path)
        if len(done) < len(wanted):
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                # Slice threads only: frame threading drops the frames in flight when a damaged packet stops it.
                stream.thread_type = "SLICE"
                for position, frame in enumerate(_decode_robust(container, stream)):
                    if position in wanted and position not in done:
                        done.add(position)
                        yield position, frame
                        if len(done) == len(wanted):
                            break
    except _av_errors(av) as exc:
        raise QVGGTError(f"cannot decode video {path} ({len(done)} of the {len(wanted)} wanted frames decoded: "
                         f"{exc}); pass --skip-bad to skip the windows it cannot give") from exc
    missing = sorted(wanted - done)
    if missing:
        raise QVGGTError(f"video {path} ended before frame(s) {missing[:5]} could be decoded ({len(done)} of the "
                         f"{len(wanted)} wanted frames decoded); pass --skip-bad to skip the windows it cannot give")


def _decode_video_frames(path: Path, indices: Sequence[int], pts: Sequence[int] | None) -> list[Any]:
    """Decode the frames at ``indices`` (presentation order) of ``path`` as PIL images, in ``indices`` order."""
    found = {index: frame.to_image() for index, frame in _iter_video_frames(path, indices, pts)}
    return [found[i] for i in indices]


def _seek_frames(container: Any, stream: Any, index_of_pts: dict[int, int]) -> Iterator[tuple[int, Any]]:
    """Seek to the key frame before each wanted timestamp and decode forward: ``(index, frame)`` as found.

    The key frames are listed first (demuxing only), so a new seek happens only when a key frame lies
    between the last decoded frame and the next wanted one: never more decoding than sequential order.
    Raises :class:`_SeekMissError` when a wanted frame does not come out where expected.
    """
    keyframes = sorted(p.pts for p in container.demux(stream) if p.is_keyframe and p.pts is not None)
    if not keyframes:
        raise _SeekMissError

    def key_before(stamp: int) -> int:
        return keyframes[max(bisect.bisect_right(keyframes, stamp) - 1, 0)]

    found: set[int] = set()
    remaining = sorted(index_of_pts)
    while remaining:
        container.seek(remaining[0], stream=stream, backward=True, any_frame=False)
        progressed = False
        for frame in _decode_robust(container, stream):
            stamp = frame.pts
            if stamp is None:
                raise _SeekMissError
            if stamp in index_of_pts and index_of_pts[stamp] not in found:
                found.add(index_of_pts[stamp])
                remaining.remove(stamp)
                progressed = True
                yield index_of_pts[stamp], frame
            if not remaining:
                break
            if stamp > remaining[0]:
                raise _SeekMissError  # the wanted frame never came out of the decoder
            if key_before(remaining[0]) > stamp:
                break  # a key frame lies ahead of us: seek there rather than decode the frames between
        else:
            if remaining:
                raise _SeekMissError
        if not progressed and remaining:
            raise _SeekMissError


def _probe_image(path: Path) -> tuple[int, int]:
    """Read an image header: (width, height). Cheap; pixel corruption shows only on load."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as exc:
        raise QVGGTError(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise QVGGTError(f"cannot read image {path}: {exc}") from exc


def list_file_sequences(path: str | os.PathLike[str]) -> list[list[Path]]:
    """Parse a list file (see the module notes) into frame-path lists, one per sequence, in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QVGGTError(f"list file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QVGGTError(f"cannot read list file {path}: {exc}") from exc
    base = path.parent
    entries: list[list[str]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QVGGTError(f"list file {path} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and "samples" in data:
            data = data["samples"]
        if not isinstance(data, list):
            raise QVGGTError(f"list file {path} must hold a JSON list of lists of frame paths, "
                             f"got {type(data).__name__}")
        for number, item in enumerate(data):
            frames = item.get("frames") if isinstance(item, dict) else item
            if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
                raise QVGGTError(f"list file {path}: entry {number} must be a list of frame paths "
                                 f"(or an object with a 'frames' list), got {item!r}")
            entries.append(frames)
    else:
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(",") if "," in line else line.split()
            entries.append([p.strip() for p in parts if p.strip()])
    # Relative entries are relative to the list file; "/" or "~" entries are taken as they are.
    sequences = [[base / Path(f).expanduser() for f in frames] for frames in entries]
    sequences = [s for s in sequences if s]
    if not sequences:
        raise QVGGTError(f"list file {path} names no frames")
    return sequences


def _co3d_sequences(root: Path) -> list[tuple[str, list[Path]]]:
    if (root / "images").is_dir():
        candidates = [(root.name, root / "images")]
    elif any(root.glob("*/images")):
        candidates = [(p.parent.name, p) for p in sorted(root.glob("*/images")) if p.is_dir()]
    else:
        candidates = [(f"{p.parent.parent.name}/{p.parent.name}", p) for p in sorted(root.glob("*/*/images"))
                      if p.is_dir()]
    return [(name, imgs) for name, folder in candidates if (imgs := _images_in(folder))]


def _detect_layout(path: Path) -> str:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            return "video"
        if suffix in LIST_SUFFIXES:
            return "list"
        raise QVGGTError(f"cannot tell what {path} is: expected a video ({', '.join(VIDEO_SUFFIXES)}), a list file "
                         f"({', '.join(LIST_SUFFIXES)}) or a folder")
    if (path / "images").is_dir() or any(path.glob("*/images")) or any(path.glob("*/*/images")):
        return "co3d"
    if _videos_in(path) and not _images_in(path):
        return "video"
    return "folders"


def _sequences_from(source: Path, layout: str) -> list[_Sequence]:
    """The (unprobed) sequences of one file-system source."""
    source = source.expanduser()
    if not source.exists():
        raise QVGGTError(f"calibration data not found: {source}")
    if layout == "auto":
        layout = _detect_layout(source)
    if layout == "video":
        videos = [source] if source.is_file() else _videos_in(source)
        if not videos:
            raise QVGGTError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {source}")
        return [_Sequence(name=v.name, kind="video", paths=[v], length=0) for v in videos]
    if layout == "list":
        if not source.is_file():
            raise QVGGTError(f"layout 'list' needs a list file, got the folder {source}")
        return [_Sequence(name=f"{source.name}:{n}", kind="images", paths=s, length=len(s))
                for n, s in enumerate(list_file_sequences(source))]
    if not source.is_dir():
        raise QVGGTError(f"layout {layout!r} needs a folder, got the file {source}")
    if layout == "co3d":
        found = _co3d_sequences(source)
        if not found:
            raise QVGGTError(f"no CO3D sequences (<category>/<sequence>/images/*.jpg) under {source}")
        return [_Sequence(name=name, kind="images", paths=imgs, length=len(imgs)) for name, imgs in found]
    if layout == "folders":
        scenes = scene_folders(source)
        out = []
        for scene in scenes:
            parent = scene[0].parent
            name = source.name if parent == source else parent.relative_to(source).as_posix()
            out.append(_Sequence(name=name, kind="images", paths=list(scene), length=len(scene)))
        return out
    raise QVGGTError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# --------------------------------------------------------------------------------------------------
# Window drawing
# --------------------------------------------------------------------------------------------------


def _strides_for(length: int, frames: int, strides: Sequence[int] | None) -> list[int]:
    if frames == 1:
        return [1] if length >= 1 else []
    widest = (length - 1) // (frames - 1)
    allowed = range(1, widest + 1) if strides is None else sorted({s for s in strides if s <= widest})
    return list(allowed)


def _window_capacity(length: int, frames: int, strides: Sequence[int] | None) -> int:
    return sum(length - (frames - 1) * s for s in _strides_for(length, frames, strides))


def _allocate(capacities: Sequence[int], total: int | None, rng: np.random.Generator) -> list[int]:
    """Spread ``total`` samples over sequences round-robin (seed-shuffled order), capped by capacity."""
    if total is None:
        return list(capacities)
    quota = [0] * len(capacities)
    order = rng.permutation(len(capacities))
    remaining = total
    while remaining > 0:
        progressed = False
        for i in order:
            if remaining == 0:
                break
            if quota[i] < capacities[i]:
                quota[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return quota


def _draw_windows(name: str, length: int, frames: int, strides: Sequence[int] | None, count: int,
                  seed: int) -> list[tuple[int, int]]:
    """``count`` distinct (start, stride) windows of one sequence, rotating over strides, seed-drawn starts."""
    allowed = _strides_for(length, frames, strides)
    if count <= 0 or not allowed:
        return []
    # Keyed by the sequence name (crc32 is stable across runs, unlike hash()).
    rng = np.random.default_rng([seed, _KEY_WINDOWS, zlib.crc32(name.encode("utf-8"))])
    order = [allowed[i] for i in rng.permutation(len(allowed))]
    starts = {s: list(rng.permutation(length - (frames - 1) * s)) for s in order}
    count = min(count, sum(len(v) for v in starts.values()))
    chosen: list[tuple[int, int]] = []
    while len(chosen) < count:
        for stride in order:
            if len(chosen) == count:
                break
            if starts[stride]:
                chosen.append((int(starts[stride].pop()), stride))
    return sorted(chosen)


def _preprocessed_hw(width: int, height: int, target_size: int, mode: str, patch_size: int) -> tuple[int, int]:
    """(H, W) that :func:`preprocess_image` gives an image of ``width`` x ``height`` (same arithmetic)."""
    if mode == "pad":
        return target_size, target_size
    new_height = round(height * (target_size / width) / patch_size) * patch_size
    return min(new_height, target_size), target_size


def _window_shape(sizes: Sequence[tuple[int, int]], target_size: int, mode: str,
                  patch_size: int) -> tuple[int, int, int, int]:
    hws = [_preprocessed_hw(w, h, target_size, mode, patch_size) for w, h in sizes]
    # stack_frames pads every frame to the largest height and width.
    return len(hws), 3, max(h for h, _ in hws), max(w for _, w in hws)


# --------------------------------------------------------------------------------------------------
# Building the pool
# --------------------------------------------------------------------------------------------------


def _synthetic_pool(source: str | SyntheticSequenceConfig, frames: int, target_size: int, pool_size: int | None,
                    seed: int) -> list[SampleRef]:
    if isinstance(source, SyntheticSequenceConfig):
        # The config fixes the content (its own seed and image size); frames and pool size come from the call.
        config = dataclasses.replace(source, frames=frames,
                                     num_sequences=pool_size if pool_size is not None else source.num_sequences)
        if (config.height, config.width) != (target_size, target_size):
            logger.info("synthetic sequences keep their configured %dx%d size (target_size=%d not applied)",
                        config.height, config.width, target_size)
    else:
        config = SyntheticSequenceConfig(frames=frames, height=target_size, width=target_size, seed=seed,
                                         num_sequences=pool_size if pool_size is not None else 8)
    shape = (config.frames, 3, config.height, config.width)
    return [SampleRef(id=f"synthetic/seed{config.seed}/{i:04d}", kind="synthetic", synthetic=config,
                      synthetic_index=i, shape=shape) for i in range(config.num_sequences)]


def _unique_names(groups: list[list[_Sequence]]) -> None:
    """Prefix names with the source's position where two sources produce the same sequence name."""
    seen: dict[str, int] = {}
    for group in groups:
        for seq in group:
            seen[seq.name] = seen.get(seq.name, 0) + 1
    if any(count > 1 for count in seen.values()):
        for number, group in enumerate(groups):
            for seq in group:
                if seen[seq.name] > 1:
                    seq.name = f"{number}:{seq.name}"
    names = [s.name for g in groups for s in g]
    if len(set(names)) != len(names):
        raise QVGGTError(f"two calibration sequences share a name: {sorted({n for n in names if names.count(n) > 1})}")


def build_candidate_pool(
    source: str | os.PathLike[str] | SyntheticSequenceConfig | Sequence[str | os.PathLike[str]],
    frames: int = 10,
    target_size: int = 518,
    mode: str = "crop",
    pool_size: int | None = 400,
    seed: int = 0,
    skip_bad: bool = False,
    *,
    layout: str = "auto",
    strides: Sequence[int] | None = None,
    patch_size: int = 14,
) -> CandidatePool:
    """Build a lazy pool of ``pool_size`` candidate samples ``[frames, 3, H, W]`` (see the module notes).

    Nothing is decoded except image headers and video packet indexes; samples load on demand.

    Args:
        source: An image folder (one scene or a folder of scenes), a CO3Dv2 root, a video or folder of
            videos, a list file, a list of such paths (pooled together), the string ``"synthetic"``
            (generated ``target_size`` x ``target_size`` sequences seeded by ``seed``) or a
            :class:`SyntheticSequenceConfig` (its own seed and image size; ``frames`` and
            ``pool_size`` override its ``frames`` and ``num_sequences``).
        frames: Frames per sample (``S``).
        target_size: Preprocessing size, a multiple of ``patch_size``.
        mode: ``"crop"`` (width ``target_size``, height by aspect) or ``"pad"`` (square).
        pool_size: Number of candidates to draw; ``None`` takes every window of every sequence. If the
            sources hold fewer windows, the pool is smaller (with a warning).
        seed: Seeds the window draw (and the content of ``"synthetic"`` sequences).
        skip_bad: Skip unreadable files (and sequences that become too short) with a warning instead
            of raising.
        layout: ``"auto"`` or one of :data:`LAYOUTS`, applied to every path in ``source``.
        strides: Allowed frame strides inside a window; ``None`` allows every stride that fits.
        patch_size: The model's patch size.

    Returns:
        The pool; samples are ordered by sequence, then by start frame and stride.

    Raises:
        QVGGTError: Missing or empty source, bad arguments, no sequence with at least ``frames``
            frames, or (without ``skip_bad``) an unreadable file, named in the message.
    """
    frames = _check_int("frames", frames, 1)
    target_size = _check_int("target_size", target_size, 1)
    patch_size = _check_int("patch_size", patch_size, 1)
    seed = _check_int("seed", seed, 0)
    if pool_size is not None:
        pool_size = _check_int("pool_size", pool_size, 1)
    if mode not in PREPROCESS_MODES:
        raise QVGGTError(f"preprocessing mode must be one of {PREPROCESS_MODES}, got {mode!r}")
    if layout not in LAYOUTS:
        raise QVGGTError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if target_size % patch_size:
        below = max(patch_size, target_size // patch_size * patch_size)
        raise QVGGTError(f"target_size must be a multiple of the patch size {patch_size}, got {target_size}; "
                         f"nearest valid values: {below} or {below + patch_size}")
    if strides is not None:
        strides = [_check_int("stride", s, 1) for s in strides]
        if not strides:
            raise QVGGTError("strides must name at least one stride (or be None for all)")

    is_synthetic = isinstance(source, SyntheticSequenceConfig) or (isinstance(source, str) and source == SYNTHETIC)
    if is_synthetic or layout == SYNTHETIC:
        if layout not in ("auto", SYNTHETIC) or not is_synthetic:
            raise QVGGTError(f"layout 'synthetic' needs source='synthetic' or a SyntheticSequenceConfig, "
                             f"got {source!r} with layout {layout!r}")
        return CandidatePool(_synthetic_pool(source, frames, target_size, pool_size, seed), skip_bad=skip_bad)

    paths = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not paths:
        raise QVGGTError("no calibration source given")
    if any(isinstance(p, SyntheticSequenceConfig) or p == SYNTHETIC for p in paths):
        raise QVGGTError("generated ('synthetic') sequences cannot be mixed with file sources in one pool")
    groups = [_sequences_from(Path(p), layout) for p in paths]
    _unique_names(groups)
    sequences = [seq for group in groups for seq in group]

    # Zero-byte images are unreadable frames, not frames: found by size before any window is planned, so that
    # "not enough frames" counts readable ones.
    for seq in sequences:
        if seq.kind != "images":
            continue
        empty = [path for path in seq.paths if path.is_file() and path.stat().st_size == 0]
        if empty and not skip_bad:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise QVGGTError(f"image {empty[0]} is an empty file (0 bytes){more}: unreadable; pass --skip-bad to "
                             "skip unreadable files")
        if empty:
            logger.warning("skipping %d empty image file(s) in %s, e.g. %s", len(empty), seq.name, empty[0])
            seq.paths = [path for path in seq.paths if path not in set(empty)]
            seq.length = len(seq.paths)

    # Videos: demux once to count frames (and validate the file).
    for seq in sequences:
        if seq.kind == "video":
            try:
                seq.pts, seq.length, seq.video_hw = _probe_video(seq.paths[0])
            except QVGGTError as exc:
                if not skip_bad:
                    raise
                logger.warning("skipping video %s: %s", seq.paths[0], exc)
                seq.length = 0

    bad: set[Path] = set()
    warned: set[str] = set()
    allocation_rng_seed = [seed, _KEY_ALLOCATION]
    while True:
        usable: list[_Sequence] = []
        for seq in sequences:
            if seq.kind == "images" and bad:
                kept = [p for p in seq.paths if p not in bad]
                if len(kept) != len(seq.paths):
                    seq.paths, seq.length = kept, len(kept)
            if seq.length >= frames:
                usable.append(seq)
            elif seq.name not in warned:
                warned.add(seq.name)
                if seq.length > 0:
                    logger.warning("skipping sequence %s: %d frame(s), fewer than frames=%d", seq.name, seq.length,
                                   frames)
        if not usable:
            lengths = {s.name: s.length for s in sequences}
            longest = max(lengths.values(), default=0)
            raise QVGGTError(f"no sequence in {', '.join(str(p) for p in paths)} has at least {frames} readable "
                             f"frames (longest: {longest}); lower frames or add data")
        capacities = [_window_capacity(s.length, frames, strides) for s in usable]
        if sum(capacities) == 0:
            raise QVGGTError(f"no window of {frames} frames fits the strides {strides} in any sequence")
        quota = _allocate(capacities, pool_size, np.random.default_rng(allocation_rng_seed))
        windows = {s.name: _draw_windows(s.name, s.length, frames, strides, q, seed) for s, q in zip(usable, quota,
                                                                                                     strict=True)}
        newly_bad: list[tuple[Path, QVGGTError]] = []
        for seq in usable:
            if seq.kind != "images":
                continue
            needed = sorted({i for start, stride in windows[seq.name] for i in range(start, start + frames * stride,
                                                                                      stride)})
            for i in needed:
                frame_path = seq.paths[i]
                if frame_path in seq.sizes:
                    continue
                try:
                    seq.sizes[frame_path] = _probe_image(frame_path)
                except QVGGTError as exc:
                    if not skip_bad:
                        raise
                    newly_bad.append((frame_path, exc))
        if not newly_bad:
            break
        for frame_path, exc in newly_bad:
            logger.warning("skipping unreadable frame: %s", exc)
            bad.add(frame_path)

    refs: list[SampleRef] = []
    for seq in usable:
        for start, stride in windows[seq.name]:
            positions = list(range(start, start + frames * stride, stride))
            stop = positions[-1] + 1
            sample_id = f"{seq.name}[{start}:{stop}:{stride}]"
            if seq.kind == "video":
                height, width = seq.video_hw  # type: ignore[misc]
                refs.append(SampleRef(
                    id=sample_id, kind="video", paths=(str(seq.paths[0]),), frame_indices=tuple(positions),
                    frame_pts=tuple(seq.pts[i] for i in positions) if seq.pts is not None else None,
                    target_size=target_size, mode=mode, patch_size=patch_size,
                    shape=_window_shape([(width, height)] * frames, target_size, mode, patch_size)))
            else:
                frame_paths = [seq.paths[i] for i in positions]
                refs.append(SampleRef(
                    id=sample_id, kind="images", paths=tuple(str(p) for p in frame_paths),
                    target_size=target_size, mode=mode, patch_size=patch_size,
                    shape=_window_shape([seq.sizes[p] for p in frame_paths], target_size, mode, patch_size)))
    if pool_size is not None and len(refs) < pool_size:
        logger.warning("the sources hold only %d windows of %d frames; the pool has %d candidates, not %d",
                       len(refs), frames, len(refs), pool_size)
    pool = CandidatePool(refs, skip_bad=skip_bad)
    resolutions = pool.resolutions()
    if len(resolutions) > 1:
        logger.warning("candidates come in %d resolutions %s (mode=%r keeps each source's aspect ratio); NFDS "
                       "handles this, but calibration batches and engine profiles need one resolution: use "
                       "mode='pad' for %dx%d samples", len(resolutions), sorted(resolutions), mode, target_size,
                       target_size)
    logger.info("candidate pool: %d samples of %d frames from %d sequence(s)", len(pool), frames, len(usable))
    return pool
