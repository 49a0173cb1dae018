"""``--method auto``: per block (or per layer), the transform whose quantized block output stays closest to the float.

Which transform wins depends on the model: on our planted-outlier testbeds Scale-then-Rotate beats DSFQ, the paper
reports the opposite on trained VGGT-1B, and a block whose inputs carry no outliers may do best with none. So
``auto`` measures instead of guessing. :class:`MethodChooser` plugs into the walk over blocks of
:func:`~qvggt_export.quant.reconstruct.reconstruct_blocks` (which captures every block's inputs anyway), and for
each block in execution order:

1. builds every candidate's float layers for the block's targets (:func:`~qvggt_export.quant.dsfq.transform_linear`:
   exact equivalences, from the calibration statistics), and quantizes each round-to-nearest in the run's format
   (NVFP4's activation global scale from the block's own calibration inputs);
2. runs the block with each candidate's quantized layers on the *quantized chain's* inputs (earlier blocks already
   quantized with their choices, and learned when reconstruction is on) and measures the squared error against the
   float block's output on the float chain (:func:`block_error_parts`, :func:`combined_error`: in aggregator
   blocks the mean of the special tokens' and the patch tokens' relative errors, so that the camera token, which
   carries the pose, is not one token among ~1,370 per frame);
3. keeps the candidate with the lowest error (ties: the earlier in ``auto_methods``); with
   ``auto_granularity="layer"`` it then tries, linear by linear, every other candidate for that one linear and keeps
   a switch when the block's error drops (one coordinate-descent sweep: 1 + 4 x (candidates - 1) block passes);
4. puts the chosen float layers into the model. Block reconstruction, when on, then learns that choice: each layer
   learns its own method's smoothing factor (:func:`~qvggt_export.quant.reconstruct.smoothing_space`).

Errors are relative (``errors``: each candidate on the whole block; ``token_errors``: in aggregator blocks, the
special and patch tokens' parts of ``errors``; ``error``: the choice; ``learned_errors``: each candidate after
learning, with ``auto_criterion="reconstructed"``). The choice is greedy: each block is
chosen given the blocks before it, which is what reconstruction does too. Cost per block: one block pass over the
calibration set per candidate (and per trial with ``layer``), on top of the two capture passes the walk makes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.methods import METHODS
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.dsfq import ChannelStats, transform_linear
from qvggt_export.quant.hadamard import is_rotatable
from qvggt_export.quant.modules import TransformedLinear
from qvggt_export.quant.reconstruct import BlockCall, mean_block_loss, swapped_modules, to_device
from qvggt_export.quant.roles import AGGREGATOR_PATH, QuantTarget, in_aggregator, in_patch_embed, replace_module
from qvggt_export.quant.rtn import quantize_linear

logger = logging.getLogger(__name__)

# A candidate must beat the current choice by more than this relative margin to replace it: float noise in the
# block pass must not flip a choice between methods that are equal (rtn and rotate on a block whose targets
# cannot differ, say).
_TIE_MARGIN = 1e-6


def _local(block: str, name: str) -> str:
    return name[len(block) + 1:]


def _label(assignment: Mapping[str, str]) -> str:
    """An option's name in the report: its method, or ``mixed`` when its linears differ."""
    methods = set(assignment.values())
    return next(iter(methods)) if len(methods) == 1 else "mixed"


@dataclass(frozen=True)
class TokenLayout:
    """Where the special tokens sit in an aggregator block's tokens: ``tokens_per_frame`` per frame, the first
    ``special`` of them (camera + registers), frame after frame (frame blocks [B*S, P, C], global [B, S*P, C])."""

    tokens_per_frame: int
    special: int

    def fits(self, calls: Sequence[Sequence[BlockCall]]) -> bool:
        output = calls[0][0].output
        return (isinstance(output, torch.Tensor) and output.dim() == 3
                and output.shape[1] % self.tokens_per_frame == 0)

    def special_mask(self, tokens: int, device: torch.device) -> torch.Tensor:
        return (torch.arange(tokens, device=device) % self.tokens_per_frame) < self.special


