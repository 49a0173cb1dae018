"""Output activations of the heads (official names: ``inv_log``, ``expp1`` ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expm1(x: torch.Tensor) -> torch.Tensor:
    # ONNX has no Expm1 op; exp(x) - 1 differs by < 1 ulp of the output's scale, only for |x| << 1.
    return torch.exp(x) - 1 if torch.onnx.is_in_onnx_export() else torch.expm1(x)


def inverse_log_transform(y: torch.Tensor) -> torch.Tensor:
    """Inverse of ``sign(x) * log(1 + |x|)``."""
    return torch.sign(y) * _expm1(torch.abs(y))


def _pose_act(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return x
    if kind == "inv_log":
        return inverse_log_transform(x)
    if kind == "exp":
        return torch.exp(x)
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown pose activation {kind!r}")


def activate_pose(encoding: torch.Tensor, trans_act: str, quat_act: str, fl_act: str) -> torch.Tensor:
    """Activate translation [..., :3], quaternion [..., 3:7] and field of view [..., 7:] separately."""
    return torch.cat([_pose_act(encoding[..., :3], trans_act), _pose_act(encoding[..., 3:7], quat_act),
                      _pose_act(encoding[..., 7:], fl_act)], dim=-1)


def activate_head(raw: torch.Tensor, activation: str, conf_activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DPT output [N, C, H, W] -> (values [N, H, W, C-1], confidence [N, H, W]); the last channel is confidence."""
    fmap = raw.permute(0, 2, 3, 1)
    values, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "norm_exp":
        norm = values.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        out = values / norm * _expm1(norm)
    elif activation == "norm":
        out = values / values.norm(dim=-1, keepdim=True)
    elif activation == "exp":
        out = torch.exp(values)
    elif activation == "relu":
        out = F.relu(values)
    elif activation == "inv_log":
        out = inverse_log_transform(values)
    elif activation == "xy_inv_log":
        xy, z = values.split([2, 1], dim=-1)
        z = inverse_log_transform(z)
        out = torch.cat([xy * z, z], dim=-1)
    elif activation == "sigmoid":
        out = torch.sigmoid(values)
    elif activation == "linear":
        out = values
    else:
        raise ValueError(f"unknown head activation {activation!r}")

    if conf_activation == "expp1":
        conf_out = 1 + torch.exp(conf)
    elif conf_activation == "expp0":
        conf_out = torch.exp(conf)
    elif conf_activation == "sigmoid":
        conf_out = torch.sigmoid(conf)
    else:
        raise ValueError(f"unknown confidence activation {conf_activation!r}")
    return out, conf_out
