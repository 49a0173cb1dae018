"""Noise-Filtered Diverse Sampling (NFDS): choosing the calibration set (QuantVGGT, section 3.3).

Pipeline (equation numbers are the paper's):

1. **Statistics pass** (eq. 9) -- the floating-point model runs once per candidate (eval, no grad);
   forward pre-hooks on a set ``L`` of deep layers record the mean ``m_ij`` and the (population)
   variance ``s_ij`` of the tokens entering layer ``j``. By default ``L`` is the *inputs* of the last
   four frame blocks and the last four global blocks of the aggregator. Forward hooks on the last frame
   and global block give the last aggregator layer's output ``[S, P, 2C]`` (what the heads read).
2. **Outlier score** (eq. 10) -- ``score_i = sqrt(sum_j ((m_ij - mu_j)/sigma_j)^2 + sum_j ((s_ij - nu_j)/tau_j)^2)``
   with ``mu, sigma, nu, tau`` the mean and (population) standard deviation over candidates, ``+ eps``.
3. **Percentile filter** (eq. 11) -- the paper says "keep the lowest p% scores", which reads either as
   keeping 20 % or as dropping the top 20 %. We take the second reading: **drop the top ``p`` fraction**,
   i.e. the ``floor(p * N)`` highest-scoring candidates (ties broken by candidate order), and keep the
   rest (p = 0.2 keeps 80 %). Keeping only 20 % of a 400 pool would leave 80 candidates for a budget of
   40, an odd way to remove *noise*; the paper's ablation shows p = 0.1..0.3 all work.
4. **Frame-aware correlation vector** (eq. 12) -- as the paper defines it (``correlation="flattened"``, the
   default): the last layer's output ``[S, P, 2C]`` is reshaped per frame into one vector of dimension
   ``s x d`` (the frame's ``s`` patch tokens, ``d = 2C`` channels, flattened in token order), and
   ``c_t = cos(a_0, a_t)`` for ``t = 1..f-1``: frame 0 and frame t are compared position by position, a
   measure of viewpoint change. The camera and register tokens are dropped: they are not image positions
   (``patch_start_idx`` of them lead each frame). ``correlation="pooled"`` keeps the earlier form: each frame's
   tokens are mean-pooled first (``pool_tokens`` chooses which) to ``a_t`` of dimension ``2C``, which keeps
   almost no geometry (the vectors cluster by camera stride rather than content; ``nfds_findings.md``).
   Single-frame candidates (``f == 1``) have no correlation vector: they are clustered on the
   L2-normalised pooled feature ``a_0`` instead (with a warning).
5. **Clustering** (eq. 13) -- scikit-learn ``KMeans(K, n_init, random_state=seed)`` on the vectors of the
   kept candidates. If ``K`` exceeds the number of kept candidates, or the number of distinct vectors,
   ``K`` is lowered to that number (with a warning; the selection records the ``K`` used).
6. **Per-cluster sampling** -- exactly ``budget`` samples: clusters are visited round-robin in a
   seed-shuffled order, each visit taking the next member of that cluster (members in seed-shuffled
   order). A cluster that runs out is skipped, so short clusters give all they have and the other
   clusters make up the rest; when ``budget`` is not a multiple of ``K`` the clusters early in the
   shuffled order give one more.

Strategies: ``"random"`` (uniform over all candidates; the model is not run), ``"filtered"`` (filter,
then uniform), ``"clustered"`` (cluster every candidate, no filter) and ``"nfds"`` (filter, then cluster).

**Cost.** The statistics pass runs the aggregator (not the heads: eq. 9 and 12 read only aggregator
layers, and eq. 12 needs its *last* layer, so the whole aggregator runs) over the pool under
``torch.inference_mode``, ``batch_size`` candidates per forward (``[B, S, 3, H, W]``; the hooks split
per sample), streaming the pool: overlapping windows decode each frame once
(:meth:`CandidatePool.iter_samples`) and, when the model is on an accelerator, a background thread
reads the next batch while the device runs this one. On ``tiny`` (10 frames, 70 px, one CPU thread)
a pass is reading (decode + resize, ~4.5 ms per candidate with the readers' 2 preprocessing threads)
and forward (9.2-10.3 ms per candidate one at a time, 7.6-8.3 ms in batches of 8: the forward is GEMM
and attention work, not per-call overhead, so batching saves 12-20 % of it). What remains is inherent: ``pool`` (400)
aggregator forwards against a calibration on ``budget`` (40) sequences, so NFDS is most of the
calibration time without block reconstruction (~80 %) and 10.7-10.9 % at the published recipe's 600
steps per block (``benchmarks/results/nfds_cost.md``); the issue's < 10 % is not met on ``tiny``.

The sampler only selects: it never quantizes, and the model is returned as it came (hooks removed,
train/eval mode restored). :func:`collect_statistics` and :func:`select_from_statistics` split the
expensive pass from the cheap selection, so one pass can serve many seeds and strategies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qvggt_export.errors import QVGGTError
from qvggt_export.io import write_json_atomic

from .readers import CandidatePool, SampleRef

logger = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES",
    "CalibrationSelection",
    "CandidateStatistics",
    "NFDSConfig",
    "cluster_vectors",
    "collect_statistics",
    "default_nfds_layers",
    "frame_correlation",
    "outlier_scores",
    "percentile_filter",
    "sample_per_cluster",
    "select_calibration_set",
    "select_from_statistics",
]

STRATEGIES = ("nfds", "random", "filtered", "clustered")
POOL_TOKENS = ("all", "patch")
CORRELATIONS = ("flattened", "pooled")
SELECTION_FORMAT = "qvggt-nfds-selection/1"

# Independent random streams (per seed) for the selection steps.
_STREAM_RANDOM, _STREAM_CLUSTER_ORDER, _STREAM_MEMBERS = range(3)

Candidates = CandidatePool | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise QVGGTError(f"NFDSConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise QVGGTError(f"NFDSConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class NFDSConfig:
    """Settings of the calibration-set sampler, validated on construction.

    Attributes:
        strategy: ``"nfds"`` (filter + cluster, the paper's method), ``"random"``, ``"filtered"``
            (filter + uniform) or ``"clustered"`` (cluster, no filter).
        budget: Number of samples to select (the paper: 40 from a pool of 400).
        p: Fraction of highest-scoring candidates dropped by the noise filter, in ``[0, 1)``
            (0.2 keeps 80 %; see the module notes on the paper's wording).
        k: Number of K-Means clusters (lowered, with a warning, if the kept pool is smaller).
        seed: Seeds the random draws and K-Means.
        layers: Module paths (``model.named_modules()`` names, e.g. ``"aggregator.global_blocks.23"``)
            whose *inputs* give the statistics; ``None`` = the last ``last_blocks`` frame and global
            blocks (:func:`default_nfds_layers`).
        last_blocks: How many trailing frame/global blocks the default ``layers`` take.
        n_init: K-Means restarts.
        correlation: Form of eq. 12's frame vectors: ``"flattened"`` (the paper's: each frame's patch tokens
            flattened to one ``s x d`` vector, camera/register tokens dropped) or ``"pooled"`` (each frame's
            tokens mean-pooled to ``d``; the earlier default, kept for comparison).
        pool_tokens: Tokens mean-pooled into a frame's feature for the ``"pooled"`` form (and the single-frame
            fallback): ``"all"`` (camera, register and patch tokens) or ``"patch"`` (patch tokens only).
        eps: Added to the standard deviations of eq. 10 (a layer whose statistic is the same for all
            candidates then contributes 0 instead of dividing by zero).
        batch_size: Candidates run together as one ``[B, S, 3, H, W]`` forward in the statistics pass
            (consecutive candidates of one shape; the last batch may be smaller). The statistics equal the
            one-at-a-time ones to float32 rounding (tested: relative 1e-5) and the selection is identical.
            Default 8: on the CPU as fast as any measured (``tiny``, 10 frames at 70 px: 7.6-8.3 ms per
            candidate at 8 or 16, up to 9.0 at 32, against 9.2-10.3 ms at 1; ``nfds_cost.md``),
            and on a GPU at 518 px with 10 frames a modest ~5-6 GB: one VGGT-1B candidate (13,740
            tokens of 1024 channels, 56 MB per float32 token tensor) peaks at about 0.7 GB of activations
            inside one block (qkv and the 4096-wide MLP temporaries; the pass caches no layer outputs)
            plus the two hooked outputs (0.11 GB). An estimate, not measured (no GPU here); it assumes a
            fused SDPA kernel (the math fallback would hold a 16 x 13,740^2 score matrix, 12 GB).
    """

    strategy: str = "nfds"
    budget: int = 40
    p: float = 0.2
    k: int = 8
    seed: int = 0
    layers: tuple[str, ...] | None = None
    last_blocks: int = 4
    n_init: int = 10
    correlation: str = "flattened"
    pool_tokens: str = "all"
    eps: float = 1e-8
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise QVGGTError(f"NFDSConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _require_int("budget", self.budget, 1)
        _require_int("k", self.k, 1)
        _require_int("seed", self.seed, 0)
        _require_int("last_blocks", self.last_blocks, 1)
        _require_int("n_init", self.n_init, 1)
        _require_int("batch_size", self.batch_size, 1)
        if isinstance(self.p, bool) or not isinstance(self.p, int | float | np.floating) or not (
                math.isfinite(self.p) and 0.0 <= self.p < 1.0):
            raise QVGGTError(f"NFDSConfig.p (fraction of candidates dropped as outliers) must be in [0, 1), "
                             f"got {self.p!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or not (
                math.isfinite(self.eps) and self.eps > 0):
            raise QVGGTError(f"NFDSConfig.eps must be a positive number, got {self.eps!r}")
        if self.correlation not in CORRELATIONS:
            raise QVGGTError(f"NFDSConfig.correlation must be one of {CORRELATIONS}, got {self.correlation!r}")
        if self.pool_tokens not in POOL_TOKENS:
            raise QVGGTError(f"NFDSConfig.pool_tokens must be one of {POOL_TOKENS}, got {self.pool_tokens!r}")
        if self.layers is not None:
            if isinstance(self.layers, str) or not isinstance(self.layers, Sequence):
                raise QVGGTError(f"NFDSConfig.layers must be a sequence of module names, got {self.layers!r}")
            names = tuple(self.layers)
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise QVGGTError(f"NFDSConfig.layers must be distinct, non-empty module names, got {self.layers!r}")
            object.__setattr__(self, "layers", names)  # normalise lists so the frozen config stays hashable
        object.__setattr__(self, "p", float(self.p))

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings as a JSON-ready dict (inverse: :meth:`from_dict`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["layers"] = list(self.layers) if self.layers is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NFDSConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QVGGTError(f"unknown NFDSConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Pure math (numpy arrays in, arrays out)
# --------------------------------------------------------------------------------------------------


def outlier_scores(means: np.ndarray, variances: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Eq. 10: each candidate's distance from the pool in standardised (mean, variance) statistics.

    Args:
        means: ``[N, L]`` per-candidate, per-layer activation means ``m_ij``.
        variances: ``[N, L]`` activation variances ``s_ij``.
        eps: Added to the per-layer standard deviations over candidates.

    Returns:
        ``[N]`` float64 scores ``sqrt(sum_j z(m)_ij^2 + sum_j z(s)_ij^2)``.
    """
    m = np.asarray(means, dtype=np.float64)
    s = np.asarray(variances, dtype=np.float64)
    if m.ndim != 2 or m.shape != s.shape:
        raise QVGGTError(f"means and variances must both be [candidates, layers], got {m.shape} and {s.shape}")
    z_mean = (m - m.mean(axis=0)) / (m.std(axis=0) + eps)
    z_var = (s - s.mean(axis=0)) / (s.std(axis=0) + eps)
    return np.sqrt((z_mean**2).sum(axis=1) + (z_var**2).sum(axis=1))


