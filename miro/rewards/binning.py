"""Quantile binning of reward scores into MIRO's conditioning values.

MIRO conditions on each reward through a value in [0, 1] (1.0 = strongest, 0.0 = weakest). The
raw stored scores of a reward are mapped to B equal-mass bins (B = 64 for the release: the
published demo's sliders step by 1/64 and its app comments on "64-bin coherence quantisation"),
and the training value of a sample is ``bin_index / (B - 1)``. Equal-mass (quantile) bins give
each reward a near-uniform marginal, the "balanced representation across quality levels" the
paper describes; the quantile construction follows CAD's coherence binning (CAD
``cad/data/text_dataset.py``, 8 bins there).

Edges per reward are ``B + 1`` quantiles of the data at ``linspace(0, 1, B + 1)``. A score ``s``
falls in bin ``i`` when ``edges[i] <= s < edges[i + 1]`` (scores below the first edge go to bin
0, at or above the last inner edge to bin B - 1). Discrete rewards produce runs of equal edges;
a score equal to a repeated *interior* edge takes the middle bin of the bins that value spans
(its mid-rank) rather than collapsing onto one side of the run. The two ends are pinned: a score
at or above the data's maximum (the last edge) is bin B - 1, value 1.0, and one at or below its
minimum (the first edge) is bin 0, value 0.0, however much mass sits there. Without the pin a
reward whose best score is common (Shapes alignment: 1.0 for ~78 % of samples) would top out at
its mid-rank (~0.6), so the default inference target 1.0 ("strongest") would be a value the model
never saw in training. NaN or missing scores stay NaN (the model treats them as published: value
0 in training, zero embedding at inference).

That rule (``ties="midrank"``, the default) trains a discrete reward on a few values only: Shapes
counting on eight, seven of them below 0.16 and 1.0 for the 84 % of perfect scores, so nothing
teaches the values in between. ``ties="spread"`` draws a tied score's bin anew every time a
sample is read, uniformly over the quantile range its value fills (``bin_index``). That is the
randomised probability integral transform (Rüschendorf 2009, "On the distributional transform,
Sklar's theorem, and the empirical copula process"): the training values of any reward, discrete
or not, come out near-uniform on [0, 1], every value is trained, and the extremes need no pin
because the best score's range ends at bin B - 1. Where no draw is possible (translating a raw
score into an inference target) a spread score takes the draw's expected bin. Scores strictly
inside one bin map as under ``midrank``.

``ties`` may also name a rule per reward (``{"shapes_counting": "spread", ...}``; a reward not
named keeps ``midrank``), for instance to spread the tied bins of counting and position while
alignment keeps its pinned 1.0. A per-reward rule draws once per score for every reward, whatever
its rule, so a spread reward's draws are the ones a run spreading every reward would make.

On disk (``reward_bins.json`` beside a run and inside an exported pipeline folder)::

    {"num_bins": 64, "edges": {"clip_score": [65 floats], ...}, "ties": "midrank"}

(``ties``: a rule, or an object of one rule per reward; absent: ``midrank``, the rule of every
file written before it existed.)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from miro.io import atomic_write_text

DEFAULT_NUM_BINS = 64  # release value, see the module docstring
BINS_FILENAME = "reward_bins.json"
TIE_RULES = ("midrank", "spread")  # how a score equal to several edges is binned (module docstring)


def quantile_edges(scores: Iterable[float], num_bins: int = DEFAULT_NUM_BINS) -> list[float]:
    """``num_bins + 1`` quantile edges of the finite values in ``scores``."""
    if int(num_bins) < 2:
        raise ValueError(f"num_bins must be >= 2; got {num_bins!r}")
    x = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("cannot compute bin edges: no finite scores")
    return np.quantile(x, np.linspace(0.0, 1.0, int(num_bins) + 1)).tolist()


def _check_ties(ties: str) -> str:
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; choose from {list(TIE_RULES)}")
    return ties


def check_tie_rules(ties, keys: Iterable[str] | None = None) -> str | dict[str, str]:
    """``ties`` validated: a ``TIE_RULES`` entry, or a mapping reward key -> entry whose keys are
    among ``keys`` (when given; a single rule needs none). Returns the rule, or a plain dict of the
    mapping."""
    if isinstance(ties, str):
        return _check_ties(ties)
    if not isinstance(ties, Mapping):
        raise ValueError(f"ties must be one of {list(TIE_RULES)} or a mapping reward -> rule; got {ties!r}")
    out = {}
    for key, rule in ties.items():
        if rule not in TIE_RULES:
            raise ValueError(f"unknown tie rule {rule!r} for reward {key!r}; choose from {list(TIE_RULES)}")
        out[str(key)] = str(rule)
    if keys is not None:
        unknown = sorted(set(out) - set(keys))
        if unknown:
            raise ValueError(f"tie rules name rewards {unknown} that are not binned; binned rewards: {sorted(keys)}")
    return out


def bin_span(edges: np.ndarray | list[float], scores) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``: the first and last bin whose closure holds each score; ``lo < hi`` exactly when
    the score equals ``hi - lo`` inner edges (a tie run for ``hi - lo >= 2``)."""
    e = np.asarray(edges, dtype=np.float64)
    inner = e[1:-1]
    s = np.asarray(scores, dtype=np.float64)
    # "edges[i] <= s" puts s in bin hi; each inner edge equal to s also makes the bin below it s's own.
    return np.searchsorted(inner, s, side="left"), np.searchsorted(inner, s, side="right")


