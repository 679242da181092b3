"""The Shapes training study: convergence, controllability, the rewards table, and the data's rewards.

Three measurements of `miro train` runs of the Shapes world (docs/training.md), all on a fixed,
category-stratified subset of ShapesEval (every k-th of the 300 prompts) with fixed seeds, so
that two checkpoints are compared on exactly the same prompts and noise:

* ``convergence`` — ShapesEval overall (and per category) and every Shapes reward of every
  periodic checkpoint of each run, against training samples seen. The speed-up factor is the
  paper's: the samples the baseline needs to reach its final score, divided by the samples MIRO
  needs to reach that score (linear interpolation between checkpoints), with a 90 % interval from
  redrawing every point within its standard error (:func:`speedup_interval`); once for ShapesEval
  and once per reward, as the paper measures it on its rewards. A recipe given more than once
  (``--run miro=SEED1_DIR --run miro=SEED2_DIR``) is trained from several seeds: its curve is their
  mean and the interval resamples the seeds as well (:func:`convergence_curves`). Writes ``convergence.csv``,
  ``convergence.json``, ``convergence.md`` (the speed-ups), ``convergence.png`` and
  ``convergence_rewards.png``.
* ``controllability`` — for each reward, its target swept over 9 values in [0, 1] (``--targets
  trained``: the values it took in training, :func:`miro.eval.sweep.trained_targets`; ``--targets
  score``: those of evenly spaced raw scores, :func:`miro.eval.sweep.score_spaced_targets`; ``--targets filled``:
  those topped up to 9 distinct values, :func:`miro.eval.sweep.filled_targets`) with the other
  targets fixed (:func:`miro.eval.sweep.run_sweep`), the reward measured by its exact Shapes
  scorer; Spearman's rho between target and the mean measured reward (and over single images).
  The negative branch's targets are all 0 (the pipeline's default) or, with ``--negative isolate``,
  the positive ones with the swept reward at 0. Writes ``controllability.json`` (means and their
  standard errors), ``controllability.png`` (the curves), one ``sweep.json`` + grid image per reward.
* ``table`` — every Shapes reward (mean) and ShapesEval overall for a list of models (baseline,
  MIRO, specialists): the trade-off table, each cell ± its standard error; ``--reward`` and
  ``--negative-reward`` set the two guidance branches' targets (equal: text-only guidance). Writes
  ``table.json``, ``table.md`` and ``table.png``.
* ``guidance`` — one model over a grid of sampler settings (guidance scale x Euler steps x time
  shift): ShapesEval and every reward per setting, the table's protocol. Writes ``guidance.json``,
  ``guidance.md`` and ``guidance.png``.
* ``summarize`` — no generation: the controllability runs of several sampler settings side by side,
  Spearman's rho of every reward, how many reach 0.9, and ShapesEval where a ``table`` run sits in the
  same folder; runs of one setting (other seeds, other targets) are pooled target by target;
  ``--targets KIND --model M`` keeps only M's own targets (e.g. a spread-ties model's). Writes
  ``settings.json``, ``settings.md``, ``<setting>_controllability.png`` (the pooled curves) and, for
  two settings or more, ``settings_controllability.png`` (all of them in one figure).
* ``confusion`` — no generation: from scored ShapesEval folders, the shape the detector found
  against the shape asked for, over the prompts that ask for one object (single object, colours).
  Writes ``confusion.json``, ``confusion.md`` and ``confusion.png``.
* ``paired`` — no generation: scored folders of the same prompts, seeds and sampler (``table``
  folders, or a sweep's ``target_<t>`` folders), image by image: each later one minus the first,
  every reward and, where both have it, ShapesEval (the mean of the category differences), each ±
  the standard error of the paired difference, much smaller than that of either mean because the
  twins share prompt and noise. Two targets of one sweep give a model's response to its target;
  ``NAME=DIR,DIR`` pools seeds. Writes ``paired.json``, ``paired.md`` and ``paired.png`` (±2 s.e.).
* ``trade`` — no generation: several models, one point each, from ``paired`` outputs: a paired
  difference on one axis (default: alignment's response to a low target, from a sweep's two target
  folders) against one on the other (default: ShapesEval against a common base model). Shows
  what a fine-tuning leg trades for what. Writes ``trade.json``, ``trade.md`` and ``trade.png`` (±2 s.e.).
* ``data`` — no model: how the training shards' rewards go together. Spearman's rho between every
  pair, and for each detector reward how often it is below perfect while the other detector
  rewards are perfect (the combinations a one-reward sweep with the others at 1.0 asks for). Writes
  ``data.json`` and ``data.md``.

Every generation folder is resumable (GenEval layout), so a killed study continues where it was.

    python benchmarks/shapes_training_study.py convergence --out runs/study \\
        --run miro=runs/train/miro/checkpoints/shapes_miro --run baseline=runs/train/miro/checkpoints/shapes_baseline
    python benchmarks/shapes_training_study.py controllability --model runs/train/.../last.ckpt --out runs/study
    python benchmarks/shapes_training_study.py table --model baseline=CKPT --model miro=CKPT --out runs/study
    python benchmarks/shapes_training_study.py paired --folder old=runs/a/table/old --folder new=runs/b/table/new --out runs/study
    python benchmarks/shapes_training_study.py trade --point shipped=runs/low_shipped,base \
        --point leg=runs/low_leg,runs/paired_leg --out runs/study
    python benchmarks/shapes_training_study.py data --data shapes-data --out runs/study
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

from _args import (  # beside this script
    ArgumentParser, device as device_arg, int_in, nonneg_float, nonneg_float_list, nonneg_int, positive_float_list,
    name_eq_source, positive_int, positive_int_list, run_main, unit_float)

from miro.eval.generate import SEED_STRIDE, parse_reward_cfg
from miro.io import atomic_write_json, atomic_write_text

SHAPES_KEYS = ("shapes_alignment", "shapes_counting", "shapes_position", "shapes_sharpness", "shapes_contrast")
DETECTOR_KEYS = ("shapes_alignment", "shapes_counting", "shapes_position")  # read from detections of the prompt's objects
PERFECT = 1.0 - 1e-6  # a reward at or above this counts as 1 (scores are stored as float32)


def eval_items(stride: int):
    """Every ``stride``-th ShapesEval prompt: the categories keep their proportions."""
    from miro.eval.prompts import load_shapes

    if stride < 1:
        raise ValueError(f"--stride must be >= 1; got {stride}")
    return load_shapes()[::stride]


def load(src: str, weights: str, device: str | None = None):
    """A pipeline from a ``.ckpt`` (EMA or raw weights) or anything ``MiroPipeline`` loads, on ``device``.
    On CUDA, float32 matmuls may use TF32 (10-bit mantissa products, float32 sums): a sweep compares
    settings with each other on one device, and the GPU's float32 path is several times slower."""
    if device and device.startswith("cuda"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    if src.endswith(".ckpt"):
        from miro.train.convert import pipeline_from_checkpoint

        pipe = pipeline_from_checkpoint(src, None if weights == "raw" else 0, device=device or "cpu")
    else:
        from miro.eval.generate import load_pipeline

        pipe = load_pipeline(src, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_eval(pipe, items, outdir: Path, gcfg) -> dict:
    """Generate (resumable) and score with the Shapes detector + GenEval rules."""
    from miro.eval.generate import generate_folder
    from miro.shapes.eval import score_folder

    generate_folder(pipe, items, outdir, gcfg, progress=False)
    return score_folder(outdir, progress=False)


def checkpoints(run_dir: Path, every: int, at: set[int] | None = None) -> list[tuple[int, Path]]:
    """The run's ``step=<k>.ckpt`` files whose step is a multiple of ``every`` (or in ``at``), sorted."""
    found = []
    for p in run_dir.glob("step=*.ckpt"):
        m = re.fullmatch(r"step=(\d+)\.ckpt", p.name)
        if m and (int(m.group(1)) in at if at else int(m.group(1)) % every == 0):
            found.append((int(m.group(1)), p))
    if not found:
        which = f"k in {sorted(at)}" if at else f"k a multiple of {every}"
        raise ValueError(f"{run_dir}: no step=<k>.ckpt with {which}")
    return sorted(found)


def tag_counts(items, n_samples: int) -> dict[str, int]:
    """Images per ShapesEval category in the subset: ``n_samples`` per prompt."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it.metadata["tag"]] = counts.get(it.metadata["tag"], 0) + n_samples
    return counts


def _sem(population_std: float, n: int) -> float:
    """Standard error of a mean from the population std the sweeps record (ddof 0): std / sqrt(n - 1),
    which is the sample std (ddof 1) over sqrt(n)."""
    return population_std / max(n - 1, 1) ** 0.5


def overall_se(row: dict, tag_counts: dict[str, int]) -> float:
    """Binomial standard error of ShapesEval overall (the mean of per-category accuracies):
    sqrt(sum_c p_c (1 - p_c) / n_c) / C, with n_c the images of category c in the subset."""
    terms = [float(row[f"cat_{t}"]) * (1 - float(row[f"cat_{t}"])) / n for t, n in tag_counts.items()
             if row.get(f"cat_{t}") not in (None, "")]
    return (sum(terms) ** 0.5) / len(terms) if terms else float("nan")


def samples_to_reach(curve: list[tuple[int, float]], score: float) -> float | None:
    """First sample count at which ``curve`` (samples, score) reaches ``score`` (interpolated)."""
    prev = None
    for s, v in curve:
        if v >= score:
            if prev is None or prev[1] >= score:
                return float(s)
            (s0, v0) = prev
            return s0 + (score - v0) / (v - v0) * (s - s0)
        prev = (s, v)
    return None


def speedup(miro: list[tuple[int, float]], baseline: list[tuple[int, float]],
            baseline_se: list[tuple[int, float]] | None = None) -> dict:
    """The paper's convergence speed-up against the baseline's final score. With the baseline's
    standard errors, also how far it rose from its first point to its final one, in combined
    standard errors (``baseline_rise_z``; None where both errors are 0)."""
    final = baseline[-1][1]
    need_b = samples_to_reach(baseline, final)
    need_m = samples_to_reach(miro, final)
    # A baseline already at its final score at its first point never rose to it: both runs "reach"
    # it at once and the ratio says nothing about speed (a falling or flat reward).
    out = {"baseline_final_score": final, "baseline_samples": need_b, "miro_samples": need_m,
           "speedup": (need_b / need_m) if need_m else None, "baseline_rises": need_b > baseline[0][0],
           # MIRO already at the score at its first point: it got there at some unmeasured time
           # before, so the ratio is only a lower bound set by the checkpoint spacing
           "miro_at_first_point": need_m is not None and need_m <= miro[0][0]}
    if baseline_se:
        se = math.hypot(baseline_se[0][1], baseline_se[-1][1])
        out["baseline_rise_z"] = (final - baseline[0][1]) / se if se > 0 else None
    return out


def speedup_interval(miro, baseline, miro_se, baseline_se, draws: int = 2000, level: float = 0.9,
                     seed: int = 0) -> dict:
    """How far the speed-up moves under the curves' own noise (a parametric bootstrap).

    Every point's score is redrawn from a normal with its standard error (the points are
    independent: each checkpoint is scored on its own images) and the speed-up recomputed. A
    draw in which MIRO never reaches the baseline's final score counts as speed-up 0, so a curve
    too short to tell pulls the interval down rather than dropping out. Returns the central
    ``level`` interval and how often the speed-up was above 1.

    ``miro`` and ``baseline`` (and their errors) may each be a list of curves instead: runs of one
    recipe from different training seeds, on one sample grid. Each draw then first resamples the
    seeds with replacement (a hierarchical bootstrap: seed to seed spread, then scoring noise)
    and averages the redrawn curves, as the pooled curve is their mean.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def one_curve(c):  # [(samples, value), ...] rather than a list of such curves
        return bool(c) and isinstance(c[0][0], (int, float))

    def as_reps(curve, se):  # (replicates, points) arrays of values and errors, and the samples
        reps = [curve] if one_curve(curve) else list(curve)
        errs = [se] if one_curve(se) else list(se)
        xs = [s for s, _ in reps[0]]
        if any([s for s, _ in r] != xs for r in reps):
            raise ValueError("the seeds of one run must share their sample grid")
        return xs, np.array([[v for _, v in r] for r in reps]), np.array([[e for _, e in r] for r in errs])

    def redraw(vals, errs):  # (draws, points): the mean of resampled seeds, each plus its own noise
        n = len(vals)
        pick = rng.integers(0, n, (draws, n)) if n > 1 else np.zeros((draws, 1), dtype=int)
        noise = rng.standard_normal((draws, n, vals.shape[1])) * errs[pick]
        return (vals[pick] + noise).mean(axis=1)

    xs_m, vals_m, errs_m = as_reps(miro, miro_se)
    xs_b, vals_b, errs_b = as_reps(baseline, baseline_se)
    out = np.array([speedup(list(zip(xs_m, m.tolist())), list(zip(xs_b, b.tolist())))["speedup"] or 0.0
                    for m, b in zip(redraw(vals_m, errs_m), redraw(vals_b, errs_b))])
    tail = (1 - level) / 2
    return {"level": level, "low": float(np.quantile(out, tail)), "high": float(np.quantile(out, 1 - tail)),
            "p_above_1": float((out > 1).mean()), "draws": draws}


def convergence_curves(rows: list[dict], counts: dict[str, int]) -> dict[str, tuple[dict, dict, dict]]:
    """Per metric (``overall`` = ShapesEval, then each Shapes reward the rows carry), per run: the
    curve [(samples, value)] and its standard errors, sorted by samples, and the run's seeds
    ({replicate: (curve, errors)}). A reward enters only when every row has it (rows scored before
    rewards were recorded are rescored, see ``cmd_convergence``).

    A run trained from several seeds (rows with one ``run`` and different ``replicate``) is pooled:
    its curve is the seeds' mean at the sample counts every seed has, and a point's error the larger
    of the mean's scoring noise (sqrt of the summed variances / n) and the seeds' spread (s / sqrt n),
    so that two seeds that happen to agree do not claim more than their images support."""
    import statistics

    out = {}
    for metric in ("overall", *SHAPES_KEYS):
        if metric != "overall" and any(r.get(metric) in (None, "") for r in rows):
            continue
        reps: dict[str, dict[str, dict[int, tuple[float, float]]]] = {}
        for r in rows:
            se = overall_se(r, counts) if metric == "overall" else float(r[f"se_{metric}"])
            reps.setdefault(r["run"], {}).setdefault(r.get("replicate") or "", {})[int(r["samples"])] = (
                float(r[metric]), se)
        curves, errors, seeds = {}, {}, {}
        for run, by_rep in reps.items():
            grid = sorted(set.intersection(*(set(points) for points in by_rep.values())))
            curves[run], errors[run] = [], []
            for s in grid:
                vals = [points[s][0] for points in by_rep.values()]
                errs = [points[s][1] for points in by_rep.values()]
                n = len(vals)
                noise = math.sqrt(sum(e * e for e in errs)) / n
                spread = statistics.stdev(vals) / math.sqrt(n) if n > 1 else 0.0
                curves[run].append((s, sum(vals) / n))
                errors[run].append((s, max(noise, spread)))
            seeds[run] = {rep: ([(s, points[s][0]) for s in grid], [(s, points[s][1]) for s in grid])
                          for rep, points in by_rep.items()}
        out[metric] = (curves, errors, seeds)
    return out


def run_specs(specs: list[str]) -> dict[str, list[tuple[str, Path]]]:
    """``NAME=CHECKPOINT_DIR`` specs as {name: [(replicate, dir)]}: a name given more than once is one
    recipe trained from several seeds, each replicate named by its folder (which must differ)."""
    runs: dict[str, list[tuple[str, Path]]] = {}
    for spec in specs:
        name, _, run_dir = spec.partition("=")  # NAME=DIR checked by argparse (name_eq_source)
        d = Path(run_dir)
        reps = runs.setdefault(name, [])
        if any(rep == d.name for rep, _ in reps):
            raise ValueError(f"--run {name}={run_dir}: another seed of {name!r} is in a folder also named "
                             f"{d.name!r}; a run's seeds are told apart by their folder names")
        reps.append((d.name, d))
    return runs


def _complete(row: dict) -> bool:
    """A point scored on every Shapes reward (older studies recorded ShapesEval alone)."""
    return all(row.get(k) not in (None, "") for k in SHAPES_KEYS)


def study_rows(path: Path, runs: dict) -> list[dict]:
    """The points of a ``convergence.csv``, each with its replicate (a row from before seeds were
    recorded belongs to its run's only seed)."""
    rows = []
    for r in csv.DictReader(open(path)):
        rep = r.get("replicate") or ""
        if not rep:
            if len(runs.get(r["run"], ())) > 1:  # which seed it was is not recorded: pooled it would be a seed of its own
                raise ValueError(f"{path}: its points of run {r['run']!r} predate recorded seeds (no replicate "
                                 f"column), and this study gives {r['run']!r} several seeds; leave it out of "
                                 f"--rows-from or score those checkpoints again")
            if runs.get(r["run"]):
                rep = runs[r["run"]][0][0]
        rows.append({**r, "replicate": rep})
    return rows


def check_settings(meta: Path, settings: dict, who: str) -> None:
    """Refuse points scored with other generation settings than ``settings``, as the study's
    ``convergence.json`` (``meta``) records them; a setting it does not record is not checked."""
    theirs = json.loads(meta.read_text()) if meta.is_file() else {}
    for k, v in settings.items():
        if k in theirs and theirs[k] != v:
            raise ValueError(f"{who}: its points were scored with {k}={theirs[k]!r}; this study uses {v!r}")


def merge_rows(done: dict, src: str | Path, runs: dict, settings: dict) -> None:
    """Add the points another process scored (``src``: its ``convergence.csv`` or the folder holding
    it) to ``done``. Refused: points scored with other settings (as that study's convergence.json
    records them) and a point that two sources give different scores."""
    src = Path(src)
    path = src / "convergence.csv" if src.is_dir() else src
    if not path.is_file():
        raise ValueError(f"--rows-from {src}: no convergence.csv there")
    check_settings(path.with_name("convergence.json"), settings, f"--rows-from {src}")
    for r in study_rows(path, runs):
        key = (r["run"], r["replicate"], int(r["step"]))
        held = done.get(key)
        if held is not None and (held.get("overall"), held.get("samples")) != (r.get("overall"), r.get("samples")):
            raise ValueError(f"--rows-from {src}: {r['run']} {r['replicate']} step {r['step']} is held with "
                             f"ShapesEval {held.get('overall')} and given as {r.get('overall')}")
        if held is None or (_complete(r) and not _complete(held)):
            done[key] = r


def cmd_convergence(args) -> int:
    from miro.eval.generate import GenerateConfig, parse_reward_args

    items = eval_items(args.stride)
    gcfg = GenerateConfig(n_samples=args.n_samples, steps=args.steps, cfg=args.cfg, reward_cfg=args.reward_cfg,
                          reward_direction=args.reward_direction, seed=args.seed, batch_size=args.batch_size,
                          reward_targets=parse_reward_args(args.reward),
                          negative_reward_targets=parse_reward_args(args.negative_reward, "--negative-reward"))
    out = Path(args.out)
    runs = run_specs(args.run)
    # what makes two points comparable; recorded in convergence.json, checked for --rows-from
    settings = json.loads(json.dumps({
        "items": len(items), "n_samples": args.n_samples, "steps": args.steps, "cfg": args.cfg,
        "reward_cfg": args.reward_cfg, "reward_direction": args.reward_direction, "weights": args.weights,
        "seed": args.seed, "reward_targets": gcfg.reward_targets,
        "negative_reward_targets": gcfg.negative_reward_targets}))
    done = {}
    csv_path = out / "convergence.csv"
    if csv_path.is_file():  # resume: checkpoints already scored are kept and not generated again
        check_settings(out / "convergence.json", settings, f"--out {out} (a new --out starts a study afresh)")
        for r in study_rows(csv_path, runs):
            done[(r["run"], r["replicate"], int(r["step"]))] = r
    for src in args.rows_from or ():
        merge_rows(done, src, runs, settings)
    counts = tag_counts(items, args.n_samples)
    scorers = _scorers()
    at = set(args.at_steps) if args.at_steps else None
    for name, reps in runs.items():
        for rep, run_dir in reps:
            # one seed keeps the layout of older studies; several get a folder each
            img_dir = out / "convergence" / name / (rep if len(reps) > 1 else "")
            for step, ckpt in checkpoints(run_dir, args.every, at):
                if args.max_step and step > args.max_step:
                    continue
                key = (name, rep, step)
                # a point scored before the rewards were recorded is redone: its images are kept, only scored
                if key in done and _complete(done[key]):
                    continue
                pipe = load(str(ckpt), args.weights, args.device)
                meta = pipe.checkpoint_meta
                ev = eval_row(pipe, items, img_dir / f"step_{step:07d}", gcfg, scorers, counts)
                ev["overall"] = ev.pop("shapes_eval")
                ev.pop("se_shapes_eval")  # recomputed from the categories (overall_se), as for older rows
                done[key] = {"run": name, "replicate": rep, "step": step,
                             "samples": int(meta.get("samples_seen_global", meta.get("samples_seen", step * 64))), **ev}
                print(json.dumps(done[key]), flush=True)
                _write_csv(csv_path, list(done.values()))
    order = {name: i for i, name in enumerate(runs)}  # runs and their seeds as given, then any others the CSV holds
    rows = sorted(done.values(), key=lambda r: (order.get(r["run"], len(order)), r["run"], r["replicate"],
                                                int(r["step"])))
    _write_csv(csv_path, rows)  # every point held, those past --max-step too: a later, longer study reuses them
    if args.max_step:
        rows = [r for r in rows if int(r["step"]) <= args.max_step]
    metrics = convergence_curves(rows, counts)
    curves, errors, seeds = metrics["overall"]
    result = {"curves": curves, "standard_errors": errors, "seeds": {k: sorted(v) for k, v in seeds.items()},
              "seed_curves": {k: {rep: c for rep, (c, _) in v.items()} for k, v in seeds.items() if len(v) > 1},
              **settings,
              "rewards": {k: {"curves": c, "standard_errors": e} for k, (c, e, _) in metrics.items() if k != "overall"}}
    if "miro" in curves and "baseline" in curves:
        # The paper's speed-ups are measured on its rewards (miro_facts.md §5.1); ShapesEval is the
        # issue's headline, every Shapes reward the like-for-like comparison.
        for k, (c, e, reps) in metrics.items():
            sp = speedup(c["miro"], c["baseline"], e["baseline"])
            (mc, me), (bc, be) = ([list(x) for x in zip(*reps[r].values())] for r in ("miro", "baseline"))
            sp["interval"] = speedup_interval(mc, bc, me, be)
            if k == "overall":
                result["speedup"] = sp
            else:
                result["rewards"][k]["speedup"] = sp
        print("speed-up:", json.dumps(result["speedup"]))
        md = speedup_markdown(result)
        atomic_write_text(out / "convergence.md", md)
        print(md, end="")
    atomic_write_json(out / "convergence.json", result)
    _plot_convergence(curves, errors, seeds, out / "convergence.png", result.get("speedup"))
    if result["rewards"]:
        _plot_reward_convergence(metrics, out / "convergence_rewards.png")
    return 0


def speedup_markdown(result: dict) -> str:
    """One line per metric: the baseline's final value, the samples each run needs to reach it, the
    speed-up and its 90 % interval (``-`` where MIRO never reaches it)."""
    lines = ["| metric | baseline final | baseline needs | MIRO needs | speed-up | 90 % interval | P(> 1) | note |",
             "|---|---|---|---|---|---|---|---|"]
    entries = [("ShapesEval", result["speedup"])] + [(k, v["speedup"]) for k, v in result["rewards"].items()]
    seeds = result.get("seeds", {})
    if any(len(v) > 1 for v in seeds.values()):  # pooled runs: say over what
        lines.insert(0, "Seeds (means over): " + "; ".join(f"{run}: {', '.join(v)}" for run, v in seeds.items())
                     + "\n")

    def k_(x):
        return "-" if x is None else f"{x / 1000:.1f}k"

    for name, sp in entries:
        ci, x = sp["interval"], sp["speedup"]
        lines.append(f"| {name} | {sp['baseline_final_score']:.3f} | {k_(sp['baseline_samples'])} | "
                     f"{k_(sp['miro_samples'])} | {'-' if x is None else f'x{x:.2f}'} | "
                     f"{ci['low']:.2f}-{ci['high']:.2f} | {ci['p_above_1']:.2f} | {_speedup_note(sp)} |")
    return "\n".join(lines) + "\n"


# A rise under two combined standard errors is not told apart from a flat curve (one-sided p ~ 0.02
# at z = 2); the first crossing of a final value that noise put there times nothing.
RISE_Z = 2.0


def _speedup_note(sp: dict) -> str:
    """Why a row's speed-up is not a measurement: a flat baseline, or one whose rise is noise."""
    if not sp.get("baseline_rises", True):
        return "no rise: the baseline starts at its final value"
    z = sp.get("baseline_rise_z")
    if z is not None and z < RISE_Z:
        return (f"rise within noise: the baseline's final is {z:.2f} standard errors above its first point "
                f"(< {RISE_Z:g})")
    if sp.get("miro_at_first_point") and sp.get("speedup") is not None:
        return (f"a lower bound (>= x{sp['speedup']:.2f}): MIRO is at the baseline's final at its first checkpoint, "
                f"so the ratio is the checkpoint spacing's")
    return ""


def _write_csv(path: Path, rows: list[dict]) -> None:
    from miro.io import atomic_write_text

    first = ("run", "replicate", "step", "samples", "overall")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in first, first.index(k) if k in first else 0, k))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def _plot_convergence(curves: dict, errors: dict, seeds: dict, path: Path, sp: dict | None) -> None:
    from miro.eval.plots import _plt, _save

    plt = _plt()

    fig, ax = plt.subplots(figsize=(6, 4))
    _errorbar_runs(ax, curves, errors, seeds)
    if sp and sp.get("speedup"):
        ax.axhline(sp["baseline_final_score"], color="grey", lw=0.8, ls="--")
        ci = sp.get("interval")
        ci = f", 90% {ci['low']:.2f}-{ci['high']:.2f}" if ci else ""
        note = _speedup_note(sp).split(":")[0]  # "no rise" / "rise within noise": the ratio times nothing
        ax.set_title(f"ShapesEval vs samples (speed-up x{sp['speedup']:.2f}{ci}{'; ' + note if note else ''})",
                     fontsize=9 if note else None)
    else:
        ax.set_title("ShapesEval vs samples")
    ax.set_xlabel("training samples (thousands)")
    ax.set_ylabel("ShapesEval overall (subset, ±1 s.e.)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)  # atomic: a killed study never leaves half a PNG


def _errorbar_runs(ax, curves: dict, errors: dict, seeds: dict) -> None:
    """One line per run: value against thousands of samples, ±1 s.e.; a run of several seeds is their
    mean, each seed drawn thin beside it in the same colour."""
    for run, c in curves.items():
        n = len(seeds.get(run, ()))
        line = ax.errorbar([s / 1000 for s, _ in c], [v for _, v in c], yerr=[e for _, e in errors[run]], marker="o",
                           ms=3, capsize=2, label=run if n < 2 else f"{run} ({n} seeds)")
        if n > 1:
            for curve, _ in seeds[run].values():
                ax.plot([s / 1000 for s, _ in curve], [v for _, v in curve], lw=0.7, alpha=0.5,
                        color=line[0].get_color())


def _plot_reward_convergence(metrics: dict, path: Path) -> None:
    """ShapesEval and every reward against samples, one panel each, runs overlaid (±1 s.e.)."""
    from miro.eval.plots import _plt, _save

    plt = _plt()
    names = list(metrics)
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3.2 * ((len(names) + 1) // 2), 5.6), squeeze=False)
    for ax, metric in zip(axes.flat, names):
        _errorbar_runs(ax, *metrics[metric])
        ax.set_title("ShapesEval" if metric == "overall" else metric.removeprefix("shapes_"), fontsize=9)
        ax.set_xlabel("samples (thousands)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plot_table(rows: list[dict], path: Path) -> None:
    """Grouped bars: ShapesEval and each reward (columns), one bar per model, ±1 s.e."""
    from miro.eval.plots import _plt, _save

    plt = _plt()

    cols = ("shapes_eval",) + SHAPES_KEYS
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 1, 4))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [r[c] for c in cols], width, yerr=[r.get(f"se_{c}", 0.0) for c in cols], capsize=2,
               label=r["model"])
    ax.set_xticks(range(len(cols)), ["ShapesEval"] + [k.removeprefix("shapes_") for k in SHAPES_KEYS])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean over the subset (±1 s.e.)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)  # atomic: a killed study never leaves half a PNG


