"""Typed VGGT configurations, presets, and the parser for the official constructor-argument layout.

Field names follow the official constructors (``Aggregator``, ``DinoVisionTransformer``,
``CameraHead``, ``DPTHead``, ``TrackHead``, ``BaseTrackerPredictor``) so that a fixture's ``model``
section, or a user's notes of the official arguments, map one-to-one. Every config validates itself on
construction and raises :class:`~qvggt_export.errors.QVGGTError` with the offending field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qvggt_export.errors import QVGGTError

# DINOv2 backbones the official aggregator can build by name (patch_embed=...). The register variants
# are the ones VGGT uses; "giant" needs a SwiGLU MLP that VGGT never ships, so it is not offered.
DINO_BACKBONES: dict[str, dict[str, int]] = {
    "dinov2_vits14_reg": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "dinov2_vitb14_reg": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "dinov2_vitl14_reg": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}
DPT_ACTIVATIONS = ("exp", "inv_log", "xy_inv_log", "norm_exp", "norm", "relu", "sigmoid", "linear")
CONF_ACTIVATIONS = ("expp1", "expp0", "sigmoid")
POSE_ACTIVATIONS = ("linear", "inv_log", "exp", "relu")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise QVGGTError(message)


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        _require(value > 0, f"{owner}.{name} must be > 0, got {value!r}")


# The planting recipe of qvggt_export.model.outliers (kept here, torch-free, so that presets need no torch).
@dataclass(frozen=True)
class PlantedOutliers:
    seed: int = 0
    special_token_channels: int = 3
    special_token_scale: float = 40.0
    norm_channels: int = 2
    norm_scale: float = 10.0
    hidden_units: int = 4
    hidden_scale: float = 6.0
    value_channels: int = 2
    value_scale: float = 6.0
    special_norm_scale: float = 4.0
    shared_special_values: bool = False
    gaussian_weights: bool = False
    massive_hidden_units: int = 0
    massive_hidden_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.massive_hidden_units and not (self.shared_special_values and self.special_token_channels):
            raise ValueError("massive_hidden_units needs shared_special_values and special_token_channels > 0: "
                             "the units fire on the one direction every special token shares")


@dataclass(frozen=True)
class DinoConfig:
    """DINOv2 ViT patch embedder (``DinoVisionTransformer``) as VGGT builds it."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0
    block_chunks: int = 0
    init_values: float = 1.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True

    def __post_init__(self) -> None:
        _positive("dino", img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                  depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)
        _require(self.embed_dim % self.num_heads == 0,
                 f"dino.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        _require(self.block_chunks == 0,
                 f"dino.block_chunks={self.block_chunks} is not supported: VGGT uses 0 (flat 'blocks.N' names)")
        _require(self.num_register_tokens >= 0, "dino.num_register_tokens must be >= 0")


@dataclass(frozen=True)
class AggregatorConfig:
    """Alternating-attention aggregator (official ``Aggregator`` arguments)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_embed: str = "dinov2_vitl14_reg"
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float | None = 0.01
    cached_layer_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _positive("aggregator", img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                  depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  aa_block_size=self.aa_block_size)
        _require(self.embed_dim % self.num_heads == 0,
                 f"aggregator.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        head_dim = self.embed_dim // self.num_heads
        _require(self.rope_freq <= 0 or head_dim % 4 == 0,
                 f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        _require(self.patch_embed == "conv" or self.patch_embed in DINO_BACKBONES,
                 f"aggregator.patch_embed must be 'conv' or one of {sorted(DINO_BACKBONES)}, "
                 f"got {self.patch_embed!r}")
        _require(sorted(self.aa_order) == ["frame", "global"],
                 f"aggregator.aa_order must hold 'frame' and 'global' once each, got {list(self.aa_order)}")
        _require(self.depth % self.aa_block_size == 0,
                 f"aggregator.depth ({self.depth}) must be a multiple of aa_block_size ({self.aa_block_size})")
        if self.cached_layer_indices is not None:
            bad = [i for i in self.cached_layer_indices if not -self.depth <= i < self.depth]
            _require(not bad, f"aggregator.cached_layer_indices {bad} out of range for depth {self.depth}")

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token: one camera token plus the register tokens come first."""
        return 1 + self.num_register_tokens


