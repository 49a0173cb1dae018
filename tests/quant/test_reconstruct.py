"""Block-wise output reconstruction (DSFQ step 4) on the tiny VGGT with planted outliers, W4A4."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qvggt_export.calib import SyntheticSequenceConfig, generate_sequences
from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from qvggt_export.quant import QuantConfig, QuantLinear, find_targets
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.dsfq import apply_transforms, collect_channel_stats
from qvggt_export.quant.modules import TransformedLinear
from qvggt_export.quant.reconstruct import bake_smoothing, group_by_block, reconstruct_blocks, smoothing_space

PRESET = "tiny-outliers"
FRAMES, SIZE = 3, 70
TOKENS_PER_FRAME = 1 + 4 + (SIZE // 14) ** 2  # camera + registers + patches
DIM = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add spin-waiting, which makes the run time swing wildly
    (10 s to minutes) when other processes share the 2-core CI machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib_batches() -> list[torch.Tensor]:
    return generate_sequences(SyntheticSequenceConfig(num_sequences=3, frames=FRAMES, height=SIZE, width=SIZE, seed=0))


@pytest.fixture(scope="module")
def held_out() -> list[torch.Tensor]:
    return generate_sequences(SyntheticSequenceConfig(num_sequences=3, frames=FRAMES, height=SIZE, width=SIZE,
                                                      seed=101))


def _prepared(config: QuantConfig, batches: list[torch.Tensor]) -> tuple[nn.Module, list]:
    """A fresh float model with ``config.method``'s transforms applied (what calibrate hands to reconstruction)."""
    model = build_vggt(PRESET)
    targets = find_targets(model, config.roles)
    stats = None
    if config.method != "rtn":
        stats = collect_channel_stats(model, targets, batches, config.seed,
                                      raw=config.method in ("smooth", "smooth_rotate"),
                                      rotated=config.method == "dsfq")
    apply_transforms(model, targets, config.method, stats, config.alpha, config.seed)
    return model, targets


@torch.no_grad()
def _tokens(model: nn.Module, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """All aggregator layers (what the heads read), one tensor per sequence."""
    return [torch.cat(model.aggregator(x[None])[0], dim=-1) for x in sequences]


def _relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return sum(float((g - r).norm() / r.norm()) for g, r in zip(got, ref, strict=True)) / len(ref)


# ---------------------------------------------------------------------------------------------------------------------
# (a) learning lowers each block's loss and the held-out error of the quantized model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "dsfq"])
def test_reconstruction_lowers_block_loss_and_held_out_error(method, calib_batches, held_out):
    reference = _tokens(build_vggt(PRESET), held_out)
    errors, reports = {}, {}
    for iters in (0, 20):
        model = build_vggt(PRESET)
        result = calibrate(model, QuantConfig(bits="w4a4", method=method, recon_iters=iters), calib_batches)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 32
        errors[iters] = _relative_error(_tokens(model, held_out), reference)
        reports[iters] = result.reconstruction
    assert reports[0] == {}
    report = reports[20]
    # One entry per block, in execution order: frame 0, global 0, frame 1, ...
    assert list(report) == [f"aggregator.{kind}_blocks.{i}" for i in range(4) for kind in ("frame", "global")]
    improved = [b for b, r in report.items() if r["loss_after"] < r["loss_before"]]
    assert len(improved) >= 7, {b: (r["loss_before"], r["loss_after"]) for b, r in report.items()}
    # Observed (relative error of all aggregator layers): rtn 0.043 -> 0.037, dsfq 0.030 -> 0.025.
    assert errors[20] < errors[0], errors
    assert all(0.25 < r["attn.qkv.smooth_min"] <= r["attn.qkv.smooth_max"] < 4 for r in report.values())


# ---------------------------------------------------------------------------------------------------------------------
# (b) the learned smoothing correction is an exact float equivalence


@pytest.mark.parametrize("method", ["rtn", "dsfq"])
def test_baking_smoothing_keeps_float_outputs(method, calib_batches, held_out):
    config = QuantConfig(bits="w4a4", method=method)
    model, targets = _prepared(config, calib_batches)
    before = _tokens(model, held_out)
    generator = torch.Generator().manual_seed(3)
    for target in targets:
        module = model.get_submodule(target.name)
        smooth = torch.exp(torch.empty(module.in_features).uniform_(-0.7, 0.7, generator=generator))
        weight_before = module.weight.detach().clone()
        baked = bake_smoothing(module, smooth)
        assert isinstance(baked, TransformedLinear)
        assert (baked is module) == (method != "rtn")  # TransformedLinear in place; nn.Linear replaced
        assert torch.allclose(baked.weight, weight_before * smooth, rtol=1e-6)
        parent, _, child = target.name.rpartition(".")
        setattr(model.get_submodule(parent), child, baked)
    after = _tokens(model, held_out)
    error = _relative_error(after, before)
    assert error < 1e-5, error  # observed ~5e-8 (float32 rounding of the folded weights)


def test_reconstruction_leaves_a_float_equivalent_model(calib_batches, held_out):
    config = QuantConfig(bits="w4a4", method="dsfq", recon_iters=5)
    model, targets = _prepared(config, calib_batches)
    before = _tokens(model, held_out)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    steps, report = reconstruct_blocks(model, targets, config, calib_batches)
    assert set(steps) == {t.name for t in targets}
    assert all(steps[t.name].shape == (model.get_submodule(t.name).out_features,) for t in targets)
    assert all(isinstance(model.get_submodule(t.name), TransformedLinear) for t in targets)  # no wrappers left
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert any(r["attn.qkv.smooth_max"] != 1.0 for r in report.values())  # s really moved...
    error = _relative_error(_tokens(model, held_out), before)
    assert error < 1e-5, error  # ...and was baked exactly (observed ~5e-8)


# ---------------------------------------------------------------------------------------------------------------------
# (c) blocks see the model's own token layout, and inputs come from the quantized chain


def test_block_inputs_have_model_layout_and_come_from_the_quantized_chain(calib_batches):
    model = build_vggt(PRESET)
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in model.aggregator.named_modules():
        if name.startswith(("frame_blocks.", "global_blocks.")) and name.count(".") == 1:
            module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: seen.setdefault(name, []).append(args[0].detach().clone()),
                with_kwargs=True)
    calibrate(model, QuantConfig(bits="w4a4", method="dsfq", recon_iters=3), calib_batches)
    assert len(seen) == 8
    for name, inputs in seen.items():
        shapes = {tuple(x.shape) for x in inputs}
        if name.startswith("global"):
            assert shapes == {(1, FRAMES * TOKENS_PER_FRAME, DIM)}, (name, shapes)
        else:
            assert shapes == {(FRAMES, TOKENS_PER_FRAME, DIM)}, (name, shapes)

    # The last block's input in the final quantized model (every upstream block quantized with its learned
    # parameters) is exactly what that block was reconstructed on.
    last = "global_blocks.3"
    during = list(seen[last])  # a copy: the recording hook stays on for the pass below
    final = []
    handle = model.aggregator.global_blocks[3].register_forward_pre_hook(
        lambda m, args: final.append(args[0].detach().clone()))
    with torch.no_grad():
        for images in calib_batches:
            model.aggregator(images[None])
    handle.remove()
    for x in final:
        distances = [float((x - y).abs().max()) for y in during]
        assert min(distances) < 1e-5 * float(x.abs().max()), min(distances)
        # and the float chain's input (also seen during reconstruction) is clearly different from it
        assert max(distances) > 1e-3 * float(x.abs().max())