def _floor_integral(x: np.ndarray) -> np.ndarray:
    """``∫_0^x floor(p) dp`` for x >= 0."""
    f = np.floor(x)
    return f * (f - 1) / 2 + f * (x - f)


def bin_index(edges: np.ndarray | list[float], scores, ties: str = "midrank",
              rng: np.random.Generator | None = None) -> np.ndarray:
    """Bin index (float, NaN kept) of each score for the given ``B + 1`` edges.

    ``ties="spread"``: a score's quantile position is drawn uniformly over ``[a, b)`` and floored,
    where ``a = lo + 1/2`` and ``b = hi + 1/2`` (the edges do not say how much of the two end bins
    the tied value fills, so half of each is assumed) except at the data's extremes, where the
    position is known: ``a = 0`` for the minimum, ``b = B`` for the maximum. A score inside one bin
    has ``a = b`` and keeps that bin. With ``rng`` one draw per score (tied or not, so the stream of
    draws does not depend on the data); without it, the draw's expected bin, which may be fractional.
    """
    e = np.asarray(edges, dtype=np.float64)
    nb = e.size - 1
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = bin_span(e, s)
    if _check_ties(ties) == "spread":
        a = np.where(s <= e[0], 0.0, lo + 0.5)
        b = np.where(s >= e[-1], float(nb), hi + 0.5)
        if rng is not None:
            idx = np.floor(a + rng.random(np.shape(s)) * (b - a))
        else:
            w = b - a
            idx = np.where(w > 0, (_floor_integral(b) - _floor_integral(a)) / np.where(w > 0, w, 1.0), np.floor(a))
        idx = np.clip(idx, 0, nb - 1).astype(np.float64)
        return np.where(np.isnan(s), np.nan, idx)
    # The middle bin ceil((lo + hi) / 2) equals hi for k <= 1 and the mid-rank for a tie run.
    idx = np.ceil((lo + hi) / 2.0)
    # The data's extremes keep the extreme values 0 and 1 (module docstring); the minimum pin comes
    # last, so a constant reward (every edge equal) maps to 0.
    idx = np.where(s >= e[-1], nb - 1, idx)
    idx = np.where(s <= e[0], 0, idx)
    idx = np.clip(idx, 0, nb - 1).astype(np.float64)
    return np.where(np.isnan(s), np.nan, idx)