def _plot_controllability(result: dict, path: Path) -> None:
    """One panel per swept reward: measured mean ±1 s.e. at each target, targets evenly spaced by
    rank (score-spaced targets crowd near 0) and labelled with their values; rho in the title."""
    from miro.eval.plots import _plt, _save

    plt = _plt()

    fig, axes = plt.subplots(1, len(result), figsize=(3.2 * len(result), 3), squeeze=False)
    for ax, (key, r) in zip(axes[0], result.items()):
        xs = range(len(r["targets"]))
        ax.errorbar(xs, r["means"], yerr=r["se"], marker="o", capsize=3)
        ax.set_xticks(xs, [f"{t:.3g}" for t in r["targets"]], rotation=45, fontsize=7)
        ax.set_title(f"{key.removeprefix('shapes_')}: rho {r['spearman_means']:.2f}", fontsize=9)
        ax.set_xlabel("target")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("measured reward (mean ±1 s.e.)")
    fig.tight_layout()
    _save(fig, path)  # atomic: a killed study never leaves half a PNG


def _scorers():
    from miro.rewards import load_scorer

    return {k: load_scorer(k) for k in SHAPES_KEYS}


def cmd_controllability(args) -> int:
    from miro.demo.handlers import isolation_targets
    from miro.eval.generate import GenerateConfig
    from miro.eval.sweep import DEFAULT_TARGETS, run_sweep, sweep_grid, targets_from_bins

    pipe = load(args.model, args.weights, args.device)
    items = eval_items(args.stride)
    base = GenerateConfig(n_samples=args.n_samples, steps=args.steps, cfg=args.cfg, reward_cfg=args.reward_cfg,
                          reward_direction=args.reward_direction, seed=args.seed, batch_size=args.batch_size,
                          reward_targets={k: args.others for k in pipe.coherence_keys})
    scorers, out = _scorers(), Path(args.out) / "controllability"
    result = {}
    for key in args.keys or pipe.coherence_keys:
        if key not in pipe.coherence_keys:
            raise ValueError(f"--keys {key!r}: the model is conditioned on {list(pipe.coherence_keys)}")
        if args.target_values:  # a subset or extension of a sweep, pooled later (`summarize`)
            targets = args.target_values
        elif args.targets == "grid":
            targets = DEFAULT_TARGETS
        else:
            targets = targets_from_bins(args.targets, pipe.reward_bins, key)
        kbase = base
        if args.negative == "isolate":  # s- = the positive targets with the swept reward at 0 (miro_facts.md §2)
            kbase = replace(base, negative_reward_targets=isolation_targets(base.reward_targets, key))
        s = run_sweep(pipe, items, key, kbase, out / key, {key: scorers[key]}, targets, progress=False)
        result[key] = {"targets": list(targets), "spearman_means": s["spearman_means"][key],
                       "spearman_images": s["spearman_images"][key], "means": [r[key]["mean"] for r in s["per_target"]],
                       "se": [_sem(r[key]["std"], r["n"]) for r in s["per_target"]]}
        sweep_grid(out / key, targets, max_prompts=6).save(out / key / "grid.png")
        print(key, json.dumps(result[key]), flush=True)
    summary = {"model": args.model, "targets": args.targets, "others": args.others, "negative": args.negative,
               "items": len(items),
               "n_samples": args.n_samples, "steps": args.steps, "cfg": args.cfg, "reward_cfg": args.reward_cfg,
               "reward_direction": args.reward_direction, "rewards": result}
    atomic_write_json(out / "controllability.json", summary)
    _plot_controllability(result, out / "controllability.png")
    return 0


