"""The VGGT aggregator: patch embedding, then alternating frame-wise and global attention.

Token layout per frame: ``[camera, registers..., patches...]`` (``patch_start_idx = 1 + registers``).
The first frame gets its own camera/register tokens (index 0 of the learned pairs), all other frames
share the second set. Frame blocks see ``[B*S, P, C]``; global blocks see ``[B, S*P, C]``. Special
tokens sit at RoPE position (0, 0); patch (i, j) sits at (i + 1, j + 1).
"""

from __future__ import annotations

import torch
from torch import nn

from qvggt_export.model.config import AggregatorConfig, DinoConfig
from qvggt_export.model.dinov2 import DinoVisionTransformer
from qvggt_export.model.layers import Block, PatchEmbed, RotaryPositionEmbedding2D, patch_grid_positions

# ImageNet statistics: the aggregator normalises [0, 1] images itself (official behaviour).
RESNET_MEAN = (0.485, 0.456, 0.406)
RESNET_STD = (0.229, 0.224, 0.225)


def _first_and_others(tokens: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """Learned pair [1, 2, n, C] -> [B*S, n, C]: entry 0 for frame 0, entry 1 for every other frame."""
    first = tokens[:, :1].expand(batch, 1, *tokens.shape[2:])
    others = tokens[:, 1:].expand(batch, frames - 1, *tokens.shape[2:])
    return torch.cat([first, others], dim=1).reshape(batch * frames, *tokens.shape[2:])


class Aggregator(nn.Module):
    def __init__(self, config: AggregatorConfig, dino: DinoConfig | None = None) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.patch_start_idx = config.patch_start_idx
        if dino is not None:
            self.patch_embed: nn.Module = DinoVisionTransformer(dino)
        else:
            self.patch_embed = PatchEmbed(config.patch_size, 3, dim)
        self.rope = RotaryPositionEmbedding2D(config.rope_freq) if config.rope_freq > 0 else None

        def make_block() -> Block:
            return Block(dim, config.num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias,
                         proj_bias=config.proj_bias, ffn_bias=config.ffn_bias, init_values=config.init_values,
                         qk_norm=config.qk_norm, rope=self.rope)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(config.depth))
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, dim) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, config.num_register_tokens, dim) * 1e-6)
        depth = config.depth
        cached = config.cached_layer_indices
        self.cached_layers: frozenset[int] = frozenset(range(depth) if cached is None else (i % depth for i in cached))

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor | None], int]:
        """Images [B, S, 3, H, W] in [0, 1] -> (per-layer tokens [B, S, P, 2C], patch_start_idx).

        Entry i of the list is ``cat(frame_block_i_out, global_block_i_out)`` (for ``aa_block_size`` 1);
        entries outside ``cached_layers`` are ``None`` so unused layers cost no memory.
        """
        batch, frames, channels, height, width = images.shape
        if channels != 3:
            raise ValueError(f"expected 3-channel images [B, S, 3, H, W], got shape {tuple(images.shape)}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        # Constants made at call time rather than buffers: nothing to materialise after a meta-device load.
        mean = torch.tensor(RESNET_MEAN, dtype=images.dtype, device=images.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(RESNET_STD, dtype=images.dtype, device=images.device).view(1, 1, 3, 1, 1)
        images = (images - mean) / std
        patch_tokens = self.patch_embed(images.reshape(batch * frames, channels, height, width))
        camera = _first_and_others(self.camera_token, batch, frames)
        registers = _first_and_others(self.register_token, batch, frames)
        tokens = torch.cat([camera, registers, patch_tokens], dim=1)
        _, num_tokens, dim = tokens.shape

        pos, num_positions = None, 0
        if self.rope is not None:
            grid_h, grid_w = int(height) // self.patch_size, int(width) // self.patch_size  # fixed per export
            grid = patch_grid_positions(grid_h, grid_w, images.device) + 1
            special = torch.zeros(self.patch_start_idx, 2, dtype=grid.dtype, device=grid.device)
            pos = torch.cat([special, grid], dim=0).expand(batch * frames, -1, -1)
            num_positions = max(grid_h, grid_w) + 1

        outputs: list[torch.Tensor | None] = []
        layer = 0
        block_size = self.config.aa_block_size
        for _ in range(self.config.depth // block_size):
            per_kind: dict[str, list[torch.Tensor]] = {}
            for kind in self.config.aa_order:
                blocks = self.frame_blocks if kind == "frame" else self.global_blocks
                group = batch * frames if kind == "frame" else batch
                tokens = tokens.reshape(group, -1, dim)
                kind_pos = pos.reshape(group, -1, 2) if pos is not None else None
                kept = []
                for offset in range(block_size):
                    tokens = blocks[layer + offset](tokens, pos=kind_pos, num_positions=num_positions)
                    kept.append(tokens.reshape(batch, frames, num_tokens, dim))
                per_kind[kind] = kept
            for offset in range(block_size):
                index = layer + offset
                if index in self.cached_layers:
                    outputs.append(torch.cat([per_kind["frame"][offset], per_kind["global"][offset]], dim=-1))
                else:
                    outputs.append(None)
            layer += block_size
        return outputs, self.patch_start_idx
