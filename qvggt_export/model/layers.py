"""Transformer building blocks shared by the patch embedder, the aggregator and the camera head.

Module and parameter names (``norm1``, ``attn.qkv``, ``attn.q_norm``, ``ls1.gamma``, ``mlp.fc1`` ...)
are those of the official checkpoint. Constant tables (RoPE angles, sin/cos embeddings) are computed
in float64 with NumPy from shapes alone: they are exact, identical in eager mode and export, and an
exporter sees them as constants instead of tracing data-dependent arithmetic.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Two linears with a GELU between them (``fc1`` -> act -> ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True, approximate_gelu: str = "none") -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU(approximate=approximate_gelu)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (CaiT), parameter ``gamma``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


@functools.lru_cache(maxsize=64)
def _rope_tables(dim: int, length: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [length, dim] for 1-D RoPE over ``dim`` features, positions 0..length-1."""
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryPositionEmbedding2D(nn.Module):
    """2-D rotary embedding: the first half of each head's features rotates with the row (y) position,
    the second half with the column (x) position, each as 1-D RoPE with ``base`` frequency."""

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.base_frequency = float(frequency)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, num_positions: int) -> torch.Tensor:
        """Rotate ``tokens`` [batch, heads, N, head_dim] by integer ``positions`` [batch, N, 2] (y, x).

        ``num_positions`` bounds the table (all positions are < it); passing it from the patch grid
        avoids the official ``int(positions.max())``, a data-dependent value no exporter can trace.
        """
        half = int(tokens.shape[-1]) // 2  # a Python int even under tracing (head size is static)
        cos_np, sin_np = _rope_tables(half, num_positions, self.base_frequency)
        cos_table = torch.from_numpy(cos_np).to(device=tokens.device, dtype=tokens.dtype)
        sin_table = torch.from_numpy(sin_np).to(device=tokens.device, dtype=tokens.dtype)
        rotated = []
        for axis, features in enumerate(tokens.chunk(2, dim=-1)):
            cos = F.embedding(positions[..., axis], cos_table)[:, None]
            sin = F.embedding(positions[..., axis], sin_table)[:, None]
            rotated.append(features * cos + _rotate_half(features) * sin)
        return torch.cat(rotated, dim=-1)


def patch_grid_positions(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Row-major (y, x) integer positions of an ``height`` x ``width`` patch grid, shape [h*w, 2]."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    grid = np.stack([ys.reshape(-1), xs.reshape(-1)], axis=-1).astype(np.int64)
    return torch.from_numpy(grid).to(device)


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-LayerNorm and 2-D RoPE."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, rope: RotaryPositionEmbedding2D | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, num_positions: int = 0) -> torch.Tensor:
        batch, tokens, channels = x.shape
        # qkv rows are ordered q | k | v with heads contiguous inside each part (official layout).
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q = self.rope(q, pos, num_positions)
            k = self.rope(k, pos, num_positions)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float | None = None,
                 norm_eps: float = 1e-5, qk_norm: bool = False,
                 rope: RotaryPositionEmbedding2D | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm,
                              rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, num_positions: int = 0) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos, num_positions=num_positions))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping conv patchify: [N, 3, H, W] -> [N, (H/p)*(W/p), dim] tokens, row-major."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_embedding(positions: np.ndarray, dim: int, omega_0: float) -> np.ndarray:
    """Fixed 1-D sin/cos embedding of float ``positions`` [M] into [M, dim] (sin half, then cos half),
    frequencies ``1 / omega_0 ** (i / (dim/2))``; float64 math."""
    omega = 1.0 / omega_0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
