"""Image preprocessing identical to the official VGGT loader.

``crop`` (default): resize to ``target_size`` width, height rounded to a multiple of the patch size
(bicubic), centre-crop the height to ``target_size`` if it is larger. ``pad``: resize the longer side to
``target_size`` and pad the other to a square with white (1.0). Transparent images are composited on
white. Values stay in [0, 1]; the ImageNet normalisation happens inside the model. Frames of different
sizes are padded with white to the largest, as upstream does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qvggt_export.errors import QVGGTError

logger = logging.getLogger(__name__)

PREPROCESS_MODES = ("crop", "pad")


def _round_to_patch(value: float, patch_size: int) -> int:
    # Python's round (half to even), as the official loader uses it.
    return round(value / patch_size) * patch_size


def resized_size(width: int, height: int, target_size: int, mode: str, patch_size: int) -> tuple[int, int]:
    """``(new_width, new_height)`` an image of ``width x height`` is resized to before the crop or the padding of
    :func:`preprocess_image` (the official loader's geometry; ground-truth depth maps follow the same one)."""
    if mode == "pad" and height > width:
        return _round_to_patch(width * (target_size / height), patch_size), target_size
    return target_size, _round_to_patch(height * (target_size / width), patch_size)


def preprocess_image(image: object, target_size: int = 518, mode: str = "crop", patch_size: int = 14) -> torch.Tensor:
    """One PIL image -> float tensor [3, H, W] in [0, 1], sized as the official loader sizes it."""
    from PIL import Image

    if mode not in PREPROCESS_MODES:
        raise QVGGTError(f"preprocessing mode must be one of {PREPROCESS_MODES}, got {mode!r}")
    if not isinstance(image, Image.Image):
        raise QVGGTError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB")
    width, height = image.size
    new_width, new_height = resized_size(width, height, target_size, mode, patch_size)
    if new_width < patch_size or new_height < patch_size:
        raise QVGGTError(f"image of {width}x{height} is too thin to resize to a {patch_size}-pixel patch grid")
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if mode == "crop" and new_height > target_size:
        top = (new_height - target_size) // 2
        tensor = tensor[:, top:top + target_size]
    if mode == "pad":
        pad_h, pad_w = target_size - tensor.shape[1], target_size - tensor.shape[2]
        if pad_h > 0 or pad_w > 0:
            tensor = F.pad(tensor, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=1.0)
    return tensor


def stack_frames(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [3, H, W] frames into [S, 3, H, W], padding smaller ones with white (centred), as upstream."""
    if not frames:
        raise QVGGTError("no frames to stack")
    heights = {f.shape[1] for f in frames}
    widths = {f.shape[2] for f in frames}
    if len(heights) > 1 or len(widths) > 1:
        max_h, max_w = max(heights), max(widths)
        logger.warning("frames have different sizes %s; padding all to %dx%d",
                       sorted({tuple(f.shape[1:]) for f in frames}), max_h, max_w)
        padded = []
        for f in frames:
            pad_h, pad_w = max_h - f.shape[1], max_w - f.shape[2]
            padded.append(F.pad(f, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=1.0))
        frames = padded
    return torch.stack(list(frames))


def open_image(path: str | os.PathLike[str]) -> object:
    """Open an image file fully (so a truncated file fails here, naming the file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError as exc:
        raise QVGGTError(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise QVGGTError(f"cannot read image {path}: {exc}") from exc


def load_and_preprocess_images(paths: Sequence[str | os.PathLike[str]], mode: str = "crop", target_size: int = 518,
                               patch_size: int = 14) -> torch.Tensor:
    """Image files -> [S, 3, H, W] in [0, 1], the official ``load_and_preprocess_images``."""
    if len(paths) == 0:
        raise QVGGTError("at least one image is required")
    frames = [preprocess_image(open_image(Path(p)), target_size, mode, patch_size) for p in paths]
    return stack_frames(frames)
