"""Calibration data: readers, generated sequences and NFDS selection (installed as ``qvggt_export.calib``)."""

from .folders import iter_folder_sequences, scene_folders
from .nfds import (
    CalibrationSelection,
    CandidateStatistics,
    NFDSConfig,
    cluster_vectors,
    collect_statistics,
    default_nfds_layers,
    frame_correlation,
    outlier_scores,
    percentile_filter,
    sample_per_cluster,
    select_calibration_set,
    select_from_statistics,
)
from .readers import CandidatePool, SampleRef, build_candidate_pool, list_file_sequences, video_frame_count
from .report import pca_2d, plot_selection, selection_table, write_selection_report
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
    "CandidatePool",
    "SampleRef",
    "build_candidate_pool",
    "list_file_sequences",
    "video_frame_count",
    "CalibrationSelection",
    "CandidateStatistics",
    "NFDSConfig",
    "cluster_vectors",
    "collect_statistics",
    "default_nfds_layers",
    "frame_correlation",
    "outlier_scores",
    "percentile_filter",
    "sample_per_cluster",
    "select_calibration_set",
    "select_from_statistics",
    "pca_2d",
    "plot_selection",
    "selection_table",
    "write_selection_report",
]