def aggregator_token_layout(model: nn.Module, batches: Sequence[torch.Tensor]) -> TokenLayout | None:
    """The :class:`TokenLayout` of ``model``'s aggregator blocks at the calibration images' size (None without an
    aggregator or images)."""
    aggregator = getattr(model, AGGREGATOR_PATH, None)
    if aggregator is None or len(batches) == 0:
        return None
    height, width = batches[0].shape[-2:]
    patch = aggregator.patch_size
    special = aggregator.patch_start_idx
    return TokenLayout(special + (height // patch) * (width // patch), special)


@torch.no_grad()
def block_error_parts(block: nn.Module, calls: Sequence[Sequence[BlockCall]], layout: TokenLayout | None
                      ) -> dict[str, float]:
    """The block's output error against the calls' float ``output``, relative to the float output's power.

    With a ``layout`` (aggregator blocks): ``{"special": ..., "patch": ...}``, the special tokens' (camera +
    registers) and the patch tokens' relative squared errors, each over its own power, averaged over the calls.
    Without: ``{"all": ...}``, the sum of squared errors over the sum of squared float outputs, over every call."""
    device = next(block.parameters()).device
    total_error = total_power = 0.0
    pairs = []  # with a layout: per call, (special tokens' relative error, patch tokens')
    for batch in calls:
        for call in batch:
            got = block(*to_device(call.args, device), **to_device(call.kwargs, device)).float()
            want = to_device(call.output, device).float()
            squared, power = (got - want).pow(2).sum(-1), want.pow(2).sum(-1)  # per token
            if layout is None:
                total_error += float(squared.sum())
                total_power += float(power.sum())
                continue
            special = layout.special_mask(want.shape[1], device)
            pairs.append([float(squared[:, m].sum() / power[:, m].sum().clamp_min(1e-30)) for m in (special, ~special)])
    if layout is None:
        return {"all": total_error / max(total_power, 1e-30)}
    return {"special": sum(p[0] for p in pairs) / len(pairs), "patch": sum(p[1] for p in pairs) / len(pairs)}


def combined_error(parts: Mapping[str, float]) -> float:
    """The one number auto minimises: the mean of :func:`block_error_parts`' parts. In aggregator blocks a plain
    relative MSE would weigh the camera token, which alone carries the pose, as 1 of ``tokens_per_frame`` tokens
    (1 in 1,374 for VGGT-1B at 518 px), so a candidate could ruin the cameras at no cost; the mean of the special
    and patch tokens' errors weighs the two groups equally."""
    return sum(parts.values()) / len(parts)


@dataclass
class _Pending:
    """What :meth:`MethodChooser.measure` built for one block, kept until :meth:`MethodChooser.commit`."""

    block: str
    floats: dict[str, dict[str, nn.Module]]
    amax: dict[tuple[str, str], float]
    record: dict[str, Any]


class MethodChooser:
    """Chooses and installs each block's transforms during the walk of ``reconstruct_blocks`` (module docstring).

    Args:
        model: the float VGGT (its targets still plain ``nn.Linear``).
        config: ``auto`` settings (``auto_methods``, ``auto_granularity``), format, alpha, seed.
        stats: per-target calibration channel maxima (raw and/or rotated, as the candidates need).
    """

    def __init__(self, model: nn.Module, config: QuantConfig, stats: Mapping[str, ChannelStats] | None,
                 token_layout: TokenLayout | None = None) -> None:
        self.model = model
        self.token_layout = token_layout
        self.config = config
        self.stats = dict(stats or {})
        self.methods: dict[str, str] = {}
        self.blocks: dict[str, dict[str, Any]] = {}
        self.input_amax: dict[str, float] = {}  # nvfp4: each chosen layer's max |transformed input| on its block
        self._pending: _Pending | None = None  # the block measured and not yet committed

    def _pending_for(self, block: str) -> _Pending:
        if self._pending is None or self._pending.block != block:
            raise QVGGTError(f"auto: {block} has not been measured (measure() comes first)")
        return self._pending

    # -- the walk's interface (reconstruct.BlockChooser) ---------------------------------------------------------

    def measure(self, block: str, targets: Sequence[QuantTarget], calls: Sequence[Sequence[BlockCall]]
                ) -> list[dict[str, str]]:
        """Measure every candidate on the block (round-to-nearest, module docstring) and return the options,
        best first: the chosen assignment (target name -> method), then every other block-wide candidate by
        error. Nothing is put into the model yet (:meth:`try_option`, :meth:`commit`)."""
        candidates, unavailable = self._available(block, targets)
        floats = {t.name: {m: self._float_layer(t.name, m) for m in candidates[t.name]} for t in targets}
        amax = self._transformed_amax(block, floats, calls) if self.config.family == "nvfp4" else {}
        quantized = {name: {m: quantize_linear(layer, self.config, name, None, amax.get((name, m)))
                            for m, layer in layers.items()} for name, layers in floats.items()}
        def error_parts(assignment: Mapping[str, str]) -> dict[str, float]:
            return self.score_parts(block, {name: quantized[name][m] for name, m in assignment.items()}, calls)

        def error(assignment: Mapping[str, str]) -> float:
            return combined_error(error_parts(assignment))

        block_methods = [m for m in self.config.auto_methods if all(m in candidates[t.name] for t in targets)]
        if not block_methods:
            raise QVGGTError(f"--method auto: no candidate of {list(self.config.auto_methods)} applies to every "
                             f"linear of {block} ({unavailable}); add rtn or smooth to the candidates")
        errors: dict[str, float] = {}
        token_errors: dict[str, dict[str, float]] = {}  # aggregator blocks: each candidate's special / patch parts
        for method in block_methods:
            parts = error_parts(dict.fromkeys(candidates, method))
            errors[method] = combined_error(parts)
            if "special" in parts:
                token_errors[method] = parts
        best = block_methods[0]
        for method in block_methods[1:]:
            if errors[method] < errors[best] * (1 - _TIE_MARGIN):
                best = method
        assignment = dict.fromkeys(candidates, best)
        chosen_error = errors[best]
        trials = 0
        if self.config.auto_granularity == "layer":
            for target in targets:
                for method in [m for m in candidates[target.name] if m != assignment[target.name]]:
                    trial = {**assignment, target.name: method}
                    value = error(trial)
                    trials += 1
                    if value < chosen_error * (1 - _TIE_MARGIN):
                        assignment, chosen_error = trial, value
        record: dict[str, Any] = {"method": best, "error": chosen_error, "errors": errors,
                                  "layers": {_local(block, n): m for n, m in assignment.items()}}
        if token_errors:
            record["token_errors"] = token_errors
        if trials:
            record["layer_trials"] = trials
        if unavailable:
            record["unavailable"] = unavailable
        options = [assignment] + [dict.fromkeys(candidates, m) for m in sorted(errors, key=errors.get)
                                  if dict.fromkeys(candidates, m) != assignment]
        self._pending = _Pending(block, floats, amax, record)
        return options

    def score(self, block: str, layers: Mapping[str, nn.Module], calls: Sequence[Sequence[BlockCall]]) -> float:
        """:func:`combined_error` of :meth:`score_parts` (``layers``: target name -> quantized layer)."""
        return combined_error(self.score_parts(block, layers, calls))

    def score_parts(self, block: str, layers: Mapping[str, nn.Module], calls: Sequence[Sequence[BlockCall]]
                    ) -> dict[str, float]:
        """:func:`block_error_parts` of ``block`` with ``layers`` swapped in; the token layout applies to the
        aggregator's frame and global blocks only (not the DINOv2 embedding's, not the camera trunk's)."""
        aggregator_block = in_aggregator(block) and not in_patch_embed(block)
        layout = (self.token_layout if aggregator_block and self.token_layout is not None
                  and self.token_layout.fits(calls) else None)
        with swapped_modules(self.model, dict(layers)):
            return block_error_parts(self.model.get_submodule(block), calls, layout)

    def try_option(self, block: str, targets: Sequence[QuantTarget], assignment: Mapping[str, str]) -> None:
        """Put one measured option's float layers into the model (to learn it; :meth:`commit` decides)."""
        pending = self._pending_for(block)
        for target in targets:
            replace_module(self.model, target.name, pending.floats[target.name][assignment[target.name]])

    def commit(self, block: str, targets: Sequence[QuantTarget], assignment: Mapping[str, str],
               learned: Sequence[tuple[Mapping[str, str], float]] = ()) -> dict[str, str]:
        """Put the chosen option's float layers into the model and record the choice. ``learned``: each option
        tried with reconstruction and its :meth:`score` once learned (``auto_criterion="reconstructed"``)."""
        pending = self._pending_for(block)
        self.install(block, targets, assignment, pending.floats)
        for name, method in assignment.items():
            if (name, method) in pending.amax:
                self.input_amax[name] = pending.amax[(name, method)]
        record = pending.record
        record["layers"] = {_local(block, n): m for n, m in assignment.items()}
        if len(set(assignment.values())) == 1:
            record["method"] = next(iter(assignment.values()))
            record["error"] = record["errors"][record["method"]]
        if learned:
            record["learned_errors"] = {_label(option): value for option, value in learned}
        self.blocks[block] = record
        self._pending = None
        switched = {k: v for k, v in record["layers"].items() if v != record["method"]}
        logger.info("auto: %s -> %s%s (relative error %.4g; %s%s)", block, record["method"],
                    f", switched {switched}" if switched else "", record["error"],
                    ", ".join(f"{m} {e:.4g}" for m, e in record["errors"].items()),
                    "; learned: " + ", ".join(f"{k} {v:.4g}" for k, v in record["learned_errors"].items())
                    if learned else "")
        return dict(assignment)

    def choose(self, block: str, targets: Sequence[QuantTarget], calls: Sequence[Sequence[BlockCall]]
               ) -> dict[str, str]:
        """:meth:`measure`, then :meth:`commit` the measured best (the ``"quantized"`` criterion)."""
        return self.commit(block, targets, self.measure(block, targets, calls)[0])

    def install(self, block: str, targets: Sequence[QuantTarget], methods: Mapping[str, str],
                floats: Mapping[str, Mapping[str, nn.Module]] | None = None) -> None:
        for target in targets:
            method = methods[target.name]
            if method not in METHODS:
                raise QVGGTError(f"{target.name}: unknown method {method!r} (a damaged reconstruction checkpoint?)")
            layer = floats[target.name][method] if floats is not None else self._float_layer(target.name, method)
            replace_module(self.model, target.name, layer)
            self.methods[target.name] = method
        if floats is None:  # a resumed block: the choice was measured by an earlier run
            counts = [methods[t.name] for t in targets]
            self.blocks[block] = {"method": max(set(counts), key=counts.count),
                                  "layers": {_local(block, t.name): methods[t.name] for t in targets},
                                  "resumed": True}

    def quantize(self, module: nn.Module, name: str, weight_step: torch.Tensor | None) -> nn.Module:
        return quantize_linear(module, self.config, name, weight_step, self.input_amax.get(name))

    # -- results -------------------------------------------------------------------------------------------------

    @property
    def transformed(self) -> int:
        """How many targets got a transform (not ``rtn``)."""
        return sum(isinstance(self.model.get_submodule(name), TransformedLinear) for name in self.methods)

    def summary(self) -> dict[str, Any]:
        """What the report records: settings, per-method counts over the layers, and every block's measurements."""
        counts = {m: sum(v == m for v in self.methods.values()) for m in self.config.auto_methods}
        error = ("block-output squared error vs float, relative, special (camera + register) and patch tokens "
                 "weighted equally" if self.token_layout is not None else
                 "block-output squared error vs float, relative")
        criterion = (f"{error}; round-to-nearest; quantized-chain inputs"
                     if self.config.auto_criterion == "quantized" or self.config.recon_iters == 0 else
                     f"{error}; after block reconstruction of every candidate; quantized-chain inputs")
        return {"candidates": list(self.config.auto_methods), "granularity": self.config.auto_granularity,
                "criterion": criterion,
                "layer_counts": counts, "blocks": self.blocks}

    # -- helpers -------------------------------------------------------------------------------------------------

    def _available(self, block: str, targets: Sequence[QuantTarget]
                   ) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Per target, the candidates that apply (a rotating method needs a width the Hadamard code supports)."""
        candidates: dict[str, list[str]] = {}
        unavailable: dict[str, str] = {}
        for target in targets:
            module = self.model.get_submodule(target.name)
            if type(module) is not nn.Linear:
                raise QVGGTError(f"{target.name} is a {type(module).__name__}; --method auto starts from float "
                                 "nn.Linear layers")
            usable = []
            for method in self.config.auto_methods:
                if METHODS[method].rotates and not is_rotatable(module.in_features):
                    unavailable[f"{_local(block, target.name)}:{method}"] = (
                        f"no Hadamard matrix of order {module.in_features}")
                    continue
                usable.append(method)
            if not usable:
                raise QVGGTError(f"--method auto: no candidate of {list(self.config.auto_methods)} applies to "
                                 f"{target.name} ({module.in_features} input channels cannot be rotated)")
            candidates[target.name] = usable
        return candidates, unavailable

    def _float_layer(self, name: str, method: str) -> nn.Module:
        original = self.model.get_submodule(name)
        if isinstance(original, TransformedLinear):  # installing again (a resumed block): start from the float one
            raise QVGGTError(f"{name} already has a transform; --method auto starts from float nn.Linear layers")
        return transform_linear(name, original, method, self.stats.get(name), self.config.alpha, self.config.seed)

    @torch.no_grad()
    def _transformed_amax(self, block: str, floats: Mapping[str, Mapping[str, nn.Module]],
                          calls: Sequence[Sequence[BlockCall]]) -> dict[tuple[str, str], float]:
        """NVFP4: max |candidate-transformed input| of every (target, candidate) over the block's calibration inputs.

        The float block runs once; every candidate is an exact equivalence of the float layer, so each target's raw
        input is the same whichever candidates its neighbours use."""
        amax: dict[tuple[str, str], float] = {}

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach().float()
                for method, layer in floats[name].items():
                    value = layer.transform(x) if isinstance(layer, TransformedLinear) else x
                    key = (name, method)
                    amax[key] = max(amax.get(key, 0.0), float(value.abs().amax()))
            return hook

        handles = [self.model.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in floats]
        try:
            mean_block_loss(self.model.get_submodule(block), calls)
        finally:
            for handle in handles:
                handle.remove()
        zero = sorted(f"{name}:{method}" for (name, method), value in amax.items() if not value > 0)
        if zero:
            raise QVGGTError(f"the calibration data never activates {zero[:3]} (max |input| = 0): no NVFP4 activation "
                             "scale can be set; use other calibration data")
        return amax
