"""DPT head (dense prediction transformer decoder) for depth, point maps and tracking features.

Four aggregator layers are projected to four resolutions (x4 up, x2 up, x1, x2 down), fused coarse to
fine by RefineNet-style blocks, upsampled to the image size and turned into values + confidence. The
positional term added twice is a fixed sin/cos embedding of an aspect-aware UV grid.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qvggt_export.model.config import DPTHeadConfig
from qvggt_export.model.heads.activations import activate_head
from qvggt_export.model.layers import sincos_embedding

# Official constants: the UV embedding uses omega_0 = 100 and is added with weight 0.1; the last
# 3x3 conv of the output branch has 32 channels.
UV_OMEGA_0 = 100.0
UV_EMBED_WEIGHT = 0.1
OUTPUT_HIDDEN_CHANNELS = 32
# F.interpolate's element limit, above which the official code splits the batch.
INTERPOLATE_MAX_ELEMENTS = 1_610_612_736


@functools.lru_cache(maxsize=64)
def _uv_embedding_factors(width: int, height: int, channels: int, aspect_ratio: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The UV embedding of a grid spanning the image diagonal to unit length, as two zero-padded factors.

    The official embedding is [channels, height, width]: its first half of channels is a sin/cos of the
    column's u alone, its second half one of the row's v alone. Returned as ``u_part`` [channels, 1, width]
    (zeros in the v half) and ``v_part`` [channels, height, 1] (zeros in the u half), so that
    ``u_part + v_part`` broadcast is the official table, value for value (adding 0.0 is exact), while an
    export holds O(channels * (height + width)) numbers instead of O(channels * height * width): at 518 px
    the full table of the last DPT stage alone is [128, 518, 518], 137 MB.
    """
    half = channels // 2
    if half % 2 or 2 * half != channels:
        raise ValueError(f"the UV embedding needs channels divisible by 4, got {channels}")
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    xs = np.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=np.float32)
    ys = np.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=np.float32)
    # Same float64 math, float32 cast and float32 weight as the full table, so every value is identical.
    weight = np.float32(UV_EMBED_WEIGHT)
    u_emb = sincos_embedding(xs, half, UV_OMEGA_0).astype(np.float32) * weight  # [width, half]
    v_emb = sincos_embedding(ys, half, UV_OMEGA_0).astype(np.float32) * weight  # [height, half]
    u_part = np.zeros((channels, 1, width), dtype=np.float32)
    v_part = np.zeros((channels, height, 1), dtype=np.float32)
    u_part[:half, 0, :] = u_emb.T
    v_part[half:, :, 0] = v_emb.T
    return u_part, v_part


def add_uv_embedding(x: torch.Tensor, image_width: int, image_height: int) -> torch.Tensor:
    u_part, v_part = _uv_embedding_factors(int(x.shape[-1]), int(x.shape[-2]), int(x.shape[1]),
                                           int(image_width) / int(image_height))
    u_table = torch.from_numpy(u_part).to(device=x.device, dtype=x.dtype)
    v_table = torch.from_numpy(v_part).to(device=x.device, dtype=x.dtype)
    # Two broadcast additions, each of x: (x + u) + v equals x + (u + v) exactly (each channel gets one
    # table value plus 0.0). Adding u + v first would let the exporter's constant folding rebuild the full
    # [channels, height, width] table as a graph constant.
    return (x + u_table) + v_table


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with aligned corners, split along the batch when it exceeds F.interpolate's limit."""
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= INTERPOLATE_MAX_ELEMENTS or torch.onnx.is_in_onnx_export():
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = (elements // INTERPOLATE_MAX_ELEMENTS) + 1
    return torch.cat([F.interpolate(part, size=size, mode="bilinear", align_corners=True)
                      for part in x.chunk(chunks, dim=0)], dim=0)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official unit applies an in-place ReLU to its input before the skip addition, so the skip
        # carries relu(x), not x. Reproduced explicitly (no in-place ops) for exact parity.
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.has_residual = has_residual
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)  # noqa: N815 (checkpoint name)
        self.resConfUnit2 = ResidualConvUnit(features)  # noqa: N815

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.has_residual and skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (int(x.shape[-2] * 2), int(x.shape[-1] * 2))
        return self.out_conv(resize_bilinear(x, size))


class DPTHead(nn.Module):
    def __init__(self, config: DPTHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        oc = config.out_channels
        features = config.features
        self.norm = nn.LayerNorm(config.dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(config.dim_in, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, channels in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if config.feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, OUTPUT_HIDDEN_CHANNELS, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(OUTPUT_HIDDEN_CHANNELS, config.output_dim, 1),
            )
        # Frames decoded per pass in eager mode (memory bound, results unchanged); None = all at once.
        self.frames_chunk_size: int | None = 8

    def forward(self, aggregated_tokens: list[torch.Tensor | None], images: torch.Tensor, patch_start_idx: int
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Aggregator layers + images [B, S, 3, H, W] -> (values [B, S, H, W, C], conf [B, S, H, W]),
        or features [B, S, F, H/r, W/r] when ``feature_only``."""
        frames = images.shape[1]
        chunk = self.frames_chunk_size
        if chunk is None or frames <= chunk or torch.onnx.is_in_onnx_export():
            return self._decode(aggregated_tokens, images, patch_start_idx)
        parts = [self._decode([None if t is None else t[:, start:start + chunk] for t in aggregated_tokens],
                              images[:, start:start + chunk], patch_start_idx)
                 for start in range(0, frames, chunk)]
        if self.config.feature_only:
            return torch.cat(parts, dim=1)  # type: ignore[arg-type]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _decode(self, aggregated_tokens: list[torch.Tensor | None], images: torch.Tensor, patch_start_idx: int
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, frames, _, height, width = images.shape
        height, width = int(height), int(width)  # fixed per export (tensors under tracing)
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        pyramid = []
        for level, layer in enumerate(self.config.intermediate_layer_idx):
            tokens = aggregated_tokens[layer]
            if tokens is None:
                raise ValueError(f"the DPT head needs aggregator layer {layer}, which was not cached")
            x = self.norm(tokens[:, :, patch_start_idx:].reshape(batch * frames, grid_h * grid_w, -1))
            x = x.permute(0, 2, 1).reshape(batch * frames, -1, grid_h, grid_w)
            x = self.projects[level](x)
            if self.config.pos_embed:
                x = add_uv_embedding(x, width, height)
            pyramid.append(self.resize_layers[level](x))

        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(x) for i, x in enumerate(pyramid, start=1))
        out = s.refinenet4(l4, size=tuple(l3.shape[-2:]))
        out = s.refinenet3(out, l3, size=tuple(l2.shape[-2:]))
        out = s.refinenet2(out, l2, size=tuple(l1.shape[-2:]))
        out = s.refinenet1(out, l1)
        out = s.output_conv1(out)

        ratio = self.config.down_ratio
        out = resize_bilinear(out, (int(grid_h * self.patch_size / ratio), int(grid_w * self.patch_size / ratio)))
        if self.config.pos_embed:
            out = add_uv_embedding(out, width, height)
        if self.config.feature_only:
            return out.reshape(batch, frames, *out.shape[1:])
        values, conf = activate_head(s.output_conv2(out), self.config.activation, self.config.conf_activation)
        return values.reshape(batch, frames, *values.shape[1:]), conf.reshape(batch, frames, *conf.shape[1:])