def data_reward_rows(data_dir: str, keys=SHAPES_KEYS, limit: int = 0) -> list[list[float]]:
    """The training pairs' rewards: one row per (sample, caption), original and synthetic, as trained.

    A row with any reward missing or non-finite is left out. ``limit`` > 0 stops after that many samples.
    """
    import math

    from miro.data import schema

    rows, n = [], 0
    for shard in schema.list_shards(data_dir):
        for raw in schema.iter_raw_samples(shard):
            if "json" not in raw:
                continue
            meta = schema.decode_member("json", raw["json"])
            for names in (keys, [schema.synthetic_reward_key(k) for k in keys]):
                vals = [meta.get(k) for k in names]
                if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
                    rows.append([float(v) for v in vals])
            n += 1
            if limit and n >= limit:
                return rows
    return rows


def joint_room(rows, perfect: float = PERFECT) -> list[dict]:
    """Per reward: how often the data shows it below perfect while every other reward is perfect.

    Sweeping one target with the others fixed at 1.0 asks the model for exactly these combinations;
    a reward that is almost never imperfect when the others are perfect has almost no examples to
    learn independent control from. Returns, per column, ``{"n_others_perfect", "frac_below"}``.
    """
    import numpy as np

    a = np.asarray(rows, dtype=np.float64)
    out = []
    for j in range(a.shape[1]):
        others = np.delete(a, j, axis=1)
        sel = (others >= perfect).all(axis=1)
        n = int(sel.sum())
        out.append({"n_others_perfect": n, "frac_below": float((a[sel, j] < perfect).mean()) if n else float("nan")})
    return out


