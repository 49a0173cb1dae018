"""Track head: a feature-only DPT at half resolution plus an iterative point tracker (VGGSfM/CoTracker
style) that refines query-point positions through correlation pyramids and a space-time transformer.

Names follow the checkpoint (``feature_extractor``, ``tracker.corr_mlp``, ``tracker.updateformer`` with
its ``virual_tracks`` [sic] parameter, ``time_blocks``, ``space_*_blocks`` ...).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qvggt_export.model.config import TrackerConfig, TrackHeadConfig
from qvggt_export.model.heads.dpt import DPTHead
from qvggt_export.model.layers import Mlp, sincos_embedding

# The tracker's 2-D sin/cos position embedding uses the classic 10000 base.
TRACK_POS_OMEGA_0 = 10000.0


def bilinear_sample(features: torch.Tensor, coords: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample [N, C, H, W] at pixel coordinates (x, y) ``coords`` [N, h, w, 2] (corner-aligned) -> [N, C, h, w]."""
    # Python ints on purpose: the feature-map size is fixed per export (as the resolution is), which max() on
    # traced sizes would freeze silently; the frame and point axes never enter this constant.
    height, width = int(features.shape[-2]), int(features.shape[-1])
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=coords.dtype,
                         device=coords.device)
    grid = coords.to(features.dtype) * scale - 1
    return F.grid_sample(features, grid, align_corners=True, padding_mode=padding_mode)


