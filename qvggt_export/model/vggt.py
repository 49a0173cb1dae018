"""The VGGT model: aggregator plus camera, depth, point and track heads."""

from __future__ import annotations

import torch
from torch import nn

from qvggt_export.model.aggregator import Aggregator
from qvggt_export.model.config import VGGTConfig
from qvggt_export.model.heads.camera import CameraHead
from qvggt_export.model.heads.dpt import DPTHead
from qvggt_export.model.heads.track import TrackHead


class VGGT(nn.Module):
    """Visual Geometry Grounded Transformer.

    ``forward(images, query_points=None)`` takes images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1] and
    returns the official output dict: ``pose_enc`` [B, S, 9], ``pose_enc_list``, ``depth``
    [B, S, H, W, 1], ``depth_conf`` [B, S, H, W], ``world_points`` [B, S, H, W, 3],
    ``world_points_conf`` [B, S, H, W], ``images``, and with query points [B, N, 2] (pixels, frame 0)
    ``track`` [B, S, N, 2], ``vis`` and ``conf`` [B, S, N]. Heads always run in float32 (as upstream).
    """

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        self.config = config
        self.aggregator = Aggregator(config.aggregator, config.dino)
        self.camera_head = CameraHead(config.camera_head) if config.camera_head else None
        self.point_head = DPTHead(config.point_head) if config.point_head else None
        self.depth_head = DPTHead(config.depth_head) if config.depth_head else None
        self.track_head = TrackHead(config.track_head) if config.track_head else None

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5:
            raise ValueError(f"expected images [B, S, 3, H, W] or [S, 3, H, W], got shape {tuple(images.shape)}")
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        tokens, patch_start_idx = self.aggregator(images)
        predictions: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(tokens)
                predictions["pose_enc"] = pose_enc_list[-1]
                predictions["pose_enc_list"] = pose_enc_list  # type: ignore[assignment]
            if self.depth_head is not None:
                predictions["depth"], predictions["depth_conf"] = self.depth_head(tokens, images, patch_start_idx)
            if self.point_head is not None:
                predictions["world_points"], predictions["world_points_conf"] = self.point_head(
                    tokens, images, patch_start_idx)
            if self.track_head is not None and query_points is not None:
                track_list, vis, conf = self.track_head(tokens, images, patch_start_idx, query_points)
                predictions["track"] = track_list[-1]
                predictions["vis"] = vis
                if conf is not None:
                    predictions["conf"] = conf
        if not self.training:
            predictions["images"] = images
        return predictions
