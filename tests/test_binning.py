import json
import math

import numpy as np
import pytest

from miro.rewards.binning import RewardBins, bin_index, bin_span, bin_values, quantile_edges


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
    # non-finite scores take no part in the edges
    assert quantile_edges([0.0, np.inf, 1.0, 2.0, -np.inf, np.nan, 3.0, 4.0], num_bins=4) == edges
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
    assert math.isnan(b.values({"binary": float("inf")})["binary"])  # non-finite: no value


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


def test_spread_ties_closed_form_and_draws():
    # The 8-bin discrete reward above: 0.0 spans bins 0-1, 0.5 bins 1-3, 1.0 bins 3-7.
    b = RewardBins(8, {"r": [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]}, ties="spread")
    lo, hi = bin_span(b.edges["r"], [0.0, 0.5, 1.0])
    assert lo.tolist() == [0, 1, 3] and hi.tolist() == [1, 3, 7]
    # Quantile positions drawn from [0, 1.5), [1.5, 3.5) and [3.5, 8): the end bins of a run are
    # half-weighted except at the data's extremes. Expected bins 1/3, 2 and 23.5/4.5.
    np.testing.assert_allclose(b.value("r", np.array([0.0, 0.5, 1.0])), [1 / 21, 2 / 7, 23.5 / 4.5 / 7])
    rng = np.random.default_rng(0)
    draws = np.rint(b.value("r", np.full(45_000, 1.0), rng) * 7).astype(int)
    freq = np.bincount(draws, minlength=8) / 45_000
    np.testing.assert_allclose(freq, [0, 0, 0, 1 / 9, 2 / 9, 2 / 9, 2 / 9, 2 / 9], atol=0.01)
    assert math.isnan(b.value("r", float("nan"), rng))
    # the best and worst scores reach the extreme values 1.0 and 0.0 without a pin
    assert b.value("r", np.full(200, 1.0), rng).max() == 1.0 and b.value("r", np.full(200, 0.0), rng).min() == 0.0
    # trained values: every bin under spread, three values under midrank
    assert b.trained_values("r") == [i / 7 for i in range(8)]
    assert RewardBins(8, b.edges).trained_values("r") == [0.0, 2 / 7, 1.0]


def test_spread_makes_a_discrete_reward_uniform_and_leaves_continuous_scores_alone():
    rng = np.random.default_rng(1)
    # 84 % perfect scores, the rest on six levels (the shape of Shapes counting)
    x = np.where(rng.random(20_000) < 0.84, 1.0, rng.integers(0, 6, 20_000) / 6)
    mid, spread = RewardBins.fit({"c": x}, 16), RewardBins.fit({"c": x}, 16, ties="spread")
    h_mid = np.bincount(np.rint(mid.value("c", x) * 15).astype(int), minlength=16) / x.size
    h_spread = np.bincount(np.rint(spread.value("c", x, rng) * 15).astype(int), minlength=16) / x.size
    assert h_mid.max() > 0.8 and (h_mid > 0).sum() <= 7  # one value holds the perfect scores
    assert np.all(np.abs(h_spread - 1 / 16) < 0.01)  # near-uniform over all 16 bins
    assert np.all(np.diff(spread.value("c", np.unique(x))) >= 0)  # expected values keep the order
    # a continuous reward: no score equals an edge, so the two rules agree, draw or not
    y = rng.normal(size=5_000)
    c_mid, c_spread = RewardBins.fit({"y": y}, 64), RewardBins.fit({"y": y}, 64, ties="spread")
    z = rng.normal(size=2_000) * 2
    np.testing.assert_array_equal(c_mid.value("y", z), c_spread.value("y", z))
    np.testing.assert_array_equal(c_mid.value("y", z), c_spread.value("y", z, rng))


def test_tie_rule_round_trip_and_bad_rule(tmp_path):
    b = RewardBins(4, {"a": [0, 0, 0, 1, 1]}, ties="spread")
    assert RewardBins.load(b.save(tmp_path / "b.json")).ties == "spread"
    assert RewardBins.from_dict({"num_bins": 4, "edges": {"a": [0, 1, 2, 3, 4]}}).ties == "midrank"  # older files
    with pytest.raises(ValueError, match="unknown tie rule 'mean'.*midrank.*spread"):
        RewardBins(4, {"a": [0, 1, 2, 3, 4]}, ties="mean")


def test_per_reward_tie_rules_match_the_uniform_rules_and_their_draws(tmp_path):
    edges = {"a": [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0], "b": [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
             "c": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}
    mixed = RewardBins(8, edges, ties={"b": "spread", "c": "spread"})
    spread, mid = RewardBins(8, edges, ties="spread"), RewardBins(8, edges)
    assert [mixed.rule(k) for k in "abc"] == ["midrank", "spread", "spread"]  # unnamed: midrank
    x = np.array([0.0, 0.5, 1.0, 0.25, 0.7])
    np.testing.assert_array_equal(mixed.value("a", x), mid.value("a", x))
    np.testing.assert_array_equal(mixed.value("b", x), spread.value("b", x))
    assert mixed.trained_values("a") == mid.trained_values("a")
    assert mixed.trained_values("b") == spread.trained_values("b") == [i / 7 for i in range(8)]
    # sample by sample, a spread reward gets the draws a run spreading every reward would give it
    r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
    for s in ({"a": 1.0, "b": 1.0, "c": 0.35}, {"a": 0.5, "b": 0.0, "c": 0.05}, {"a": None, "b": 1.0, "c": 0.8}):
        vm, vs = mixed.values(s, rng=r1), spread.values(s, rng=r2)
        assert vm["b"] == vs["b"] and vm["c"] == vs["c"]
        assert vm["a"] == mid.values(s)["a"] or (math.isnan(vm["a"]) and math.isnan(vs["a"]))
    assert r1.random() == r2.random()  # the two streams stay in step
    loaded = RewardBins.load(mixed.save(tmp_path / "m.json"))
    assert loaded.ties == {"b": "spread", "c": "spread"} and loaded.rule("a") == "midrank"
    with pytest.raises(ValueError, match="unknown tie rule 'mean' for reward 'b'"):
        RewardBins(8, edges, ties={"b": "mean"})
    with pytest.raises(ValueError, match=r"tie rules name rewards \['zz'\] that are not binned"):
        RewardBins(8, edges, ties={"zz": "spread"})