# ---------------------------------------------------------------------------------------------------------------------
# (d) determinism, (e) resume


def _run(calib_batches, seed=0, checkpoint=None, progress=lambda x: x, iters=6):
    config = QuantConfig(bits="w4a4", method="dsfq", recon_iters=iters, seed=seed)
    model, targets = _prepared(config, calib_batches)
    steps, report = reconstruct_blocks(model, targets, config, calib_batches, progress, checkpoint=checkpoint)
    return model, steps, report


def test_same_seed_gives_identical_steps(calib_batches):
    _, steps_a, report_a = _run(calib_batches)
    _, steps_b, report_b = _run(calib_batches)
    assert steps_a.keys() == steps_b.keys() and len(steps_a) == 32
    assert all(torch.equal(steps_a[k], steps_b[k]) for k in steps_a)
    assert [r["loss_after"] for r in report_a.values()] == [r["loss_after"] for r in report_b.values()]
    # the steps were learned (not the round-to-nearest initial values)
    assert any(r["attn.qkv.step_ratio_max"] > 1.01 or r["attn.qkv.step_ratio_min"] < 0.99 for r in report_a.values())


@pytest.mark.parametrize("method", ["rtn", "dsfq", "smooth_rotate"])
def test_replayed_capture_passes_match_full_passes_bit_for_bit(method, calib_batches, held_out):
    """Capture passes that start from the previous block's recorded outputs (O(blocks)) learn exactly what passes
    from the images (O(blocks^2)) learn, and skip the earlier blocks and the patch embedding."""
    config = QuantConfig(bits="w4a4", method=method, seed=0, recon_iters=3)
    runs = {}
    for replay in (False, True):
        model, targets = _prepared(config, calib_batches)
        embed_calls = []
        model.aggregator.patch_embed.register_forward_pre_hook(lambda m, args, calls=embed_calls: calls.append(1))
        steps, report = reconstruct_blocks(model, targets, config, calib_batches, replay=replay)
        runs[replay] = (model, steps, report, len(embed_calls))
    (model_full, steps_full, report_full, embeds_full), (model_r, steps_r, report_r, embeds_r) = runs[False], runs[True]
    assert [r["replayed"] for r in report_full.values()] == [0.0] * 8
    assert [r["replayed"] for r in report_r.values()] == [0.0] + [1.0] * 7  # the first block has nothing to replay
    assert steps_full.keys() == steps_r.keys() and all(torch.equal(steps_full[k], steps_r[k]) for k in steps_full)
    assert [r["loss_after"] for r in report_full.values()] == [r["loss_after"] for r in report_r.values()]
    for a, b in zip(_tokens(model_full, held_out), _tokens(model_r, held_out), strict=True):
        assert torch.equal(a, b)
    # one call-order pass on the first batch, then the embedding runs only in the first block's capture pass
    assert embeds_r == 1 + len(calib_batches)
    assert embeds_full == 1 + (8 + 7) * len(calib_batches)  # every float and quantized-chain pass from the images


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: captures are offloaded only from one")
def test_offloaded_captures_on_cuda_learn_bit_for_bit_what_gpu_resident_ones_learn(calib_batches, held_out):
    config = QuantConfig(bits="w4a4", method="dsfq", seed=0, recon_iters=3)
    runs = {}
    for offload in (False, True):
        model, targets = _prepared(config, calib_batches)
        model.cuda()
        steps, report = reconstruct_blocks(model, targets, config, [b.cuda() for b in calib_batches],
                                           offload=offload)
        runs[offload] = (model.cpu(), steps, report)
    (model_a, steps_a, report_a), (model_b, steps_b, report_b) = runs[False], runs[True]
    assert all(torch.equal(steps_a[k], steps_b[k]) for k in steps_a)
    assert [r["loss_after"] for r in report_a.values()] == [r["loss_after"] for r in report_b.values()]
    for a, b in zip(_tokens(model_a, held_out), _tokens(model_b, held_out), strict=True):
        assert torch.equal(a, b)


