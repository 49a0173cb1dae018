"""Block-wise output reconstruction (DSFQ step 4): learn smoothing corrections and weight steps per block.

QuantVGGT makes the smoothing factors ``c`` and the weight steps ``D`` learnable and fits them block by
block, BRECQ-style: for each transformer block ``b`` in execution order, minimise

    || block_b^fp(x_b^fp) - block_b^q(x_b^q) ||^2

where ``x_b^fp`` is the block's input in the float model and ``x_b^q`` its input in the model whose
earlier blocks are already quantized with their learned parameters (the *quantized chain*), so each
block also learns to absorb the error that reaches it from upstream.

**Parameters per target linear** (``y = T(x) W^T + b`` after :func:`~qvggt_export.quant.dsfq.apply_transforms`):

* ``s`` [in]: a per-input-channel correction of the method's own smoothing factor ``c``
  (:func:`smoothing_space`), an exact equivalence. For Scale and DSFQ it acts after the whole transform,
  ``T(x) W^T = (T(x) / s)(W diag(s))^T`` (raw space for Scale, rotated space for DSFQ); for
  Scale-then-Rotate it acts on the raw channels before the rotation (``pre -> pre / s``, the weight
  refolded through ``H``); Base and Rotation have no smoothing factor and learn only ``D``. Parametrised
  as ``log s`` (init 0, so ``s = 1``): positive by construction and the Adam step is relative (lr 5e-3
  moves ``s`` by about 0.5 % per step).
* ``D`` [out]: the per-output-channel weight step, init ``max|W_row| / qmax`` (round-to-nearest),
  parametrised as ``log D`` for the same reasons (lr 5e-2: about 5 % per step).

**Learning forward** of each target (the paper's quantizer, eq. 3, with straight-through rounding):
``x_t = T(x) / s`` is fake-quantized per token with the *dynamic* step ``max|x_t| / qmax`` computed
from ``x_t`` itself; the weight ``W diag(s)`` is fake-quantized per output channel with the learnable
``D`` (LSQ gradient, :func:`~qvggt_export.quant.functional.fake_quantize_ste`). The activation step is
**not detached**: with ``D = max / qmax`` the clamp never binds, so the only way the loss can tell that
shrinking an outlier channel shrinks every other channel's rounding error is the gradient through the
token's max (OmniQuant's learnable equivalent transforms train through dynamic per-token steps the same
way). Loss: MSE of the block output against the float target; Adam with two groups (``lr_smooth`` for
``s``, ``lr_step`` for ``D``); ``recon_iters`` steps per block, each on one calibration batch in an
order drawn from ``(seed, block)``, so a block's result does not depend on which blocks ran before in
this process (that is what makes resuming exact).

**How block inputs are captured.** Blocks are found by grouping targets by their parent block path
(``aggregator.frame_blocks.3``, ``aggregator.patch_embed.blocks.0``, ``camera_head.trunk.1``) and
ordered by one float forward pass with hooks that records the sequence of block calls (a block may be
called more than once per forward: the camera trunk runs once per refinement iteration). For block
``b`` the model itself is run on every calibration batch (``model.aggregator(images)`` when all targets
live in the aggregator, else ``model(images)``) with forward pre-hooks (``with_kwargs=True``) that copy
the block's ``(args, kwargs)``; the forward is cut short right after the block's last call. Tokens are
therefore exactly what the model feeds the block (frame blocks ``[B*S, P, C]``, global blocks
``[B, S*P, C]``); nothing is reshaped here. Two passes per block:

1. *float chain*: the model as it is (finished blocks carry their baked ``s``, a float equivalence), a
   forward hook records the block's output = the reconstruction target;
2. *quantized chain*: the targets of finished blocks are temporarily swapped for the very
   :class:`~qvggt_export.quant.modules.QuantLinear` modules that :func:`~qvggt_export.quant.rtn.quantize_model`
   will build from them (baked transform, learned ``D``), and the block's inputs are recorded.

After learning, ``s`` is baked into the float module (:func:`bake_smoothing`) and ``D`` kept for
``quantize_model``; the model therefore stays a float model, equivalent to the original, until
``quantize_model`` runs. On an error the block being learned is restored, earlier blocks stay baked
(still float-equivalent).

**``--method auto``.** The same walk chooses each block's transforms (``chooser``,
:class:`qvggt_export.quant.select.MethodChooser`): the targets arrive untransformed; when the walk reaches a block,
the chooser measures every candidate on the block's quantized-chain inputs, the chosen float layers go into the
model, the targets are recomputed through them (so one candidate learns bit for bit what that single method
learns), and learning proceeds as above (with ``auto_criterion="reconstructed"``, every candidate is learned and
the lowest learned error wins). With ``recon_iters == 0`` the walk only chooses.

**Memory.** One block at a time: its inputs and float targets for all calibration batches are cached
(two token tensors per batch and call, plus the small ``pos`` tensors), plus the int8 ``QuantLinear``
copies of the finished targets (a quarter of their float weights). On a CUDA model these captures (and the
replay's recorded outputs) live in pinned CPU memory and move to the GPU one batch at a time when a step or a
pass reads them (``offload``; the values are the same bits, so results are unchanged): for VGGT-1B with 40
sequences of 10 frames at 518 px that is about 56 MB per tensor and batch, ~13 GB in all, which would not
fit a 24 GB card next to the model; the GPU then holds the model, one block's working set and the images.

**Cost.** Per block, two capture passes over the calibration set (float and quantized chain), then
``recon_iters`` forward/backward steps of the block alone. A capture pass would run the model from the
images up to the block, so capturing every block of a deep model costs O(blocks^2) block forwards
(about 2600 aggregator forwards for VGGT-1B's 48 blocks and 40 sequences). When every block of interest is
an aggregator block called once per forward (the default targets), the passes *replay* instead: the
patch embedding's output (recorded once) and the previous block's outputs in each chain (computed from its
captured inputs right after it finished, with its baked float and its quantized linears) are returned by
stand-ins, the blocks before it are skipped, and only the glue between the two blocks and the block itself
run: O(blocks) in all, and bit-identical to full passes (tested). The price is memory: the float-chain inputs
stay alive while the block learns, and the embedding and two sets of block outputs are kept. Other target
sets (patch-embed or camera-trunk blocks, blocks called more than once) and the block after one resumed
from a checkpoint use full passes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.methods import METHODS
from qvggt_export.quant import functional as qf
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.hadamard import fwht, fwht_inverse
from qvggt_export.quant.modules import QuantLinear, TransformedLinear
from qvggt_export.quant.roles import AGGREGATOR_PATH, PATCH_EMBED_PATH, QuantTarget, in_patch_embed, replace_module
from qvggt_export.quant.roles import in_aggregator as is_in_aggregator
from qvggt_export.quant.transforms import transform_input

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "qvggt-export/reconstruction/1"
# A learned parameter that leaves this range means the learning diverged: it is reported, not clamped.
_LOG_LIMIT = 30.0


# ---------------------------------------------------------------------------------------------------------------------
# Surgery helpers (public: small, pure model surgery that the invariance tests check directly).


def block_path(target: QuantTarget | str) -> str:
    """Dotted path of the transformer block holding a target linear: ``aggregator.frame_blocks.3.attn.qkv``
    -> ``aggregator.frame_blocks.3`` (every role names a ``{block}.{attn|mlp}.{linear}`` module)."""
    name = target if isinstance(target, str) else target.name
    parts = name.rsplit(".", 2)
    if len(parts) != 3:
        raise QVGGTError(f"target {name!r} is not inside a block (expected '<block>.<attn|mlp>.<linear>')")
    return parts[0]


def group_by_block(targets: Iterable[QuantTarget]) -> dict[str, list[QuantTarget]]:
    """Targets grouped by :func:`block_path`, each group in the given target order."""
    groups: dict[str, list[QuantTarget]] = {}
    for target in targets:
        groups.setdefault(block_path(target), []).append(target)
    return groups


def smoothing_space(method: str) -> str | None:
    """Where block reconstruction learns its per-channel correction ``s`` for a transform ``method``.

    The paper learns the smoothing factors ``c`` of DSFQ (step 4), so each ablation variant learns the factor
    *it* has, in the space where it applies it: ``"post"`` = after the whole input transform (Scale: the raw
    space; DSFQ: the rotated space), ``"pre"`` = before the rotation (Scale-then-Rotate scales raw channels,
    then rotates), ``None`` = no smoothing factor to learn (Base, Rotation: weight steps only). Learning a
    rotated-space ``s`` for Rotation or Scale-then-Rotate would give every rotating variant DSFQ's own
    mechanism and erase the ablation's distinction.
    """
    if method not in METHODS:
        raise QVGGTError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method].reconstruction_space


def _refold_pre(weight: torch.Tensor, post: torch.Tensor | None, smooth: torch.Tensor) -> torch.Tensor:
    """The folded weight after the pre-rotation scale changes from ``pre`` to ``pre / s``.

    ``W' = ((W / pre) @ H) / post`` (:func:`~qvggt_export.quant.transforms.fold_weight`), so
    ``W / pre = (W' * post) @ H^T`` and the new weight is ``(((W' * post) @ H^T) * s) @ H / post``.
    """
    unrotated = fwht_inverse(weight if post is None else weight * post)
    folded = fwht(unrotated * smooth)
    return folded if post is None else folded / post


@torch.no_grad()
def bake_smoothing(module: nn.Module, smooth: torch.Tensor, space: str = "post") -> TransformedLinear:
    """Fold a per-input-channel correction ``s`` into a float linear.

    ``space="post"``: ``x -> T(x) / s``, ``W -> W diag(s)``. ``space="pre"`` (a rotating
    :class:`TransformedLinear` only): ``pre -> pre / s`` before the rotation, ``W -> (((W * post) H^T) diag(s)) H
    / post``. Both are exact in real arithmetic; folded in float64 and cast once.

    Args:
        module: a :class:`TransformedLinear` (modified in place: ``input_post`` becomes
            ``input_post / s``, created if absent, or ``input_pre`` becomes ``input_pre / s``, and the
            weight is refolded) or an ``nn.Linear`` (left untouched; ``"post"`` only).
        smooth: ``s`` [in_features], positive.
        space: ``"post"`` or ``"pre"`` (see :func:`smoothing_space`).

    Returns:
        The module to put in the model: ``module`` itself for a :class:`TransformedLinear`, a new
        :class:`TransformedLinear` (``post = 1 / s``, no rotation) for an ``nn.Linear``.
    """
    if not isinstance(module, TransformedLinear | nn.Linear):
        raise QVGGTError(f"smoothing can be baked into a float linear only, got {type(module).__name__}")
    if space not in ("post", "pre"):
        raise QVGGTError(f"smoothing space must be 'post' or 'pre', got {space!r}")
    in_features = module.in_features
    if smooth.shape != (in_features,):
        raise QVGGTError(f"smoothing correction must have shape [{in_features}], got {tuple(smooth.shape)}")
    s = smooth.detach().to(device=module.weight.device, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise QVGGTError("smoothing correction must be finite and positive")
    if space == "pre":
        if not (isinstance(module, TransformedLinear) and module.rotate):
            raise QVGGTError("a pre-rotation smoothing correction needs a rotating TransformedLinear")
        post = None if module.input_post is None else module.input_post.to(torch.float64)
        weight = _refold_pre(module.weight.detach().to(torch.float64), post, s).to(module.weight.dtype)
        pre = module.input_pre
        pre = (torch.ones_like(s) if pre is None else pre.to(torch.float64)) / s
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.set_transform(pre, module.input_post, module.rotate)
        return module
    weight = (module.weight.detach().to(torch.float64) * s).to(module.weight.dtype)
    if isinstance(module, TransformedLinear):
        post = module.input_post
        post = (torch.ones_like(s) if post is None else post.to(torch.float64)) / s
        # A new Parameter rather than copy_: the layer may have been made under torch.inference_mode().
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.set_transform(module.input_pre, post, module.rotate)
        return module
    return TransformedLinear(weight, module.bias, None, (1.0 / s).float(), rotate=False)


# ---------------------------------------------------------------------------------------------------------------------
# The learnable fake-quant stand-in used while a block is learned.


class _LearnableQuantLinear(nn.Module):
    """``y = Q_w(W diag(s); D) applied to Q_a(T(x) / s)`` with learnable ``log s`` [in] and ``log D`` [out].

    ``space="pre"`` puts ``s`` before the rotation instead (``T`` with ``pre / s``, the weight refolded through
    ``H``); ``space=None`` keeps ``s = 1`` frozen (see :func:`smoothing_space`).

    Holds copies of the float layer's tensors (one block at a time, so the memory is small): copies made
    here are ordinary tensors even when the caller created the layer under ``torch.inference_mode()``.
    """

    def __init__(self, base: nn.Module, weight_bits: int, act_bits: int, space: str | None = "post") -> None:
        super().__init__()
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.rotate = bool(getattr(base, "rotate", False))
        self.space = space
        if space == "pre" and not self.rotate:
            raise QVGGTError("a pre-rotation smoothing correction needs a rotating layer")
        for name in ("weight", "bias", "input_pre", "input_post"):
            value = getattr(base, name, None)
            self.register_buffer(name, None if value is None else value.detach().clone())
        # Without a smoothing factor to learn, s stays exactly 1 (no gradient, not in the optimizer).
        self.log_smooth = nn.Parameter(torch.zeros(base.in_features, device=self.weight.device),
                                       requires_grad=space is not None)
        if space == "pre":  # W / pre (unrotated), so that the refolded weight is one transform away
            post = None if self.input_post is None else self.input_post.double()
            unrotated = fwht_inverse(self.weight.double() if post is None else self.weight.double() * post)
            self.register_buffer("unrotated_weight", unrotated.float())
        self.register_buffer("init_step", qf.per_channel_step(self.weight.to(torch.float64), weight_bits).float())
        self.log_step = nn.Parameter(self.init_step.log())

    def smooth(self) -> torch.Tensor:
        return self.log_smooth.exp()

    def step(self) -> torch.Tensor:
        return self.log_step.exp().clamp_min(qf.MIN_STEP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.smooth()
        if self.space == "pre":
            pre = 1.0 / s if self.input_pre is None else self.input_pre / s
            x = transform_input(x, pre.to(x.dtype), self.input_post, self.rotate)
            weight = fwht(self.unrotated_weight * s)
            weight = weight if self.input_post is None else weight / self.input_post
        else:
            x = transform_input(x, self.input_pre, self.input_post, self.rotate) / s.to(x.dtype)
            weight = self.weight * s
        # Dynamic per-token step from x itself, not detached (see the module docstring).
        x = qf.fake_quantize_ste(x, qf.per_token_step(x, self.act_bits), self.act_bits)
        weight = qf.fake_quantize_ste(weight, self.step()[:, None], self.weight_bits)
        return F.linear(x, weight.to(x.dtype), self.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Capturing block calls from the running model.


@dataclass
class BlockCall:
    """One call of a block during a forward pass: its positional and keyword arguments, and (float pass) output."""

    args: tuple
    kwargs: dict[str, Any]
    output: torch.Tensor | None = None


class _StopForwardSignal(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by a hook to cut a capture pass short once the block of interest has run for the last time."""


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _stash(value: Any, pinned: bool) -> Any:
    """A detached copy of ``value`` (tensors inside tuples, lists and dicts) for later use; with ``pinned``, GPU
    tensors are copied into page-locked CPU memory instead (module docstring, *Memory*)."""
    if not pinned:
        return _copy(value)
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value.detach().clone()
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return host.copy_(value.detach())
    if isinstance(value, tuple | list):
        return type(value)(_stash(v, pinned) for v in value)
    if isinstance(value, dict):
        return {k: _stash(v, pinned) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors on ``device`` (no copy for those already there; asynchronous from pinned memory,
    ordered on the current stream before the kernels that read them)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _as_images(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor):
        raise QVGGTError(f"calibration batches must be image tensors, got {type(batch).__name__}")
    images = batch.unsqueeze(0) if batch.dim() == 4 else batch
    if images.dim() != 5:
        raise QVGGTError(f"calibration batches must be [B, S, 3, H, W] or [S, 3, H, W], got {tuple(batch.shape)}")
    return images.to(device)


class _Replay(nn.Module):
    """Stands in for a module during a capture pass: returns the current batch's recorded output."""

    def __init__(self, outputs: Sequence[torch.Tensor], device: torch.device) -> None:
        super().__init__()
        self.outputs = outputs
        self.device = device
        self.index = 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.outputs[self.index].to(self.device, non_blocking=True)


class _Skip(nn.Module):
    """Stands in for a block whose output nobody reads (the replayed block after it ignores its input)."""

    def forward(self, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tokens


class _Runner:
    """Runs the smallest part of the model that executes every block of interest, and captures block calls.

    With ``replay`` (see the module docstring, *Cost*) a capture pass starts from recorded outputs of the
    patch embedding and of the previous block instead of from the images, when those are available.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str], batches: Sequence[torch.Tensor],
                 replay: bool = True, offload: bool | None = None) -> None:
        self.model = model
        self.blocks = list(blocks)
        aggregator = getattr(model, AGGREGATOR_PATH, None)
        in_aggregator = aggregator is not None and all(is_in_aggregator(b) for b in blocks)
        self.forward: Callable[[torch.Tensor], Any] = aggregator if in_aggregator else model
        device = next(model.parameters()).device
        self.device = device
        # Captured tensors go to pinned CPU memory on CUDA by default (module docstring, *Memory*).
        self.pinned = device.type == "cuda" if offload is None else bool(offload) and device.type == "cuda"
        self.batches = [_as_images(b, device) for b in batches]
        self.sequence = self._call_sequence()
        self.replays = (replay and in_aggregator and hasattr(aggregator, "patch_embed")
                        and len(self.sequence) == len(set(self.sequence))
                        and not any(in_patch_embed(b) for b in self.blocks))
        self._embed: list[torch.Tensor] | None = None
        self._finished: dict[bool, tuple[str, list[torch.Tensor]]] = {}  # chain (with_output) -> last block's outputs
        self.replayed = False  # whether the last capture pass started from recorded outputs

    def remember(self, block: str, float_outputs: list[torch.Tensor], quant_outputs: list[torch.Tensor]) -> None:
        """Record a finished block's per-batch outputs in the float and the quantized chain (for replay)."""
        if self.replays:
            self._finished = {True: (block, _stash(float_outputs, self.pinned)),
                              False: (block, _stash(quant_outputs, self.pinned))}

    def _replay_modules(self, block: str, with_output: bool) -> dict[str, nn.Module]:
        """Stand-ins that start a pass for ``block`` at its predecessor's recorded output; {} for a full pass."""
        position = self.sequence.index(block)
        finished = self._finished.get(with_output)
        if not self.replays or self._embed is None or position == 0 or finished is None:
            return {}
        previous, outputs = finished
        if previous != self.sequence[position - 1]:
            return {}
        stand_ins: dict[str, nn.Module] = {b: _Skip() for b in self.sequence[:position - 1]}
        stand_ins[previous] = _Replay(outputs, self.device)
        stand_ins[PATCH_EMBED_PATH] = _Replay(self._embed, self.device)
        return stand_ins

    def _hooks(self, make: Callable[[str], Callable]) -> list:
        return [self.model.get_submodule(b).register_forward_pre_hook(make(b), with_kwargs=True) for b in self.blocks]

    @torch.no_grad()
    def _call_sequence(self) -> list[str]:
        """The order in which the blocks of interest are called in one forward pass (first batch)."""
        sequence: list[str] = []

        def make(path: str) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                sequence.append(path)
            return hook

        handles = self._hooks(make)
        try:
            self.forward(self.batches[0])
        finally:
            for handle in handles:
                handle.remove()
        missing = [b for b in self.blocks if b not in sequence]
        if missing:
            raise QVGGTError(f"block(s) {missing} hold quantization targets but never run in the forward pass")
        return sequence

    def order(self) -> list[str]:
        """Blocks of interest in execution order (first call)."""
        return list(dict.fromkeys(self.sequence))

    @torch.no_grad()
    def capture(self, block: str, with_output: bool) -> list[list[BlockCall]]:
        """Every call of ``block`` on every batch: ``result[batch][call]``.

        The forward stops right after the block's last call in :attr:`sequence` (or after its input, when
        ``with_output`` is false). The call order is checked against the recorded sequence so a model whose
        control flow changed between batches is reported rather than silently mis-captured.
        """
        last = max(i for i, p in enumerate(self.sequence) if p == block)
        expected = self.sequence.count(block)
        position = -1
        calls: list[BlockCall] = []

        def make(path: str) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                nonlocal position
                position += 1
                if position > last:
                    raise _StopForwardSignal
                if self.sequence[position] != path:
                    raise QVGGTError(f"the model called {path} where {self.sequence[position]} was expected: "
                                     "its block call order differs between calibration batches")
                if path == block:
                    calls.append(BlockCall(_stash(args, self.pinned), _stash(kwargs, self.pinned)))
                    if position == last and not with_output:
                        raise _StopForwardSignal
            return hook

        def output_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise QVGGTError(f"block {block} returned {type(output).__name__}; reconstruction needs a tensor")
            calls[-1].output = _stash(output, self.pinned)
            if position == last:
                raise _StopForwardSignal

        stand_ins = self._replay_modules(block, with_output)
        embeddings: list[torch.Tensor] = []

        def embed_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            embeddings.append(_stash(output, self.pinned))

        result = []
        with swapped_modules(self.model, stand_ins):
            handles = self._hooks(make)
            if with_output:
                handles.append(self.model.get_submodule(block).register_forward_hook(output_hook, with_kwargs=True))
            if self.replays and self._embed is None:
                handles.append(self.model.get_submodule(PATCH_EMBED_PATH).register_forward_hook(embed_hook))
            try:
                for index, images in enumerate(self.batches):
                    for module in stand_ins.values():
                        if isinstance(module, _Replay):
                            module.index = index
                    position = -1
                    calls = []
                    with contextlib.suppress(_StopForwardSignal):
                        self.forward(images)
                    if len(calls) != expected:
                        raise QVGGTError(f"block {block} ran {len(calls)} times on a calibration batch, "
                                         f"expected {expected}")
                    result.append(calls)
            finally:
                for handle in handles:
                    handle.remove()
        self.replayed = bool(stand_ins)
        if embeddings and len(embeddings) == len(self.batches):
            self._embed = embeddings
        return result


@contextlib.contextmanager
def swapped_modules(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily put ``modules`` (dotted path -> module) into the model."""
    originals = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            replace_module(model, name, module)
        yield
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)


@torch.no_grad()
def _block_outputs(model: nn.Module, block: str, swaps: dict[str, nn.Module],
                   chain: Sequence[Sequence[BlockCall]]) -> list[torch.Tensor]:
    """A finished block's output on one chain's inputs, exactly as a full pass of that chain computes it."""
    with swapped_modules(model, swaps):
        module = model.get_submodule(block)
        device = _device_of(module)
        return [module(*to_device(calls[-1].args, device), **to_device(calls[-1].kwargs, device)).detach()
                for calls in chain]


@torch.no_grad()
def _learned_layers(model: nn.Module, targets: Sequence[QuantTarget], learned: _BlockResult,
                    spaces: Mapping[str, str | None],
                    quantize: Callable[[nn.Module, str, torch.Tensor | None], nn.Module]) -> dict[str, nn.Module]:
    """The quantized layers a learned block would get (its smoothing baked into copies of the float layers now in
    the model, its steps): what ``finish`` builds, without touching the model."""
    layers = {}
    for target in targets:
        module = copy.deepcopy(model.get_submodule(target.name))
        space = spaces[target.name]
        baked = module if space is None else bake_smoothing(module, learned.smooth[target.name], space)
        layers[target.name] = quantize(baked, target.name, learned.steps[target.name].to(baked.weight.device))
    return layers


@torch.no_grad()
def _retarget(model: nn.Module, block: str, float_chain: Sequence[Sequence[BlockCall]],
              quant_chain: Sequence[Sequence[BlockCall]], pinned: bool) -> None:
    """``--method auto`` with reconstruction: the float targets were captured through the block's untransformed
    linears; recompute them with the float layers now in the block (an exact equivalence, so they differ only by
    rounding), exactly as a single-method walk captures them: auto with one candidate then learns bit for bit what
    that method learns. The quantized chain's calls share the float chain's outputs."""
    module = model.get_submodule(block)
    device = _device_of(module)
    for calls in float_chain:
        for call in calls:
            call.output = _stash(module(*to_device(call.args, device), **to_device(call.kwargs, device)), pinned)
    if quant_chain is not float_chain:
        for fp_calls, q_calls in zip(float_chain, quant_chain, strict=True):
            for fp_call, q_call in zip(fp_calls, q_calls, strict=True):
                q_call.output = fp_call.output


# ---------------------------------------------------------------------------------------------------------------------
# Learning one block.


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _block_loss(block: nn.Module, calls: Sequence[BlockCall]) -> torch.Tensor:
    device = _device_of(block)
    losses = [F.mse_loss(block(*to_device(call.args, device), **to_device(call.kwargs, device)).float(),
                         to_device(call.output, device).float()) for call in calls]
    return torch.stack(losses).mean()


@torch.no_grad()
def mean_block_loss(block: nn.Module, batches: Sequence[Sequence[BlockCall]]) -> float:
    """Mean over ``batches`` of the MSE between the block's output on each captured call and that call's target
    ``output`` (the float chain's)."""
    return float(sum(float(_block_loss(block, calls)) for calls in batches) / len(batches))


def _block_seed(seed: int, block: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(block.encode())) % (2**63)


def _batch_order(seed: int, block: str, num_batches: int, iters: int) -> list[int]:
    """``iters`` batch indices: shuffled passes over the batches, drawn from ``(seed, block)`` only."""
    generator = torch.Generator().manual_seed(_block_seed(seed, block))
    order: list[int] = []
    while len(order) < iters:
        order.extend(torch.randperm(num_batches, generator=generator).tolist())
    return order[:iters]


@dataclass
class _BlockResult:
    smooth: dict[str, torch.Tensor]
    steps: dict[str, torch.Tensor]
    report: dict[str, float] = field(default_factory=dict)


def _learn_block(model: nn.Module, block: str, targets: Sequence[QuantTarget], batches: Sequence[Sequence[BlockCall]],
                 config: QuantConfig, spaces: Mapping[str, str | None]) -> _BlockResult:
    module = model.get_submodule(block)
    wrappers = {t.name: _LearnableQuantLinear(model.get_submodule(t.name), config.weight_bits, config.act_bits,
                                              spaces[t.name])
                for t in targets}
    with swapped_modules(model, wrappers):
        if any(t.is_inference() for t in (*module.parameters(), *module.buffers())):
            raise QVGGTError(f"{block} holds tensors created under torch.inference_mode(), which cannot take part "
                             "in learning; build the model outside inference mode (torch.no_grad() is fine)")
        loss_before = mean_block_loss(module, batches)
        if not math.isfinite(loss_before):
            raise QVGGTError(f"reconstruction of {block}: the initial loss is {loss_before} (non-finite inputs or "
                             "targets; check the calibration images and the checkpoint)")
        groups = [{"params": [w.log_step for w in wrappers.values()], "lr": config.lr_step}]
        smoothing = [w.log_smooth for w in wrappers.values() if w.space is not None]
        if smoothing:
            groups.insert(0, {"params": smoothing, "lr": config.lr_smooth})
        optimizer = torch.optim.Adam(groups)
        with torch.enable_grad():
            for iteration, index in enumerate(_batch_order(config.seed, block, len(batches), config.recon_iters)):
                optimizer.zero_grad(set_to_none=True)
                loss = _block_loss(module, batches[index])
                if not torch.isfinite(loss):
                    raise QVGGTError(f"reconstruction of {block} diverged: loss {float(loss)} at step {iteration} "
                                     f"(batch {index}); lower lr_smooth/lr_step ({config.lr_smooth}, {config.lr_step})")
                loss.backward()
                optimizer.step()
        for name, wrapper in wrappers.items():
            drift = (wrapper.log_step.detach() - wrapper.init_step.log()).abs().max()
            worst = max(float(wrapper.log_smooth.detach().abs().max()), float(drift))
            if not math.isfinite(worst) or worst > _LOG_LIMIT:
                raise QVGGTError(f"reconstruction of {block} diverged: {name} learned a factor of exp({worst:.1f}); "
                                 f"lower lr_smooth/lr_step ({config.lr_smooth}, {config.lr_step})")
        loss_after = mean_block_loss(module, batches)
        if not math.isfinite(loss_after):
            raise QVGGTError(f"reconstruction of {block} diverged: final loss {loss_after}")
        smooth = {name: w.smooth().detach().float() for name, w in wrappers.items()}
        steps = {name: w.step().detach().float() for name, w in wrappers.items()}
        init_steps = {name: w.init_step.float() for name, w in wrappers.items()}
    report = {"loss_before": loss_before, "loss_after": loss_after, "iters": float(config.recon_iters)}
    for target in targets:
        local = target.name[len(block) + 1:]
        ratio = steps[target.name] / init_steps[target.name]
        report.update({f"{local}.smooth_min": float(smooth[target.name].min()),
                       f"{local}.smooth_max": float(smooth[target.name].max()),
                       f"{local}.step_ratio_min": float(ratio.min()),
                       f"{local}.step_ratio_max": float(ratio.max())})
    return _BlockResult(smooth, steps, report)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint (resume).


def _fingerprint(model: nn.Module, targets: Sequence[QuantTarget], config: QuantConfig,
                 batches: Sequence[torch.Tensor]) -> str:
    """What a checkpoint's learned values depend on: settings, target weights and calibration data (summaries)."""
    settings = {k: getattr(config, k) for k in ("bits", "method", "alpha", "seed", "recon_iters", "lr_smooth",
                                                  "lr_step")}
    if config.is_auto:  # (only then: checkpoints of the other methods keep their fingerprints)
        settings.update(auto_methods=list(config.auto_methods), auto_granularity=config.auto_granularity,
                        auto_criterion=config.auto_criterion)
    with torch.no_grad():
        weights = [(t.name, repr(float(model.get_submodule(t.name).weight.double().sum())),
                    repr(float(model.get_submodule(t.name).weight.double().abs().sum()))) for t in targets]
        data = [(list(b.shape), repr(float(b.double().sum())), repr(float(b.double().square().sum())))
                for b in batches]
    blob = json.dumps({"settings": settings, "weights": weights, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_checkpoint(path: Path, fingerprint: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise QVGGTError(f"cannot read the reconstruction checkpoint {path}: {exc}") from exc
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise QVGGTError(f"{path} is not a reconstruction checkpoint (format {metadata.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    if metadata.get("fingerprint") != fingerprint:
        raise QVGGTError(f"the reconstruction checkpoint {path} was made with other settings, weights or calibration "
                         "data; delete it, or give this run its own file with --recon-checkpoint PATH")
    return tensors, json.loads(metadata.get("report", "{}")), json.loads(metadata.get("methods", "{}"))


def _save_checkpoint(path: Path, fingerprint: str, tensors: dict[str, torch.Tensor],
                     report: dict[str, dict[str, float]], methods: dict[str, str]) -> None:
    """Write atomically (:func:`qvggt_export.io.atomic_write`)."""
    from safetensors.torch import save_file

    from qvggt_export.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "report": json.dumps(report),
                "methods": json.dumps(methods)}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata))


# ---------------------------------------------------------------------------------------------------------------------
# The stage.


class BlockChooser(Protocol):
    """Chooses each block's transforms when the walk over blocks reaches it (``--method auto``; implemented by
    :class:`qvggt_export.quant.select.MethodChooser`). Declared here so that this module needs no import of it."""

    def measure(self, block: str, targets: Sequence[QuantTarget], calls: Sequence[Sequence[BlockCall]]
                ) -> list[dict[str, str]]:
        """Measure the candidates on the block's quantized-chain ``calls`` (outputs: the float targets); return the
        options (target name -> method), the measured best first."""

    def try_option(self, block: str, targets: Sequence[QuantTarget], assignment: Mapping[str, str]) -> None:
        """Put one option's float layers into the model (to learn it)."""

    def commit(self, block: str, targets: Sequence[QuantTarget], assignment: Mapping[str, str],
               learned: Sequence[tuple[Mapping[str, str], float]] = ()) -> dict[str, str]:
        """Put the chosen option's float layers into the model, record the choice, return it."""

    def score(self, block: str, layers: Mapping[str, nn.Module], calls: Sequence[Sequence[BlockCall]]) -> float:
        """The block's error with ``layers`` (target name -> quantized layer) in place (lower is better)."""

    def install(self, block: str, targets: Sequence[QuantTarget], methods: Mapping[str, str]) -> None:
        """Put the float layers of ``methods`` (a resumed block's saved choice) into the model."""

    def quantize(self, module: nn.Module, name: str, weight_step: torch.Tensor | None) -> nn.Module:
        """The quantized layer that ``quantize_model`` will build from the finished float ``module``."""


def reconstruct_blocks(model: nn.Module, targets: Sequence[QuantTarget], config: QuantConfig,
                       batches: Sequence[torch.Tensor], progress: Callable[[Iterable], Iterable] = lambda x: x,
                       *, checkpoint: str | Path | None = None, replay: bool = True, offload: bool | None = None,
                       chooser: BlockChooser | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Learn per-channel smoothing corrections and weight steps block by block (in place; DSFQ step 4).

    Runs after :func:`~qvggt_export.quant.dsfq.apply_transforms` (targets are :class:`TransformedLinear`,
    or ``nn.Linear`` for ``rtn``) and before :func:`~qvggt_export.quant.rtn.quantize_model`. Each learned
    correction ``s`` is baked into its layer (the model stays float and equivalent to the original);
    the learned steps are returned for ``quantize_model``. See the module docstring for the method.

    Args:
        model: the VGGT, float, eval mode; its parameters are frozen during the call and restored after.
        targets: the linears to quantize (:func:`~qvggt_export.quant.roles.find_targets`), possibly spread
            over aggregator, patch-embed and camera-trunk blocks.
        config: bits, seed, ``recon_iters`` (steps per block), ``lr_smooth``, ``lr_step``.
        batches: calibration images, each [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1].
        progress: wraps the loop over blocks (e.g. a tqdm factory).
        checkpoint: optional safetensors file; the learned ``s``/``D`` of every finished block are written
            to it (atomically) after each block, and blocks already in it are applied and skipped. A
            checkpoint from other settings, weights or data is refused.
        replay: start capture passes from recorded outputs where possible (module docstring, *Cost*);
            False runs every pass from the images (slower; for comparison).
        offload: keep captured tensors in pinned CPU memory (module docstring, *Memory*); ``None`` (default):
            on when the model is on a CUDA device. No effect on the CPU.
        chooser: ``--method auto``: the targets arrive as plain ``nn.Linear``; as the walk reaches a block, the
            chooser measures the candidate methods on the same captured inputs (the quantized chain's, so upstream
            error counts) and installs its choice, which is then learned (or, with ``recon_iters == 0``, only
            quantized for the chain: the walk then chooses without learning and returns no steps). A checkpoint
            keeps the choices, so a resumed run applies the same ones.

    Returns:
        ``(weight_steps, report)``: the learned step ``D`` [out] (float32) per target name, and per block
        path ``loss_before`` / ``loss_after`` (mean block-output MSE over the calibration batches with the
        initial / learned parameters), ``iters``, ``seconds`` (capture + learning), ``resumed`` (1.0 if taken
        from the checkpoint), ``replayed`` (1.0 if its capture passes started from recorded outputs) and
        per layer ``<attn.qkv>.smooth_min`` / ``smooth_max`` / ``step_ratio_min`` / ``step_ratio_max`` (``D``
        over its round-to-nearest initial value).

    Raises:
        QVGGTError: no calibration batches, a target that is not a float linear, a non-finite or diverging
            loss (naming the block), or an unusable checkpoint.
    """
    if len(batches) == 0:
        raise QVGGTError("block reconstruction needs calibration data, but the calibration set is empty")
    targets = list(targets)
    if not targets or (config.recon_iters == 0 and chooser is None):
        return {}, {}
    for target in targets:
        module = model.get_submodule(target.name)
        if not isinstance(module, TransformedLinear | nn.Linear) or (chooser is not None
                                                                      and type(module) is not nn.Linear):
            raise QVGGTError(f"{target.name} is a {type(module).__name__}; reconstruction runs on float linears, "
                             "before quantize_model")
    groups = group_by_block(targets)
    path = None if checkpoint is None else Path(checkpoint)
    # Only the learnable corrections get gradients. (Inference tensors cannot change their flag; they are
    # refused with a clear message when their block is learned.)
    frozen = [p for p in model.parameters() if p.requires_grad and not p.is_inference()]
    for parameter in frozen:
        parameter.requires_grad_(False)
    # Inference-mode tensors cannot be saved for backward; learning needs ordinary tensors even if the caller
    # runs under torch.inference_mode().
    with torch.inference_mode(False):
        try:
            return _reconstruct(model, targets, groups, config, batches, progress, path, replay, offload, chooser)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)


def _reconstruct(model: nn.Module, targets: list[QuantTarget], groups: dict[str, list[QuantTarget]],
                 config: QuantConfig, batches: Sequence[torch.Tensor], progress: Callable[[Iterable], Iterable],
                 path: Path | None, replay: bool, offload: bool | None, chooser: BlockChooser | None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    learn = config.recon_iters > 0  # else a chooser's walk only: choose, quantize the chain, learn nothing
    fingerprint = _fingerprint(model, targets, config, batches) if path is not None and learn else ""
    saved, report, saved_methods = ({}, {}, {})
    if fingerprint and path.exists():
        saved, report, saved_methods = _load_checkpoint(path, fingerprint)
    runner = _Runner(model, list(groups), batches, replay, offload)
    methods = {} if chooser is not None else dict.fromkeys((t.name for t in targets), config.method)
    steps: dict[str, torch.Tensor] = {}
    quantized: dict[str, nn.Module] = {}  # finished targets as quantize_model will build them
    learned: dict[str, torch.Tensor] = {}  # what the checkpoint holds

    def quantize(module: nn.Module, name: str, step: torch.Tensor | None) -> nn.Module:
        if chooser is not None:
            return chooser.quantize(module, name, step)
        return QuantLinear.from_linear(module, config.weight_bits, config.act_bits, name, weight_step=step)

    def finish(block_targets: Sequence[QuantTarget], smooth: dict[str, torch.Tensor] | None,
               block_steps: dict[str, torch.Tensor] | None) -> None:
        for target in block_targets:
            module = model.get_submodule(target.name)
            space = smoothing_space(methods[target.name])
            # s == 1 exactly when the method has no smoothing factor: nothing to bake (keeps nn.Linear for Base).
            baked = (module if space is None or smooth is None
                     else bake_smoothing(module, smooth[target.name], space))
            replace_module(model, target.name, baked)
            if block_steps is None:  # nothing learned: round-to-nearest steps
                quantized[target.name] = quantize(baked, target.name, None)
                continue
            step = block_steps[target.name].to(device=baked.weight.device, dtype=torch.float32)
            steps[target.name] = step
            quantized[target.name] = quantize(baked, target.name, step)
            learned[f"{target.name}.smooth"] = smooth[target.name]
            learned[f"{target.name}.weight_step"] = step

    for block in progress(runner.order()):
        block_targets = groups[block]
        keys = [f"{t.name}.{kind}" for t in block_targets for kind in ("smooth", "weight_step")]
        resumable = chooser is None or all(t.name in saved_methods for t in block_targets)
        if block in report and all(k in saved for k in keys) and resumable:
            if chooser is not None:
                chosen = {t.name: saved_methods[t.name] for t in block_targets}
                chooser.install(block, block_targets, chosen)
                methods.update(chosen)
            finish(block_targets, {t.name: saved[f"{t.name}.smooth"] for t in block_targets},
                   {t.name: saved[f"{t.name}.weight_step"] for t in block_targets})
            report[block] = {**report[block], "resumed": 1.0}
            logger.info("reconstruction of %s: taken from %s", block, path)
            continue
        started = time.perf_counter()
        float_chain = runner.capture(block, with_output=True)
        replayed = runner.replayed
        if quantized:
            with swapped_modules(model, quantized):
                quant_chain = runner.capture(block, with_output=False)
            for fp_calls, q_calls in zip(float_chain, quant_chain, strict=True):
                for fp_call, q_call in zip(fp_calls, q_calls, strict=True):
                    q_call.output = fp_call.output
        else:  # nothing upstream is quantized yet: both chains feed the block the same input
            quant_chain = float_chain
        result = None
        if chooser is not None:
            options = chooser.measure(block, block_targets, quant_chain)
            if not learn:
                methods.update(chooser.commit(block, block_targets, options[0]))
            else:
                if config.auto_criterion != "reconstructed":
                    options = options[:1]
                trials, failures = [], []
                for option in options:
                    chooser.try_option(block, block_targets, option)
                    _retarget(model, block, float_chain, quant_chain, runner.pinned)
                    spaces = {t.name: smoothing_space(option[t.name]) for t in block_targets}
                    try:
                        outcome = _learn_block(model, block, block_targets, quant_chain, config, spaces)
                    except QVGGTError as exc:
                        if len(options) == 1:
                            raise
                        failures.append(exc)  # a candidate whose learning diverges is out of the comparison
                        logger.warning("auto: %s: %s", block, exc)
                        continue
                    # Compared as the quantized criterion compares, on the layers this option would become.
                    value = (chooser.score(block, _learned_layers(model, block_targets, outcome, spaces, quantize),
                                           quant_chain) if len(options) > 1 else 0.0)
                    trials.append((option, outcome, value))
                if not trials:
                    raise failures[0]
                option, result, _ = min(trials, key=lambda trial: trial[2])  # ties: the first
                methods.update(chooser.commit(block, block_targets, option,
                                              [(o, v) for o, _, v in trials] if len(options) > 1 else ()))
        if not runner.replays:
            del float_chain
        if learn:
            if result is None:
                result = _learn_block(model, block, block_targets, quant_chain, config,
                                      {t.name: smoothing_space(methods[t.name]) for t in block_targets})
            finish(block_targets, result.smooth, result.steps)
        else:
            finish(block_targets, None, None)
        if runner.replays:  # the next block's passes start here: this block's outputs, baked float and quantized
            runner.remember(block, _block_outputs(model, block, {}, float_chain),
                            _block_outputs(model, block, quantized, quant_chain))
            del float_chain
        del quant_chain
        if not learn:
            continue
        report[block] = {**result.report, "seconds": time.perf_counter() - started, "resumed": 0.0,
                         "replayed": float(replayed)}
        before, after = report[block]["loss_before"], report[block]["loss_after"]
        logger.info("reconstruction of %s: loss %.4g -> %.4g in %.1f s", block, before, after, report[block]["seconds"])
        if after > before:
            logger.warning("reconstruction of %s ended above its initial loss (%.4g > %.4g); consider more "
                           "calibration data, more iterations or lower learning rates", block, after, before)
        if path is not None:
            run_only = ("resumed", "replayed")  # how this run got the block, not what was learned
            _save_checkpoint(path, fingerprint, learned, {b: {k: v for k, v in report[b].items() if k not in run_only}
                                                          for b in report if b in groups},
                             methods if chooser is not None else {})
    if not learn:
        return {}, {}
    return steps, {block: report[block] for block in runner.order()}
