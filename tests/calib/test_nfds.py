"""NFDS: eq. 9-13 on hand-made statistics, strategies, errors, and end-to-end on the tiny VGGT."""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch

from qvggt_export.calib import (
    CalibrationSelection,
    CandidateStatistics,
    NFDSConfig,
    SampleRef,
    build_candidate_pool,
    cluster_vectors,
    collect_statistics,
    default_nfds_layers,
    frame_correlation,
    outlier_scores,
    pca_2d,
    percentile_filter,
    sample_per_cluster,
    select_calibration_set,
    select_from_statistics,
    selection_table,
    write_selection_report,
)
from qvggt_export.errors import QVGGTError
from qvggt_export.model import build_vggt
from tests.conftest import require_shared_data

# --------------------------------------------------------------------------------------------------
# Hand-made statistics
# --------------------------------------------------------------------------------------------------


def _stats(n=40, layers=4, dim=3, outlier=7, seed=0, clusters=4) -> CandidateStatistics:
    """Well-behaved candidates, one planted outlier, and correlation vectors in ``clusters`` tight groups."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (n, layers))
    variances = rng.uniform(1.0, 2.0, (n, layers))
    means[outlier] += 25.0  # a massive-activation sample: far from the pool in every layer
    variances[outlier] *= 30.0
    centres = rng.uniform(-1.0, 1.0, (clusters, dim)) * 5.0
    truth = np.arange(n) % clusters
    vectors = centres[truth] + rng.normal(0.0, 0.01, (n, dim))
    refs = [SampleRef(id=f"c{i:02d}", kind="tensor") for i in range(n)]
    return CandidateStatistics(ids=[r.id for r in refs], refs=refs, layers=tuple(f"l{j}" for j in range(layers)),
                               means=means, variances=variances, vectors=vectors, frames=dim + 1)


def test_outlier_score_matches_eq10_by_hand():
    means = np.array([[0.0, 10.0], [2.0, 10.0], [4.0, 10.0]])
    variances = np.array([[1.0, 5.0], [1.0, 7.0], [1.0, 9.0]])
    scores = outlier_scores(means, variances, eps=1e-12)
    # Layer 0 means: mu 2, sigma sqrt(8/3); layer 1 variances: nu 7, tau sqrt(8/3); constant columns give 0.
    z = 2.0 / math.sqrt(8.0 / 3.0)
    np.testing.assert_allclose(scores, [math.sqrt(2 * z * z), 0.0, math.sqrt(2 * z * z)], rtol=1e-12)


def test_planted_outlier_scores_highest_and_is_filtered():
    stats = _stats()
    scores = outlier_scores(stats.means, stats.variances)
    assert int(np.argmax(scores)) == 7
    assert scores[7] > 3 * np.partition(scores, -2)[-2]  # clearly apart from the runner-up
    kept = percentile_filter(scores, 0.1)
    assert not kept[7]
    assert kept.sum() == 36  # floor(0.1 * 40) = 4 dropped


def test_percentile_filter_drops_top_fraction_with_deterministic_ties():
    assert percentile_filter(np.arange(400.0), 0.2).sum() == 320  # 0.2 * 400 is exactly 80 dropped
    kept = percentile_filter(np.array([5.0, 1.0, 9.0, 3.0, 9.0]), 0.4)  # floor(2.0) = 2 dropped: both 9s
    assert kept.tolist() == [True, True, False, True, False]
    kept = percentile_filter(np.array([1.0, 7.0, 7.0, 7.0]), 0.25)  # one of the tied 7s goes: the last
    assert kept.tolist() == [True, True, True, False]
    assert percentile_filter(np.array([3.0, 1.0]), 0.0).all()
    with pytest.raises(QVGGTError, match="p must be in"):
        percentile_filter(np.ones(3), 1.0)


def test_frame_correlation_eq12():
    features = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    np.testing.assert_allclose(frame_correlation(features), [0.0, 1 / math.sqrt(2), -1.0], atol=1e-12)
    assert frame_correlation(torch.ones(1, 5)).shape == (0,)


def test_clusters_recovered_on_separable_vectors():
    from sklearn.metrics import adjusted_rand_score

    stats = _stats(n=48, clusters=4)
    labels, used = cluster_vectors(stats.vectors, k=4, seed=0, n_init=5)
    assert used == 4
    assert adjusted_rand_score(np.arange(48) % 4, labels) == 1.0


def test_k_larger_than_distinct_vectors_is_lowered(caplog):
    vectors = np.repeat(np.array([[0.0, 1.0], [1.0, 0.0], [5.0, 5.0]]), 3, axis=0)
    with caplog.at_level(logging.WARNING):
        labels, used = cluster_vectors(vectors, k=8)
    assert used == 3
    assert len(set(labels.tolist())) == 3
    assert "using K=3" in caplog.text


def test_budget_met_exactly_with_short_clusters():
    labels = np.array([0] + [1] * 2 + [2] * 10 + [3] * 3)
    for budget in range(1, len(labels) + 1):
        chosen = sample_per_cluster(labels, budget, seed=1)
        assert len(chosen) == budget and len(set(chosen.tolist())) == budget
        counts = np.bincount(labels[chosen], minlength=4)
        # Uniform per cluster: no cluster with members left is more than one behind another.
        sizes = np.bincount(labels)
        unfinished = counts < sizes
        if unfinished.any():
            assert counts.max() - counts[unfinished].min() <= 1
    chosen = sample_per_cluster(labels, 9, seed=0)
    counts = np.bincount(labels[chosen], minlength=4)
    assert counts[0] == 1 and counts[1] == 2  # short clusters give all they have ...
    assert counts[2] + counts[3] == 6 and abs(int(counts[2]) - int(counts[3])) <= 1  # ... the others the rest
    with pytest.raises(QVGGTError, match="cannot pick 17"):
        sample_per_cluster(labels, 17)


@pytest.mark.parametrize("strategy", ["nfds", "random", "filtered", "clustered"])
def test_strategies_meet_budget_and_are_deterministic(strategy):
    stats = _stats()
    config = NFDSConfig(strategy=strategy, budget=8, p=0.1, k=4, seed=3, n_init=3)
    first = select_from_statistics(stats, config)
    again = select_from_statistics(stats, config)
    assert first.selected_indices == again.selected_indices
    assert len(first.selected_indices) == 8 == len(set(first.selected_indices))
    assert first.selected_ids == [f"c{i:02d}" for i in first.selected_indices]
    if strategy in ("filtered", "nfds"):
        assert 7 not in first.selected_indices and not first.kept[7]
        assert first.kept.sum() == 36
    else:
        assert first.kept.all()
    if strategy in ("clustered", "nfds"):
        assert first.k_used == 4
        picked = np.bincount(first.labels[first.selected_indices], minlength=4)
        assert picked.tolist() == [2, 2, 2, 2]  # 8 samples over 4 clusters: uniform
        if strategy == "nfds":
            assert first.labels[7] == -1
    else:
        assert first.labels is None


def test_random_depends_on_seed_and_ignores_statistics():
    stats = _stats()
    picks = {tuple(select_from_statistics(stats, NFDSConfig(strategy="random", budget=8, seed=s)).selected_indices)
             for s in range(4)}
    assert len(picks) == 4
    # The planted outlier can be drawn by "random" (it is never by "filtered"/"nfds").
    drawn = [7 in select_from_statistics(stats, NFDSConfig(strategy="random", budget=20, seed=s)).selected_indices
             for s in range(10)]
    assert any(drawn)


def test_config_validation():
    for bad in (dict(strategy="kmeans"), dict(budget=0), dict(p=1.0), dict(p=-0.1), dict(k=0), dict(seed=-1),
                dict(layers="aggregator.frame_blocks.0"), dict(layers=[]), dict(pool_tokens="cls"),
                dict(correlation="mean"), dict(eps=0.0), dict(n_init=True)):
        with pytest.raises(QVGGTError, match="NFDSConfig"):
            NFDSConfig(**bad)
    config = NFDSConfig(layers=["a.b", "c"])
    assert config.layers == ("a.b", "c")
    assert NFDSConfig.from_dict(config.to_dict()) == config
    with pytest.raises(QVGGTError, match="unknown NFDSConfig"):
        NFDSConfig.from_dict({"budgt": 3})


def test_selection_errors():
    stats = _stats(n=10)
    with pytest.raises(QVGGTError, match="has 10 samples, fewer than the calibration budget 11"):
        select_from_statistics(stats, NFDSConfig(budget=11))
    with pytest.raises(QVGGTError, match="keeps 8 of 10 candidates, fewer than the calibration budget 9"):
        select_from_statistics(stats, NFDSConfig(budget=9, p=0.2))
    empty = CandidateStatistics(ids=[], refs=[])
    with pytest.raises(QVGGTError, match="empty"):
        select_from_statistics(empty, NFDSConfig(budget=1))
    with pytest.raises(QVGGTError, match="empty"):
        select_calibration_set([], None, NFDSConfig(budget=1))
    with pytest.raises(QVGGTError, match="has 2 samples, fewer than the calibration budget 3"):
        select_calibration_set([torch.rand(2, 3, 14, 14)] * 2, None, NFDSConfig(strategy="random", budget=3))
    with pytest.raises(QVGGTError, match="needs the floating-point model"):
        select_calibration_set([torch.rand(2, 3, 14, 14)] * 2, None, NFDSConfig(budget=1))


def test_selection_json_round_trip_and_report(tmp_path):
    selection = select_from_statistics(_stats(), NFDSConfig(budget=8, p=0.1, k=4, n_init=3))
    path = selection.save(tmp_path / "sub" / "selection.json")
    assert json.loads(path.read_text())["format"] == "qvggt-nfds-selection/1"
    assert not [p for p in path.parent.iterdir() if p.name != "selection.json"]  # no temp file left behind
    loaded = CalibrationSelection.load(path)
    assert loaded.selected_ids == selection.selected_ids
    assert loaded.config == selection.config
    np.testing.assert_array_equal(loaded.labels, selection.labels)
    np.testing.assert_allclose(loaded.scores, selection.scores)
    np.testing.assert_array_equal(loaded.kept, selection.kept)

    table = selection_table(selection)
    assert "kept 36 of 40" in table and "**c07**" not in table  # the outlier is neither kept nor selected
    assert table.count("| yes |") >= 8
    csv_rows = selection_table(selection, "csv").splitlines()
    assert csv_rows[0].startswith("index,id,score,kept,cluster,selected,c_1") and len(csv_rows) == 41
    written = write_selection_report(selection, tmp_path / "report")
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    coords, explained = pca_2d(selection.vectors)
    assert coords.shape == (40, 2) and 0.99 < explained.sum() <= 1.0 + 1e-9  # 3-D data: 2 axes hold most

    with pytest.raises(QVGGTError, match="not an NFDS selection"):
        (tmp_path / "other.json").write_text("{}")
        CalibrationSelection.load(tmp_path / "other.json")
    with pytest.raises(QVGGTError, match="not found"):
        CalibrationSelection.load(tmp_path / "missing.json")


def test_random_selection_report_skips_plot(tmp_path, caplog):
    stats = CandidateStatistics(ids=["a", "b", "c"], refs=[SampleRef(id=i, kind="tensor") for i in "abc"])
    selection = select_from_statistics(stats, NFDSConfig(strategy="random", budget=2))
    with caplog.at_level(logging.WARNING):
        written = write_selection_report(selection, tmp_path)
    assert "plot" not in written and "plot skipped" in caplog.text
    assert "strategy: **random**" in written["markdown"].read_text()


# --------------------------------------------------------------------------------------------------
# End to end on the tiny VGGT
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_vggt("tiny")


@pytest.fixture(scope="module")
def pool():
    return build_candidate_pool("synthetic", frames=3, target_size=70, pool_size=12, seed=0)


@pytest.fixture(scope="module")
def statistics(tiny, pool):
    return collect_statistics(pool, tiny, NFDSConfig(budget=4, k=3), progress=False)


def test_default_layers_are_last_blocks(tiny):
    assert default_nfds_layers(tiny) == tuple(f"aggregator.{k}.{i}" for k in ("frame_blocks", "global_blocks")
                                              for i in range(4))
    assert default_nfds_layers(tiny, 1) == ("aggregator.frame_blocks.3", "aggregator.global_blocks.3")
    with pytest.raises(QVGGTError, match="not found in the model"):
        collect_statistics([torch.rand(2, 3, 28, 28)], tiny, NFDSConfig(layers=("aggregator.frame_blocks.9",)),
                           progress=False)
    with pytest.raises(QVGGTError, match="needs a VGGT model"):
        collect_statistics([torch.rand(2, 3, 28, 28)], torch.nn.Linear(2, 2), progress=False)


def test_statistics_match_a_manual_forward(tiny, pool, statistics):
    """Eq. 9 and eq. 12 from the pass equal the same quantities computed by hand for one candidate."""
    sample = pool[5]
    seen = {}
    handle = tiny.aggregator.global_blocks[2].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            outputs, _ = tiny.aggregator(sample[None])
    finally:
        handle.remove()
    j = statistics.layers.index("aggregator.global_blocks.2")
    assert statistics.means[5, j] == pytest.approx(seen["x"].mean().item(), rel=1e-5, abs=1e-7)
    assert statistics.variances[5, j] == pytest.approx(seen["x"].var(unbiased=False).item(), rel=1e-5)
    # Eq. 12 as the paper defines it (the default): frame t's patch tokens [s, 2C] flattened to one s x 2C
    # vector, cosine with frame 0's; camera and register tokens (the first patch_start_idx) dropped.
    patches = outputs[-1][0, :, tiny.aggregator.patch_start_idx:].double()  # [S, s, 2C]
    flat = patches.flatten(1)
    np.testing.assert_allclose(statistics.vectors[5], torch.cosine_similarity(flat[:1], flat[1:]).numpy(),
                               rtol=1e-6)
    # The earlier pooled form, kept as an option: each frame's tokens (all of them) mean-pooled first.
    pooled_stats = collect_statistics([pool[5]], tiny, NFDSConfig(correlation="pooled"), progress=False)
    pooled = outputs[-1][0].double().mean(dim=1)  # last layer [S, P, 2C] -> [S, 2C]
    np.testing.assert_allclose(pooled_stats.vectors[0], torch.cosine_similarity(pooled[:1], pooled[1:]).numpy(),
                               rtol=1e-6)
    assert not np.allclose(pooled_stats.vectors[0], statistics.vectors[5], rtol=1e-3)  # the forms differ
    assert statistics.means.shape == (12, 8) and statistics.vectors.shape == (12, 2)
    assert statistics.timing["per_candidate_s"] > 0


def test_end_to_end_tiny_model(tiny, pool, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.train()
    results = {}
    for strategy in ("nfds", "random"):  # "filtered"/"clustered" run the same pass (covered on hand-made stats)
        selection = select_calibration_set(pool, tiny, NFDSConfig(strategy=strategy, budget=4, k=3, seed=0),
                                           progress=False)
        assert len(selection.selected) == 4 == len(set(selection.selected_ids))
        assert set(selection.selected_ids) <= set(pool.ids)
        results[strategy] = selection
    assert tiny.training  # mode restored ...
    tiny.eval()
    assert all(not b._forward_pre_hooks and not b._forward_hooks  # ... hooks removed ...
               for b in (*tiny.aggregator.frame_blocks, *tiny.aggregator.global_blocks))
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())  # ... weights untouched
    nfds = results["nfds"]
    assert nfds.kept.sum() == 10 and (nfds.labels[~nfds.kept] == -1).all()  # floor(0.2 * 12) = 2 dropped
    assert not set(np.flatnonzero(~nfds.kept)) & set(nfds.selected_indices)
    assert nfds.scores[~nfds.kept].min() >= nfds.scores[nfds.kept].max()
    assert results["random"].scores is None and "statistics_s" not in results["random"].timing
    assert nfds.timing["statistics_s"] > 0

    # Reuse: the saved selection reloads the very same samples.
    loaded = CalibrationSelection.load(nfds.save(tmp_path / "sel.json"))
    for index, sample in zip(loaded.selected_indices, loaded.samples(), strict=True):
        assert torch.equal(sample, pool[index])
    assert "plot" in write_selection_report(nfds, tmp_path / "report")


def test_same_statistics_serve_many_seeds(statistics):
    a = select_from_statistics(statistics, NFDSConfig(budget=4, k=3, seed=0))
    b = select_from_statistics(statistics, NFDSConfig(budget=4, k=3, seed=0))
    assert a.selected_ids == b.selected_ids
    many = {tuple(select_from_statistics(statistics, NFDSConfig(strategy="random", budget=4, seed=s)).selected_ids)
            for s in range(5)}
    assert len(many) > 1


def test_k_fallback_on_small_pool(statistics, caplog):
    with caplog.at_level(logging.WARNING):
        selection = select_from_statistics(statistics, NFDSConfig(budget=4, k=20, p=0.2))
    assert selection.k_used == 10 and "K lowered from 20 to 10" in selection.notes[0]
    assert "only 10 candidates to cluster" in caplog.text
    assert len(selection.selected) == 4


def test_nan_activations_name_candidate_and_layer(tiny, pool):
    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.aggregator.frame_blocks[2].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(QVGGTError, match=r"candidate synthetic/seed0/0000: NaN/Inf .* aggregator\.global_blocks\.2"):
        select_calibration_set(pool[:4], broken, NFDSConfig(budget=2), progress=False)
    images = torch.rand(2, 3, 28, 28)
    images[0, 0, 0, 0] = float("inf")
    with pytest.raises(QVGGTError, match="candidate bad: the input images contain NaN/Inf"):
        collect_statistics({"bad": images}, tiny, progress=False)


def test_in_memory_candidates_frames_and_patch_pooling(tiny, pool):
    tensors = {f"t{i}": pool[i] for i in range(4)}
    stats_all = collect_statistics(tensors, tiny, NFDSConfig(correlation="pooled", pool_tokens="all"), progress=False)
    stats_patch = collect_statistics(tensors, tiny, NFDSConfig(correlation="pooled", pool_tokens="patch"),
                                     progress=False)
    assert stats_all.ids == ["t0", "t1", "t2", "t3"]
    assert not np.allclose(stats_all.vectors, stats_patch.vectors)
    np.testing.assert_array_equal(stats_all.means, stats_patch.means)
    with pytest.raises(QVGGTError, match="has 2 frames, the others 3"):
        collect_statistics([pool[0], pool[1][:2]], tiny, progress=False)
    with pytest.raises(QVGGTError, match="expected images"):
        collect_statistics([torch.rand(3, 70, 70)], tiny, progress=False)
    with pytest.raises(QVGGTError, match="in-memory tensor and cannot be reloaded"):
        next(select_calibration_set(list(tensors.values()), None, NFDSConfig(strategy="random", budget=2)).samples())


def test_unreadable_candidates_skipped_or_named(tiny, tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    data = (tmp_path / "3.jpg").read_bytes()
    (tmp_path / "3.jpg").write_bytes(data[: len(data) // 3])  # header intact: found only when loaded
    strict = build_candidate_pool(tmp_path, frames=2, target_size=28, pool_size=None, strides=[1])
    with pytest.raises(QVGGTError, match=r"cannot read image .*3\.jpg"):
        select_calibration_set(strict, tiny, NFDSConfig(budget=2, k=2), progress=False)
    lenient = build_candidate_pool(tmp_path, frames=2, target_size=28, pool_size=None, strides=[1], skip_bad=True)
    selection = select_calibration_set(lenient, tiny, NFDSConfig(budget=2, k=2, p=0.0), progress=False)
    bad = [f"{tmp_path.name}[2:4:1]", f"{tmp_path.name}[3:5:1]"]
    assert selection.skipped == bad and len(selection.candidate_ids) == 3
    assert not set(bad) & set(selection.candidate_ids)

    # "random" neither runs the model nor loads a sample.
    monkeypatch.setattr(SampleRef, "load", lambda self: pytest.fail("random strategy loaded a sample"))
    picked = select_calibration_set(strict, None, NFDSConfig(strategy="random", budget=3, seed=1))
    assert len(picked.selected) == 3 and picked.frames == 2


def test_single_frame_candidates_fall_back_to_pooled_features(tiny, caplog):
    single = build_candidate_pool("synthetic", frames=1, target_size=70, pool_size=6, seed=1)
    with caplog.at_level(logging.WARNING):
        selection = select_calibration_set(single, tiny, NFDSConfig(budget=3, k=2, p=0.0), progress=False)
    assert "single-frame candidates" in caplog.text
    assert selection.vector_kind == "pooled_feature"
    assert selection.vectors.shape == (6, 2 * tiny.config.aggregator.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(selection.vectors, axis=1), 1.0, rtol=1e-9)
    assert len(selection.selected) == 3 and selection.k_used == 2


def test_real_data_end_to_end(tiny, tmp_path):
    data = require_shared_data()
    real = build_candidate_pool([data / "sequences", data / "videos"], frames=3, target_size=70, mode="pad",
                                pool_size=8, seed=0)
    selection = select_calibration_set(real, tiny, NFDSConfig(budget=3, k=2), progress=False)
    assert len(selection.selected) == 3 and selection.kept.sum() == 7
    assert {r.kind for r in real.refs} == {"images", "video"}
    loaded = CalibrationSelection.load(selection.save(tmp_path / "real.json"))
    assert all(s.shape == (3, 3, 70, 70) for s in loaded.samples())


def test_prefetch_gives_the_same_statistics_and_stops_its_reader(tiny, pool, statistics):
    import threading

    ahead = collect_statistics(pool, tiny, NFDSConfig(budget=4, k=3), progress=False, prefetch=2)
    for field_name in ("means", "variances", "vectors"):
        np.testing.assert_array_equal(getattr(ahead, field_name), getattr(statistics, field_name))  # CPU default: 0
    assert ahead.ids == statistics.ids
    # A failure in the loop (here: NaN activations on the first candidate) stops the background reader.
    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.aggregator.frame_blocks[0].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(QVGGTError, match="NaN/Inf"):
        collect_statistics(pool, broken, progress=False, prefetch=3)
    assert not any(t.name == "nfds-prefetch" for t in threading.enumerate())
    # A reader failure reaches the caller as the reader raised it.
    refs = [SampleRef(id="gone", kind="images", paths=("/nonexistent/0.png", "/nonexistent/1.png"))]
    from qvggt_export.calib import CandidatePool

    with pytest.raises(QVGGTError, match="image not found"):
        collect_statistics(CandidatePool(refs), tiny, progress=False, prefetch=1)
    with pytest.raises(QVGGTError, match="prefetch must be"):
        collect_statistics(pool, tiny, progress=False, prefetch=-1)


def test_flattened_correlation_compares_the_same_positions():
    """The paper's eq. 12 sees a spatial shift that leaves the mean-pooled feature unchanged."""
    from qvggt_export.calib import flattened_frame_correlation

    frame0 = torch.randn(16, 8, dtype=torch.float64)
    permuted = frame0[torch.randperm(16, generator=torch.Generator().manual_seed(0))]  # same tokens, moved
    tokens = torch.stack([frame0, frame0 * 3.0, permuted])  # [f=3, s=16, d=8]
    flattened = flattened_frame_correlation(tokens).numpy()
    assert flattened[0] == pytest.approx(1.0)  # a scaled copy: same direction
    assert flattened[1] < 0.9  # positions moved: a viewpoint change
    pooled = frame_correlation(tokens.mean(dim=1))
    assert pooled[1] == pytest.approx(1.0)  # the pooled form cannot tell
    batched = flattened_frame_correlation(torch.stack([tokens, tokens]))  # leading batch dimensions
    assert batched.shape == (2, 2) and torch.allclose(batched[1], torch.from_numpy(flattened))
    with pytest.raises(QVGGTError, match="frames, tokens, dim"):
        flattened_frame_correlation(torch.randn(4, 8))
