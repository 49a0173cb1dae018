"""The layer-role registry of VGGT: which linears are quantized, found by role, not by substring.

A role names a kind of linear in the architecture (``frame.qkv`` = the qkv projection of every frame
block). The paper quantizes the 192 aggregator linears of VGGT-1B: qkv, proj, fc1, fc2 of the 24 frame
and 24 global blocks; patch-embed blocks and heads stay in floating point by default but can be
selected. A role that matches no module is an error that says what the model has.

This module is the only place that knows VGGT's module paths (:data:`BLOCK_LISTS`, :data:`AGGREGATOR_PATH`,
:data:`PATCH_EMBED_PATH`): NFDS (which blocks it reads), DSFQ and reconstruction (which linears and blocks
they rewrite) ask it by role or block kind. Each block list carries a *scope* (``aggregator``,
``backbone``, ``heads``) so that a quantization scope can select roles by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from qvggt_export.errors import QVGGTError

#: Module path of VGGT's aggregator (frame / global attention and the patch embedding).
AGGREGATOR_PATH = "aggregator"
#: Module path of the patch embedding (DINOv2 or conv), inside the aggregator.
PATCH_EMBED_PATH = f"{AGGREGATOR_PATH}.patch_embed"


@dataclass(frozen=True)
class BlockList:
    """One list of transformer blocks whose linears roles name.

    Attributes:
        kind: The role prefix (``"frame"`` in ``"frame.qkv"``).
        path: Dotted module path of the ``nn.ModuleList`` (``"aggregator.frame_blocks"``).
        scope: ``"aggregator"`` (the paper's quantized part), ``"backbone"`` (patch embedding) or ``"heads"``.
        required: Every VGGT has it (an error when missing); optional lists are absent in some configs.
    """

    kind: str
    path: str
    scope: str
    required: bool = False


BLOCK_LISTS: tuple[BlockList, ...] = (
    BlockList("frame", f"{AGGREGATOR_PATH}.frame_blocks", "aggregator", required=True),
    BlockList("global", f"{AGGREGATOR_PATH}.global_blocks", "aggregator", required=True),
    BlockList("patch_embed", f"{PATCH_EMBED_PATH}.blocks", "backbone"),
    BlockList("camera_trunk", "camera_head.trunk", "heads"),
)
_LISTS = {block_list.kind: block_list for block_list in BLOCK_LISTS}
_BLOCK_LINEARS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}


def roles_of(*kinds: str) -> tuple[str, ...]:
    """Every role of the block lists ``kinds`` (``roles_of("frame")`` -> ``("frame.qkv", ...)``)."""
    return tuple(f"{kind}.{linear}" for kind in kinds for linear in _BLOCK_LINEARS)


AGGREGATOR_ROLES = roles_of("frame", "global")
PATCH_EMBED_ROLES = roles_of("patch_embed")
CAMERA_TRUNK_ROLES = roles_of("camera_trunk")
ALL_ROLES = roles_of(*_LISTS)
DEFAULT_ROLES = AGGREGATOR_ROLES


@dataclass(frozen=True)
class QuantTarget:
    """One linear to quantize: its dotted module path, its role, and its block index."""

    name: str
    role: str
    block: int


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _block_lists(model: nn.Module) -> dict[str, tuple[str, Iterable[nn.Module]]]:
    if _submodule(model, AGGREGATOR_PATH) is None:
        raise QVGGTError(f"expected a VGGT with an {AGGREGATOR_PATH!r}, got {type(model).__name__}")
    lists: dict[str, tuple[str, Iterable[nn.Module]]] = {}
    for block_list in BLOCK_LISTS:
        blocks = _submodule(model, block_list.path)
        if blocks is None and block_list.required:
            raise QVGGTError(f"expected a VGGT with {block_list.path}, got {type(model).__name__} without it")
        if blocks is not None:
            lists[block_list.kind] = (block_list.path, blocks)
    return lists


def block_names(model: nn.Module, kind: str) -> list[str]:
    """Dotted module names of every block of the list ``kind`` (``"frame"`` -> ``aggregator.frame_blocks.0``,
    ...), in execution order.

    Raises:
        QVGGTError: unknown kind, or a model without that block list.
    """
    if kind not in _LISTS:
        raise QVGGTError(f"unknown block list {kind!r}; known: {', '.join(_LISTS)}")
    lists = _block_lists(model)
    if kind not in lists:
        raise QVGGTError(f"this model has no {kind} blocks ({_LISTS[kind].path}); it has: {', '.join(sorted(lists))}")
    prefix, blocks = lists[kind]
    return [f"{prefix}.{index}" for index in range(len(blocks))]


def in_aggregator(name: str) -> bool:
    """Whether module ``name`` lies inside the aggregator."""
    return name.startswith(AGGREGATOR_PATH + ".")


def in_patch_embed(name: str) -> bool:
    """Whether module ``name`` is the patch embedding or lies inside it."""
    return name == PATCH_EMBED_PATH or name.startswith(PATCH_EMBED_PATH + ".")


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
    aggregator = getattr(model, AGGREGATOR_PATH, None)
    if aggregator is None or not all(in_aggregator(t.name) for t in targets):
        return model

    def forward(images: Any) -> Any:
        return aggregator(images.unsqueeze(0) if images.dim() == 4 else images)

    return forward


#: Quantization scopes, each widening the previous one by block-list scopes: ``aggregator`` (the paper's
#: frame / global linears, the default so results stay comparable with the paper), ``backbone`` (+ the DINOv2
#: patch-embed encoder), ``all`` (+ the camera head's trunk, the heads' only transformer linears; the DPT
#: heads are convolutions, which the linear-role machinery does not cover).
QUANTIZE_SCOPES: dict[str, tuple[str, ...]] = {
    "aggregator": ("aggregator",),
    "backbone": ("aggregator", "backbone"),
    "all": ("aggregator", "backbone", "heads"),
}
DEFAULT_SCOPE = "aggregator"


def check_scope(scope: str) -> str:
    """``scope`` if it names a quantization scope.

    Raises:
        QVGGTError: an unknown scope name.
    """
    if scope not in QUANTIZE_SCOPES:
        raise QVGGTError(f"unknown quantize scope {scope!r}; expected one of {', '.join(QUANTIZE_SCOPES)}")
    return scope


def scope_roles(scope: str, model: nn.Module | None = None) -> tuple[str, ...]:
    """The roles a quantization scope selects; with ``model``, only the block lists that model has.

    A preset without a DINOv2 encoder (conv patch embedding) has no ``patch_embed`` blocks; the widest scope
    then quantizes what exists. A scope that adds nothing to the narrower one for this model is an error.

    Raises:
        QVGGTError: unknown scope, or a scope wider than ``aggregator`` that finds nothing more in ``model``.
    """
    wanted = QUANTIZE_SCOPES[check_scope(scope)]
    kinds = [block_list.kind for block_list in BLOCK_LISTS if block_list.scope in wanted]
    if model is not None:
        present = _block_lists(model)
        extra = [kind for kind in kinds if kind in present and _LISTS[kind].scope != "aggregator"]
        if scope != DEFAULT_SCOPE and not extra:
            paths = ", ".join(_LISTS[k].path for k in kinds if _LISTS[k].scope != "aggregator")
            raise QVGGTError(f"quantize scope {scope!r} adds nothing for this model: it has none of {paths} "
                             f"(it has: {', '.join(sorted(present))}); use --quantize-scope aggregator")
        kinds = [kind for kind in kinds if kind in present]
    return roles_of(*kinds)


def scope_summary(model: nn.Module, targets: Iterable[QuantTarget], scope: str) -> dict[str, object]:
    """What a scope quantizes in ``model``: layer names, and their parameters' share of the model's.

    Parameters of a linear are its weight and bias; the share is over every parameter of ``model``.
    """
    targets = list(targets)
    quantized = sum(p.numel() for target in targets for p in model.get_submodule(target.name).parameters())
    total = sum(p.numel() for p in model.parameters())
    return {
        "name": scope,
        "block_lists": sorted({t.role.split(".")[0] for t in targets}),
        "layers": [t.name for t in targets],
        "parameters_quantized": int(quantized),
        "parameters_total": int(total),
        "parameter_share": round(quantized / max(total, 1), 4),
    }
