"""Reading calibration sequences from image folders.

Two layouts: a folder of images (one scene; consecutive windows of ``frames`` images become samples)
or a folder of such folders (one scene each). Images are preprocessed exactly as the model's loader
does (:func:`qvggt_export.model.preprocess_image`). Every unreadable file is reported by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.model.preprocess import load_and_preprocess_images

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scene_folders(root: str | os.PathLike[str]) -> list[list[Path]]:
    """The image lists of each scene under ``root`` (the folder itself, or its sub-folders)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise QVGGTError(f"calibration data not found: {root}")
    if not root.is_dir():
        raise QVGGTError(f"calibration data must be a folder of images or of image folders, got the file {root}")
    try:
        own = _images_in(root)
        subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    except PermissionError as exc:
        raise QVGGTError(f"cannot read calibration folder {root}: permission denied") from exc
    scenes = [own] if own else [imgs for imgs in (_images_in(f) for f in subfolders) if imgs]
    if not scenes:
        raise QVGGTError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its sub-folders")
    return scenes


def iter_folder_sequences(root: str | os.PathLike[str], frames: int, target_size: int, mode: str = "crop",
                          patch_size: int = 14, max_sequences: int | None = None) -> Iterator[torch.Tensor]:
    """Yield [frames, 3, H, W] samples: consecutive, non-overlapping windows of each scene, lazily."""
    if frames < 1:
        raise QVGGTError(f"frames must be >= 1, got {frames}")
    scenes = scene_folders(root)
    usable = [s for s in scenes if len(s) >= frames]
    if not usable:
        longest = max(len(s) for s in scenes)
        raise QVGGTError(f"every scene under {root} has fewer than {frames} images (longest: {longest}); "
                         "lower --frames or add images")
    produced = 0
    for scene in usable:
        for start in range(0, len(scene) - frames + 1, frames):
            if max_sequences is not None and produced >= max_sequences:
                return
            yield load_and_preprocess_images(scene[start:start + frames], mode=mode, target_size=target_size,
                                             patch_size=patch_size)
            produced += 1