def percentile_filter(scores: np.ndarray, p: float) -> np.ndarray:
    """Eq. 11 as read here: drop the ``floor(p * N)`` highest scores, keep the rest (a bool mask).

    Ties are broken by candidate order (the later of two equal scores is dropped first), so the
    mask is deterministic. ``p = 0`` keeps everything.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0.0 <= p < 1.0:
        raise QVGGTError(f"p must be in [0, 1), got {p}")
    n = scores.shape[0]
    drop = int(math.floor(p * n + 1e-9))  # the tolerance keeps 0.2 * 400 at 80, not 79
    keep = np.ones(n, dtype=bool)
    if drop:
        order = np.argsort(scores, kind="stable")  # ascending score; among ties the later candidate sorts last
        keep[order[n - drop:]] = False
    return keep


def frame_correlation(frame_features: np.ndarray | torch.Tensor, eps: float = 1e-12) -> np.ndarray:
    """Eq. 12: ``c_t = cos(a_0, a_t)`` for ``t = 1..f-1`` from per-frame features ``[f, D]`` (``[f-1]`` out)."""
    a = np.asarray(frame_features.detach().cpu() if isinstance(frame_features, torch.Tensor) else frame_features,
                   dtype=np.float64)
    if a.ndim != 2:
        raise QVGGTError(f"frame features must be [frames, dim], got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1)
    return (a[1:] @ a[0]) / (norms[1:] * norms[0] + eps)


def flattened_frame_correlation(patch_tokens: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eq. 12 as the paper writes it: ``c_t = cos(vec(A_0), vec(A_t))`` for ``t = 1..f-1``, where ``A_t`` is
    frame t's ``[s, d]`` patch tokens flattened to one ``s x d`` vector (same image positions compared).

    Args:
        patch_tokens: ``[..., f, s, d]`` (leading batch dimensions allowed).

    Returns:
        ``[..., f-1]`` float64.
    """
    if patch_tokens.ndim < 3:
        raise QVGGTError(f"patch tokens must be [..., frames, tokens, dim], got shape {tuple(patch_tokens.shape)}")
    flat = patch_tokens.flatten(-2).double()  # [..., f, s*d]
    first, rest = flat[..., :1, :], flat[..., 1:, :]
    dots = (rest * first).sum(dim=-1)
    return dots / (rest.norm(dim=-1) * first.norm(dim=-1) + eps)


