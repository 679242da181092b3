"""Reward-target sweeps: images and scores as one reward's target moves from 0 to 1.

The paper's aesthetic sweep (targets 0, 0.125, ..., 1 with the other rewards at their default
target) shows that a reward is controllable at inference. For each target value t the sweep
generates the same prompts with the same seeds into ``<outdir>/target_<t>/`` (GenEval layout,
resumable), scores them, and reports the mean score per target and Spearman's rank correlation
between target and score: over the per-target means (the contract's controllability number,
>= 9 targets) and over individual images.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from miro.eval.folder import atomic_write_json
from miro.eval.generate import GenerateConfig, generate_folder
from miro.eval.rewards import merge_records, read_records, score_folder

# Nine evenly spaced targets, the paper's aesthetic sweep grid (miro_facts.md §5.7).
DEFAULT_TARGETS = tuple(i / 8 for i in range(9))


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the tie-averaged ranks (nan if a side is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length; got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("spearman needs at least 2 points")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def trained_targets(bins, key: str, max_n: int = len(DEFAULT_TARGETS)) -> list[float]:
    """The distinct conditioning values reward ``key`` took in training
    (``RewardBins.trained_values``), at most ``max_n`` of them spread evenly by rank.

    A discrete reward trains on a few values only (Shapes alignment: 0, a handful below 0.2, and
    1.0 for its ~78 % of perfect scores), so a 0 -> 1 grid mostly probes values the model never
    saw; sweeping these instead measures control over the range it was taught.
    """
    if key not in bins.edges:
        raise ValueError(f"no bin edges for reward {key!r}; binned rewards: {sorted(bins.edges)}")
    if max_n < 2:
        raise ValueError(f"max_n must be >= 2; got {max_n}")
    vals = sorted({round(float(v), 6) for v in bins.trained_values(key)})
    if len(vals) > max_n:
        vals = [vals[i] for i in np.unique(np.round(np.linspace(0, len(vals) - 1, max_n)).astype(int))]
    return vals


def score_spaced_targets(bins, key: str, n: int = len(DEFAULT_TARGETS)) -> list[float]:
    """The training values of ``n`` raw scores evenly spaced between reward ``key``'s lowest and
    highest bin edge (duplicates merged).

    Quantile bins give a heavily skewed reward most of its targets in a sliver of its score range
    (Shapes contrast: targets 0.5-1 all score 0.988-1.0 in the data), where neither the model nor
    the scorer can tell the targets apart; spacing by score sweeps where the data differs.
    """
    if key not in bins.edges:
        raise ValueError(f"no bin edges for reward {key!r}; binned rewards: {sorted(bins.edges)}")
    if n < 2:
        raise ValueError(f"n must be >= 2; got {n}")
    e = bins.edges[key]
    return sorted({round(float(v), 6) for v in bins.value(key, np.linspace(e[0], e[-1], n))})


def filled_targets(bins, key: str, n: int = len(DEFAULT_TARGETS)) -> list[float]:
    """``score_spaced_targets`` and the ends 0 and 1, topped up to ``n`` distinct values: while
    fewer, the widest gap between neighbours is halved (the lowest of equal gaps first). Under
    ``ties="spread"`` the extreme scores' values lie inside (0, 1), so up to ``n + 2`` can come out.

    Merging duplicates can leave a skewed reward 6-8 targets (Shapes alignment: 0, five values
    below 0.21, and 1.0), fewer than the >= 9 a controllability number is taken over; the values
    added sit where the data has no bin (between 0.21 and 1.0 there), so they also test that the
    model's response between trained values keeps its order.
    """
    ts = sorted(set(score_spaced_targets(bins, key, n)) | {0.0, 1.0})  # a sweep spans 0 -> 1
    while len(ts) < n:
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        i = next(j for j, g in enumerate(gaps) if g >= max(gaps) - 1e-5)  # ts are rounded to 1e-6
        ts.insert(i + 1, round((ts[i] + ts[i + 1]) / 2, 6))
    return ts


# Target grids derived from a model's reward bins, by name (``--targets score|filled|trained``).
BIN_TARGETS = {"score": score_spaced_targets, "filled": filled_targets, "trained": trained_targets}


def targets_from_bins(kind: str, bins, key: str) -> list[float]:
    """The ``kind`` grid (a key of ``BIN_TARGETS``) of reward ``key`` from ``bins`` (``RewardBins``
    or None, as ``pipe.reward_bins``)."""
    if kind not in BIN_TARGETS:
        raise ValueError(f"unknown target grid {kind!r}; choose from {sorted(BIN_TARGETS)}")
    if bins is None:
        raise ValueError(f"targets {kind!r} need the model's reward_bins.json; this model has none")
    return BIN_TARGETS[kind](bins, key)


def target_dir(outdir: str | Path, t: float) -> Path:
    return Path(outdir) / f"target_{t:.4f}"


def check_targets(targets) -> list[float]:
    ts = [float(t) for t in targets]
    bad = [t for t in ts if not 0.0 <= t <= 1.0]
    if bad or len(ts) < 2:
        raise ValueError(f"sweep targets must be >= 2 values in [0, 1]; got {ts}")
    if len(set(ts)) != len(ts):
        raise ValueError(f"sweep targets must be distinct; got {ts}")
    folders: dict[str, float] = {}
    for t in ts:  # each target's folder is named at 4 decimals (target_dir)
        other = folders.setdefault(target_dir("", t).name, t)
        if other != t:
            raise ValueError(f"sweep targets {other!r} and {t!r} share the folder {target_dir('', t).name}; "
                             "targets must differ in their first 4 decimals")
    return ts


def run_sweep(pipe, items, key: str, base: GenerateConfig, outdir: str | Path, scorers: dict,
              targets=DEFAULT_TARGETS, batch_size: int = 16, progress: bool = True, geneval=None) -> dict:
    """Generate and score every target; returns (and writes ``sweep.json``) the summary.

    ``geneval`` (a :class:`miro.eval.geneval.GenEvalLike`) also scores each target folder
    GenEval-style, as in the paper's sweep table (GenEval and Aesthetic per target).
    """
    targets = check_targets(targets)
    for t in targets:
        cfg = replace(base, reward_targets={**base.reward_targets, key: t})
        d = target_dir(outdir, t)
        generate_folder(pipe, items, d, cfg, progress=progress)
        score_folder(d, scorers, d / "rewards.jsonl", batch_size=batch_size, progress=progress)
        if geneval is not None:
            from miro.eval.geneval import evaluate_folder

            evaluate_folder(d, d / "results.jsonl", geneval, progress=progress)
    return summarize_sweep(outdir, key, targets)


def summarize_sweep(outdir: str | Path, key: str, targets=DEFAULT_TARGETS) -> dict:
    """Read the scored target folders (no generation): means per target and Spearman's rho."""
    targets = check_targets(targets)
    per_target = []
    img_t, img_s = {}, {}
    for t in targets:
        recs = merge_records(read_records(target_dir(outdir, t) / "rewards.jsonl"))
        if not recs:
            raise ValueError(f"{target_dir(outdir, t)} has no rewards.jsonl; run the sweep first")
        names = sorted({k for r in recs.values() for k, v in r.items()
                        if isinstance(v, float) and not k.endswith("_normalized")})
        row = {"target": t, "n": len(recs)}
        for name in names:
            vals = np.array([r[name] for r in recs.values() if name in r])
            row[name] = {"mean": float(vals.mean()), "std": float(vals.std())}
            img_t.setdefault(name, []).extend([t] * len(vals))
            img_s.setdefault(name, []).extend(vals.tolist())
        per_target.append(row)
    names = sorted(set.intersection(*[{k for k in r if isinstance(r[k], dict)} for r in per_target]))
    rho = {n: spearman(targets, [r[n]["mean"] for r in per_target]) for n in names}
    rho_img = {n: spearman(img_t[n], img_s[n]) for n in names}
    out = {"swept": key, "targets": targets, "per_target": per_target,
           "spearman_means": rho, "spearman_images": rho_img}
    summaries = [target_dir(outdir, t) / "geneval_summary.json" for t in targets]
    if all(p.is_file() for p in summaries):  # GenEval-style overall per target (0..1)
        import json

        overall = [json.loads(p.read_text(encoding="utf-8"))["overall"] for p in summaries]
        for row, o in zip(per_target, overall):
            row["geneval_overall"] = o
        out["spearman_geneval"] = spearman(targets, overall)
    atomic_write_json(Path(outdir) / "sweep.json", out)
    return out


def sweep_grid(outdir: str | Path, targets=DEFAULT_TARGETS, max_prompts: int = 6, sample: int = 0, cell: int = 96,
               skipped: list | None = None):
    """A PIL image: one row per prompt, one column per target (same seed along a row). An
    unreadable image is a placeholder cell and its path is appended to ``skipped``."""
    from PIL import Image

    from miro.eval.plots import grid_cell

    targets = check_targets(targets)
    rows = []
    for i in range(max_prompts):
        row = [target_dir(outdir, t) / f"{i:05d}" / "samples" / f"{sample:04d}.png" for t in targets]
        if all(p.is_file() for p in row):
            rows.append(row)
    if not rows:
        raise ValueError(f"{outdir}: no prompt has an image at every target")
    grid = Image.new("RGB", (cell * len(targets), cell * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            grid.paste(grid_cell(p, cell, skipped), (c * cell, r * cell))
    return grid
