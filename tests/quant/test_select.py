"""``--method auto`` (qvggt_export.quant.select) on the tiny VGGT with planted outliers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from qvggt_export.calib import SyntheticSequenceConfig, generate_sequences
from qvggt_export.errors import QVGGTError
from qvggt_export.methods import METHODS
from qvggt_export.model import build_vggt
from qvggt_export.model.config import resolve_config
from qvggt_export.quant import QuantConfig, find_targets
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.modules import FloatQuantLinear, QuantLinear

PRESET = "tiny-outliers"
FIRST_BLOCK = "aggregator.frame_blocks.0"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin on the shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    config = SyntheticSequenceConfig(num_sequences=3, frames=3, height=70, width=70, seed=0)
    return [s.unsqueeze(0) for s in generate_sequences(config)]


def _quantized(config: QuantConfig, batches, preset=PRESET, **kwargs):
    model = build_vggt(preset)
    result = calibrate(model, config, batches, **kwargs)
    return model, result


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["rtn", "smooth_rotate", "dsfq"])
def test_auto_with_one_candidate_is_that_method(method, batches):
    """The selection adds nothing of its own: with a single candidate the quantized model is bit-identical."""
    single, _ = _quantized(QuantConfig(bits="w4a4", method=method), batches)
    auto, result = _quantized(QuantConfig(bits="w4a4", method="auto", auto_methods=(method,)), batches)
    assert _same_state(single, auto)
    assert result.method_selection["layer_counts"] == {method: 32}


TOKENS_PER_FRAME, SPECIAL = 5 + (70 // 14) ** 2, 5  # camera + 4 registers, then 5 x 5 patches


@torch.no_grad()
def _first_block_errors(method: str, batches, recon_iters: int = 0) -> tuple[float, float]:
    """The first block's quantized-vs-float output errors, measured here independently: the whole model quantized
    with ``method``, the block fed the float model's inputs (the first block's chains coincide); the special tokens'
    and the patch tokens' relative squared errors, each averaged over the calls."""
    float_model = build_vggt(PRESET)
    quantized, _ = _quantized(QuantConfig(bits="w4a4", method=method, recon_iters=recon_iters), batches)
    calls = []
    handle = float_model.get_submodule(FIRST_BLOCK).register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args, kwargs, output)), with_kwargs=True)
    for images in batches:
        float_model.aggregator(images)
    handle.remove()
    block = quantized.get_submodule(FIRST_BLOCK)
    special = torch.arange(TOKENS_PER_FRAME) < SPECIAL  # frame block: [frames, tokens, channels]
    sums = [0.0, 0.0]
    for args, kwargs, out in calls:
        squared = (block(*args, **kwargs) - out).pow(2)
        for i, group in enumerate((special, ~special)):
            sums[i] += float(squared[:, group].sum() / out[:, group].pow(2).sum())
    return sums[0] / len(calls), sums[1] / len(calls)


def _first_block_error(method: str, batches, recon_iters: int = 0) -> float:
    """The criterion: the mean of the two parts."""
    return sum(_first_block_errors(method, batches, recon_iters)) / 2


def test_auto_measures_every_candidate_truthfully_and_keeps_the_lowest(batches):
    _, result = _quantized(QuantConfig(bits="w4a4", method="auto"), batches)
    selection = result.method_selection
    assert selection["candidates"] == list(METHODS) and selection["granularity"] == "block"
    assert list(selection["blocks"]) == [f"aggregator.{kind}_blocks.{i}" for i in range(4)
                                         for kind in ("frame", "global")]
    for record in selection["blocks"].values():
        errors = record["errors"]
        assert set(errors) == set(METHODS) and all(e > 0 and math.isfinite(e) for e in errors.values())
        assert record["method"] == min(errors, key=errors.get)
        assert record["error"] == errors[record["method"]]
        assert set(record["layers"].values()) == {record["method"]}
    assert sum(selection["layer_counts"].values()) == 32
    # The recorded numbers are the real block errors: recomputed from a model quantized with each method.
    first = selection["blocks"][FIRST_BLOCK]
    for method in METHODS:
        special, patch = _first_block_errors(method, batches)
        assert first["token_errors"][method] == pytest.approx({"special": special, "patch": patch}, rel=1e-4)
        assert first["errors"][method] == pytest.approx((special + patch) / 2, rel=1e-4)
    for record in selection["blocks"].values():  # every block records the parts its error is the mean of
        assert record["errors"] == pytest.approx({m: sum(parts.values()) / 2
                                                  for m, parts in record["token_errors"].items()}, rel=1e-12)
    # The planted outliers are what the transforms are for: round-to-nearest alone is never the best here.
    assert all(record["method"] != "rtn" for record in selection["blocks"].values())