def cmd_data(args) -> int:
    import numpy as np
    from scipy.stats import spearmanr

    rows = data_reward_rows(args.data, SHAPES_KEYS, args.limit)
    if len(rows) < 3:
        raise ValueError(f"--data {args.data!r}: {len(rows)} (sample, caption) rows with every Shapes reward; need >= 3")
    a = np.asarray(rows)
    rho = np.atleast_2d(spearmanr(a).correlation)
    # The detector rewards are discrete, with most pairs exactly perfect (their top bin is the score
    # 1.0), so "the others at target 1.0" is a set of pairs one can count; sharpness and contrast
    # are continuous (never exactly 1), so the count is over the detector rewards only.
    det = [SHAPES_KEYS.index(k) for k in DETECTOR_KEYS]
    room = joint_room(a[:, det])
    short = [k.removeprefix("shapes_") for k in SHAPES_KEYS]
    lines = ["| Spearman | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    lines += [f"| {short[i]} | " + " | ".join(f"{rho[i, j]:.2f}" for j in range(len(short))) + " |"
              for i in range(len(short))]
    lines += ["", "| reward | P(perfect) | pairs with the other detector rewards perfect | below perfect among them |",
              "|---|---|---|---|"]
    lines += [f"| {short[j]} | {float((a[:, j] >= PERFECT).mean()):.3f} | {r['n_others_perfect']} | {r['frac_below']:.3f} |"
              for j, r in zip(det, room)]
    md = "\n".join(lines) + "\n"
    print(f"{len(rows)} (sample, caption) pairs from {args.data}\n\n{md}")
    if args.out:
        from miro.io import atomic_write_text

        out = Path(args.out)
        atomic_write_text(out / "data.json", json.dumps({"data": args.data, "pairs": len(rows), "keys": list(SHAPES_KEYS),
                                                         "spearman": rho.tolist(),
                                                         "joint_room": dict(zip(DETECTOR_KEYS, room))}, indent=2))
        atomic_write_text(out / "data.md", md)
    return 0


def eval_row(pipe, items, d: Path, gcfg, scorers, counts: dict) -> dict:
    """ShapesEval (overall, per category, its standard error) and every Shapes reward (mean and
    standard error) of one model at one generation setting; the folder ``d`` is resumable."""
    from miro.eval.folder import read_jsonl
    from miro.eval.rewards import score_folder, summarize

    ev = shapes_eval(pipe, items, d, gcfg)
    score_folder(d, scorers, d / "rewards.jsonl", progress=False)
    stats = summarize(read_jsonl(d / "rewards.jsonl"))["rewards"]
    row = {"shapes_eval": ev["overall"], **{f"cat_{k}": t["accuracy"] for k, t in ev["tags"].items()}}
    row["se_shapes_eval"] = overall_se(row, counts)
    for k in SHAPES_KEYS:
        row[k], row[f"se_{k}"] = stats[k]["mean"], stats[k]["sem"]
    return row


