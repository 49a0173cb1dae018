"""Pose encodings (``absT_quaR_FoV``) to cameras, and angular differences between two predictions.

The encoding is ``[tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]``: the world-to-camera translation, the
rotation as a scalar-last quaternion, and the vertical / horizontal fields of view in radians.
Extrinsics follow the OpenCV convention (camera-from-world); the principal point is the image centre.
"""

from __future__ import annotations

import torch


def quaternion_to_matrix(quaternion: torch.Tensor) -> torch.Tensor:
    """Scalar-last quaternions [..., 4] (normalised here) -> rotation matrices [..., 3, 3]."""
    q = quaternion / quaternion.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x, y, z, w = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def pose_encoding_to_extri_intri(pose_encoding: torch.Tensor, image_size_hw: tuple[int, int]
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 9] encodings -> (extrinsics [..., 3, 4], intrinsics [..., 3, 3]) for images of ``(H, W)``."""
    height, width = image_size_hw
    translation = pose_encoding[..., :3]
    rotation = quaternion_to_matrix(pose_encoding[..., 3:7])
    fov_h, fov_w = pose_encoding[..., 7], pose_encoding[..., 8]
    fy = (height / 2.0) / torch.tan(fov_h / 2.0)
    fx = (width / 2.0) / torch.tan(fov_w / 2.0)
    intrinsics = torch.zeros(*pose_encoding.shape[:-1], 3, 3, dtype=pose_encoding.dtype, device=pose_encoding.device)
    intrinsics[..., 0, 0], intrinsics[..., 1, 1] = fx, fy
    intrinsics[..., 0, 2], intrinsics[..., 1, 2] = width / 2.0, height / 2.0
    intrinsics[..., 2, 2] = 1.0
    return torch.cat([rotation, translation[..., None]], dim=-1), intrinsics


def pose_angle_errors(pose_a: torch.Tensor, pose_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame angular differences in degrees between two pose encodings [..., 9]:

    ``rotation``: the angle of ``R_a^T R_b``; ``translation``: the angle between the translation vectors
    (direction only, as in VGGT's relative-pose metrics; 0 where either is ~0).
    """
    ra, rb = quaternion_to_matrix(pose_a[..., 3:7].double()), quaternion_to_matrix(pose_b[..., 3:7].double())
    trace = (ra.transpose(-1, -2) @ rb).diagonal(dim1=-2, dim2=-1).sum(-1)
    rotation = torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0)))
    ta, tb = pose_a[..., :3].double(), pose_b[..., :3].double()
    cosine = (ta * tb).sum(-1) / (ta.norm(dim=-1) * tb.norm(dim=-1)).clamp_min(1e-12)
    translation = torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0)))
    return {"rotation": rotation, "translation": translation}