@dataclass(frozen=True)
class CameraHeadConfig:
    dim_in: int = 2048
    trunk_depth: int = 4
    pose_encoding_type: str = "absT_quaR_FoV"
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float | None = 0.01
    trans_act: str = "linear"
    quat_act: str = "linear"
    fl_act: str = "relu"
    num_iterations: int = 4

    def __post_init__(self) -> None:
        _positive("camera_head", dim_in=self.dim_in, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  num_iterations=self.num_iterations)
        _require(self.trunk_depth >= 0, "camera_head.trunk_depth must be >= 0")
        _require(self.pose_encoding_type == "absT_quaR_FoV",
                 f"camera_head.pose_encoding_type {self.pose_encoding_type!r} is not supported "
                 "(only 'absT_quaR_FoV')")
        _require(self.dim_in % self.num_heads == 0, "camera_head.dim_in must be divisible by num_heads")
        for name in ("trans_act", "quat_act", "fl_act"):
            value = getattr(self, name)
            _require(value in POSE_ACTIVATIONS, f"camera_head.{name} must be one of {POSE_ACTIVATIONS}, got {value!r}")


@dataclass(frozen=True)
class DPTHeadConfig:
    dim_in: int = 2048
    patch_size: int = 14
    output_dim: int = 4
    activation: str = "inv_log"
    conf_activation: str = "expp1"
    features: int = 256
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)
    pos_embed: bool = True
    feature_only: bool = False
    down_ratio: int = 1

    def __post_init__(self) -> None:
        _positive("dpt_head", dim_in=self.dim_in, patch_size=self.patch_size, features=self.features,
                  down_ratio=self.down_ratio)
        _require(len(self.out_channels) == 4, f"dpt_head.out_channels needs 4 entries, got {list(self.out_channels)}")
        _require(len(self.intermediate_layer_idx) == 4,
                 f"dpt_head.intermediate_layer_idx needs 4 entries, got {list(self.intermediate_layer_idx)}")
        _require(self.feature_only or self.output_dim >= 2, "dpt_head.output_dim must be >= 2 (values + confidence)")
        _require(self.activation in DPT_ACTIVATIONS,
                 f"dpt_head.activation must be one of {DPT_ACTIVATIONS}, got {self.activation!r}")
        _require(self.conf_activation in CONF_ACTIVATIONS,
                 f"dpt_head.conf_activation must be one of {CONF_ACTIVATIONS}, got {self.conf_activation!r}")


@dataclass(frozen=True)
class TrackerConfig:
    """``BaseTrackerPredictor`` arguments (the iterative point tracker of the track head)."""

    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    latent_dim: int = 128
    hidden_size: int = 384
    use_spaceatt: bool = True
    depth: int = 6
    max_scale: int = 518
    predict_conf: bool = True
    num_heads: int = 8
    num_virtual_tracks: int = 64

    def __post_init__(self) -> None:
        _positive("tracker", stride=self.stride, corr_levels=self.corr_levels, corr_radius=self.corr_radius,
                  latent_dim=self.latent_dim, hidden_size=self.hidden_size, depth=self.depth,
                  num_heads=self.num_heads)
        _require(self.latent_dim % 4 == 0, "tracker.latent_dim must be divisible by 4 (2-D flow embedding)")
        _require(self.hidden_size % self.num_heads == 0, "tracker.hidden_size must be divisible by num_heads")


@dataclass(frozen=True)
class TrackHeadConfig:
    """``TrackHead``: a feature-only DPT at half resolution plus the tracker."""

    feature_extractor: DPTHeadConfig = field(
        default_factory=lambda: DPTHeadConfig(features=128, feature_only=True, down_ratio=2, pos_embed=False))
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    iters: int = 4

    def __post_init__(self) -> None:
        _positive("track_head", iters=self.iters)
        _require(self.feature_extractor.feature_only, "track_head.feature_extractor must be feature_only")
        _require(self.feature_extractor.features == self.tracker.latent_dim,
                 f"track_head: feature_extractor.features ({self.feature_extractor.features}) must equal "
                 f"tracker.latent_dim ({self.tracker.latent_dim})")


