"""NFDS statistics pass in batches: same statistics and selection as one candidate at a time, streamed.

Tolerance: means, variances and correlation vectors within 1e-5 relative (float32 rounding of a
batched GEMM may differ from a single-sample one; on this CPU they were observed bit-identical),
and the selection identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from qvggt_export.calib import (
    NFDSConfig,
    build_candidate_pool,
    collect_statistics,
    outlier_scores,
    select_from_statistics,
)
from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from tests.conftest import require_shared_data

RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return build_vggt("tiny")


@pytest.fixture(scope="module")
def pool():
    return build_candidate_pool("synthetic", frames=3, target_size=70, pool_size=11, seed=0)


@pytest.fixture(scope="module")
def one_at_a_time(tiny, pool):
    return collect_statistics(pool, tiny, NFDSConfig(batch_size=1), progress=False)


def _assert_same_statistics(got, want):
    assert got.ids == want.ids and got.layers == want.layers and got.vector_kind == want.vector_kind
    for name in ("means", "variances", "vectors"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        # atol only guards values that are exactly 0 (none here); the scale is the statistic's own.
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-12 * np.abs(b).max(), err_msg=name)
    np.testing.assert_allclose(outlier_scores(got.means, got.variances), outlier_scores(want.means, want.variances),
                               rtol=RTOL)


def _assert_same_selections(got, want, budget, k):
    for strategy in ("nfds", "filtered", "clustered"):
        for seed in range(3):
            config = NFDSConfig(strategy=strategy, budget=budget, k=k, seed=seed, n_init=3)
            a, b = select_from_statistics(got, config), select_from_statistics(want, config)
            assert a.selected_ids == b.selected_ids, (strategy, seed)
            assert a.kept.tolist() == b.kept.tolist()
            if a.labels is not None:
                assert a.labels.tolist() == b.labels.tolist()


@pytest.mark.parametrize("batch_size", [4, 32])  # 11 = 4 + 4 + 3 (partial last batch); 32 > pool: one batch
def test_batched_statistics_and_selection_equal_one_at_a_time(tiny, pool, one_at_a_time, batch_size):
    cached = tiny.aggregator.cached_layers
    batched = collect_statistics(pool, tiny, NFDSConfig(batch_size=batch_size), progress=False)
    assert tiny.aggregator.cached_layers is cached  # the pass caches no layer outputs, then restores the set
    _assert_same_statistics(batched, one_at_a_time)
    _assert_same_selections(batched, one_at_a_time, budget=4, k=3)
    assert batched.timing["batch_size"] == batch_size


@pytest.mark.slow
def test_real_clips_at_ten_frames_select_the_same(tiny):
    """The cost benchmark's shape (10-frame windows of the real clips, 70 px), default batch vs 1."""
    data = require_shared_data()
    real = build_candidate_pool([data / "sequences", data / "videos"], frames=10, target_size=70, mode="pad",
                                pool_size=21, seed=0)
    single = collect_statistics(real, tiny, NFDSConfig(batch_size=1), progress=False)
    batched = collect_statistics(real, tiny, NFDSConfig(), progress=False)  # default 8: 8 + 8 + 5
    assert NFDSConfig().batch_size == 8
    _assert_same_statistics(batched, single)
    _assert_same_selections(batched, single, budget=5, k=3)


class _CountingCandidates(Sequence):
    """In-memory candidates that count how many have been handed out (to check the pass streams)."""

    def __init__(self, samples: list[torch.Tensor]) -> None:
        self.samples = samples
        self.handed_out = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def __iter__(self):
        self.handed_out = 0  # per iteration: the pass lists the candidates' shapes first, then streams them
        for sample in self.samples:
            self.handed_out += 1
            yield sample


def test_batches_stream_and_split_on_shape_changes(tiny, pool):
    """Batches are consecutive candidates of one shape, cut at batch_size; no more than a batch is read ahead."""
    small = torch.nn.functional.interpolate(pool[0], size=(56, 56), mode="bilinear")  # another image size
    samples = [pool[i] for i in range(5)] + [small, small.flip(-1)] + [pool[i] for i in range(5, 8)]
    candidates = _CountingCandidates(samples)
    forwards = []
    handle = tiny.aggregator.register_forward_pre_hook(
        lambda module, args: forwards.append((tuple(args[0].shape[:1]) + tuple(args[0].shape[-2:]),
                                              candidates.handed_out)))
    try:
        batched = collect_statistics(candidates, tiny, NFDSConfig(batch_size=3), progress=False)
    finally:
        handle.remove()
    sizes = [(shape[0], shape[1]) for shape, _ in forwards]
    assert sizes == [(3, 70), (2, 70), (2, 56), (3, 70)]
    # Each forward sees only the candidates handed out so far, at most one past its batch (the one
    # whose different shape closed the batch).
    done = 0
    for (batch, _), handed_out in zip(sizes, [h for _, h in forwards], strict=True):
        done += batch
        assert done <= handed_out <= done + 1
    single = collect_statistics(samples, tiny, NFDSConfig(batch_size=1), progress=False)
    _assert_same_statistics(batched, single)


def test_nonfinite_activations_name_the_candidate_within_a_batch(tiny, pool):
    """Per-sample hooks: an overflowing candidate in the middle of a batch is the one named."""
    samples = {f"c{i}": pool[i] for i in range(6)}
    samples["c4"] = pool[4] * 3e38  # finite input that overflows to Inf in the normalisation
    with pytest.raises(QVGGTError, match=r"candidate c4: NaN/Inf activations at the input of layer "
                                         r"aggregator\.frame_blocks\.0"):
        collect_statistics(samples, tiny, NFDSConfig(batch_size=4), progress=False)
    with pytest.raises(QVGGTError, match=r"candidate c4: NaN/Inf"):
        collect_statistics(samples, tiny, NFDSConfig(batch_size=1), progress=False)
    assert tiny.aggregator.cached_layers == frozenset(range(4))  # restored after a failed pass too
    samples["c2"] = pool[2].clone()
    samples["c2"][1, 0, 5, 5] = float("nan")  # a NaN pixel: named as bad input, before c4 (pool order)
    with pytest.raises(QVGGTError, match=r"candidate c2: the input images contain NaN/Inf"):
        collect_statistics(samples, tiny, NFDSConfig(batch_size=4), progress=False)


def test_batch_size_validated():
    for bad in (0, -1, True, 2.0, "8"):
        with pytest.raises(QVGGTError, match="NFDSConfig.batch_size"):
            NFDSConfig(batch_size=bad)
    config = NFDSConfig(batch_size=16)
    assert NFDSConfig.from_dict(config.to_dict()) == config
    legacy = config.to_dict()
    del legacy["batch_size"]  # selections saved before the field existed still load
    assert NFDSConfig.from_dict(legacy).batch_size == 8
