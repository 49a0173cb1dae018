"""DINOv2 ViT with register tokens, the patch embedder of VGGT-1B (ViT-L/14, 4 registers).

Only what VGGT uses: a class token, register tokens inserted after it, a learned position embedding
resampled (bicubic, antialiased) to the input's patch grid, pre-norm blocks with LayerScale, and the
final LayerNorm whose patch tokens feed the aggregator. Parameter names match the checkpoint
(``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.N``,
``norm``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qvggt_export.model.config import DinoConfig
from qvggt_export.model.layers import Block, PatchEmbed

# DINOv2 uses LayerNorm(eps=1e-6) everywhere, unlike the aggregator's default 1e-5.
DINO_NORM_EPS = 1e-6


class DinoVisionTransformer(nn.Module):
    def __init__(self, config: DinoConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        self.patch_embed = PatchEmbed(config.patch_size, 3, dim)
        grid = config.img_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
                                if config.num_register_tokens else None)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias, proj_bias=config.proj_bias,
                  ffn_bias=config.ffn_bias, init_values=config.init_values, norm_eps=DINO_NORM_EPS)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=DINO_NORM_EPS)
        # Present in the checkpoint (used by DINOv2's masked training only); kept so weights load unchanged.
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self._frozen_grids: set[tuple[int, int]] = set()  # grids with a frozen_pos_embed_HxW buffer

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embedding [1, 1 + grid_h*grid_w, dim] for a ``grid_h`` x ``grid_w`` patch grid."""
        if (grid_h, grid_w) in self._frozen_grids:
            return getattr(self, self._frozen_name(grid_h, grid_w))  # the registered buffer
        stored = self.pos_embed.shape[1] - 1
        side = math.isqrt(stored)
        if side * side != stored:
            raise ValueError(f"pos_embed holds {stored} patch positions, not a square grid")
        if grid_h == side and grid_w == side:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        patch_pos = self.pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            resize = {"scale_factor": ((grid_h + offset) / side, (grid_w + offset) / side)}
        else:
            resize = {"size": (grid_h, grid_w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.config.interpolate_antialias, **resize)
        if tuple(patch_pos.shape[-2:]) != (grid_h, grid_w):
            raise ValueError(f"pos_embed resampled to {tuple(patch_pos.shape[-2:])}, expected {(grid_h, grid_w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([self.pos_embed[:, :1].float(), patch_pos], dim=1).to(self.pos_embed.dtype)

    @torch.no_grad()
    def freeze_pos_embed(self, grid_h: int, grid_w: int) -> None:
        """Precompute the resampled position embedding for one grid, so an export sees a constant
        instead of an antialiased bicubic resize (which exporters and TensorRT handle poorly).

        At the stored grid there is no resize: nothing is frozen, so an export keeps the ``pos_embed``
        parameter as a weight initializer (moved to external data with the others) rather than a copy
        frozen into the graph as a Constant node (5.6 MB for VGGT-1B at 518 px). Elsewhere the resample is
        held, until :meth:`unfreeze_pos_embed`, as the buffer ``frozen_pos_embed_<h>x<w>`` (in the state dict
        meanwhile), which an export writes as an initializer too."""
        self._drop_frozen(grid_h, grid_w)
        side = math.isqrt(self.pos_embed.shape[1] - 1)
        if (grid_h, grid_w) == (side, side):
            return
        frozen = self.interpolate_pos_encoding(grid_h, grid_w).detach().clone()
        # A (transient) buffer, not a plain tensor attribute: the tracer exports state-dict entries as
        # initializers (external data for a large model) but freezes other tensors into Constant nodes.
        self.register_buffer(self._frozen_name(grid_h, grid_w), frozen, persistent=True)
        self._frozen_grids.add((grid_h, grid_w))

    def unfreeze_pos_embed(self) -> None:
        for grid_h, grid_w in list(self._frozen_grids):
            self._drop_frozen(grid_h, grid_w)

    @staticmethod
    def _frozen_name(grid_h: int, grid_w: int) -> str:
        return f"frozen_pos_embed_{grid_h}x{grid_w}"

    def _drop_frozen(self, grid_h: int, grid_w: int) -> None:
        self._frozen_grids.discard((grid_h, grid_w))
        if hasattr(self, name := self._frozen_name(grid_h, grid_w)):
            delattr(self, name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 3, H, W] -> final-norm patch tokens [N, h*w, dim]."""
        # int(): under tracing, sizes are tensors; the resolution is fixed per export, the frame count is not.
        grid_h, grid_w = int(images.shape[-2]) // self.patch_size, int(images.shape[-1]) // self.patch_size
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(grid_h, grid_w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.num_register_tokens:]