class _Interrupted(Exception):  # noqa: N818 (a simulated Ctrl-C, not an error)
    pass


def test_resume_from_checkpoint_skips_finished_blocks(calib_batches, held_out, tmp_path):
    model_a, steps_a, report_a = _run(calib_batches, checkpoint=tmp_path / "a.safetensors")

    def interrupt_after_three(blocks):
        for index, block in enumerate(blocks):
            if index == 3:
                raise _Interrupted
            yield block

    path = tmp_path / "b" / "recon.safetensors"
    with pytest.raises(_Interrupted):
        _run(calib_batches, checkpoint=path, progress=interrupt_after_three)
    with safe_open(str(path), framework="pt") as handle:
        assert len(list(handle.keys())) == 3 * 4 * 2  # 3 blocks x 4 linears x (s, D)
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temporary file

    model_c, steps_c, report_c = _run(calib_batches, checkpoint=path)
    assert [r["resumed"] for r in report_c.values()] == [1.0] * 3 + [0.0] * 5
    # the block after the resumed ones has no recorded predecessor outputs: its passes start from the images
    assert [r.get("replayed") for r in report_c.values()] == [None] * 3 + [0.0] + [1.0] * 4
    assert all(torch.equal(steps_a[k], steps_c[k]) for k in steps_a)
    assert [r["loss_after"] for r in report_a.values()] == [r["loss_after"] for r in report_c.values()]
    for a, c in zip(_tokens(model_a, held_out), _tokens(model_c, held_out), strict=True):
        assert torch.equal(a, c)

    # A checkpoint made with other settings is refused, not silently mixed in.
    with pytest.raises(QVGGTError, match="other settings"):
        _run(calib_batches, seed=1, checkpoint=path)


# ---------------------------------------------------------------------------------------------------------------------
# Errors and grouping


