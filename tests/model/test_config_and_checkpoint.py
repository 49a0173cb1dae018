"""Presets, config parsing, checkpoint loading and its error paths."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt, config_from_dict, load_checkpoint, preset_names
from qvggt_export.model.checkpoint import find_hf_checkpoint, load_state_dict_file
from tests.conftest import fixture_config


def test_presets_build_and_run():
    assert {"tiny", "tiny-dino", "vggt-1b"} <= set(preset_names())
    for name in ("tiny", "tiny-dino"):
        model = build_vggt(name)
        size = model.config.aggregator.img_size
        with torch.no_grad():
            out = model(torch.rand(1, 2, 3, size, size), query_points=torch.rand(1, 3, 2) * (size - 1))
        assert out["pose_enc"].shape == (1, 2, 9)
        assert out["depth"].shape == (1, 2, size, size, 1)
        assert out["world_points"].shape == (1, 2, size, size, 3)
        assert torch.isfinite(out["depth"]).all()
        assert ("track" in out) == (model.track_head is not None)


def test_seeded_build_is_reproducible_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b = build_vggt("tiny", seed=3), build_vggt("tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = build_vggt("tiny", seed=4)
    assert not torch.equal(c.aggregator.frame_blocks[0].attn.qkv.weight, a.aggregator.frame_blocks[0].attn.qkv.weight)


def test_fixture_config_equals_preset():
    """The 'tiny' preset is exactly the official tiny reference model (weights load strictly)."""
    parsed = config_from_dict(fixture_config("tiny"))
    assert dataclasses.replace(parsed.aggregator, cached_layer_indices=None) == build_vggt("tiny").config.aggregator
    assert parsed.track_head == build_vggt("tiny").config.track_head
    assert config_from_dict(fixture_config("tiny_dino")).dino == build_vggt("tiny-dino").config.dino


def test_non_square_and_frame_counts():
    model = build_vggt("tiny-dino")
    with torch.no_grad():
        for frames in (1, 4):
            out = model(torch.rand(1, frames, 3, 56, 84))
            assert out["depth"].shape == (1, frames, 56, 84, 1)


@pytest.mark.parametrize("bad, match", [
    ("no-such-preset", "unknown model preset"),
    ({"aggregator": {"embed_dim": 60, "num_heads": 4}}, "RoPE needs head_dim divisible by 4"),
    ({"aggregator": {"bogus": 1}}, "unknown argument"),
    ({"aggregator": {}, "depth_head": {"dim_in": 10}}, "must be 2 \\* aggregator.embed_dim"),
    ({"aggregator": {"patch_embed": "resnet"}}, "patch_embed must be"),
])
def test_bad_configs_raise_clear_errors(bad, match):
    with pytest.raises(QVGGTError, match=match):
        build_vggt(bad, device="meta")


def test_checkpoint_roundtrip_pt_and_safetensors(tmp_path):
    src = build_vggt("tiny", seed=1)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "model.pt")
    for path in (tmp_path / "w.safetensors", tmp_path / "model.pt", tmp_path):
        dst = load_checkpoint(build_vggt("tiny", seed=2), path)
        assert torch.equal(dst.camera_head.embed_pose.weight, src.camera_head.embed_pose.weight)


def test_checkpoint_into_meta_model(tmp_path):
    src = build_vggt("tiny", seed=1)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = load_checkpoint(build_vggt("tiny", device="meta"), tmp_path / "w.safetensors")
    with torch.no_grad():
        got = model(torch.rand(1, 2, 3, 70, 70, generator=torch.Generator().manual_seed(0)))
        want = src(torch.rand(1, 2, 3, 70, 70, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(got["depth"], want["depth"])


def test_checkpoint_errors(tmp_path):
    model = build_vggt("tiny")
    with pytest.raises(QVGGTError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(QVGGTError, match=r"corrupt.pt is not a checkpoint \(safetensors or torch zip\)"):
        load_checkpoint(model, tmp_path / "corrupt.pt")
    torch.save(build_vggt("tiny").state_dict(), tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:4096])
    with pytest.raises(QVGGTError, match="cannot read PyTorch checkpoint .*truncated.pt: corrupt or truncated zip"):
        load_checkpoint(model, tmp_path / "truncated.pt")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(QVGGTError, match="is not a safetensors file"):
        load_checkpoint(model, tmp_path / "corrupt.safetensors")
    (tmp_path / "bad_header.safetensors").write_bytes((8).to_bytes(8, "little") + b"{broken}" + b"\x00" * 8)
    with pytest.raises(QVGGTError, match="cannot read safetensors"):
        load_checkpoint(model, tmp_path / "bad_header.safetensors")
    state = build_vggt("tiny").state_dict()
    state.pop("camera_head.embed_pose.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    before = model.camera_head.embed_pose.weight.clone()
    with pytest.raises(QVGGTError, match=r"missing keys 1: camera_head.embed_pose.weight.*unexpected keys 1: extra"):
        load_checkpoint(model, tmp_path / "wrong.safetensors")
    assert torch.equal(model.camera_head.embed_pose.weight, before), "a failed load must not touch the model"
    state = build_vggt("tiny").state_dict()
    state["camera_head.embed_pose.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(QVGGTError, match=r"shape mismatches 1: camera_head.embed_pose.weight \(3, 3\)"):
        load_checkpoint(model, tmp_path / "shape.safetensors")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(QVGGTError, match="holds pickled Python objects besides tensors.*refused for safety") as info:
        load_state_dict_file(tmp_path / "evil.pt")
    assert "weights_only" not in str(info.value)


def test_hf_cache_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert find_hf_checkpoint("facebook/VGGT-1B") is None
    with pytest.raises(QVGGTError, match="never downloads"):
        load_checkpoint(build_vggt("tiny"), "facebook/VGGT-1B")
    snapshot = tmp_path / "models--facebook--VGGT-1B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--facebook--VGGT-1B" / "refs").mkdir()
    (tmp_path / "models--facebook--VGGT-1B" / "refs" / "main").write_text("abc123")
    save_file(build_vggt("tiny", seed=5).state_dict(), str(snapshot / "model.safetensors"))
    assert find_hf_checkpoint("facebook/VGGT-1B") == snapshot / "model.safetensors"
    model = load_checkpoint(build_vggt("tiny"), "facebook/VGGT-1B")
    assert torch.equal(model.camera_head.embed_pose.weight, build_vggt("tiny", seed=5).camera_head.embed_pose.weight)


def test_json_config_file_equivalent(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(fixture_config("tiny")))
    assert config_from_dict(json.loads(path.read_text())).track_head.tracker.depth == 2
