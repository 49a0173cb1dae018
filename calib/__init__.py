"""Calibration data: readers and generated sequences (installed as ``qvggt_export.calib``)."""

from .folders import iter_folder_sequences, scene_folders
from .synthetic import (
    SyntheticSequence,
    SyntheticSequenceConfig,
    available_source_images,
    generate_sequence,
    generate_sequences,
    generate_sequences_with_metadata,
    iter_sequences,
    load_source_image,
)

__all__ = [
    "iter_folder_sequences",
    "scene_folders",
    "SyntheticSequence",
    "SyntheticSequenceConfig",
    "available_source_images",
    "generate_sequence",
    "generate_sequences",
    "generate_sequences_with_metadata",
    "iter_sequences",
    "load_source_image",
]