def cluster_vectors(vectors: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> tuple[np.ndarray, int]:
    """Eq. 13: K-Means labels of ``vectors`` ``[N, d]``, and the number of clusters actually used.

    ``k`` is lowered to the number of distinct vectors (at most ``N``) with a warning, since K-Means
    cannot make more non-empty clusters than that.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise QVGGTError("NFDS clustering needs scikit-learn, which is not installed. "
                         "Install it with: pip install scikit-learn") from exc
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise QVGGTError(f"cannot cluster an empty set of vectors (shape {x.shape})")
    distinct = np.unique(x, axis=0).shape[0]
    used = min(k, distinct)
    if used < k:
        logger.warning("K-Means: K=%d is more than the %d distinct vectors of %d candidates; using K=%d",
                       k, distinct, x.shape[0], used)
    if used == 1:
        return np.zeros(x.shape[0], dtype=np.int64), 1
    labels = KMeans(n_clusters=used, n_init=n_init, random_state=seed).fit_predict(x)
    return labels.astype(np.int64), used


def sample_per_cluster(labels: np.ndarray, budget: int, seed: int = 0) -> np.ndarray:
    """Pick exactly ``budget`` positions spread uniformly over clusters (rule in the module notes, step 6).

    Args:
        labels: ``[N]`` cluster label of each candidate.
        budget: Number of positions to return, at most ``N``.
        seed: Seeds the cluster visiting order and the order inside each cluster.

    Returns:
        The chosen positions into ``labels``, ascending.
    """
    labels = np.asarray(labels)
    if budget > labels.shape[0]:
        raise QVGGTError(f"cannot pick {budget} samples from {labels.shape[0]} clustered candidates")
    clusters = np.unique(labels)
    order_rng = np.random.default_rng([seed, _STREAM_CLUSTER_ORDER])
    member_rng = np.random.default_rng([seed, _STREAM_MEMBERS])
    members = {int(c): list(member_rng.permutation(np.flatnonzero(labels == c))) for c in clusters}
    order = [int(c) for c in order_rng.permutation(clusters)]
    chosen: list[int] = []
    while len(chosen) < budget:
        for c in order:
            if len(chosen) == budget:
                break
            if members[c]:
                chosen.append(int(members[c].pop(0)))
    return np.sort(np.asarray(chosen, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# Statistics pass
# --------------------------------------------------------------------------------------------------


def _aggregator(model: nn.Module) -> nn.Module:
    aggregator = getattr(model, "aggregator", None)
    if aggregator is None or not hasattr(aggregator, "frame_blocks") or not hasattr(aggregator, "global_blocks"):
        raise QVGGTError(f"NFDS needs a VGGT model (with aggregator.frame_blocks/global_blocks), "
                         f"got {type(model).__name__}")
    return aggregator


def default_nfds_layers(model: nn.Module, last_blocks: int = 4) -> tuple[str, ...]:
    """The module names whose inputs NFDS reads by default: the last ``last_blocks`` frame and global blocks."""
    from qvggt_export.quant.roles import block_names

    _aggregator(model)
    names: list[str] = []
    for kind in ("frame", "global"):  # block lists of the layer-role registry
        blocks = block_names(model, kind)
        names += blocks[max(len(blocks) - last_blocks, 0):]
    return tuple(names)


def _resolve_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        blocks = sorted(n for n in modules if n.count(".") == 2 and "_blocks." in n)
        raise QVGGTError(f"NFDS layers not found in the model: {missing}; block names look like "
                         f"{blocks[:2] + blocks[-2:]}")
    return [(n, modules[n]) for n in names]


@dataclass
class CandidateStatistics:
    """The result of the statistics pass over a candidate pool (input of :func:`select_from_statistics`).

    Attributes:
        ids: Candidate ids, in pool order (candidates skipped as unreadable are absent).
        refs: Their descriptors.
        layers: Names of the layers whose inputs were measured (``L``).
        means: ``[N, L]`` activation means (eq. 9), or ``None`` if the model was not run.
        variances: ``[N, L]`` activation variances.
        vectors: ``[N, f-1]`` correlation vectors (eq. 12); for single-frame candidates ``[N, 2C]``
            normalised pooled features (see the module notes).
        vector_kind: ``"correlation"`` or ``"pooled_feature"``.
        frames: Frames per candidate.
        timing: Seconds: ``statistics_s`` (whole pass), ``load_s``, ``forward_s``, ``per_candidate_s``.
        skipped: Ids skipped as unreadable (pool built with ``skip_bad=True``).
    """

    ids: list[str]
    refs: list[SampleRef]
    layers: tuple[str, ...] = ()
    means: np.ndarray | None = None
    variances: np.ndarray | None = None
    vectors: np.ndarray | None = None
    vector_kind: str = "correlation"
    frames: int | None = None
    timing: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _candidate_refs(candidates: Candidates) -> list[SampleRef]:
    if isinstance(candidates, CandidatePool):
        return candidates.refs
    if isinstance(candidates, Mapping):
        return [SampleRef(id=str(key), kind="tensor", shape=tuple(value.shape[-4:]))  # type: ignore[arg-type]
                for key, value in candidates.items()]
    if isinstance(candidates, Sequence) and not isinstance(candidates, str | bytes):
        return [SampleRef(id=f"candidate-{i:04d}", kind="tensor",
                          shape=tuple(x.shape[-4:]) if isinstance(x, torch.Tensor) else None)  # type: ignore[arg-type]
                for i, x in enumerate(candidates)]
    raise QVGGTError(f"candidates must be a CandidatePool, a sequence of [S, 3, H, W] tensors or a mapping of id "
                     f"to tensor, got {type(candidates).__name__}")


def _iter_candidates(candidates: Candidates, refs: list[SampleRef]) -> Iterator[tuple[SampleRef, torch.Tensor]]:
    if isinstance(candidates, CandidatePool):
        yield from candidates.iter_samples()
    elif isinstance(candidates, Mapping):
        yield from zip(refs, candidates.values(), strict=True)
    else:
        yield from zip(refs, candidates, strict=True)


_END = object()


def _prefetched(items: Iterator[Any], depth: int) -> Generator[Any, None, None]:
    """Yield ``items`` while a background thread reads up to ``depth`` ahead.

    Decoding and preprocessing (PIL, PyAV, torch: all release the GIL) then overlap the model's forward
    instead of adding to it. An exception in the reader is raised here, in order; closing this generator
    stops the reader.
    """
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
            put((_END, exc))

    reader = threading.Thread(target=read, name="nfds-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        reader.join()


def _as_sample(ref: SampleRef, sample: object) -> torch.Tensor:
    """One candidate as ``[S, 3, H, W]`` (a leading batch of 1 is dropped).

    Finiteness is checked only for a candidate whose activations turn out non-finite (:func:`_check_finite`):
    a NaN/Inf pixel always shows there, and an up-front pass over every image cost 2 % of the pass.
    """
    if not isinstance(sample, torch.Tensor):
        raise QVGGTError(f"candidate {ref.id}: expected an image tensor [S, 3, H, W], got {type(sample).__name__}")
    if sample.dim() == 5 and sample.shape[0] == 1:
        sample = sample[0]
    if sample.dim() != 4 or sample.shape[1] != 3:
        raise QVGGTError(f"candidate {ref.id}: expected images [S, 3, H, W] (or [1, S, 3, H, W]), "
                         f"got shape {tuple(sample.shape)}")
    return sample


def _check_finite(stats: np.ndarray, order: Sequence[str], images: torch.Tensor, refs: Sequence[SampleRef]) -> None:
    """Name the first candidate (pool order) with NaN/Inf inputs or activations, and the first layer affected.

    ``stats`` is ``[L, 2, B]`` (mean, variance) for the layers in execution ``order``; the per-sample hooks
    keep candidates apart, so a bad one does not taint the others of its batch.
    """
    finite = np.isfinite(stats).all(axis=1)  # [L, B]
    for b, ref in enumerate(refs):
        if finite[:, b].all():
            continue
        if not torch.isfinite(images[b]).all():
            raise QVGGTError(f"candidate {ref.id}: the input images contain NaN/Inf")
        raise QVGGTError(f"candidate {ref.id}: NaN/Inf activations at the input of layer "
                         f"{order[int(np.argmin(finite[:, b]))]}; check the weights and this sample")


class _Recorder:
    """Hook state for one batched forward: per-sample (mean, var) of each layer's input, last layer's outputs.

    The aggregator lays every tensor out sample-major (frame blocks ``[B*S, P, C]``, global blocks
    ``[B, S*P, C]``), so ``x.reshape(B, -1)`` is one row per candidate for any hooked module.
    """

    def __init__(self) -> None:
        self.batch = 1
        self.stats: dict[str, torch.Tensor] = {}  # name -> [2, B] (mean, var), in execution order
        self.outputs: dict[str, torch.Tensor] = {}

    def reset(self, batch: int) -> None:
        self.batch = batch
        self.stats.clear()
        self.outputs.clear()

    def input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if not isinstance(x, torch.Tensor):
                raise QVGGTError(f"NFDS layer {name} was called without a tensor input")
            if x.dim() == 0 or x.shape[0] % self.batch:
                raise QVGGTError(f"NFDS layer {name}: input of shape {tuple(x.shape)} does not lead with the batch "
                                 f"of {self.batch} candidates; use NFDSConfig(batch_size=1) for this layer")
            # Eq. 9 over all of one candidate's tokens at this layer. Kept on the device (one transfer per
            # batch); a NaN/Inf input makes its mean non-finite, which replaces an isfinite pass over x.
            # Two passes (mean, then mean squared deviation) rather than torch.var_mean: same value to float32
            # rounding, and 16x faster on the CPU (var_mean's Welford kernel took 0.8 ms per 8 x 19,200 values,
            # 10 % of a tiny forward).
            rows = x.detach().reshape(self.batch, -1).float()
            mean = rows.mean(dim=1, keepdim=True)
            self.stats[name] = torch.stack([mean[:, 0], (rows - mean).square().mean(dim=1)])

        return hook

    def output_hook(self, key: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.outputs[key] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook


def collect_statistics(candidates: Candidates, model: nn.Module, config: NFDSConfig | None = None, *,
                       progress: bool = True, prefetch: int | None = None) -> CandidateStatistics:
    """Run the FP model over the candidates and record NFDS's statistics (steps 1 and 4 of the notes).

    Candidates run ``config.batch_size`` at a time (consecutive candidates of one shape; a shape change
    or the end of the pool runs a smaller batch), streamed: at most one batch plus the prefetch queue
    is held. The model is not modified: hooks are removed and its train/eval mode is restored
    afterwards. Only the aggregator runs (the heads do not influence the statistics).

    Args:
        candidates: A :class:`CandidatePool` (loaded one sample at a time), a sequence of ``[S, 3, H, W]``
            tensors, or a mapping of id to tensor.
        model: A VGGT (:func:`qvggt_export.model.build_vggt`).
        config: Uses ``layers``, ``last_blocks``, ``pool_tokens`` and ``batch_size``; defaults to
            :class:`NFDSConfig()`.
        progress: Show a progress bar over candidates.
        prefetch: Candidates read ahead by a background thread while the model runs (0: read in turn).
            ``None``: ``batch_size`` when the model is on an accelerator (the next batch is read while
            the device runs this one; not measured, no GPU here), 0 on the CPU, where the reader
            competes with the forward for the cores (``benchmarks/results/nfds_cost.md``). The
            statistics do not depend on it; ``timing["load_s"]`` is the time the forwards waited for data.

    Raises:
        QVGGTError: Empty pool, a candidate of the wrong shape or frame count, NaN/Inf activations
            (naming the candidate and the first layer affected), unknown layer names.
    """
    from tqdm.auto import tqdm

    config = config or NFDSConfig()
    if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0):
        raise QVGGTError(f"prefetch must be None or an integer >= 0 (candidates read ahead), got {prefetch!r}")
    refs = _candidate_refs(candidates)
    if not refs:
        raise QVGGTError("the candidate pool is empty: nothing to select a calibration set from")
    aggregator = _aggregator(model)
    layer_names = tuple(config.layers) if config.layers is not None else default_nfds_layers(model, config.last_blocks)
    layers = _resolve_layers(model, layer_names)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    patch_start = int(getattr(aggregator, "patch_start_idx", 0))
    if prefetch is None:
        prefetch = 0 if device.type == "cpu" else config.batch_size

    recorder = _Recorder()
    handles = [module.register_forward_pre_hook(recorder.input_hook(name), with_kwargs=True) for name, module in layers]
    handles.append(aggregator.frame_blocks[-1].register_forward_hook(recorder.output_hook("frame")))
    handles.append(aggregator.global_blocks[-1].register_forward_hook(recorder.output_hook("global")))
    was_training = model.training
    # The aggregator returns every cached layer's [B, S, P, 2C] output (all of them by default: 24 x 110 MB
    # per candidate for VGGT-1B at 518 px, 10 frames); the pass reads only the hooks, so nothing is cached
    # while it runs (restored afterwards). This makes a candidate's peak memory that of one block.
    cached_layers = getattr(aggregator, "cached_layers", None)
    kept_refs: list[SampleRef] = []
    means: list[np.ndarray] = []
    variances: list[np.ndarray] = []
    features: list[np.ndarray] = []
    flattened: list[np.ndarray] = []  # eq. 12 per candidate, paper form (computed per batch: s x d is large)
    frames: int | None = None
    load_s = forward_s = 0.0
    pending: list[tuple[SampleRef, torch.Tensor]] = []
    bar = tqdm(total=len(refs), desc="NFDS statistics", unit="candidate", disable=not progress)

    def run_batch() -> None:
        batch_refs = [ref for ref, _ in pending]
        images = torch.stack([sample for _, sample in pending]).to(device=device, dtype=dtype)
        pending.clear()  # the batch tensor holds the pixels now
        recorder.reset(len(batch_refs))
        aggregator(images)
        missing = [n for n in layer_names if n not in recorder.stats]
        if missing or set(recorder.outputs) != {"frame", "global"}:
            raise QVGGTError(f"NFDS layers {missing or 'frame/global blocks'} did not run in the forward of "
                             f"candidate {batch_refs[0].id}")
        order = list(recorder.stats)  # execution order: the first non-finite layer is where the NaN entered
        stats = torch.stack([recorder.stats[n] for n in order]).double().cpu().numpy()  # [L, 2, B]
        _check_finite(stats, order, images, batch_refs)
        pooled = _frame_features(recorder.outputs, len(batch_refs), frames, patch_start,  # type: ignore[arg-type]
                                 config.pool_tokens, [r.id for r in batch_refs])
        position = [order.index(n) for n in layer_names]
        means.extend(stats[position, 0].T)
        variances.extend(stats[position, 1].T)
        features.extend(pooled)
        if config.correlation == "flattened" and frames > 1:  # type: ignore[operator]
            flattened.extend(_flattened_correlation(recorder.outputs, len(batch_refs), frames, patch_start))
        kept_refs.extend(batch_refs)
        recorder.reset(1)  # drop the hooked outputs before the next batch is read
        bar.update(len(batch_refs))

    start = time.perf_counter()
    try:
        model.eval()
        if cached_layers is not None:
            aggregator.cached_layers = frozenset()
        # inference_mode, not no_grad: no version counters or views tracked, and the hooks' detached
        # tensors never leave this function.
        with torch.inference_mode(), closing(_prefetched(_iter_candidates(candidates, refs), prefetch)) as stream:
            tick = time.perf_counter()
            for ref, raw in stream:
                sample = _as_sample(ref, raw)
                loaded = time.perf_counter()
                load_s += loaded - tick
                if frames is None:
                    frames = sample.shape[0]
                elif sample.shape[0] != frames:
                    raise QVGGTError(f"candidate {ref.id} has {sample.shape[0]} frames, the others {frames}: "
                                     "correlation vectors (eq. 12) need one frame count per pool")
                if pending and pending[0][1].shape != sample.shape:
                    run_batch()  # another image size: stacking needs one shape per batch
                pending.append((ref, sample))
                if len(pending) == config.batch_size:
                    run_batch()
                tick = time.perf_counter()
                forward_s += tick - loaded
            if pending:
                loaded = time.perf_counter()
                run_batch()  # the last, partial batch
                forward_s += time.perf_counter() - loaded
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
        if cached_layers is not None:
            aggregator.cached_layers = cached_layers
    ids = [r.id for r in kept_refs]
    skipped = list(candidates.skipped) if isinstance(candidates, CandidatePool) else []
    if not ids:
        raise QVGGTError(f"no candidate could be loaded ({len(skipped)} skipped as unreadable)")
    total = time.perf_counter() - start
    if frames == 1:
        logger.warning("single-frame candidates have no frame-correlation vector (eq. 12); clustering on the "
                       "normalised pooled frame feature instead")
        pooled = np.stack([f[0] for f in features])
        vectors = pooled / (np.linalg.norm(pooled, axis=1, keepdims=True) + 1e-12)
        kind = "pooled_feature"
    elif config.correlation == "flattened":
        vectors = np.stack(flattened)
        kind = "correlation"
    else:
        vectors = np.stack([frame_correlation(f) for f in features])
        kind = "correlation"
    timing = {"statistics_s": total, "load_s": load_s, "forward_s": forward_s, "per_candidate_s": total / len(ids),
              "batch_size": float(config.batch_size)}
    logger.info("NFDS statistics: %d candidates in %.2f s (%.3f s each: load %.3f, forward %.3f; batch %d)",
                len(ids), total, total / len(ids), load_s / len(ids), forward_s / len(ids), config.batch_size)
    return CandidateStatistics(ids=ids, refs=kept_refs, layers=layer_names, means=np.asarray(means),
                               variances=np.asarray(variances), vectors=vectors, vector_kind=kind, frames=frames,
                               timing=timing, skipped=skipped)


def _flattened_correlation(outputs: Mapping[str, torch.Tensor], batch: int, frames: int, patch_start: int
                           ) -> np.ndarray:
    """Eq. 12 (paper form) per candidate of a batch: ``[B, f-1]`` from the last layer's patch tokens."""
    frame_out, global_out = outputs["frame"], outputs["global"]
    channels = frame_out.shape[-1]
    per_frame = torch.cat([frame_out.reshape(batch, frames, -1, channels),
                           global_out.reshape(batch, frames, -1, channels)], dim=-1)
    return flattened_frame_correlation(per_frame[:, :, patch_start:]).cpu().numpy()


def _frame_features(outputs: Mapping[str, torch.Tensor], batch: int, frames: int, patch_start: int, pool_tokens: str,
                    candidates: Sequence[str]) -> np.ndarray:
    """The last aggregator layer ``[B, S, P, 2C]`` (frame and global block outputs) mean-pooled per frame.

    The frame block's output is ``[B*S, P, C]``, the global block's ``[B, S*P, C]``: both reshape to
    ``[B, S, P, C]``. Returns ``[B, S, 2C]`` float64.
    """
    frame_out, global_out = outputs["frame"], outputs["global"]
    channels = frame_out.shape[-1]
    per_frame = torch.cat([frame_out.reshape(batch, frames, -1, channels),
                           global_out.reshape(batch, frames, -1, channels)], dim=-1)
    if pool_tokens == "patch":
        per_frame = per_frame[:, :, patch_start:]
    pooled = per_frame.double().mean(dim=2).cpu().numpy()
    finite = np.isfinite(pooled).all(axis=(1, 2))
    if not finite.all():
        raise QVGGTError(f"candidate {candidates[int(np.argmin(finite))]}: NaN/Inf in the last aggregator layer's "
                         "output")
    return pooled


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def _to_list(array: np.ndarray | None) -> list[Any] | None:
    return None if array is None else np.asarray(array).tolist()


def _from_list(values: list[Any] | None, dtype: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=dtype)


@dataclass
class CalibrationSelection:
    """The calibration set chosen by :func:`select_calibration_set`, with everything that explains it.

    Per-candidate arrays are in candidate order (``candidate_ids``). ``save``/``load`` round-trip it
    through JSON so a later run reuses the selection (:meth:`samples` reloads the chosen samples).

    Attributes:
        strategy: The strategy used.
        config: The resolved config.
        candidate_ids: Ids of all candidates that took part (skipped unreadable ones excluded).
        selected_indices: Positions of the chosen candidates in ``candidate_ids``, ascending.
        selected: Descriptors of the chosen candidates (same order).
        scores: ``[N]`` outlier scores (eq. 10), or ``None`` when the model was not run (``"random"``).
        kept: ``[N]`` bool, ``False`` for candidates the noise filter dropped.
        labels: ``[N]`` cluster labels, ``-1`` where not clustered; ``None`` for non-clustering strategies.
        vectors: ``[N, f-1]`` correlation vectors (eq. 12) (see :attr:`CandidateStatistics.vectors`).
        vector_kind: ``"correlation"`` or ``"pooled_feature"``.
        means: ``[N, L]`` activation means (eq. 9).
        variances: ``[N, L]`` activation variances.
        layers: The measured layers.
        k_used: Number of clusters actually used (``None`` without clustering).
        frames: Frames per candidate.
        timing: Seconds (``statistics_s``, ``per_candidate_s``, ``selection_s``, ...).
        skipped: Candidate ids skipped as unreadable.
        notes: Fallbacks applied (e.g. K lowered), in words.
    """

    strategy: str
    config: NFDSConfig
    candidate_ids: list[str]
    selected_indices: list[int]
    selected: list[SampleRef]
    kept: np.ndarray
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    vectors: np.ndarray | None = None
    vector_kind: str = "correlation"
    means: np.ndarray | None = None
    variances: np.ndarray | None = None
    layers: tuple[str, ...] = ()
    k_used: int | None = None
    frames: int | None = None
    timing: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def selected_ids(self) -> list[str]:
        return [r.id for r in self.selected]

    def samples(self) -> Iterator[torch.Tensor]:
        """Load the selected samples one at a time (``[frames, 3, H, W]`` each), in selection order.

        Overlapping windows of one clip decode their shared frames once (:meth:`CandidatePool.iter_samples`);
        an unreadable sample raises :class:`QVGGTError` naming the file.
        """
        for _, sample in CandidatePool(self.selected).iter_samples():
            yield sample

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SELECTION_FORMAT,
            "strategy": self.strategy,
            "config": self.config.to_dict(),
            "candidate_ids": list(self.candidate_ids),
            "selected_indices": [int(i) for i in self.selected_indices],
            "selected": [r.to_dict() for r in self.selected],
            "kept": _to_list(self.kept),
            "scores": _to_list(self.scores),
            "labels": _to_list(self.labels),
            "vectors": _to_list(self.vectors),
            "vector_kind": self.vector_kind,
            "means": _to_list(self.means),
            "variances": _to_list(self.variances),
            "layers": list(self.layers),
            "k_used": self.k_used,
            "frames": self.frames,
            "timing": dict(self.timing),
            "skipped": list(self.skipped),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationSelection:
        if data.get("format") != SELECTION_FORMAT:
            raise QVGGTError(f"not an NFDS selection (format {data.get('format')!r}, expected {SELECTION_FORMAT!r})")
        try:
            return cls(
                strategy=data["strategy"],
                config=NFDSConfig.from_dict(data["config"]),
                candidate_ids=list(data["candidate_ids"]),
                selected_indices=[int(i) for i in data["selected_indices"]],
                selected=[SampleRef.from_dict(r) for r in data["selected"]],
                kept=np.asarray(data["kept"], dtype=bool),
                scores=_from_list(data.get("scores"), np.float64),
                labels=_from_list(data.get("labels"), np.int64),
                vectors=_from_list(data.get("vectors"), np.float64),
                vector_kind=data.get("vector_kind", "correlation"),
                means=_from_list(data.get("means"), np.float64),
                variances=_from_list(data.get("variances"), np.float64),
                layers=tuple(data.get("layers", ())),
                k_used=data.get("k_used"),
                frames=data.get("frames"),
                timing=dict(data.get("timing", {})),
                skipped=list(data.get("skipped", [])),
                notes=list(data.get("notes", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QVGGTError(f"malformed NFDS selection: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the selection as JSON, atomically (a temporary file, then ``os.replace``)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationSelection:
        """Read a selection written by :meth:`save`."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise QVGGTError(f"NFDS selection not found: {path}") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise QVGGTError(f"cannot read NFDS selection {path}: {exc}") from exc
        return cls.from_dict(data)


def select_from_statistics(statistics: CandidateStatistics, config: NFDSConfig) -> CalibrationSelection:
    """Steps 2-6 of the notes on precomputed statistics: score, filter, cluster, sample (no model run).

    Raises:
        QVGGTError: Empty pool, fewer candidates (or, after filtering, kept candidates) than the budget,
            or a strategy that needs statistics the pass did not record.
    """
    start = time.perf_counter()
    n = len(statistics.ids)
    if n == 0:
        raise QVGGTError("the candidate pool is empty: nothing to select a calibration set from")
    if n < config.budget:
        raise QVGGTError(f"the candidate pool has {n} samples, fewer than the calibration budget {config.budget}; "
                         "enlarge the pool or lower the budget")
    strategy = config.strategy
    has_stats = statistics.means is not None and statistics.variances is not None
    if strategy != "random" and (not has_stats or statistics.vectors is None):
        raise QVGGTError(f"strategy {strategy!r} needs the statistics pass (collect_statistics)")
    notes: list[str] = []
    scores = outlier_scores(statistics.means, statistics.variances, config.eps) if has_stats else None
    kept = np.ones(n, dtype=bool)
    labels: np.ndarray | None = None
    k_used: int | None = None
    if strategy in ("filtered", "nfds"):
        kept = percentile_filter(scores, config.p)  # type: ignore[arg-type]
        if kept.sum() < config.budget:
            raise QVGGTError(f"the noise filter (p={config.p}) keeps {int(kept.sum())} of {n} candidates, fewer than "
                             f"the calibration budget {config.budget}; lower p or enlarge the pool")
    kept_positions = np.flatnonzero(kept)
    if strategy == "random":
        rng = np.random.default_rng([config.seed, _STREAM_RANDOM])
        chosen = np.sort(rng.choice(n, size=config.budget, replace=False))
    elif strategy == "filtered":
        rng = np.random.default_rng([config.seed, _STREAM_RANDOM])
        chosen = np.sort(rng.choice(kept_positions, size=config.budget, replace=False))
    else:
        vectors = np.asarray(statistics.vectors)[kept_positions]
        k = config.k
        if k > len(kept_positions):
            logger.warning("K=%d clusters requested but only %d candidates to cluster; using K=%d", k,
                           len(kept_positions), len(kept_positions))
            k = len(kept_positions)
        kept_labels, k_used = cluster_vectors(vectors, k, config.seed, config.n_init)
        if k_used != config.k:
            notes.append(f"K lowered from {config.k} to {k_used} (only {len(kept_positions)} candidates, "
                         f"{np.unique(vectors, axis=0).shape[0]} distinct vectors)")
        labels = np.full(n, -1, dtype=np.int64)
        labels[kept_positions] = kept_labels
        chosen = np.sort(kept_positions[sample_per_cluster(kept_labels, config.budget, config.seed)])
    if statistics.vector_kind == "pooled_feature" and strategy in ("clustered", "nfds"):
        notes.append("single-frame candidates: clustered on normalised pooled features, not eq. 12 correlations")
    timing = dict(statistics.timing)
    timing["selection_s"] = time.perf_counter() - start
    return CalibrationSelection(
        strategy=strategy, config=config, candidate_ids=list(statistics.ids),
        selected_indices=[int(i) for i in chosen], selected=[statistics.refs[int(i)] for i in chosen],
        kept=kept, scores=scores, labels=labels, vectors=statistics.vectors, vector_kind=statistics.vector_kind,
        means=statistics.means, variances=statistics.variances, layers=statistics.layers, k_used=k_used,
        frames=statistics.frames, timing=timing, skipped=list(statistics.skipped), notes=notes)


def select_calibration_set(candidates: Candidates, model: nn.Module | None, config: NFDSConfig | None = None, *,
                           progress: bool = True) -> CalibrationSelection:
    """Choose ``config.budget`` calibration samples from ``candidates`` (NFDS or a baseline strategy).

    Not in place: the model is only read (hooks are removed, its mode restored) and nothing is
    quantized. ``"random"`` does not run the model (``model`` may be ``None``) nor load any sample.

    Args:
        candidates: A :class:`CandidatePool` (lazy; see :func:`build_candidate_pool`), a sequence of
            ``[S, 3, H, W]`` tensors, or a mapping of id to tensor.
        model: The floating-point VGGT the calibration is for.
        config: Strategy and hyperparameters; defaults to :class:`NFDSConfig()` (NFDS, 40 samples).
        progress: Show a progress bar over candidates during the statistics pass.

    Returns:
        The selection, with scores, filter mask, clusters, correlation vectors and timing.

    Raises:
        QVGGTError: An empty pool, fewer candidates than the budget (both numbers named), NaN/Inf
            activations (candidate and layer named), or a bad candidate.
    """
    config = config or NFDSConfig()
    refs = _candidate_refs(candidates)
    if not refs:
        raise QVGGTError("the candidate pool is empty: nothing to select a calibration set from")
    if len(refs) < config.budget:
        raise QVGGTError(f"the candidate pool has {len(refs)} samples, fewer than the calibration budget "
                         f"{config.budget}; enlarge the pool or lower the budget")
    if config.strategy == "random":
        frames = refs[0].frames or None
        statistics = CandidateStatistics(ids=[r.id for r in refs], refs=refs, frames=frames)
    else:
        if model is None:
            raise QVGGTError(f"strategy {config.strategy!r} needs the floating-point model")
        statistics = collect_statistics(candidates, model, config, progress=progress)
    selection = select_from_statistics(statistics, config)
    logger.info("calibration set: %d of %d candidates (%s)", len(selection.selected), len(selection.candidate_ids),
                config.strategy)
    return selection