def cmd_table(args) -> int:
    from miro.eval.generate import GenerateConfig, parse_reward_args
    from miro.io import atomic_write_text

    items = eval_items(args.stride)
    gcfg = GenerateConfig(n_samples=args.n_samples, steps=args.steps, cfg=args.cfg, reward_cfg=args.reward_cfg,
                          reward_direction=args.reward_direction, seed=args.seed, batch_size=args.batch_size,
                          reward_targets=parse_reward_args(args.reward),
                          negative_reward_targets=parse_reward_args(args.negative_reward, "--negative-reward"))
    scorers, out, rows = _scorers(), Path(args.out) / "table", []
    counts = tag_counts(items, args.n_samples)
    for spec in args.model:
        name, sep, src = spec.partition("=")
        if not sep:  # no NAME=: the source names the row (its last path part, a .ckpt without suffix)
            src = spec
            name = Path(spec.rstrip("/\\")).name if ("/" in spec or "\\" in spec) else spec
            name = name[: -len(".ckpt")] if name.endswith(".ckpt") else name
        if not name or not src:
            raise ValueError(f"--model must be NAME=SOURCE or SOURCE; got {spec!r}")
        pipe = load(src, args.weights, args.device)
        rows.append({"model": name, **eval_row(pipe, items, out / name, replace(gcfg, model=name), scorers, counts)})
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_text(out / "table.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "table.md", table_markdown(rows))
    _plot_table(rows, out / "table.png")
    print(table_markdown(rows), end="")
    return 0


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers; got {text!r}") from None
    if not vals:
        raise ValueError(f"{name} needs at least one value; got {text!r}")
    return vals


def _target_values(text: str) -> list[float]:
    """``--target-values``: >= 2 distinct comma-separated numbers in [0, 1] (an argparse ``type``)."""
    from miro.eval.sweep import check_targets

    try:
        return check_targets(_floats(text, "--target-values"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_guidance(args) -> int:
    """One model over a grid of sampler settings: guidance scale x Euler steps x time shift.

    The shift is the model config's ``scheduler.shift`` (the published ``LinearScheduler``'s; > 1
    spends more steps near the data end), set on the loaded pipeline for each folder; the folder
    name records it, so resumed folders never mix settings.
    """
    from miro.eval.generate import GenerateConfig
    from miro.io import atomic_write_text

    if isinstance(args.reward_cfg, dict):
        raise ValueError(f"guidance sweeps one reward scale (--reward-cfg, --reward-cfgs); got per-reward scales "
                         f"{args.reward_cfg}: use table or controllability for those")
    cfgs, shifts = args.cfgs, args.shifts  # lists, checked by argparse
    if any(x < 1 for x in shifts):  # Scheduler.from_config reads a shift below 1 as 1 (published)
        raise ValueError(f"--shifts must be >= 1 (the scheduler takes a smaller shift as 1, so the rows would be "
                         f"labelled with a grid they did not use); got {shifts}")
    reward_cfgs = args.reward_cfgs or [args.reward_cfg]
    directions = [d.strip() for d in (args.reward_directions or args.reward_direction).split(",") if d.strip()]
    if not directions or set(directions) - {"prompt", "null"}:
        raise ValueError(f"--reward-directions must be a comma-separated subset of prompt,null; got "
                         f"{args.reward_directions!r}")
    # w_r = None (one scale) has no direction: run it once
    settings = [(wr, d) for wr in reward_cfgs for d in (directions if wr is not None else directions[:1])]
    steps = args.steps_list
    items, scorers = eval_items(args.stride), _scorers()
    counts, out, rows = tag_counts(items, args.n_samples), Path(args.out) / "guidance", []
    pipe = load(args.model, args.weights, args.device)
    shipped_shift = float(pipe.config.get("scheduler", {}).get("shift", 1.0))
    for n in steps:
        for s in shifts:
            pipe.config.setdefault("scheduler", {})["shift"] = s
            for w, (wr, d) in ((w, st) for st in settings for w in cfgs):
                if wr == w and d != directions[0]:
                    continue  # w_r = w is the one-scale combination whatever the direction
                rname = "" if wr is None else f"_rcfg{wr:g}" + ("_null" if d == "null" else "")
                name = f"cfg{w:g}{rname}_steps{n}_shift{s:g}"
                gcfg = GenerateConfig(model=args.model, n_samples=args.n_samples, steps=n, cfg=w, reward_cfg=wr,
                                      reward_direction=d, seed=args.seed, batch_size=args.batch_size)
                rows.append({"model": name, "cfg": w, "reward_cfg": wr, "reward_direction": None if wr in (None, w) else d,
                             "steps": n, "shift": s,
                             **eval_row(pipe, items, out / name, gcfg, scorers, counts)})
                print(json.dumps(rows[-1]), flush=True)
    pipe.config["scheduler"]["shift"] = shipped_shift
    atomic_write_text(out / "guidance.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "guidance.md", table_markdown(rows))
    _plot_guidance(rows, out / "guidance.png")
    print(table_markdown(rows), end="")
    return 0


def _plot_guidance(rows: list[dict], path: Path) -> None:
    """One panel per measure (ShapesEval, each reward), ±1 s.e., against the guidance scale w, one
    line per (steps, shift, w_r, direction); or, when every row has the same w and the reward scale
    varies, against w_r (a one-scale row sits at w_r = w), one line per (steps, shift, direction)."""
    from miro.eval.plots import _plt, _save

    plt = _plt()

    cols = ("shapes_eval",) + SHAPES_KEYS
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols), 2.8), squeeze=False)
    by_wr = len({r["cfg"] for r in rows}) == 1 and len({r.get("reward_cfg") for r in rows}) > 1

    def x(r):
        wr = r.get("reward_cfg")
        return (r["cfg"] if wr is None else wr) if by_wr else r["cfg"]

    def line(r):
        d = r.get("reward_direction")  # None: one scale (w_r unset or = w)
        if by_wr:  # the one-scale point belongs to every direction's curve
            return r["steps"], r["shift"], d
        return r["steps"], r["shift"], r.get("reward_cfg"), d

    keys = sorted({line(r) for r in rows if line(r)[-1] is not None or not by_wr}, key=str) or [line(rows[0])]
    for ax, c in zip(axes[0], cols):
        for key in keys:
            rs = sorted((r for r in rows if line(r) == key or (by_wr and line(r)[:2] == key[:2]
                                                                and r["reward_direction"] is None)), key=x)
            label = f"{key[0]} steps, shift {key[1]:g}"
            if not by_wr and key[2] is not None:
                label += f", w_r {key[2]:g}"
            if key[-1] is not None:
                label += f", reward along {key[-1]}"
            ax.errorbar([x(r) for r in rs], [r[c] for r in rs], yerr=[r[f"se_{c}"] for r in rs], marker="o",
                        ms=3, capsize=2, label=label)
        ax.set_title("ShapesEval" if c == "shapes_eval" else c.removeprefix("shapes_"), fontsize=9)
        ax.set_xlabel(f"reward guidance scale w_r (w = {rows[0]['cfg']:g})" if by_wr else "guidance scale w")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)  # atomic: a killed study never leaves half a PNG


ONE_OBJECT_TAGS = ("single_object", "colors")  # ShapesEval categories that ask for exactly one object


def shape_outcome(details: dict) -> str:
    """What the detector found in an image that asked for one object: the class when exactly one
    class was found (however many instances), ``"none"``, or ``"several"`` (more than one class)."""
    found = sorted(k for k, boxes in details.items() if boxes)
    return found[0] if len(found) == 1 else ("none" if not found else "several")


def shape_confusion(records) -> dict:
    """Asked shape -> detected outcome counts over the one-object ShapesEval images (``results.jsonl``
    records), plus ``accuracy``: the share whose outcome is exactly the asked class."""
    from miro.shapes.world import CLASSES

    cols = list(CLASSES) + ["none", "several"]
    counts = {c: dict.fromkeys(cols, 0) for c in CLASSES}
    for r in records:
        if r.get("tag") not in ONE_OBJECT_TAGS:
            continue
        # metadata and details are JSON strings (miro.eval.geneval_rules.result_record)
        asked = json.loads(r["metadata"])["include"][0]["class"]
        counts[asked][shape_outcome(json.loads(r["details"]))] += 1
    n = sum(sum(row.values()) for row in counts.values())
    hits = sum(counts[c][c] for c in CLASSES)
    return {"columns": cols, "counts": counts, "n": n, "accuracy": hits / n if n else float("nan")}