def bin_values(edges: np.ndarray | list[float], scores, ties: str = "midrank",
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Training value ``bin_index / (B - 1)`` in [0, 1] of each score; NaN stays NaN."""
    nb = len(edges) - 1
    return bin_index(edges, scores, ties, rng) / (nb - 1)


@dataclass
class RewardBins:
    """Quantile edges for every reward of a run."""

    num_bins: int = DEFAULT_NUM_BINS  # B: number of equal-mass bins per reward
    edges: dict[str, list[float]] = field(default_factory=dict)  # reward key -> B + 1 increasing edges
    # A TIE_RULES entry, or one per reward key (unnamed keys: midrank): how scores equal to several
    # edges are binned.
    ties: str | dict[str, str] = "midrank"
    # Where the edges were fitted (the datamodule's record: the data's shards, the sample, its seed),
    # so a cached file is not reused for other data; None for bins made otherwise.
    fitted_on: dict | None = None

    def __post_init__(self) -> None:
        self.num_bins = int(self.num_bins)
        self.ties = check_tie_rules(self.ties, self.edges)
        for key, e in self.edges.items():
            if len(e) != self.num_bins + 1:
                raise ValueError(f"reward {key!r}: expected {self.num_bins + 1} edges for {self.num_bins} bins, got {len(e)}")
            if any(b < a for a, b in zip(e, e[1:])):
                raise ValueError(f"reward {key!r}: bin edges must be non-decreasing")

    @property
    def keys(self) -> list[str]:
        return list(self.edges)

    def rule(self, key: str) -> str:
        """The tie rule of reward ``key``."""
        return self.ties if isinstance(self.ties, str) else self.ties.get(key, "midrank")

    @classmethod
    def fit(cls, scores: Mapping[str, Iterable[float]], num_bins: int = DEFAULT_NUM_BINS,
            ties: str | Mapping[str, str] = "midrank") -> "RewardBins":
        """Edges from raw scores per reward key (NaN/missing ignored)."""
        return cls(num_bins, {k: quantile_edges(v, num_bins) for k, v in scores.items()}, ties)

    def value(self, key: str, score, rng: np.random.Generator | None = None) -> np.ndarray | float:
        """Value(s) in [0, 1] of raw ``score`` for reward ``key`` (NaN stays NaN). ``rng`` draws the
        training value of a spread tie; without it a spread score gets the draw's expected bin."""
        if key not in self.edges:
            raise ValueError(f"no bin edges for reward {key!r}; binned rewards: {sorted(self.edges)}")
        rule = self.rule(key)
        if rng is not None and rule == "midrank" and not isinstance(self.ties, str):
            rng.random(np.shape(score))  # per-reward rules draw for every reward (module docstring)
        out = bin_values(self.edges[key], score, rule, rng)
        return float(out) if np.ndim(score) == 0 else out

    def trained_values(self, key: str) -> list[float]:
        """Every conditioning value reward ``key`` can take in training, ascending."""
        if key not in self.edges:
            raise ValueError(f"no bin edges for reward {key!r}; binned rewards: {sorted(self.edges)}")
        u = np.unique(self.edges[key])
        if self.rule(key) == "midrank":
            return sorted({float(v) for v in self.value(key, u)})
        lo, hi = bin_span(self.edges[key], u)
        idx = {min(int(i), self.num_bins - 1) for a, b in zip(lo, hi) for i in range(int(a), int(b) + 1)}
        return [i / (self.num_bins - 1) for i in sorted(idx)]

    def values(self, scores: Mapping[str, float | None], keys: Iterable[str] | None = None,
               rng: np.random.Generator | None = None) -> dict[str, float]:
        """Bin every reward of one sample; a missing, None or non-finite score gives NaN. ``rng``:
        the sample's generator, which draws spread ties (unused under ``midrank``)."""
        out = {}
        for key in keys if keys is not None else self.edges:
            raw = scores.get(key)
            try:
                raw = float(raw) if raw is not None else math.nan
            except (TypeError, ValueError):
                raw = math.nan
            out[key] = self.value(key, raw, rng) if math.isfinite(raw) else math.nan
        return out

    def to_dict(self) -> dict:
        d = {"num_bins": self.num_bins, "edges": {k: [float(x) for x in v] for k, v in self.edges.items()},
             "ties": self.ties if isinstance(self.ties, str) else dict(self.ties)}
        if self.fitted_on is not None:
            d["fitted_on"] = dict(self.fitted_on)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "RewardBins":
        if "num_bins" not in d or "edges" not in d:
            raise ValueError(f"reward bins need 'num_bins' and 'edges'; got keys {sorted(d)}")
        return cls(int(d["num_bins"]), {k: [float(x) for x in v] for k, v in d["edges"].items()},
                   d.get("ties", "midrank"), d.get("fitted_on"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file + rename)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RewardBins":
        with open(path) as f:
            return cls.from_dict(json.load(f))