def test_errors_name_the_problem(calib_batches):
    config = QuantConfig(bits="w4a4", method="rtn", recon_iters=2)
    model, targets = _prepared(config, calib_batches)
    with pytest.raises(QVGGTError, match="calibration set is empty"):
        reconstruct_blocks(model, targets, config, [])
    poisoned = [calib_batches[0].clone()]
    poisoned[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(QVGGTError, match=r"aggregator\.frame_blocks\.0"):
        reconstruct_blocks(model, targets, config, poisoned)
    assert all(isinstance(model.get_submodule(t.name), nn.Linear) for t in targets)  # restored after the error


def test_blocks_outside_the_aggregator_run_in_execution_order():
    model = build_vggt("tiny-dino")
    roles = ("patch_embed.qkv", "patch_embed.fc2", "camera_trunk.fc1", "global.proj")
    targets = find_targets(model, roles)
    groups = group_by_block(targets)
    assert [t.name for t in groups["aggregator.patch_embed.blocks.1"]] == [
        "aggregator.patch_embed.blocks.1.attn.qkv", "aggregator.patch_embed.blocks.1.mlp.fc2"]
    calls = []
    model.camera_head.trunk[0].register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    sequences = generate_sequences(SyntheticSequenceConfig(num_sequences=2, frames=2, height=SIZE, width=SIZE))
    config = QuantConfig(bits="w4a4", method="rtn", roles=roles, recon_iters=2)
    steps, report = reconstruct_blocks(model, targets, config, sequences)
    assert list(report) == ["aggregator.patch_embed.blocks.0", "aggregator.patch_embed.blocks.1",
                            "aggregator.global_blocks.0", "aggregator.global_blocks.1", "camera_head.trunk.0"]
    assert set(steps) == {t.name for t in targets}
    assert all(r["replayed"] == 0.0 for r in report.values())  # replay is for aggregator blocks only
    # The camera trunk runs once per refinement iteration (4): every call of every batch is learned on.
    assert set(calls) == {(1, 2, 128)}
    assert len(calls) >= 2 * 4 * (1 + 2)  # capture passes (float chain + quantized chain) + 2 learning steps


def test_calibrate_under_inference_mode_matches_no_grad(calib_batches):
    """Callers often wrap calibration in torch.inference_mode(); the layers it creates must still be learnable."""
    steps = {}
    for context in (torch.no_grad, torch.inference_mode):
        model = build_vggt(PRESET)
        with context():
            calibrate(model, QuantConfig(bits="w4a4", method="dsfq", recon_iters=2), calib_batches[:2])
        steps[context.__name__] = [m.weight_step.clone() for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(steps["no_grad"]) == 32
    assert all(torch.equal(a, b) for a, b in zip(steps["no_grad"], steps["inference_mode"], strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# Each ablation variant learns its own smoothing factor, where it applies it


def test_smoothing_space_per_method():
    assert {m: smoothing_space(m) for m in ("rtn", "smooth", "rotate", "smooth_rotate", "dsfq")} == {
        "rtn": None, "smooth": "post", "rotate": None, "smooth_rotate": "pre", "dsfq": "post"}
    with pytest.raises(QVGGTError, match="unknown method 'gptq'"):
        smoothing_space("gptq")


def test_pre_rotation_baking_keeps_float_outputs(calib_batches, held_out):
    """Scale-then-Rotate's correction multiplies the raw channels before the rotation; exact equivalence."""
    config = QuantConfig(bits="w4a4", method="smooth_rotate")
    model, targets = _prepared(config, calib_batches)
    before = _tokens(model, held_out)
    generator = torch.Generator().manual_seed(5)
    for target in targets:
        module = model.get_submodule(target.name)
        pre, post = module.input_pre.clone(), module.input_post
        smooth = torch.exp(torch.empty(module.in_features).uniform_(-0.7, 0.7, generator=generator))
        assert bake_smoothing(module, smooth, "pre") is module
        assert torch.allclose(module.input_pre, pre / smooth) and module.input_post is post is None
    error = _relative_error(_tokens(model, held_out), before)
    assert error < 1e-5, error  # observed ~9e-8
    with pytest.raises(QVGGTError, match="needs a rotating"):
        bake_smoothing(nn.Linear(DIM, DIM), torch.ones(DIM), "pre")


@pytest.mark.parametrize("method", ["rtn", "rotate", "smooth_rotate", "dsfq"])
def test_reconstruction_learns_only_the_methods_own_factor(method, calib_batches):
    config = QuantConfig(bits="w4a4", method=method, roles=("frame.qkv",), recon_iters=3)
    model, targets = _prepared(config, calib_batches[:1])
    original = {t.name: model.get_submodule(t.name) for t in targets}
    pre = {n: None if getattr(m, "input_pre", None) is None else m.input_pre.clone() for n, m in original.items()}
    post = {n: None if getattr(m, "input_post", None) is None else m.input_post.clone() for n, m in original.items()}
    _, report = reconstruct_blocks(model, targets, config, calib_batches[:1])
    for target in targets:
        module = model.get_submodule(target.name)
        block = report[target.name.rsplit(".", 2)[0]]
        moved = block["attn.qkv.smooth_min"] != 1.0 or block["attn.qkv.smooth_max"] != 1.0
        if method == "rtn":  # no factor: s stays exactly 1 and the layer stays a plain float linear
            assert not moved and type(module) is nn.Linear
        elif method == "rotate":
            assert not moved and torch.equal(module.input_pre, pre[target.name]) and module.input_post is None
        elif method == "smooth_rotate":  # raw-space factor, before the rotation
            assert moved and not torch.equal(module.input_pre, pre[target.name]) and module.input_post is None
        else:  # dsfq: rotated-space factor, after the rotation; the signs stay
            assert moved and torch.equal(module.input_pre, pre[target.name])
            assert not torch.equal(module.input_post, post[target.name])
