"""Camera head: iterative refinement of a 9-D pose encoding from each frame's camera token.

Each iteration embeds the current estimate (a learned "empty" pose at first), turns it into
adaptive-LayerNorm shift/scale/gate for the camera tokens, runs a transformer trunk and adds a predicted
delta. Encoding ``absT_quaR_FoV``: translation (3), quaternion XYZW (4), field of view h, w (2).
"""

from __future__ import annotations

import torch
from torch import nn

from qvggt_export.model.config import CameraHeadConfig
from qvggt_export.model.heads.activations import activate_pose
from qvggt_export.model.layers import Block, Mlp

POSE_ENCODING_DIM = 9


class CameraHead(nn.Module):
    def __init__(self, config: CameraHeadConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim_in
        self.trunk = nn.Sequential(*(Block(dim, config.num_heads, config.mlp_ratio, init_values=config.init_values)
                                     for _ in range(config.trunk_depth)))
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = nn.Linear(POSE_ENCODING_DIM, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))  # noqa: N815 (checkpoint name)
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, POSE_ENCODING_DIM)

    def forward(self, aggregated_tokens: list[torch.Tensor | None], num_iterations: int | None = None
                ) -> list[torch.Tensor]:
        """Last aggregator layer [B, S, P, 2C] -> activated pose encodings [B, S, 9], one per iteration."""
        last = aggregated_tokens[-1]
        if last is None:
            raise ValueError("the camera head needs the last aggregator layer, which was not cached")
        pose_tokens = self.token_norm(last[:, :, 0])
        batch, frames, _ = pose_tokens.shape
        estimate: torch.Tensor | None = None
        encodings = []
        for _ in range(num_iterations or self.config.num_iterations):
            if estimate is None:
                condition = self.embed_pose(self.empty_pose_tokens.expand(batch, frames, -1))
            else:
                condition = self.embed_pose(estimate.detach())
            shift, scale, gate = self.poseLN_modulation(condition).chunk(3, dim=-1)
            modulated = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(modulated)))
            estimate = delta if estimate is None else estimate + delta
            encodings.append(activate_pose(estimate, self.config.trans_act, self.config.quat_act,
                                           self.config.fl_act))
        return encodings