def test_layer_granularity_refines_the_block_choice(batches):
    _, by_block = _quantized(QuantConfig(bits="w4a4", method="auto"), batches)
    model, by_layer = _quantized(QuantConfig(bits="w4a4", method="auto", auto_granularity="layer"), batches)
    block_record = by_block.method_selection["blocks"][FIRST_BLOCK]
    layer_record = by_layer.method_selection["blocks"][FIRST_BLOCK]
    assert layer_record["errors"] == block_record["errors"]  # same inputs: the first block has no upstream
    assert layer_record["error"] <= block_record["error"]
    assert layer_record["layer_trials"] == 4 * (len(METHODS) - 1)
    # Mixed blocks are real: every linear is quantized with the transform recorded for it.
    for block, record in by_layer.method_selection["blocks"].items():
        for local, method in record["layers"].items():
            layer = model.get_submodule(f"{block}.{local}")
            assert isinstance(layer, QuantLinear)
            assert layer.rotate == METHODS[method].rotates
            assert (layer.input_post is not None) == (METHODS[method].smoothing == "post" and METHODS[method].rotates)


def test_auto_reconstruction_learns_the_choice_and_resumes_it(batches, tmp_path):
    config = QuantConfig(bits="w4a4", method="auto", recon_iters=2, auto_methods=("rotate", "smooth_rotate", "dsfq"))
    path = tmp_path / "recon.safetensors"
    model_a, result_a = _quantized(config, batches, recon_checkpoint=path)
    assert set(result_a.reconstruction) == set(result_a.method_selection["blocks"])
    assert all(r["loss_after"] <= r["loss_before"] * 1.5 for r in result_a.reconstruction.values())
    # Block reconstruction ran on the chosen transforms: the choices are what the quantized model holds.
    for block, record in result_a.method_selection["blocks"].items():
        for local, method in record["layers"].items():
            assert model_a.get_submodule(f"{block}.{local}").rotate == METHODS[method].rotates
    # A rerun with the same checkpoint takes every block, choice included, from it: the same model.
    model_b, result_b = _quantized(config, batches, recon_checkpoint=path)
    assert all(r["resumed"] == 1.0 for r in result_b.reconstruction.values())
    assert all(r.get("resumed") for r in result_b.method_selection["blocks"].values())
    assert {b: r["layers"] for b, r in result_b.method_selection["blocks"].items()} == {
        b: r["layers"] for b, r in result_a.method_selection["blocks"].items()}
    assert _same_state(model_a, model_b)
    # Other candidates: other fingerprint, refused rather than mixed.
    with pytest.raises(QVGGTError, match="other settings"):
        _quantized(dataclasses.replace(config, auto_methods=("rotate", "dsfq")), batches, recon_checkpoint=path)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_auto_float_formats(fmt, batches):
    single, single_result = _quantized(QuantConfig(bits=fmt, method="dsfq"), batches)
    auto, result = _quantized(QuantConfig(bits=fmt, method="auto", auto_methods=("dsfq",)), batches)
    assert _same_state(single, auto) and result.input_amax == single_result.input_amax
    model, result = _quantized(QuantConfig(bits=fmt, method="auto"), batches)
    assert all(isinstance(model.get_submodule(t.name), FloatQuantLinear) for t in find_targets(model))
    assert sum(result.method_selection["layer_counts"].values()) == 32


