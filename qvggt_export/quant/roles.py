"""The layer-role registry of VGGT: which linears are quantized, found by role, not by substring.

A role names a kind of linear in the architecture (``frame.qkv`` = the qkv projection of every frame
block). The paper quantizes the 192 aggregator linears of VGGT-1B: qkv, proj, fc1, fc2 of the 24 frame
and 24 global blocks; patch-embed blocks and heads stay in floating point by default but can be
selected. A role that matches no module is an error that says what the model has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from qvggt_export.errors import QVGGTError

_BLOCK_LINEARS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}
AGGREGATOR_ROLES = tuple(f"{kind}.{linear}" for kind in ("frame", "global") for linear in _BLOCK_LINEARS)
PATCH_EMBED_ROLES = tuple(f"patch_embed.{linear}" for linear in _BLOCK_LINEARS)
CAMERA_TRUNK_ROLES = tuple(f"camera_trunk.{linear}" for linear in _BLOCK_LINEARS)
ALL_ROLES = AGGREGATOR_ROLES + PATCH_EMBED_ROLES + CAMERA_TRUNK_ROLES
DEFAULT_ROLES = AGGREGATOR_ROLES


@dataclass(frozen=True)
class QuantTarget:
    """One linear to quantize: its dotted module path, its role, and its block index."""

    name: str
    role: str
    block: int


def _block_lists(model: nn.Module) -> dict[str, tuple[str, Iterable[nn.Module]]]:
    aggregator = getattr(model, "aggregator", None)
    if aggregator is None:
        raise QVGGTError(f"expected a VGGT with an 'aggregator', got {type(model).__name__}")
    lists: dict[str, tuple[str, Iterable[nn.Module]]] = {
        "frame": ("aggregator.frame_blocks", aggregator.frame_blocks),
        "global": ("aggregator.global_blocks", aggregator.global_blocks),
    }
    dino_blocks = getattr(aggregator.patch_embed, "blocks", None)
    if dino_blocks is not None:
        lists["patch_embed"] = ("aggregator.patch_embed.blocks", dino_blocks)
    camera = getattr(model, "camera_head", None)
    if camera is not None:
        lists["camera_trunk"] = ("camera_head.trunk", camera.trunk)
    return lists


def find_targets(model: nn.Module, roles: Iterable[str] = DEFAULT_ROLES) -> list[QuantTarget]:
    """All linears of ``model`` with one of ``roles``, in execution order within each block list.

    Raises:
        QVGGTError: an unknown role, or a role that matches nothing in this model.
    """
    roles = tuple(roles)
    unknown = [r for r in roles if r not in ALL_ROLES]
    if unknown:
        raise QVGGTError(f"unknown layer role(s) {unknown}; known roles: {', '.join(ALL_ROLES)}")
    lists = _block_lists(model)
    targets: list[QuantTarget] = []
    for role in roles:
        kind, linear = role.split(".")
        if kind not in lists:
            raise QVGGTError(f"role {role!r} matches nothing: this model has no {kind} blocks "
                             f"(it has: {', '.join(sorted(lists))})")
        prefix, blocks = lists[kind]
        parent_name, child_name = _BLOCK_LINEARS[linear]
        found = 0
        for index, block in enumerate(blocks):
            module = getattr(getattr(block, parent_name, None), child_name, None)
            if isinstance(module, nn.Module):
                targets.append(QuantTarget(f"{prefix}.{index}.{parent_name}.{child_name}", role, index))
                found += 1
        if not found:
            raise QVGGTError(f"role {role!r} matches no {parent_name}.{child_name} linear in {prefix}")
    return sorted(targets, key=lambda t: (t.name.rsplit(".", 3)[0], t.block, _order(t.role)))


def _order(role: str) -> int:
    return list(_BLOCK_LINEARS).index(role.split(".")[1])


def iter_modules(model: nn.Module, targets: Iterable[QuantTarget]) -> Iterator[tuple[QuantTarget, nn.Module]]:
    for target in targets:
        yield target, model.get_submodule(target.name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path ``name`` for ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def calibration_forward(model: nn.Module, targets: Sequence[QuantTarget]) -> Callable[[Any], Any]:
    """The smallest part of ``model`` whose forward reaches every target: the aggregator when all targets are in it
    (statistics passes then skip the camera, depth, point and track heads: at 518 px the DPT heads hold most of a
    VGGT-1B forward's activation memory), else the whole model. Takes images as the model does ([S, 3, H, W] or
    [B, S, 3, H, W])."""
    aggregator = getattr(model, "aggregator", None)
    if aggregator is None or not all(t.name.startswith("aggregator.") for t in targets):
        return model

    def forward(images: Any) -> Any:
        return aggregator(images.unsqueeze(0) if images.dim() == 4 else images)

    return forward
