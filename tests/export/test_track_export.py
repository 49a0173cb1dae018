"""Track head as its own ONNX graph: structure, dynamic frames and points, float and W4A4 parity, bad input.

Observed on the tiny preset (ONNX Runtime CPU vs PyTorch, one export at S=3, N=5, checked at other S and N):
float track 3.3e-3 px (tolerance 2e-2), vis 2.2e-4, conf 1.5e-4 (tolerance 2e-3), about the float32-vs-float64
noise of PyTorch itself (2.8e-3 px); W4A4 track rel_l2 9.8e-7 against a tolerance of 4.1e-4 (2 x the
quantization noise; 7.4e-5 against 3.2e-4 with the PyPI torch 2.13.0 build of 2026-12). With the official
fixtures' weights (not used here, to run without ../shared): track
2.3e-5 px, vis 1.0e-5, conf 4.2e-6.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qvggt_export.errors import QVGGTError
from qvggt_export.export.track_export import _check_grid_samples, export_track_onnx
from qvggt_export.model import build_vggt, resolve_config
from qvggt_export.model.heads.track import multihead_attention
from qvggt_export.parity.track import ABS_TOL, check_track_parity
from qvggt_export.quant import QuantConfig, quantize_model

SIZE = 70


def _case(frames: int, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, frames, 3, SIZE, SIZE, generator=g)
    return images, torch.rand(1, points, 2, generator=g) * (SIZE - 1)


def _tracking_model() -> torch.nn.Module:
    """``tiny`` with the tracker's update head at the fixtures' scale (0.02 N(0,1)).

    ``build_vggt`` leaves ``flow_head`` at nn.Linear's default init (std ~0.1; the official init is 1e-3):
    each refinement step then moves tracks so far that the tracker amplifies float32 rounding chaotically
    (PyTorch fp32 vs fp64 differ by 0.2-0.3 px), and no export could be held to the fixtures' 2e-2 px.
    """
    model = build_vggt("tiny")
    weight = model.track_head.tracker.updateformer.flow_head.weight
    with torch.no_grad():
        weight.copy_(0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    return model


@pytest.fixture(scope="module")
def float_export(tmp_path_factory):
    model = _tracking_model()
    path = tmp_path_factory.mktemp("track") / "track.onnx"
    return model, export_track_onnx(model, path, *_case(3, 5, 0))


def test_float_track_graph_structure(float_export):
    _, result = float_export
    assert result.input_shapes == {"images": [1, "frames", 3, SIZE, SIZE], "query_points": [1, "points", 2]}
    assert result.outputs == ["track", "vis", "conf"]
    assert result.num_qlinear == 0 and result.iters == 4
    proto = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert dims == {"track": [1, "frames", "points", 2], "vis": [1, "frames", "points"],
                    "conf": [1, "frames", "points"]}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # standard ops only
    samples = [n for n in proto.graph.node if n.op_type == "GridSample"]
    pads = [helper.get_attribute_value(a) for n in samples for a in n.attribute if a.name == "padding_mode"]
    # Correlation windows: 4 pyramid levels x 4 iterations (zeros padding); point features and the position
    # embedding (border): the query features once, the embedding at least once per iteration.
    assert pads.count(b"zeros") == 16 and pads.count(b"border") >= 1 + 4 and len(pads) == len(samples)
    assert all(helper.get_attribute_value(a) == 1 for n in samples for a in n.attribute if a.name == "align_corners")
    # No nn.MultiheadAttention fast-path op leaked in: attention is MatMul + Softmax.
    assert result.op_counts.get("Softmax", 0) == 40


def test_float_track_parity_at_other_frame_and_point_counts(float_export):
    model, result = float_export
    # Judged by the fixed official tolerances alone (no float32-noise allowance): the stricter criterion.
    report = check_track_parity(model, result.onnx_path, [_case(2, 7, 1), _case(5, 3, 2), _case(1, 1, 3)],
                                float64_noise=False)
    assert report.passed, report.to_dict()
    assert all(out.max_abs <= ABS_TOL[out.name] and out.noise is None for out in report.outputs)
    assert report.cases[1] == {"images": [1, 5, 3, SIZE, SIZE], "query_points": [1, 3, 2]}


@pytest.mark.slow
def test_non_square_resolution_and_batch_two(tmp_path):
    """x/y order of the grid normalisation and of the position table: a swap would shift tracks by pixels."""
    height, width = 56, 84

    def case(frames: int, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(2, frames, 3, height, width, generator=g),
                torch.rand(2, points, 2, generator=g) * torch.tensor([width - 1, height - 1]))

    model = _tracking_model()
    result = export_track_onnx(model, tmp_path / "track.onnx", *case(3, 5, 0))
    assert result.input_shapes["images"] == [2, "frames", 3, height, width]
    report = check_track_parity(model, result.onnx_path, [case(2, 6, 1), case(4, 3, 2)], float64_noise=False)
    assert report.passed, report.to_dict()  # observed track 8.8e-5 px (batch 1)


def test_track_parity_fails_against_another_model(float_export):
    """The check can fail: the graph judged against a tracker whose update weights are 1.5x larger."""
    _, result = float_export
    other = _tracking_model()
    with torch.no_grad():
        other.track_head.tracker.updateformer.flow_head.weight.mul_(1.5)
    report = check_track_parity(other, result.onnx_path, [_case(2, 4, 5)], float64_noise=False)
    assert not report.passed
    assert not next(o for o in report.outputs if o.name == "track").passed


def test_track_export_is_deterministic(tmp_path):
    # A one-layer, one-iteration VGGT with only the track head keeps the two exports fast.
    tiny = resolve_config("tiny")
    extractor = dataclasses.replace(tiny.track_head.feature_extractor, intermediate_layer_idx=(0, 0, 0, 0))
    tracker = dataclasses.replace(tiny.track_head.tracker, depth=1)
    config = dataclasses.replace(
        tiny, aggregator=dataclasses.replace(tiny.aggregator, depth=1), camera_head=None, depth_head=None,
        point_head=None, track_head=dataclasses.replace(tiny.track_head, feature_extractor=extractor,
                                                        tracker=tracker, iters=1))
    model = build_vggt(config)
    first = export_track_onnx(model, tmp_path / "first.onnx", *_case(2, 3, 0))
    second = export_track_onnx(model, tmp_path / "second.onnx", *_case(2, 3, 0))
    assert first.num_nodes > 100
    assert first.onnx_path.read_bytes() == second.onnx_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.onnx", "second.onnx"]  # no temporaries left
    # The default float criterion, with the float32 noise measured by a float64 copy of the model.
    images, points = _case(3, 4, 1)
    report = check_track_parity(model, first.onnx_path, [(images, points)])
    assert report.passed, report.to_dict()
    assert all(o.noise is not None and o.noise_metric == "float32_max_abs" for o in report.outputs)
    # That noise, recomputed here: max |float64 model - float32 model| per output; the tolerance follows from it.
    with torch.no_grad():
        want = model(images, query_points=points)
        wide = copy.deepcopy(model).double()(images.double(), query_points=points.double())
    for out in report.outputs:
        noise = float((wide[out.name] - want[out.name].double()).abs().max())
        assert out.noise == pytest.approx(noise, rel=1e-6, abs=1e-12)
        assert out.tolerance == max(ABS_TOL[out.name], 2 * out.noise)


def test_quantized_w4a4_track_graph(tmp_path):
    float_model = _tracking_model()
    model = _tracking_model()
    quantize_model(model, QuantConfig(bits="w4a4"))
    result = export_track_onnx(model, tmp_path / "track.onnx", *_case(3, 5, 0))
    assert result.num_qlinear == 32  # every aggregator linear of tiny, lowered to Q/DQ
    proto = onnx.load(str(result.onnx_path))
    assert not any(n.domain == "qvggt.export" for n in proto.graph.node)
    weights = [i for i in proto.graph.initializer if i.name.endswith("/weight_q")]
    assert len(weights) == 32 and all(i.data_type == TensorProto.INT4 for i in weights)
    report = check_track_parity(model, result.onnx_path, [_case(2, 6, 1), _case(4, 2, 2)], float_model=float_model)
    assert report.passed, report.to_dict()
    track = next(o for o in report.outputs if o.name == "track")
    # Observed rel_l2 9.8e-7 vs a tolerance of 4.1e-4 with an earlier torch 2.13.0 build, and 7.4e-5 vs 3.2e-4 with
    # the PyPI build of 2026-12 (a few INT4 rounding ties flip the other way; the quantization noise moved too):
    # well inside either way, not at the edge.
    assert track.rel_l2 <= 0.5 * track.tolerance


@pytest.mark.parametrize("images, points, match", [
    (torch.rand(1, 3, 3, SIZE, SIZE), torch.rand(1, 5, 3), r"\[B, N, 2\]"),
    (torch.rand(1, 1, 3, SIZE, SIZE), torch.rand(1, 5, 2), "frames"),
    (torch.rand(1, 3, 3, SIZE, SIZE), torch.rand(1, 1, 2), "points"),
    (torch.rand(1, 3, 3, SIZE, SIZE), torch.rand(2, 5, 2), "batch"),
    (torch.rand(1, 3, 3, 64, SIZE), torch.rand(1, 5, 2), "patch size"),
    (torch.rand(1, 3, 3, SIZE, SIZE).double(), torch.rand(1, 5, 2), "float32"),
    (torch.rand(1, 3, 3, SIZE, SIZE), torch.full((1, 5, 2), float("nan")), "NaN"),
])
def test_bad_examples_are_refused_and_nothing_is_written(tmp_path, images, points, match):
    with pytest.raises(QVGGTError, match=match):
        export_track_onnx(build_vggt("tiny"), tmp_path / "track.onnx", images, points)
    assert list(tmp_path.iterdir()) == []


def test_model_without_track_head_is_refused(tmp_path):
    with pytest.raises(QVGGTError, match="no track head"):
        export_track_onnx(build_vggt("tiny-dino"), tmp_path / "track.onnx", torch.rand(1, 2, 3, 56, 70),
                          torch.rand(1, 3, 2))
    assert list(tmp_path.iterdir()) == []


def test_quantized_model_needs_its_float_model(float_export):
    _, result = float_export
    model = build_vggt("tiny")
    quantize_model(model, QuantConfig(bits="w8a8"))
    with pytest.raises(QVGGTError, match="float_model"):
        check_track_parity(model, result.onnx_path, [_case(2, 3, 0)])


def test_grid_sample_semantics_are_checked():
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], name="gs", align_corners=0, mode="linear")
    graph = helper.make_graph([node], "g", [], [])
    with pytest.raises(QVGGTError, match="align_corners=1"):
        _check_grid_samples(helper.make_model(graph))
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], name="gs", align_corners=1, mode="nearest")
    with pytest.raises(QVGGTError, match="bilinear"):
        _check_grid_samples(helper.make_model(helper.make_graph([node], "g", [], [])))


@pytest.mark.parametrize("context_len", [7, 11])
def test_export_form_of_attention_equals_the_module(monkeypatch, context_len):
    """The standard-op attention written during export computes nn.MultiheadAttention's output."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(32, 8, batch_first=True).eval()
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        query = torch.randn(3, 7, 32)
        context = query if context_len == 7 else torch.randn(3, context_len, 32)
        want = attn(query, context, context, need_weights=False)[0]
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        got = multihead_attention(attn, query, context)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)
