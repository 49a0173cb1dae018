"""The helpers of benchmarks/method_auto.py: the two verdict (noise) rules, the per-sequence evaluation, the auto
variants and the real-clip window split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import dsfq_ablation  # noqa: E402
import method_auto  # noqa: E402


def test_verdict_picks_lowest_median_and_its_seed_range_as_noise():
    single = {"a": [1.0, 5.0, 2.0], "b": [1.5, 1.6, 1.9], "c": [3.0, 3.0, 3.0]}  # medians 2.0, 1.6, 3.0
    got = method_auto.verdict(single, auto=[1.8, 2.0, 1.9])  # median 1.9
    assert got["best"] == "b"
    assert got["best_median"] == pytest.approx(1.6)
    assert got["noise"] == pytest.approx(0.4)  # 1.9 - 1.5
    assert got["gap"] == pytest.approx(0.3)
    assert got["within"] is True


def test_verdict_says_no_beyond_noise_and_yes_when_auto_is_better():
    single = {"a": [1.0, 1.1, 1.2], "b": [2.0, 2.0, 2.0]}
    assert method_auto.verdict(single, auto=[1.5, 1.4, 1.6])["within"] is False  # gap 0.4 > noise 0.2
    assert method_auto.verdict(single, auto=[1.3, 1.3, 1.3])["within"] is True  # gap 0.2 == noise
    better = method_auto.verdict(single, auto=[0.5, 0.6, 0.7])
    assert better["within"] is True and better["gap"] == pytest.approx(-0.5)


def test_verdict_refuses_missing_seeds():
    with pytest.raises(ValueError, match="at least one seed"):
        method_auto.verdict({"a": []}, auto=[1.0])


def test_bootstrap_verdict_says_no_for_a_constant_gap_and_yes_for_equal_or_better():
    best = [[1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5]]  # [seed][sequence]
    worse = method_auto.bootstrap_verdict({"b": best}, auto=[[x + 0.5 for x in row] for row in best])
    assert (worse["diff"], worse["low"], worse["high"]) == pytest.approx((0.5, 0.5, 0.5))
    assert worse["within"] is False
    same = method_auto.bootstrap_verdict({"b": best}, auto=best)
    assert (same["diff"], same["low"], same["high"], same["within"]) == (0.0, 0.0, 0.0, True)
    better = method_auto.bootstrap_verdict({"b": best}, auto=[[x - 0.1 for x in row] for row in best])
    assert better["high"] < 0 and better["within"] is True


def test_bootstrap_verdict_is_paired_and_its_interval_spans_the_per_sequence_spread():
    spread = [[0.0, 100.0, 3.0, 50.0, 20.0, 70.0]] * 2  # sequences differ a lot, both methods alike
    # auto is worse by 0.01 on every sequence: tiny against the spread, but paired it is a sure difference.
    tiny = method_auto.bootstrap_verdict({"b": spread}, auto=[[x + 0.01 for x in row] for row in spread])
    assert tiny["low"] == pytest.approx(0.01) and tiny["within"] is False
    # Differences +1, -1 alternating: mean 0, so the interval holds 0; every resampled mean lies in [-1, 1].
    mixed = method_auto.bootstrap_verdict({"b": spread}, auto=[[x + (-1) ** i for i, x in enumerate(row)]
                                                                for row in spread])
    assert mixed["diff"] == pytest.approx(0.0)
    assert -1.0 <= mixed["low"] < 0 < mixed["high"] <= 1.0 and mixed["within"] is True
    # All differences positive (0.9..1.1): the interval lies within (0.9, 1.1), above 0.
    positive = method_auto.bootstrap_verdict({"b": spread}, auto=[[x + 1 + 0.1 * (-1) ** i for i, x in enumerate(row)]
                                                                   for row in spread])
    assert 0.9 <= positive["low"] <= positive["high"] <= 1.1 and positive["within"] is False
    again = method_auto.bootstrap_verdict({"b": spread}, auto=[[x + (-1) ** i for i, x in enumerate(row)]
                                                               for row in spread])
    assert again == mixed  # a fixed resampling seed


def test_bootstrap_verdict_best_is_the_lowest_pooled_mean_not_the_lowest_median():
    spiky = [[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]  # per-seed means 0, 0, 10: median 0, mean 3.33
    flat = [[1.0, 1.0]] * 3  # median 1, mean 1
    auto = [[1.0, 1.0]] * 3
    assert method_auto.verdict({"spiky": [0, 0, 10], "flat": [1, 1, 1]}, auto=[1, 1, 1])["best"] == "spiky"
    got = method_auto.bootstrap_verdict({"spiky": spiky, "flat": flat}, auto=auto)
    assert got["best"] == "flat" and got["best_mean"] == pytest.approx(1.0) and got["within"] is True


def test_bootstrap_verdict_refuses_ragged_or_single_sequence_input():
    with pytest.raises(ValueError, match="at least 2 held-out sequences"):
        method_auto.bootstrap_verdict({"b": [[1.0]]}, auto=[[1.0]])
    with pytest.raises(ValueError, match="same"):
        method_auto.bootstrap_verdict({"b": [[1.0, 2.0]]}, auto=[[1.0, 2.0], [1.0, 2.0]])


def test_variants_apply_their_settings_and_auto_recon_needs_reconstruction(capsys):
    assert method_auto.variant_config("auto-layer", 1, 0).auto_granularity == "layer"
    recon = method_auto.variant_config("auto-recon", 1, 5)
    assert (recon.method, recon.auto_criterion, recon.recon_iters) == ("auto", "reconstructed", 5)
    assert method_auto.available_variants(list(method_auto.VARIANTS), 0) == ["auto", "auto-layer"]
    assert method_auto.available_variants(list(method_auto.VARIANTS), 20) == ["auto", "auto-layer", "auto-recon"]


def test_evaluate_per_sequence_averages_to_dsfq_ablations_evaluate():
    from qvggt_export.model import build_vggt
    from qvggt_export.quant.calibrate import calibrate
    from qvggt_export.quant.config import QuantConfig

    config = dsfq_ablation.model_config("preset")
    held_out = dsfq_ablation._batches(2, seed=7)
    float_model = build_vggt(config)
    with torch.no_grad():
        references = [(float_model(x), float_model.aggregator(x)[0][-1]) for x in held_out]
    model = build_vggt(config)
    calibrate(model, QuantConfig(bits="w4a4", method="rtn"), held_out)
    per_sequence = method_auto.evaluate_per_sequence(model, references, held_out)
    assert set(per_sequence) == set(method_auto.ALL_METRICS)
    assert all(len(values) == 2 for values in per_sequence.values())
    assert per_sequence["depth"][0] != per_sequence["depth"][1]  # two sequences, two values
    means = dsfq_ablation.evaluate(model, references, held_out)
    assert {k: sum(per_sequence[k]) / 2 for k in means} == pytest.approx(means, rel=1e-12)
    assert all(v > 0 for v in per_sequence["abs_rel"])  # W4A4 changes the depth


def test_split_windows_by_time_keeps_halves_apart_and_drops_straddlers():
    ids = ["room[0:4:1]", "room[4:8:1]", "room[2:6:1]", "room[1:8:2]",  # length 8, half 4
           "v.mp4[0:10:3]", "v.mp4[10:20:3]", "v.mp4[11:15:1]", "v.mp4[5:9:1]"]  # length 20, half 10
    split = method_auto.split_windows_by_time(ids)
    assert split == {"room": {"calibration": [0], "held_out": [1]},
                     "v.mp4": {"calibration": [4, 7], "held_out": [5, 6]}}


def test_split_windows_by_time_refuses_other_ids():
    with pytest.raises(ValueError, match="window id"):
        method_auto.split_windows_by_time(["synthetic/seed0/0001"])


def test_round_robin_takes_one_per_group_before_seconds_and_stops_when_empty():
    groups = {"a": [0, 1, 2], "b": [10], "c": [20, 21]}
    chosen = method_auto.round_robin(groups, 3, np.random.default_rng(0))
    assert sorted(i // 10 for i in chosen) == [0, 1, 2]
    everything = method_auto.round_robin(groups, 10, np.random.default_rng(1))
    assert sorted(everything) == [0, 1, 2, 10, 20, 21]
    assert method_auto.round_robin(groups, 4, np.random.default_rng(5)) == \
        method_auto.round_robin(groups, 4, np.random.default_rng(5))


def _walk(*blocks: tuple[str, dict[str, tuple[float, float]]]) -> dict:
    """One auto run's selection: per block, the chosen method and each candidate's (special, patch) errors."""
    return {"selection": {"blocks": {
        f"aggregator.frame_blocks.{i}": {
            "method": chosen, "errors": {m: (s + p) / 2 for m, (s, p) in parts.items()},
            "token_errors": {m: {"special": s, "patch": p} for m, (s, p) in parts.items()}}
        for i, (chosen, parts) in enumerate(blocks)}}}


def test_miss_diagnostics_counts_where_the_winner_measured_lower():
    runs = [
        _walk(("smooth_rotate", {"rtn": (0.1, 0.9), "smooth_rotate": (0.2, 0.3)}),  # winner lower on special only
              ("rtn", {"rtn": (0.1, 0.1), "smooth_rotate": (0.2, 0.3)})),  # auto chose the winner here
        _walk(("smooth_rotate", {"rtn": (0.3, 0.2), "smooth_rotate": (0.2, 0.3)}),  # lower on patch; a tie overall
              ("smooth_rotate", {"smooth_rotate": (0.2, 0.3)})),  # the winner was not measured: not counted
    ]
    counts = method_auto.miss_diagnostics(runs, "rtn")
    assert counts == {"blocks": 3, "chose_winner": 1, "special": 1, "patch": 1, "criterion": 0}
    assert method_auto.miss_diagnostics([{"selection": {"blocks": {}}}], "rtn")["blocks"] == 0
