import json
import math

import numpy as np
import pytest

from miro.rewards.binning import RewardBins, bin_index, bin_values, quantile_edges


def test_uniform_scores_give_uniform_bins():
    # 64 bins over 6400 evenly spaced scores: each bin holds exactly 100 scores.
    x = np.arange(6400, dtype=np.float64)
    bins = RewardBins.fit({"r": x}, num_bins=64)
    idx = bin_index(bins.edges["r"], x)
    counts = np.bincount(idx.astype(int), minlength=64)
    assert counts.min() >= 99 and counts.max() <= 101
    v = bins.value("r", x)
    assert v.min() == 0.0 and v.max() == 1.0
    # value = index / (B - 1)
    np.testing.assert_allclose(v, idx / 63)
    assert np.all(np.diff(v) >= 0)  # monotone in the score


def test_closed_form_four_bins():
    edges = quantile_edges([0.0, 1.0, 2.0, 3.0, 4.0], num_bins=4)
    assert edges == [0.0, 1.0, 2.0, 3.0, 4.0]
    # bins: [0,1) -> 0, [1,2) -> 1, [2,3) -> 2, [3,..] -> 3; outside range clips
    got = bin_values(edges, [-5.0, 0.5, 1.0, 2.5, 3.0, 4.0, 99.0])
    np.testing.assert_allclose(got, [0, 0, 1 / 3, 2 / 3, 1, 1, 1])


def test_interior_ties_take_middle_bin_extremes_are_pinned_and_nan_is_kept():
    # 8 bins of a discrete reward, {0: 1/4, 0.5: 1/4, 1: 1/2} of the mass.
    b = RewardBins(8, {"r": [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]})
    # 0.5 equals edges[2] and edges[3], spanning bins 1-3: its middle bin is 2, value 2/7.
    assert b.value("r", 0.5) == pytest.approx(2 / 7)
    # The best score is the strongest value and the worst the weakest, although a mid-rank
    # would put 1.0 at bin 5 (5/7) and 0.0 at bin 1 (1/7).
    assert b.value("r", 1.0) == 1.0 and b.value("r", 0.0) == 0.0
    assert b.value("r", 2.0) == 1.0 and b.value("r", -1.0) == 0.0
    binary = RewardBins.fit({"binary": np.array([0.0] * 50 + [1.0] * 50)}, num_bins=8)
    assert binary.value("binary", 0.0) == 0.0 and binary.value("binary", 1.0) == 1.0
    assert RewardBins.fit({"c": np.full(10, 0.3)}, num_bins=4).value("c", 0.3) == 0.0  # constant
    b = binary
    assert math.isnan(b.value("binary", float("nan")))
    vals = b.values({"binary": None})
    assert math.isnan(vals["binary"])
    assert math.isnan(b.values({"binary": "oops"})["binary"])


def test_round_trip_json(tmp_path):
    rng = np.random.default_rng(0)
    b = RewardBins.fit({"a": rng.normal(size=500), "b": np.r_[rng.uniform(size=300), [np.nan] * 10]}, num_bins=16)
    p = b.save(tmp_path / "reward_bins.json")
    d = json.loads(p.read_text())
    assert d["num_bins"] == 16 and set(d["edges"]) == {"a", "b"} and len(d["edges"]["a"]) == 17
    b2 = RewardBins.load(p)
    x = rng.normal(size=50)
    np.testing.assert_array_equal(b.value("a", x), b2.value("a", x))
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_input():
    with pytest.raises(ValueError, match="num_bins"):
        quantile_edges([1.0, 2.0], num_bins=1)
    with pytest.raises(ValueError, match="no finite"):
        quantile_edges([np.nan], num_bins=4)
    with pytest.raises(ValueError, match="expected 5 edges"):
        RewardBins(4, {"a": [0, 1, 2]})
    with pytest.raises(ValueError, match="no bin edges for reward 'zz'"):
        RewardBins(4, {"a": [0, 1, 2, 3, 4]}).value("zz", 1.0)
