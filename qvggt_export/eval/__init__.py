"""Evaluation: camera-pose AUC, depth and point-map metrics against ground truth or the float model."""

from qvggt_export.eval.metrics import (
    AUC_THRESHOLDS,
    depth_metrics,
    point_metrics,
    pose_auc,
    pose_metrics,
    relative_pose_errors,
    umeyama,
)

__all__ = ["AUC_THRESHOLDS", "depth_metrics", "point_metrics", "pose_auc", "pose_metrics", "relative_pose_errors",
           "umeyama"]