def confusion_markdown(name: str, conf: dict) -> str:
    """One confusion matrix: rows the asked shape, cells the share of its images (%)."""
    cols = conf["columns"]
    lines = [f"**{name}** (shape right {conf['accuracy']:.3f} of {conf['n']} one-object images)", "",
             "| asked \\ found | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
    for asked, row in conf["counts"].items():
        tot = sum(row.values()) or 1
        lines.append(f"| {asked} | " + " | ".join(f"{100 * row[c] / tot:.0f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def cmd_confusion(args) -> int:
    """Which shapes a model draws when asked for one: from scored ShapesEval folders, no generation."""
    from miro.eval.folder import read_jsonl
    from miro.io import atomic_write_text
    from miro.shapes.eval import RESULTS_FILE

    result = {}
    for spec in args.folder:
        name, _, d = spec.partition("=")
        path = Path(d) / RESULTS_FILE
        if not path.is_file():
            raise ValueError(f"--folder {spec!r}: no {RESULTS_FILE} there (score it with `miro shapes eval-score`)")
        result[name or d] = shape_confusion(read_jsonl(path))
    out = Path(args.out) / "confusion"
    atomic_write_text(out / "confusion.json", json.dumps(result, indent=2))
    md = "\n".join(confusion_markdown(k, v) for k, v in result.items())
    atomic_write_text(out / "confusion.md", md)
    _plot_confusion(result, out / "confusion.png")
    print(md, end="")
    return 0


def load_scored(dirs: list[str]) -> tuple[dict | None, dict]:
    """(ShapesEval records or None, reward records) of scored folders, keyed by (folder number, file
    name): the folders of one model (e.g. one per seed) pair with the same-numbered folders of another."""
    from miro.eval.folder import read_jsonl
    from miro.shapes.eval import RESULTS_FILE

    res, rew = {}, {}
    for j, d in enumerate(dirs):
        if not (Path(d) / "rewards.jsonl").is_file():
            raise ValueError(f"{d}: no rewards.jsonl (a scored `table` folder, OUT/table/<model>, or a sweep's "
                             f"target_<t> folder)")
        # lines of one image merge (a folder scored in several passes holds one line per pass)
        from miro.eval.rewards import merge_records

        rew.update({(j, f): r for f, r in merge_records(read_jsonl(Path(d) / "rewards.jsonl")).items()})
        if res is not None and (Path(d) / RESULTS_FILE).is_file():
            res.update({(j, r["filename"]): r for r in read_jsonl(Path(d) / RESULTS_FILE)})
        else:
            res = None  # ShapesEval only where every folder has it
    return res, rew


def paired_differences(base: tuple[dict | None, dict], other: tuple[dict | None, dict]) -> dict:
    """``other - base`` over the images both hold (``load_scored`` keys), for every Shapes reward
    and, where both have ShapesEval results, ShapesEval. ShapesEval is the mean of the category
    accuracies, so its difference is the mean of the category differences, with standard error
    ``sqrt(sum_c var_c / n_c) / C``."""
    import numpy as np

    def mean_se(d):
        d = np.asarray(d, float)
        return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")}

    (res_a, rew_a), (res_b, rew_b) = base, other
    names = sorted(set(rew_a) & set(rew_b))
    if not names:
        raise ValueError("the folders share no image (compare runs of the same prompts and seeds)")
    out = {"n": len(names), "categories": {}}
    if res_a is not None and res_b is not None:
        both = [f for f in names if f in res_a and f in res_b]
        for tag in sorted({res_a[f]["tag"] for f in both}):
            d = [float(res_b[f]["correct"]) - float(res_a[f]["correct"]) for f in both if res_a[f]["tag"] == tag]
            out["categories"][tag] = {**mean_se(d), "n": len(d)}
        cats = out["categories"].values()
        if cats:
            out["shapes_eval"] = {"diff": float(np.mean([c["diff"] for c in cats])),
                                  "se": float(np.sqrt(sum(c["se"] ** 2 for c in cats)) / len(cats))}
    for key in SHAPES_KEYS:
        d = [rew_b[f][key] - rew_a[f][key] for f in names if key in rew_a[f] and key in rew_b[f]]
        if d:
            out[key] = mean_se(d)
    return out


def paired_markdown(base: str, diffs: dict[str, dict]) -> str:
    cols = ["shapes_eval", *SHAPES_KEYS]
    lines = [f"paired differences against {base}", "",
             "| model | images | " + " | ".join(c.removeprefix("shapes_") if c != "shapes_eval" else "ShapesEval"
                                               for c in cols) + " | by category |",
             "|" + "---|" * (len(cols) + 3)]
    for name, d in diffs.items():
        cells = [f"{d[c]['diff']:+.3f} ± {d[c]['se']:.3f}" if c in d else "–" for c in cols]
        cats = ", ".join(f"{t} {c['diff']:+.3f} ± {c['se']:.3f}" for t, c in d["categories"].items()) or "–"
        lines.append(f"| {name} | {d['n']} | " + " | ".join(cells) + f" | {cats} |")
    return "\n".join(lines) + "\n"


def cmd_paired(args) -> int:
    """Image-by-image differences between scored folders (no generation)."""
    from miro.io import atomic_write_text

    if len(args.folder) < 2:
        raise ValueError(f"paired needs two --folder or more (the first is the base); got {len(args.folder)}")
    recs = {}
    for spec in args.folder:
        name, sep, dirs = spec.partition("=")
        if not sep:  # a bare folder names itself
            name, dirs = spec, spec
        if name in recs:
            raise ValueError(f"--folder name {name!r} given twice; pool a model's seeds as NAME=DIR,DIR")
        recs[name] = load_scored(dirs.split(","))
    (base, base_recs), *others = recs.items()
    diffs = {name: paired_differences(base_recs, r) for name, r in others}
    out = Path(args.out) / "paired"
    atomic_write_text(out / "paired.json", json.dumps({"base": base, "diffs": diffs}, indent=2))
    md = paired_markdown(base, diffs)
    atomic_write_text(out / "paired.md", md)
    _plot_paired(base, diffs, out / "paired.png")
    print(md, end="")
    return 0


def paired_value(spec: str, measure: str) -> dict:
    """``{"diff", "se"}`` of ``measure`` read from a ``paired`` output: ``PATH[#NAME]``, PATH its
    paired.json or the --out it was written under, NAME the compared folder (default: the only
    one). ``base`` is the base model of a comparison itself: 0 ± 0."""
    if spec == "base":
        return {"diff": 0.0, "se": 0.0}
    path, _, name = spec.partition("#")
    f = Path(path)
    for cand in (f, f / "paired.json", f / "paired" / "paired.json"):
        if cand.is_file():
            f = cand
            break
    else:
        raise ValueError(f"{path}: no paired.json (give a `paired` run's --out or its paired.json)")
    diffs = json.loads(f.read_text())["diffs"]
    if not name:
        if len(diffs) != 1:
            raise ValueError(f"{f} compares {sorted(diffs)}: pick one as {path}#NAME")
        (name,) = diffs
    if name not in diffs:
        raise ValueError(f"{f}: no compared folder {name!r}; it has {sorted(diffs)}")
    if measure not in diffs[name]:
        raise ValueError(f"{f}#{name}: no measure {measure!r}; it has "
                         f"{sorted(k for k in diffs[name] if k not in ('n', 'categories'))}")
    return {k: float(diffs[name][measure][k]) for k in ("diff", "se")}


def cmd_trade(args) -> int:
    """One point per model: a paired difference on x against one on y (no generation)."""
    from miro.io import atomic_write_text

    points = {}
    for spec in args.point:
        label, sep, xy = spec.partition("=")
        x, comma, y = xy.partition(",")
        if not sep or not comma or not label or not x or not y:
            raise ValueError(f"--point {spec!r}: expected LABEL=X,Y (each a paired output PATH[#NAME] or base)")
        if label in points:
            raise ValueError(f"--point label {label!r} given twice")
        points[label] = {"x": paired_value(x, args.x), "y": paired_value(y, args.y)}
    out = Path(args.out) / "trade"
    atomic_write_json(out / "trade.json", {"x": args.x, "y": args.y, "points": points})
    lines = [f"| model | {args.x} (x) | {args.y} (y) |", "|---|---|---|"]
    lines += [f"| {k} | {p['x']['diff']:+.3f} ± {p['x']['se']:.3f} | {p['y']['diff']:+.3f} ± {p['y']['se']:.3f} |"
              for k, p in points.items()]
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "trade.md", md)
    _plot_trade(points, args.x_label or f"{args.x} (paired difference)",
                args.y_label or f"{args.y} (paired difference)", out / "trade.png")
    print(md, end="")
    return 0


def _plot_trade(points: dict, xlabel: str, ylabel: str, path: Path) -> None:
    from miro.eval.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, p) in enumerate(points.items()):
        ax.errorbar(p["x"]["diff"], p["y"]["diff"], xerr=2 * p["x"]["se"], yerr=2 * p["y"]["se"], fmt="o",
                    capsize=3, color=f"C{i % 10}", label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title("one point per model (±2 s.e.)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _plot_paired(base: str, diffs: dict[str, dict], path: Path) -> None:
    """One panel per measure the folders share (ShapesEval, rewards): each compared folder's paired
    difference against the base, ±2 s.e., beside the zero line."""
    from miro.eval.plots import _plt, _save

    plt = _plt()

    cols = [c for c in ("shapes_eval", *SHAPES_KEYS) if any(c in d for d in diffs.values())]
    names = list(diffs)
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols) + 1, 0.45 * len(names) + 1.4),
                             squeeze=False, sharey=True)
    for ax, c in zip(axes[0], cols):
        ys = [i for i, n in enumerate(names) if c in diffs[n]]
        ax.errorbar([diffs[names[i]][c]["diff"] for i in ys], ys, xerr=[2 * diffs[names[i]][c]["se"] for i in ys],
                    fmt="o", capsize=3)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_title("ShapesEval" if c == "shapes_eval" else c.removeprefix("shapes_"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    fig.supxlabel(f"paired difference against {base} (±2 s.e.)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)  # atomic: a killed study never leaves half a PNG


def _plot_confusion(result: dict, path: Path) -> None:
    """One heat map per folder: asked shape (rows) by detected outcome (columns), row shares."""
    import numpy as np

    from miro.eval.plots import _plt, _save

    plt = _plt()

    fig, axes = plt.subplots(1, len(result), figsize=(3.6 * len(result), 3.2), squeeze=False)
    for ax, (name, conf) in zip(axes[0], result.items()):
        m = np.array([[row[c] for c in conf["columns"]] for row in conf["counts"].values()], dtype=float)
        m /= np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
        ax.set_xticks(range(len(conf["columns"])), conf["columns"], rotation=45, fontsize=7)
        ax.set_yticks(range(len(conf["counts"])), list(conf["counts"]), fontsize=7)
        ax.set_title(f"{name}: shape right {conf['accuracy']:.2f}", fontsize=8)
    fig.tight_layout()
    _save(fig, path)  # atomic: a killed study never leaves half a PNG


CONTROL_TARGET = 0.9  # the issue's bar: Spearman rho >= 0.9 for every reward


def _setting_label(gen: dict, swept: str | None = None) -> str:
    """A sampler setting in the words of the CLI flags, from a target folder's ``generation.json``
    (``swept``: the reward that folder sweeps, whose target is not part of the setting)."""
    rc = gen.get("reward_cfg")
    if isinstance(rc, dict):
        rc = ",".join(f"{k.removeprefix('shapes_')}={v:g}" for k, v in sorted(rc.items()))
    parts = [f"w={gen['cfg']:g}", f"steps={gen['steps']}"]
    if rc is not None:
        parts.append(f"w_r={rc if isinstance(rc, str) else format(rc, 'g')}")
        if gen.get("reward_direction", "prompt") != "prompt":
            parts.append(f"direction={gen['reward_direction']}")
    if gen.get("negative_reward_targets"):
        parts.append("s-=isolate")
    others = {k: v for k, v in (gen.get("reward_targets") or {}).items() if k != swept}
    if swept is not None and any(v != 1.0 for v in others.values()):  # --others other than the default 1.0
        vals = set(others.values())
        parts.append(f"others={vals.pop():g}" if len(vals) == 1 else
                     "others=" + ",".join(f"{k.removeprefix('shapes_')}={v:g}" for k, v in sorted(others.items())))
    return " ".join(parts)


TARGET_DECIMALS = 4  # the precision of target folder names (miro.eval.sweep.target_dir): targets equal there are one


def pool_targets(rows: list[dict], key: str) -> list[dict]:
    """Per-target rows of several sweeps of one reward (``sweep.json``'s ``per_target``: target, n,
    {key: mean, std}) pooled by target: n summed, mean and (population) std of all the images."""
    import numpy as np

    by_t: dict[float, list[dict]] = {}
    for r in rows:
        by_t.setdefault(round(r["target"], TARGET_DECIMALS), []).append(r)
    out = []
    for t, rs in sorted(by_t.items()):
        n = np.array([r["n"] for r in rs], dtype=np.float64)
        m = np.array([r[key]["mean"] for r in rs])
        sd = np.array([r[key]["std"] for r in rs])
        mean = float((n * m).sum() / n.sum())
        var = float((n * (sd**2 + m**2)).sum() / n.sum() - mean**2)
        out.append({"target": t, "n": int(n.sum()), "mean": mean, "std": max(var, 0.0) ** 0.5})
    return out


def summarize_settings(settings: dict[str, list[Path]], only: dict[str, list[float]] | None = None) -> list[dict]:
    """One row per setting: its folders (``controllability`` runs' ``--out``, optionally with a one-model
    ``table`` run in one of them) pooled target by target, so runs with other seeds or other targets
    of the same setting add images or targets. A row has rho per reward over the pooled means, how
    many pass, the images per target, the setting read from ``generation.json`` (folders whose
    settings differ are refused) and ShapesEval at every target 1.0. Rewards not (yet) swept are left
    out of the row, so a time-boxed grid reports what it finished. ``only`` (reward -> targets)
    keeps those targets of each curve (at ``pool_targets``' precision) and lists the
    ones no folder has under ``missing``."""
    from miro.eval.sweep import spearman

    rows = []
    for name, dirs in settings.items():
        row, labels = {"setting": name, "rho": {}, "n": {}, "curves": {}, "missing": {}}, {}
        for key in SHAPES_KEYS:
            per_target = []
            for d in dirs:
                sweep = d / "controllability" / key / "sweep.json"
                if not sweep.is_file():
                    continue
                s = json.loads(sweep.read_text(encoding="utf-8"))
                per_target += s["per_target"]
                gen = d / "controllability" / key / f"target_{s['targets'][0]:.4f}" / "generation.json"
                labels[str(d)] = _setting_label(json.loads(gen.read_text(encoding="utf-8"))["config"], key)
            if not per_target:
                continue
            pooled = pool_targets(per_target, key)
            if only is not None and key in only:
                want = {round(t, TARGET_DECIMALS) for t in only[key]}
                row["missing"][key] = sorted(want - {p["target"] for p in pooled})
                pooled = [p for p in pooled if p["target"] in want]
                if not pooled:
                    continue
            row["curves"][key] = pooled
            row["rho"][key] = spearman([p["target"] for p in pooled], [p["mean"] for p in pooled])
            row["n"][key] = min(p["n"] for p in pooled)
        if len(set(labels.values())) > 1:
            raise ValueError(f"setting {name!r} pools folders of different settings: {labels}")
        tables = sorted(t for d in dirs for t in d.glob("table/table.json"))
        if tables:
            t = json.loads(tables[0].read_text(encoding="utf-8"))[0]
            row["shapes_eval"], row["se_shapes_eval"] = t["shapes_eval"], t["se_shapes_eval"]
        row["label"] = next(iter(labels.values()), "")
        row["passed"] = sum(r >= CONTROL_TARGET for r in row["rho"].values())
        rows.append(row)
    return rows


def settings_markdown(rows: list[dict]) -> str:
    """``summarize_settings`` rows as a table: rho per reward (bold where it reaches the bar)."""
    head = ("| setting | " + " | ".join(k.removeprefix("shapes_") for k in SHAPES_KEYS)
            + f" | rho >= {CONTROL_TARGET} | images per target | ShapesEval (targets 1.0) |")
    lines = [head, "|" + "---|" * (len(SHAPES_KEYS) + 4)]
    for r in rows:
        cells = [(f"**{r['rho'][k]:.2f}**" if r["rho"][k] >= CONTROL_TARGET else f"{r['rho'][k]:.2f}")
                 if k in r["rho"] else "–" for k in SHAPES_KEYS]
        n = sorted(set(r["n"].values()))
        ev = f"{r['shapes_eval']:.3f} ± {r['se_shapes_eval']:.3f}" if "shapes_eval" in r else "–"
        lines.append(f"| {r['setting']}: {r['label']} | " + " | ".join(cells)
                     + f" | {r['passed']}/{len(r['rho'])} | {'/'.join(map(str, n)) or '–'} | {ev} |")
    lines += [f"\n{r['setting']}, {k.removeprefix('shapes_')}: no run has targets {m} (rho without them)"
              for r in rows for k, m in r.get("missing", {}).items() if m]
    return "\n".join(lines) + "\n"


def _plot_settings(rows: list[dict], path: Path) -> None:
    """Every setting's pooled curve of each reward in one panel per reward (the settings' targets
    may differ, so the x axis is the target itself), rho in the legend."""
    from miro.eval.plots import _plt, _save

    plt = _plt()
    keys = [k for k in SHAPES_KEYS if any(k in r["curves"] for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in rows:
            c = r["curves"].get(key)
            if c:
                ax.errorbar([q["target"] for q in c], [q["mean"] for q in c], yerr=[_sem(q["std"], q["n"]) for q in c],
                            marker="o", capsize=3, label=f"{r['setting']}: rho {r['rho'][key]:.2f}")
        ax.set_title(key.removeprefix("shapes_"), fontsize=9)
        ax.set_xlabel("target")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("measured reward (mean ±1 s.e.)")
    fig.tight_layout()
    _save(fig, path)


def write_summary(settings: dict[str, list[Path]], out: Path, plots: Path | None = None,
                  only: dict[str, list[float]] | None = None) -> str:
    """``summarize_settings`` written to ``out`` (settings.json, settings.md) with each setting's
    pooled curves as ``<setting>_controllability.png`` in ``plots`` (default: ``out``), all settings'
    in ``settings_controllability.png`` when there are two or more; returns the markdown table."""
    from miro.io import atomic_write_text

    rows = summarize_settings(settings, only)
    md = settings_markdown(rows)
    atomic_write_json(out / "settings.json", rows)
    atomic_write_text(out / "settings.md", md)
    for r in rows:  # the pooled curves of each setting, as `controllability` draws one run's
        if r["curves"]:
            _plot_controllability({k: {"targets": [p["target"] for p in c], "means": [p["mean"] for p in c],
                                       "se": [_sem(p["std"], p["n"]) for p in c], "spearman_means": r["rho"][k]}
                                   for k, c in r["curves"].items()}, (plots or out) / f"{r['setting']}_controllability.png")
    if sum(bool(r["curves"]) for r in rows) > 1:  # the settings against each other
        _plot_settings([r for r in rows if r["curves"]], (plots or out) / "settings_controllability.png")
    return md


def cmd_summarize(args) -> int:
    settings: dict[str, list[Path]] = {}
    for spec in args.setting:
        name, sep, d = spec.partition("=")
        if not sep or not name or not Path(d).is_dir():
            raise ValueError(f"--setting {spec!r}: expected NAME=DIR with DIR an existing folder")
        settings.setdefault(name, []).append(Path(d))
    only = None
    if args.targets:  # one model's target grid of every reward, e.g. a spread model's own score targets
        from miro.eval.sweep import targets_from_bins

        if not args.model:
            raise ValueError(f"--targets {args.targets}: name the model whose bins define them (--model)")
        bins = load(args.model, "ema").reward_bins
        # a model without bins raises in targets_from_bins (what --targets needs), not silently keeps all
        only = {k: targets_from_bins(args.targets, bins, k) for k in SHAPES_KEYS if bins is None or k in bins.edges}
    print(write_summary(settings, Path(args.out), only=only), end="")
    return 0


def table_markdown(rows: list[dict]) -> str:
    """The rewards table, each cell ``mean ± standard error`` over the subset's images."""
    cols = ("shapes_eval",) + SHAPES_KEYS
    head = "| model | ShapesEval | " + " | ".join(k.removeprefix("shapes_") for k in SHAPES_KEYS) + " |"
    lines = [head, "|" + "---|" * (1 + len(cols))]
    for r in rows:
        cells = [f"{r[c]:.3f} ± {r[f'se_{c}']:.3f}" if f"se_{c}" in r else f"{r[c]:.3f}" for c in cols]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _target_args(p, who: str = "every model") -> None:
    """``--reward`` / ``--negative-reward``: the two guidance branches' targets (parsed where used)."""
    p.add_argument("--reward", nargs="+", action="extend", metavar="KEY=VALUE",
                   help=f"positive reward targets of {who} (default 1.0 each; repeatable)")
    p.add_argument("--negative-reward", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="negative branch's reward targets (default 0 each); equal to the positive ones, the "
                        "guidance follows the text alone")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (resumable)")
    common.add_argument("--stride", type=positive_int, default=3, help="every k-th ShapesEval prompt (3: 100 prompts)")
    common.add_argument("--n-samples", type=int_in(1, SEED_STRIDE), default=2, help="images per prompt")
    common.add_argument("--steps", type=positive_int, default=25, help="Euler steps")
    common.add_argument("--cfg", type=nonneg_float, default=5.0, help="guidance scale")
    common.add_argument("--reward-cfg", type=parse_reward_cfg, default=None,
                        help="separate guidance scale of the reward direction (default: --cfg, one scale), "
                             "or one per reward: KEY=W,KEY=W (rewards left out: --cfg)")
    common.add_argument("--reward-direction", choices=("prompt", "null"), default="prompt",
                        help="with a reward scale: the reward direction taken with the prompt or the null text")
    common.add_argument("--seed", type=nonneg_int, default=0)
    common.add_argument("--device", type=device_arg, default=None,
                        help="generate on this device (default: the pipeline's, CPU)")
    common.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per pipeline call (same noise per image, pixels equal up to float rounding; a GPU wants hundreds)")
    common.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="checkpoint weights (raw: no EMA lag, fair between runs of any length)")
    c = sub.add_parser("convergence", parents=[common],
                       help="ShapesEval and every Shapes reward vs training samples; speed-up factors")
    c.add_argument("--run", action="append", required=True, type=name_eq_source,
                   help="NAME=CHECKPOINT_DIR (names miro and baseline give the speed-up); a name given again "
                        "adds a training seed of that recipe, pooled")
    c.add_argument("--every", type=positive_int, default=500, help="use step=<k>.ckpt with k a multiple of this")
    c.add_argument("--at-steps", type=positive_int_list, default=None,
                   help="comma-separated checkpoint steps to use instead of --every")
    c.add_argument("--max-step", type=nonneg_int, default=0,
                   help="ignore checkpoints after this step, and points past it that the CSV holds (0: none)")
    c.add_argument("--rows-from", nargs="+", action="extend", metavar="STUDY",
                   help="convergence.csv files (or their folders) scored by other processes, e.g. one per "
                        "checkpoint or per run: their points join this study and are not scored again")
    _target_args(c, "every checkpoint")
    k = sub.add_parser("controllability", parents=[common], help="Spearman of target vs measured reward")
    k.add_argument("--model", required=True, help=".ckpt, pipeline folder or built-in name")
    k.add_argument("--keys", nargs="*", help="rewards to sweep (default: all the model's)")
    k.add_argument("--others", type=unit_float, default=1.0, help="target of the rewards not swept (in [0, 1])")
    k.add_argument("--targets", choices=("grid", "trained", "score", "filled"), default="grid",
                   help="grid: 0, 0.125, ..., 1; trained: the values each reward took in training (<= 9); "
                        "score: the values of 9 raw scores evenly spaced over the reward's range; filled: "
                        "those topped up to 9 distinct values by halving the widest gaps")
    k.add_argument("--target-values", type=_target_values, default=None,
                   help="comma-separated targets to sweep instead (>= 2; e.g. the ones a pooled run lacks)")
    k.add_argument("--negative", choices=("zeros", "isolate"), default="zeros",
                   help="negative branch's reward targets: zeros (the pipeline's default) or isolate (the "
                        "positive targets with the swept reward at 0, the project page's per-reward isolation)")
    t = sub.add_parser("table", parents=[common], help="every Shapes reward per model")
    t.add_argument("--model", action="append", required=True,
                   help="NAME=SOURCE (.ckpt, folder or built-in; repeatable), or SOURCE alone, named by itself "
                        "(a path by its last part, a .ckpt without its suffix)")
    _target_args(t)
    g = sub.add_parser("guidance", parents=[common], help="ShapesEval and rewards over guidance scale x steps x shift")
    g.add_argument("--model", default="shapes", help=".ckpt, pipeline folder or built-in name")
    g.add_argument("--cfgs", type=nonneg_float_list, default="1,2,3,5,7,10", help="comma-separated guidance scales")
    g.add_argument("--steps-list", type=positive_int_list, default="25,50", help="comma-separated Euler step counts")
    g.add_argument("--shifts", type=positive_float_list, default="1",
                   help="comma-separated time shifts (scheduler.shift, >= 1; the published scheduler reads a smaller one as 1)")
    g.add_argument("--reward-cfgs", type=nonneg_float_list, default=None, help="comma-separated reward guidance scales w_r (default: "
                   "--reward-cfg, i.e. w_r = w); each is crossed with every --cfgs value")
    g.add_argument("--reward-directions", default="", help="comma-separated subset of prompt,null, crossed with "
                   "--reward-cfgs (default: --reward-direction)")
    f = sub.add_parser("confusion", help="asked vs detected shape on the one-object prompts of scored folders")
    f.add_argument("--folder", action="append", required=True, help="NAME=DIR, a scored ShapesEval folder")
    f.add_argument("--out", required=True, help="output folder")
    pr = sub.add_parser("paired", help="image-by-image differences between scored folders")
    pr.add_argument("--folder", action="append", required=True,
                    help="NAME=DIR[,DIR...]: scored folders (a table's OUT/table/<model>, a sweep's target_<t>), "
                         "several for one model's seeds; the first NAME is the base")
    pr.add_argument("--out", required=True, help="output folder")
    tr = sub.add_parser("trade", help="no generation: one point per model, a paired difference against another")
    tr.add_argument("--point", action="append", required=True,
                    help="LABEL=X,Y: X and Y each a `paired` output (its --out or paired.json) as PATH[#NAME], NAME "
                         "the compared folder when it has several, or `base` (0 ± 0, the model compared against)")
    tr.add_argument("--x", default="shapes_alignment", help="measure on x (default: shapes_alignment)")
    tr.add_argument("--y", default="shapes_eval", help="measure on y (default: shapes_eval)")
    tr.add_argument("--x-label", default="", help="x axis label")
    tr.add_argument("--y-label", default="", help="y axis label")
    tr.add_argument("--out", required=True, help="output folder (trade.json, trade.md, trade.png)")
    d = sub.add_parser("data", help="how the training data's rewards go together (what a one-reward sweep asks for)")
    d.add_argument("--data", required=True, help="folder of Shapes shards (miro shapes make-dataset)")
    d.add_argument("--limit", type=nonneg_int, default=0, help="read at most this many samples (0: all)")
    d.add_argument("--out", default="", help="also write data.json and data.md here")
    m = sub.add_parser("summarize", help="no generation: controllability (and ShapesEval) of several sampler settings")
    m.add_argument("--setting", action="append", required=True,
                   help="NAME=DIR, a controllability run's --out (with a one-model table run in it, also ShapesEval); "
                        "folders given one NAME are pooled target by target")
    m.add_argument("--out", required=True, help="output folder (settings.json, settings.md)")
    m.add_argument("--targets", choices=["trained", "score", "filled"], default=None,
                   help="keep only these targets of --model (its reward_bins.json) in every curve; "
                        "the ones no run has are listed")
    m.add_argument("--model", default="", help="with --targets: .ckpt, pipeline folder or built-in name")
    args = p.parse_args(argv)
    try:
        return {"convergence": cmd_convergence, "controllability": cmd_controllability, "table": cmd_table,
                "guidance": cmd_guidance,
                "summarize": cmd_summarize, "confusion": cmd_confusion, "paired": cmd_paired, "data": cmd_data,
                "trade": cmd_trade}[args.cmd](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_main(main)
