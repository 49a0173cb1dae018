"""The pure helpers of benchmarks/method_auto.py: the verdict (noise) rule and the real-clip window split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

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