def sample_point_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Features [B, C, H, W] at points [B, N, 2] (x, y) -> [B, N, C]."""
    sampled = bilinear_sample(features, points.unsqueeze(2))  # [B, C, N, 1]
    return sampled.squeeze(-1).permute(0, 2, 1)


def flow_embedding(flows: torch.Tensor, channels: int) -> torch.Tensor:
    """Interleaved sin/cos embedding of 2-D displacements [B, N, 2] -> [B, N, 2*channels] (x block, y block).

    The frequency ``arange(0, C, 2) * (1000 / C)`` is the tracker's own convention (not 1/10000^k).
    """
    freq = torch.arange(0, channels, 2, device=flows.device, dtype=torch.float32) * (1000.0 / channels)
    parts = []
    for axis in range(2):
        angles = flows[..., axis:axis + 1] * freq
        parts.append(torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


@functools.lru_cache(maxsize=16)
def _grid_sincos_factors(dim: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D sin/cos embedding [dim, height, width] (first half of channels: x (column), second half: y
    (row)) as its two 1-D factors: x part [dim/2, 1, width] and y part [dim/2, 1, height].

    Each half depends on one coordinate only, so the tracker samples the factors (1-D) instead of the full
    table: an export then holds O(dim * (height + width)) numbers, not a [388, 259, 259] table (104 MB) for
    VGGT-1B at 518 px.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin/cos embedding needs dim divisible by 4, got {dim}")
    x_part = sincos_embedding(np.arange(width, dtype=np.float64), dim // 2, TRACK_POS_OMEGA_0).astype(np.float32)
    y_part = sincos_embedding(np.arange(height, dtype=np.float64), dim // 2, TRACK_POS_OMEGA_0).astype(np.float32)
    return np.ascontiguousarray(x_part.T[:, None, :]), np.ascontiguousarray(y_part.T[:, None, :])


def sample_grid_sincos(dim: int, height: int, width: int, points: torch.Tensor) -> torch.Tensor:
    """The 2-D sin/cos embedding of a ``height`` x ``width`` grid, bilinearly sampled (border padding) at
    points [B, N, 2] (x, y) -> [B, N, dim].

    Equals sampling the full table: a channel that depends on x alone, sampled bilinearly, is the 1-D
    linear interpolation in x (the y weights sum to 1 with border padding). A one-row table sampled by
    grid_sample is exactly that interpolation; only the rounding of the weights' products differs from the
    2-D sample (~1 ulp of the embedding values, which lie in [-1, 1]).
    """
    x_np, y_np = _grid_sincos_factors(dim, height, width)
    batch = points.shape[0]
    x_table = torch.from_numpy(x_np).to(device=points.device, dtype=points.dtype)
    y_table = torch.from_numpy(y_np).to(device=points.device, dtype=points.dtype)
    # One-row maps: grid_sample reads row 0 with weight 1 whatever the y it is given (align_corners, H = 1).
    x_emb = sample_point_features(x_table.unsqueeze(0).expand(batch, -1, -1, -1), points)
    y_emb = sample_point_features(y_table.unsqueeze(0).expand(batch, -1, -1, -1), points.flip(-1))
    return torch.cat([x_emb, y_emb], dim=-1)


class CorrelationPyramid:
    """Correlation of track features against average-pooled feature pyramids, sampled in a
    (2r+1)^2 window around each track (CoTracker's CorrBlock)."""

    def __init__(self, fmaps: torch.Tensor, num_levels: int, radius: int) -> None:
        batch, frames, channels, height, width = fmaps.shape
        self.radius = radius
        self.levels = [fmaps]
        for _ in range(num_levels - 1):
            pooled = F.avg_pool2d(fmaps.reshape(batch * frames, channels, height, width), 2, stride=2)
            height, width = pooled.shape[-2:]
            fmaps = pooled.reshape(batch, frames, channels, height, width)
            self.levels.append(fmaps)
        offsets = torch.linspace(-radius, radius, 2 * radius + 1, dtype=fmaps.dtype, device=fmaps.device)
        # Stacked as (dy, dx) but added to (x, y) coordinates: the official window is transposed. Kept,
        # because the corr MLP's input order was trained on it.
        self.delta = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)

    def sample(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Targets [B, S, N, C], coords [B, S, N, 2] -> correlations [B, S, N, levels*(2r+1)^2]."""
        batch, frames, points, channels = targets.shape
        window = 2 * self.radius + 1
        out = []
        for level, fmaps in enumerate(self.levels):
            height, width = fmaps.shape[-2:]
            corr = torch.matmul(targets, fmaps.reshape(batch, frames, channels, height * width)) / channels**0.5
            centre = coords.reshape(batch * frames * points, 1, 1, 2) / 2**level
            grid = centre + self.delta.to(coords.dtype).view(1, window, window, 2)
            sampled = bilinear_sample(corr.reshape(batch * frames * points, 1, height, width), grid,
                                      padding_mode="zeros")
            out.append(sampled.reshape(batch, frames, points, -1))
        return torch.cat(out, dim=-1)


def multihead_attention(attn: nn.MultiheadAttention, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``attn(query, context, context)[0]`` of a batch-first :class:`nn.MultiheadAttention` without weights.

    Eager mode calls the module (bit-for-bit the official path; in eval its self-attention takes PyTorch's
    fused fast path). During ONNX export the same math is written out with standard ops, because the fast
    path (``aten::_native_multi_head_attention``) has no ONNX symbolic, and the slow path
    (``F.multi_head_attention_forward``) freezes the sequence length of the example input into its reshapes
    (an export at 3 frames then fails at 2). Every size here comes from the input's shape, so the frame and
    point axes stay dynamic.
    """
    if not torch.onnx.is_in_onnx_export():
        return attn(query, context, context, need_weights=False)[0]
    heads, dim = attn.num_heads, attn.embed_dim
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    batch, length = query.shape[0], query.shape[1]

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, E] -> [B, heads, L, E / heads]
        return x.reshape(x.shape[0], x.shape[1], heads, dim // heads).transpose(1, 2)

    q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(context, w_k, b_k)), split(F.linear(context, w_v, b_v))
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class AttnBlock(nn.Module):
    """Self-attention block of the tracker. Note the official quirk: the residual adds to the
    *normalised* input (``x = norm1(x); x = x + attn(x)``)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        x = x + multihead_attention(self.attn, x, x)
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block of the tracker (same normalised-residual convention as :class:`AttnBlock`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + multihead_attention(self.cross_attn, x, context)
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Alternating time attention (per track) and space attention routed through virtual tracks."""

    def __init__(self, config: TrackerConfig, input_dim: int, output_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = config.hidden_size
        depth = config.depth
        space_depth = depth if config.use_spaceatt else 0
        self.num_virtual_tracks = config.num_virtual_tracks
        self.add_space_attn = config.use_spaceatt
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden)
        self.output_norm = nn.LayerNorm(hidden)
        self.flow_head = nn.Linear(hidden, output_dim)
        self.virual_tracks = (nn.Parameter(torch.randn(1, config.num_virtual_tracks, 1, hidden))
                              if config.use_spaceatt else None)
        self.time_blocks = nn.ModuleList(AttnBlock(hidden, config.num_heads, mlp_ratio) for _ in range(depth))
        if config.use_spaceatt:
            self.space_virtual_blocks = nn.ModuleList(
                AttnBlock(hidden, config.num_heads, mlp_ratio) for _ in range(space_depth))
            self.space_point2virtual_blocks = nn.ModuleList(
                CrossAttnBlock(hidden, config.num_heads, mlp_ratio) for _ in range(space_depth))
            self.space_virtual2point_blocks = nn.ModuleList(
                CrossAttnBlock(hidden, config.num_heads, mlp_ratio) for _ in range(space_depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, S, D] -> updates [B, N, S, output_dim]."""
        tokens = self.input_transform(self.input_norm(x))
        initial = tokens
        batch, _, frames, _ = tokens.shape
        if self.virual_tracks is not None:
            tokens = torch.cat([tokens, self.virual_tracks.repeat(batch, 1, frames, 1)], dim=1)
        num = tokens.shape[1]
        space_every = len(self.time_blocks) // len(self.space_virtual_blocks) if self.add_space_attn else 0
        space_index = 0
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(batch * num, frames, -1)).reshape(batch, num, frames, -1)
            if self.add_space_attn and i % space_every == 0:
                space = tokens.permute(0, 2, 1, 3).reshape(batch * frames, num, -1)
                points = space[:, : num - self.num_virtual_tracks]
                virtual = space[:, num - self.num_virtual_tracks:]
                virtual = self.space_virtual2point_blocks[space_index](virtual, points)
                virtual = self.space_virtual_blocks[space_index](virtual)
                points = self.space_point2virtual_blocks[space_index](points, virtual)
                space = torch.cat([points, virtual], dim=1)
                tokens = space.reshape(batch, frames, num, -1).permute(0, 2, 1, 3)
                space_index += 1
        if self.add_space_attn:
            tokens = tokens[:, : num - self.num_virtual_tracks]
        return self.flow_head(self.output_norm(tokens + initial))


class BaseTrackerPredictor(nn.Module):
    def __init__(self, config: TrackerConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.latent_dim
        self.flows_emb_dim = latent // 2
        self.corr_mlp = Mlp(config.corr_levels * (2 * config.corr_radius + 1) ** 2, config.hidden_size, latent)
        self.transformer_dim = 3 * latent + 4
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(config, self.transformer_dim, latent + 2)
        self.fmap_norm = nn.LayerNorm(latent)
        self.ffeat_norm = nn.GroupNorm(1, latent)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent, latent), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent, 1))
        if config.predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent, 1))

    def forward(self, query_points: torch.Tensor, fmaps: torch.Tensor, iters: int
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Query points [B, N, 2] (pixels in frame 0) and feature maps [B, S, C, h, w] ->
        (per-iteration tracks [B, S, N, 2] in pixels, visibility [B, S, N], confidence [B, S, N])."""
        cfg = self.config
        batch, points, _ = query_points.shape
        _, frames, _, height, width = fmaps.shape
        latent = cfg.latent_dim
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)  # LayerNorm over channels
        coords = (query_points / float(cfg.stride)).reshape(batch, 1, points, 2).repeat(1, frames, 1, 1)
        query_feats = sample_point_features(fmaps[:, 0], coords[:, 0])
        track_feats = query_feats.unsqueeze(1).repeat(1, frames, 1, 1)
        query_coords = coords[:, 0].clone()
        pyramid = CorrelationPyramid(fmaps, cfg.corr_levels, cfg.corr_radius)
        ref_token = torch.cat([self.query_ref_token[:, :1],
                               self.query_ref_token[:, 1:2].expand(-1, frames - 1, -1)], dim=1)

        track_list = []
        for _ in range(iters):
            coords = coords.detach()
            corrs = pyramid.sample(track_feats, coords)
            corr_emb = self.corr_mlp(corrs.permute(0, 2, 1, 3).reshape(batch * points, frames, -1))
            flows = (coords - coords[:, :1]).permute(0, 2, 1, 3).reshape(batch * points, frames, 2)
            flow_emb = torch.cat([flow_embedding(flows, self.flows_emb_dim), flows / cfg.max_scale,
                                  flows / cfg.max_scale], dim=-1)
            feats = track_feats.permute(0, 2, 1, 3).reshape(batch * points, frames, latent)
            x = torch.cat([flow_emb, corr_emb, feats], dim=2)
            pos = sample_grid_sincos(self.transformer_dim, height, width, coords[:, 0].to(fmaps.dtype))
            x = x + pos.reshape(batch * points, 1, -1) + ref_token.to(x.dtype)
            delta = self.updateformer(x.reshape(batch, points, frames, -1)).reshape(batch * points, frames, -1)
            feats = feats.reshape(-1, latent)
            feats = self.ffeat_updater(self.ffeat_norm(delta[..., 2:].reshape(-1, latent))) + feats
            track_feats = feats.reshape(batch, points, frames, latent).permute(0, 2, 1, 3)
            coords = coords + delta[..., :2].reshape(batch, points, frames, 2).permute(0, 2, 1, 3)
            coords = torch.cat([query_coords.unsqueeze(1), coords[:, 1:]], dim=1)  # frame 0 stays the query
            track_list.append(coords * cfg.stride)

        flat = track_feats.reshape(batch * frames * points, latent)
        vis = torch.sigmoid(self.vis_predictor(flat).reshape(batch, frames, points))
        conf = (torch.sigmoid(self.conf_predictor(flat).reshape(batch, frames, points))
                if cfg.predict_conf else None)
        return track_list, vis, conf


class TrackHead(nn.Module):
    def __init__(self, config: TrackHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_extractor = DPTHead(config.feature_extractor)
        self.tracker = BaseTrackerPredictor(config.tracker)

    def forward(self, aggregated_tokens: list[torch.Tensor | None], images: torch.Tensor, patch_start_idx: int,
                query_points: torch.Tensor, iters: int | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        fmaps = self.feature_extractor(aggregated_tokens, images, patch_start_idx)
        return self.tracker(query_points, fmaps, iters or self.config.iters)