def test_auto_skips_rotations_a_width_cannot_take(batches):
    """MLP hidden width 92: no Hadamard matrix of that order, so fc2 cannot rotate. Per block only the methods that
    apply to every linear compete; per layer the others may still rotate. Both are recorded."""
    base = resolve_config("tiny")
    config = dataclasses.replace(base, name="tiny-92", aggregator=dataclasses.replace(base.aggregator,
                                                                                      mlp_ratio=92 / 64))
    assert build_vggt(config).get_submodule(f"{FIRST_BLOCK}.mlp.fc2").in_features == 92
    with pytest.raises(QVGGTError, match="cannot rotate"):
        calibrate(build_vggt(config), QuantConfig(bits="w8a8", method="dsfq"), batches)
    result = calibrate(build_vggt(config), QuantConfig(bits="w8a8", method="auto"), batches)
    record = result.method_selection["blocks"][FIRST_BLOCK]
    assert set(record["errors"]) == {"rtn", "smooth"}
    assert record["unavailable"]["mlp.fc2:dsfq"] == "no Hadamard matrix of order 92"
    assert not any(key.startswith("attn.") for key in record["unavailable"])
    model = build_vggt(config)
    result = calibrate(model, QuantConfig(bits="w8a8", method="auto", auto_granularity="layer"), batches)
    for record in result.method_selection["blocks"].values():
        assert record["layers"]["mlp.fc2"] in ("rtn", "smooth")
        assert record["layer_trials"] == 3 * (len(METHODS) - 1) + 1
    with pytest.raises(QVGGTError, match="no candidate"):
        calibrate(build_vggt(config), QuantConfig(bits="w8a8", method="auto", auto_methods=("rotate", "dsfq")),
                  batches)


def test_auto_settings_are_validated():
    with pytest.raises(QVGGTError, match="auto_methods"):
        QuantConfig(method="auto", auto_methods=("dsfq", "gptq"))
    with pytest.raises(QVGGTError, match="auto_methods"):
        QuantConfig(method="auto", auto_methods=())
    with pytest.raises(QVGGTError, match="auto_granularity"):
        QuantConfig(method="auto", auto_granularity="head")
    with pytest.raises(QVGGTError, match="auto"):
        QuantConfig(method="best")
    assert QuantConfig(method="auto", auto_methods=["rtn", "dsfq"]).auto_methods == ("rtn", "dsfq")


@pytest.mark.parametrize("method", ["rotate", "smooth_rotate"])
def test_auto_with_one_candidate_learns_what_that_method_learns(method, batches):
    """With reconstruction too: the walk learns the chosen layers against the same targets, bit for bit."""
    single, single_result = _quantized(QuantConfig(bits="w4a4", method=method, recon_iters=3), batches)
    auto, result = _quantized(QuantConfig(bits="w4a4", method="auto", recon_iters=3, auto_methods=(method,)), batches)
    assert _same_state(single, auto)
    assert {b: r["loss_after"] for b, r in result.reconstruction.items()} == {
        b: r["loss_after"] for b, r in single_result.reconstruction.items()}


def test_reconstructed_criterion_learns_every_candidate_and_keeps_the_lowest(batches):
    candidates = ("rotate", "smooth_rotate", "dsfq")
    config = QuantConfig(bits="w4a4", method="auto", recon_iters=2, auto_methods=candidates,
                         auto_criterion="reconstructed")
    _, result = _quantized(config, batches)
    for block, record in result.method_selection["blocks"].items():
        learned = record["learned_errors"]
        assert set(learned) == set(candidates)
        assert record["method"] == min(learned, key=learned.get)
        assert set(record["layers"].values()) == {record["method"]}
        assert result.reconstruction[block]["loss_after"] > 0
    # The first block's trials are exactly the single methods' first-block learning (same inputs, same targets):
    # each recorded error is that block of the single method's reconstructed model, measured independently.
    first = result.method_selection["blocks"][FIRST_BLOCK]["learned_errors"]
    for method in candidates:
        assert first[method] == pytest.approx(_first_block_error(method, batches, recon_iters=2), rel=1e-4)
    with pytest.raises(QVGGTError, match="needs recon_iters > 0"):
        QuantConfig(method="auto", auto_criterion="reconstructed")
    with pytest.raises(QVGGTError, match="auto_criterion"):
        QuantConfig(method="auto", auto_criterion="fastest")


def test_auto_over_every_scope(batches):
    """--quantize-scope all: the camera trunk's blocks (called once per refinement iteration) are chosen too, with
    the plain relative error (the token layout is the aggregator's)."""
    from qvggt_export.quant.roles import scope_roles

    model = build_vggt("tiny-dino")
    result = calibrate(model, QuantConfig(bits="w8a8", method="auto", roles=scope_roles("all", model)), batches)
    blocks = result.method_selection["blocks"]
    assert any(b.startswith("camera_head.trunk.") for b in blocks)
    assert any(b.startswith("aggregator.patch_embed.") for b in blocks)
    assert sum(result.method_selection["layer_counts"].values()) == len(result.layers)
    # The special / patch split is the aggregator's frame and global blocks' only.
    for block, record in blocks.items():
        split = block.startswith(("aggregator.frame_blocks.", "aggregator.global_blocks."))
        assert ("token_errors" in record) == split, block
