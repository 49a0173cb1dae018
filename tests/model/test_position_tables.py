"""Position tables added in factored form stay identical to the official full tables (issue 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvggt_export.model.config import DinoConfig
from qvggt_export.model.dinov2 import DinoVisionTransformer
from qvggt_export.model.heads.dpt import UV_EMBED_WEIGHT, UV_OMEGA_0, add_uv_embedding
from qvggt_export.model.heads.track import TRACK_POS_OMEGA_0, sample_grid_sincos, sample_point_features
from qvggt_export.model.layers import sincos_embedding


def _official_uv_table(width: int, height: int, channels: int, aspect_ratio: float) -> np.ndarray:
    """The official ``create_uv_grid`` + ``position_grid_to_embed`` as one [channels, height, width] table:
    a float32 meshgrid, the sin/cos of each coordinate in float64, cast to float32, times 0.1."""
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    xs = np.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=np.float32)
    ys = np.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=np.float32)
    uu, vv = np.meshgrid(xs, ys, indexing="xy")

    def sincos(pos: np.ndarray, dim: int) -> np.ndarray:
        omega = 1.0 / UV_OMEGA_0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([sincos(uu, channels // 2), sincos(vv, channels // 2)], axis=-1).astype(np.float32)
    return (emb.reshape(height, width, channels) * np.float32(UV_EMBED_WEIGHT)).transpose(2, 0, 1)


@pytest.mark.parametrize("channels, height, width, image_hw", [
    (16, 5, 5, (70, 70)),          # tiny's patch grid
    (128, 70, 98, (70, 98)),       # last DPT stage at image resolution, landscape
    (64, 37, 27, (518, 378)),      # VGGT-1B grid, portrait
    (1024, 3, 4, (42, 56)),        # wide channels
])
def test_uv_embedding_equals_official_table_bit_for_bit(channels, height, width, image_hw):
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(channels))
    table = torch.from_numpy(np.ascontiguousarray(
        _official_uv_table(width, height, channels, image_hw[1] / image_hw[0])))
    got = add_uv_embedding(x, image_width=image_hw[1], image_height=image_hw[0])
    assert torch.equal(got, x + table)
    # float16 (the fp16 export): the same float16 table values, so the same sums.
    assert torch.equal(add_uv_embedding(x.half(), image_hw[1], image_hw[0]), x.half() + table.half())


def test_uv_embedding_refuses_channels_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        add_uv_embedding(torch.zeros(1, 6, 2, 2), 28, 28)


def test_dino_pos_embed_is_frozen_only_off_its_stored_grid():
    vit = DinoVisionTransformer(DinoConfig(img_size=70, patch_size=14, embed_dim=32, depth=1, num_heads=2))
    torch.nn.init.normal_(vit.pos_embed)
    vit.freeze_pos_embed(5, 5)  # stored grid: the parameter itself is used, nothing frozen
    assert vit.interpolate_pos_encoding(5, 5) is vit.pos_embed
    keys = set(vit.state_dict())
    vit.freeze_pos_embed(4, 6)  # another grid: the bicubic resample is precomputed, value unchanged
    frozen = vit.interpolate_pos_encoding(4, 6)
    # held as a buffer while frozen, so that an export writes it as an initializer (not a Constant node)
    assert set(vit.state_dict()) - keys == {"frozen_pos_embed_4x6"}
    vit.unfreeze_pos_embed()
    assert set(vit.state_dict()) == keys
    assert frozen is not vit.pos_embed and torch.equal(frozen, vit.interpolate_pos_encoding(4, 6))


def _official_track_table(dim: int, height: int, width: int) -> np.ndarray:
    """The official tracker's ``get_2d_sincos_pos_embed`` [dim, height, width]: x half, then y half."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64), indexing="xy")
    emb = np.concatenate([sincos_embedding(xs, dim // 2, TRACK_POS_OMEGA_0),
                          sincos_embedding(ys, dim // 2, TRACK_POS_OMEGA_0)], axis=1)
    return emb.astype(np.float32).reshape(height, width, dim).transpose(2, 0, 1)


# Sampling the 1-D factors rounds the bilinear weights' products differently from sampling the full table.
# Observed: 1.2e-7 (1 ulp at 1.0) on every size below; values lie in [-1, 1].
TRACK_POS_ABS_TOL = 2.5e-7


@pytest.mark.parametrize("dim, height, width", [(52, 35, 35), (388, 37, 37), (52, 20, 37)])
def test_tracker_position_sample_equals_full_table_sample(dim, height, width):
    g = torch.Generator().manual_seed(dim + height)
    inside = torch.rand(2, 300, 2, generator=g) * torch.tensor([width - 1.0, height - 1.0])
    outside = torch.rand(2, 100, 2, generator=g) * torch.tensor([width + 20.0, height + 20.0]) - 10  # border
    corners = torch.tensor([[[0.0, 0.0], [width - 1.0, height - 1.0], [width - 1.0, 0.0], [2.5, height - 1.0]]])
    points = torch.cat([inside, outside, corners.expand(2, -1, -1)], dim=1)
    table = torch.from_numpy(np.ascontiguousarray(_official_track_table(dim, height, width)))
    want = sample_point_features(table.expand(2, -1, -1, -1), points)
    got = sample_grid_sincos(dim, height, width, points)
    assert got.shape == want.shape == (2, 404, dim)
    assert float((got - want).abs().max()) <= TRACK_POS_ABS_TOL