@dataclass(frozen=True)
class VGGTConfig:
    """A whole VGGT: aggregator, optional DINO backbone settings, and the heads that are enabled."""

    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    dino: DinoConfig | None = None
    camera_head: CameraHeadConfig | None = field(default_factory=CameraHeadConfig)
    depth_head: DPTHeadConfig | None = field(
        default_factory=lambda: DPTHeadConfig(output_dim=2, activation="exp"))
    point_head: DPTHeadConfig | None = field(default_factory=DPTHeadConfig)
    track_head: TrackHeadConfig | None = field(default_factory=TrackHeadConfig)
    name: str = "custom"
    # Test/benchmark models only: heavy-tailed activations built into the random initialisation
    # (see qvggt_export.model.outliers). A loaded checkpoint replaces all weights.
    planted_outliers: PlantedOutliers | None = None

    def __post_init__(self) -> None:
        agg = self.aggregator
        if agg.patch_embed != "conv" and self.dino is None:
            backbone = DINO_BACKBONES[agg.patch_embed]
            object.__setattr__(self, "dino", DinoConfig(img_size=agg.img_size, patch_size=agg.patch_size,
                                                        num_register_tokens=agg.num_register_tokens, **backbone))
        if self.dino is not None:
            _require(self.dino.embed_dim == agg.embed_dim,
                     f"dino.embed_dim ({self.dino.embed_dim}) must equal aggregator.embed_dim ({agg.embed_dim})")
            _require(self.dino.patch_size == agg.patch_size,
                     f"dino.patch_size ({self.dino.patch_size}) must equal aggregator.patch_size ({agg.patch_size})")
        token_dim = 2 * agg.embed_dim
        heads: list[tuple[str, Any]] = [("camera_head", self.camera_head), ("depth_head", self.depth_head),
                                        ("point_head", self.point_head)]
        if self.track_head is not None:
            heads.append(("track_head.feature_extractor", self.track_head.feature_extractor))
        for name, head in heads:
            if head is None:
                continue
            _require(head.dim_in == token_dim,
                     f"{name}.dim_in ({head.dim_in}) must be 2 * aggregator.embed_dim ({token_dim})")
            if isinstance(head, DPTHeadConfig):
                _require(head.patch_size == agg.patch_size, f"{name}.patch_size must equal aggregator.patch_size")
                bad = [i for i in head.intermediate_layer_idx if not -agg.depth <= i < agg.depth]
                _require(not bad, f"{name}.intermediate_layer_idx {bad} out of range for depth {agg.depth}")
        _require(any(h is not None for h in (self.camera_head, self.depth_head, self.point_head, self.track_head)),
                 "a VGGT needs at least one head")

    def required_layers(self) -> tuple[int, ...]:
        """Aggregator layers the enabled heads read (non-negative indices, sorted)."""
        depth = self.aggregator.depth
        layers: set[int] = set()
        if self.camera_head is not None:
            layers.add(depth - 1)
        for head in (self.depth_head, self.point_head,
                     self.track_head.feature_extractor if self.track_head else None):
            if head is not None:
                layers.update(i % depth for i in head.intermediate_layer_idx)
        return tuple(sorted(layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def _vggt_1b() -> VGGTConfig:
    return VGGTConfig(name="vggt-1b")


def _tiny() -> VGGTConfig:
    """The conv-patch-embed reference model of ``fixtures/vggt_reference/tiny_config.json``."""
    dim, token_dim, layers = 64, 128, (0, 1, 2, 3)
    dpt = dict(dim_in=token_dim, features=32, out_channels=(16, 32, 64, 64), intermediate_layer_idx=layers)
    return VGGTConfig(
        name="tiny",
        aggregator=AggregatorConfig(img_size=70, embed_dim=dim, depth=4, num_heads=4, patch_embed="conv"),
        camera_head=CameraHeadConfig(dim_in=token_dim, trunk_depth=2, num_heads=4),
        depth_head=DPTHeadConfig(output_dim=2, activation="exp", **dpt),
        point_head=DPTHeadConfig(output_dim=4, activation="inv_log", **dpt),
        track_head=TrackHeadConfig(
            feature_extractor=DPTHeadConfig(dim_in=token_dim, features=16, out_channels=(16, 32, 64, 64),
                                            intermediate_layer_idx=layers, pos_embed=False, feature_only=True,
                                            down_ratio=2),
            tracker=TrackerConfig(stride=2, corr_levels=4, corr_radius=3, latent_dim=16, hidden_size=32, depth=2),
            iters=4,
        ),
    )


def _tiny_dino() -> VGGTConfig:
    """The DINOv2-patch-embed reference model of ``fixtures/vggt_reference/tiny_dino_config.json``."""
    dim, token_dim = 64, 128
    dpt = dict(dim_in=token_dim, features=16, out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 1, 0, 1))
    return VGGTConfig(
        name="tiny-dino",
        aggregator=AggregatorConfig(img_size=70, embed_dim=dim, depth=2, num_heads=4, patch_embed="conv"),
        dino=DinoConfig(img_size=70, patch_size=14, embed_dim=dim, depth=2, num_heads=4),
        camera_head=CameraHeadConfig(dim_in=token_dim, trunk_depth=1, num_heads=4),
        depth_head=DPTHeadConfig(output_dim=2, activation="exp", **dpt),
        point_head=DPTHeadConfig(output_dim=4, activation="inv_log", **dpt),
        track_head=None,
    )


def _tiny_outliers() -> VGGTConfig:
    """``tiny`` with VGGT-like massive activations planted (fixed seed): exercises smoothing and rotation."""
    return dataclasses.replace(_tiny(), name="tiny-outliers", planted_outliers=PlantedOutliers(seed=0))


PRESETS = {"vggt-1b": _vggt_1b, "tiny": _tiny, "tiny-dino": _tiny_dino, "tiny-outliers": _tiny_outliers}


def preset_names() -> list[str]:
    return sorted(PRESETS)


# --------------------------------------------------------------------------------------------------
# Parsing the official constructor-argument layout (fixture ``model`` sections)
# --------------------------------------------------------------------------------------------------


def _build(cls: type, section: Mapping[str, Any], where: str, drop: tuple[str, ...] = ()) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    unknown = []
    for key, value in section.items():
        if key in drop or key.endswith("_note"):
            continue
        if key not in known:
            unknown.append(key)
            continue
        values[key] = tuple(value) if isinstance(value, list) else value
    if unknown:
        raise QVGGTError(f"{where}: unknown argument(s) {sorted(unknown)}; expected some of {sorted(known)}")
    return cls(**values)


def config_from_dict(section: Mapping[str, Any], name: str = "custom") -> VGGTConfig:
    """Build a :class:`VGGTConfig` from official constructor arguments per submodule.

    Accepts either a whole fixture config (with a ``model`` key) or its ``model`` section:
    ``aggregator``, optional ``dino_patch_embed``, ``camera_head``, ``depth_head``, ``point_head`` and
    ``track_head`` (``null`` disables a head). ``track_head`` is either ``TrackHead`` arguments directly or
    the fixture's ``{"TrackHead": ..., "feature_extractor_DPTHead": ..., "tracker_BaseTrackerPredictor": ...}``.
    """
    if "model" in section and isinstance(section["model"], Mapping):
        name = str(section.get("variant", name))
        section = section["model"]
    if not isinstance(section, Mapping) or "aggregator" not in section:
        raise QVGGTError("a model config needs an 'aggregator' section (official Aggregator arguments)")
    allowed = {"aggregator", "dino_patch_embed", "camera_head", "depth_head", "point_head", "track_head"}
    unknown = set(section) - allowed
    if unknown:
        raise QVGGTError(f"model config: unknown section(s) {sorted(unknown)}; expected some of {sorted(allowed)}")

    aggregator = _build(AggregatorConfig, section["aggregator"], "aggregator")
    dino = None
    if section.get("dino_patch_embed") is not None:
        dino = _build(DinoConfig, section["dino_patch_embed"], "dino_patch_embed")
    camera = None
    if section.get("camera_head") is not None:
        camera = _build(CameraHeadConfig, section["camera_head"], "camera_head")
    depth = _build(DPTHeadConfig, section["depth_head"], "depth_head") if section.get("depth_head") else None
    point = _build(DPTHeadConfig, section["point_head"], "point_head") if section.get("point_head") else None
    track = _parse_track_head(section.get("track_head"), 2 * aggregator.embed_dim, aggregator.patch_size)
    return VGGTConfig(aggregator=aggregator, dino=dino, camera_head=camera, depth_head=depth, point_head=point,
                      track_head=track, name=name)


def _parse_track_head(section: Mapping[str, Any] | None, dim_in: int, patch_size: int) -> TrackHeadConfig | None:
    if not section:
        return None
    if "TrackHead" in section:
        head_args = dict(section["TrackHead"])
        extractor_args = section.get("feature_extractor_DPTHead")
        tracker_args = section.get("tracker_BaseTrackerPredictor")
    else:
        head_args, extractor_args, tracker_args = dict(section), None, None
    # TrackHead's own arguments, with the defaults of the official constructor.
    features = head_args.pop("features", 128)
    iters = head_args.pop("iters", 4)
    shared = {key: head_args.pop(key) for key in ("predict_conf", "stride", "corr_levels", "corr_radius",
                                                   "hidden_size") if key in head_args}
    head_dim_in = head_args.pop("dim_in", dim_in)
    head_patch = head_args.pop("patch_size", patch_size)
    if head_args:
        raise QVGGTError(f"track_head: unknown argument(s) {sorted(head_args)}")
    if extractor_args is not None:
        extractor = _build(DPTHeadConfig, extractor_args, "track_head.feature_extractor")
    else:
        extractor = DPTHeadConfig(dim_in=head_dim_in, patch_size=head_patch, features=features, feature_only=True,
                                  down_ratio=2, pos_embed=False)
    if tracker_args is not None:
        tracker = _build(TrackerConfig, tracker_args, "track_head.tracker")
    else:
        tracker = TrackerConfig(latent_dim=features, **shared)
    return TrackHeadConfig(feature_extractor=extractor, tracker=tracker, iters=iters)


def resolve_config(config: str | Mapping[str, Any] | VGGTConfig) -> VGGTConfig:
    """A preset name, an official-layout dict, or a ready :class:`VGGTConfig`."""
    if isinstance(config, VGGTConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise QVGGTError(f"unknown model preset {config!r}; available presets: {', '.join(preset_names())}")
        return PRESETS[config]()
    if isinstance(config, Mapping):
        return config_from_dict(config)
    raise QVGGTError(f"a model config must be a preset name, a dict or a VGGTConfig, got {type(config).__name__}")
