"""Markdown and HTML reports of one evaluation run, with image grids, tables and PNG plots.

A run folder (what ``miro eval all`` writes) may hold ``generation.json``, the images,
``results.jsonl`` / ``geneval_summary.json`` (GenEval-like or ShapesEval), ``rewards.jsonl`` /
``rewards_summary.json``, ``best_of_n_curve.json``, ``judge_summary.json`` and a ``sweep/``
folder with ``sweep.json`` (or be a sweep's own folder, ``sweep.json`` beside its ``target_<t>/``
folders). The report shows whatever is present; an unreadable image is a placeholder in the
grids. The paper's published numbers appear beside ours only for published MIRO checkpoints
(:func:`paper_numbers.paper_row`).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path

from miro.eval import paper_numbers as P
from miro.eval import plots
from miro.eval.folder import read_folder
from miro.eval.geneval_rules import GENEVAL_TAGS
from miro.eval.rewards import merge_records, read_records
from miro.io import atomic_path, atomic_write_text


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


class _Doc:
    """Blocks rendered to both Markdown and HTML."""

    def __init__(self):
        self.blocks: list[tuple[str, object]] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", (level, text)))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list]):
        self.blocks.append(("table", (header, [[_fmt(c) for c in r] for r in rows])))

    def img(self, rel: str, alt: str):
        self.blocks.append(("img", (rel, alt)))

    def markdown(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "table":
                header, rows = v
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
                out += ["| " + " | ".join(r) + " |" for r in rows]
            elif kind == "img":
                out.append(f"![{v[1]}]({v[0]})")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>"]
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{html.escape(v[1])}</h{v[0]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(v)}</p>")
            elif kind == "table":
                header, rows = v
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                out.append(f"<img src='{html.escape(v[0])}' alt='{html.escape(v[1])}' style='max-width:100%'>")
        out.append("</body></html>")
        return "\n".join(out)


def _geneval_section(doc: _Doc, run: Path, outdir: Path, row: str | None):
    summ = _load(run / "geneval_summary.json")
    if summ is None:
        return
    name = summ.get("benchmark", "GenEval-like")
    doc.h(2, name)
    doc.p(f"{summ['images']} images, {summ['prompts']} prompts; images correct {100 * summ['correct_images']:.1f}%, "
          f"prompts with a correct image {100 * summ['correct_prompts']:.1f}%. "
          + ("Scores use a transformers detector, not GenEval's mmdet model: compare trends, not digits."
             if name == "GenEval-like" else ""))
    order = [t for t in GENEVAL_TAGS if t in summ["tags"]] + [t for t in summ["tags"] if t not in GENEVAL_TAGS]
    paper = P.GENEVAL.get(row) if row and name == "GenEval-like" else None
    header = ["category", "accuracy (%)", "correct / total"] + ([f"paper: {row} (%)"] if paper else [])
    pct = lambda v: None if v is None else f"{v:.2f}"  # noqa: E731 - percent with 2 decimals
    rows = []
    for t in order:
        s = summ["tags"][t]
        rows.append([t, pct(100 * s["accuracy"]), f"{s['correct']} / {s['total']}"] + ([pct(paper.get(t))] if paper else []))
    rows.append(["overall", pct(100 * summ["overall"]), ""] + ([P.GENEVAL_OVERALL.get(row)] if paper else []))
    doc.table(header, rows)
    plots.plot_categories({t: summ["tags"][t]["accuracy"] for t in order}, outdir / "categories.png", name, paper,
                          f"paper: {row}")
    doc.img("categories.png", "per-category accuracy")


def _rewards_section(doc: _Doc, run: Path, outdir: Path, row: str | None):
    summ = _load(run / "rewards_summary.json")
    if summ is None:
        return
    doc.h(2, "Rewards")
    paper_cols = {key: col for col, (key, _) in P.REWARD_COLUMNS.items()}
    with_paper = row in P.REWARDS if row else False
    header = ["reward", "n", "mean", "std", "normalised mean"]
    if with_paper:
        header += ["ours in paper unit", f"paper: {row}", "paper: Baseline"]
    rows, notes = [], []
    for name, st in summ["rewards"].items():
        r = [f"{name} ({st['version']})" if st.get("version") else name, st["n"], st["mean"], st["std"],
             st["normalized_mean"]]
        if with_paper:
            col = paper_cols.get(name)
            if col and not P.comparable(name, st.get("version")):
                notes.append(P.version_note(name, st.get("version")))
                col = None
            r += [P.to_paper_unit(col, st["mean"]) if col and st["mean"] is not None else None,
                  P.REWARDS[row].get(col) if col else None, P.REWARDS["Baseline"].get(col) if col else None]
        rows.append(r)
    doc.table(header, rows)
    if with_paper:
        doc.p("Paper numbers: PartiPrompts, 256 px (MIRO project page). They apply when this run used PartiPrompts.")
        for note in notes:
            doc.p(note)
    names = list(summ["rewards"])
    tags = sorted({t for st in summ["rewards"].values() for t in st.get("by_tag", {})})
    if 1 < len(tags) <= 24:  # per category (GenEval tag, Parti category, CuRe MIA variant)
        doc.table(["tag"] + names, [[t] + [summ["rewards"][n].get("by_tag", {}).get(t, {}).get("mean") for n in names]
                                    for t in tags])
    if summ.get("mia_deltas"):
        doc.p("CuRe marginal information: mean change of each reward when the category (and region) is added "
              "to the prompt, paired by artifact and sample.")
        variants = sorted({v for d in summ["mia_deltas"].values() for v in d})
        doc.table(["reward"] + [f"{v} - item" for v in variants],
                  [[n] + [d.get(v, {}).get("mean") for v in variants] for n, d in summ["mia_deltas"].items()])
    # one value per image, as the summary counts them: a rescored image (another scorer version) has
    # two lines, and the later one holds its score
    recs = merge_records(read_records(run / "rewards.jsonl")).values()
    vals = {n: [r[n] for r in recs if isinstance(r.get(n), float)] for n in summ["rewards"]}
    vals = {n: v for n, v in vals.items() if v}
    if vals:
        plots.plot_reward_hist(vals, outdir / "rewards_hist.png")
        doc.img("rewards_hist.png", "reward histograms")


def _best_of_n_section(doc: _Doc, run: Path, outdir: Path, row: str | None):
    curve = _load(run / "best_of_n_curve.json")
    if curve is None:
        return
    doc.h(2, f"Best-of-N (selected by {curve['select_by']}, {curve['mode']})")
    keys = list(curve["values"])
    doc.table(["N"] + keys, [[n] + [curve["values"][k][i] for k in keys] for i, n in enumerate(curve["n"])])
    paper = P.best_of_n_reference(keys, curve.get("versions")) if row else None
    plots.plot_best_of_n(curve, outdir / "best_of_n.png", paper=paper)
    if paper:
        doc.p("Paper points (dashed): the MIRO project page's best-of-N endpoints, in our raw-score units.")
    doc.img("best_of_n.png", "best-of-N curves")


def _sweep_dir(run: Path) -> Path | None:
    """Where a sweep's ``sweep.json`` and ``target_<t>/`` folders are: ``<run>/sweep/`` (beside an
    evaluation run) or ``<run>`` itself (the ``--outdir`` of ``miro eval sweep``)."""
    for d in (run / "sweep", run):
        if (d / "sweep.json").is_file():
            return d
    return None


def _unreadable_note(doc: _Doc, skipped: list) -> None:
    if skipped:
        doc.p(f"{len(skipped)} unreadable image(s) shown as crossed grey cells (first: {skipped[0]}).")


def _sweep_section(doc: _Doc, run: Path, outdir: Path, row: str | None):
    sweep_dir = _sweep_dir(run)
    if sweep_dir is None:
        return
    sweep = _load(sweep_dir / "sweep.json")
    from miro.eval.sweep import sweep_grid

    names = sorted(sweep["spearman_means"])
    doc.h(2, f"Reward sweep: {sweep['swept']}")
    has_ge = "spearman_geneval" in sweep
    paper = P.AESTHETIC_SWEEP if row and sweep["swept"] == "aesthetic_score" else None
    header = ["target"] + names + (["GenEval-style overall (%)"] if has_ge else [])
    header += ["paper: GenEval (%)", "paper: Aesthetic"] if paper else []
    rows = []
    for r in sweep["per_target"]:
        ref = paper.get(r["target"], (None, None)) if paper else None
        rows.append([r["target"]] + [r[n]["mean"] for n in names] + ([100 * r["geneval_overall"]] if has_ge else [])
                    + (list(ref) if paper else []))
    doc.table(header, rows)
    doc.p("Spearman rho (target vs mean score): " + ", ".join(f"{n} {sweep['spearman_means'][n]:.3f}" for n in names)
          + (f", GenEval-style overall {sweep['spearman_geneval']:.3f}" if has_ge else ""))
    if paper:
        doc.p("Paper: synthetic-caption MIRO's aesthetic-target sweep (MIRO project page).")
    plots.plot_sweep(sweep, outdir / "sweep.png")
    doc.img("sweep.png", "reward sweep")
    skipped: list = []
    try:
        _save_png(sweep_grid(sweep_dir, sweep["targets"], skipped=skipped), outdir / "sweep_grid.png")
        doc.img("sweep_grid.png", "sweep grid: rows = prompts, columns = targets")
        _unreadable_note(doc, skipped)
    except ValueError:
        pass


def _save_png(image, path: Path) -> None:
    """Atomically, as every other report file: a killed report leaves the previous grid, never a cut one."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _spread(entries: list, k: int) -> list:
    """Up to k prompt folders taken round-robin over tags, so every category shows up."""
    by_tag: dict[str, list] = {}
    for e in entries:
        by_tag.setdefault(e.tag, []).append(e)
    out, queues = [], list(by_tag.values())
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop(0))
    return sorted(out, key=lambda e: e.index)


# The settings behind the paper's numbers (the published pipeline's defaults, miro_facts.md "Inference")
PUBLISHED_STEPS, PUBLISHED_CFG = 50, 7.0

# What the sections below read: a folder holding none of them (and no images) has nothing to report.
_RESULT_FILES = ("generation.json", "geneval_summary.json", "rewards_summary.json", "best_of_n_curve.json",
                 "judge_summary.json", "sweep/sweep.json", "sweep.json")


def _unlike_paper(cfg: dict) -> str | None:
    """Why a published checkpoint's run is not comparable with the paper's numbers (best-of-N,
    other sampler settings or reward targets), or None when it is."""
    if cfg.get("best_of_n"):
        return "a best-of-N selection"
    if cfg.get("steps", PUBLISHED_STEPS) != PUBLISHED_STEPS or cfg.get("cfg", PUBLISHED_CFG) != PUBLISHED_CFG:
        return f"sampled with {cfg.get('steps')} steps and CFG {cfg.get('cfg')}, not the published {PUBLISHED_STEPS} and {PUBLISHED_CFG:g}"
    if any(v != 1.0 for v in (cfg.get("reward_targets") or {}).values()) or cfg.get("negative_reward_targets") \
            or cfg.get("reward_cfg") is not None:
        return "reward targets or scales other than the defaults"
    return None


def build_report(run_dir: str | Path, outdir: str | Path | None = None, max_prompts: int = 8) -> Path:
    """Write ``report.md`` and ``report.html`` (+ PNGs) into ``outdir`` (default ``<run>/report``)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} does not exist")
    try:
        entries = [e for e in read_folder(run) if e.samples]
    except ValueError:  # no <00000>/metadata.jsonl prompt folders
        entries = []
    # A run without images may still hold results to show (a copied summary, a sweep/ folder); a folder
    # with neither is a wrong path, refused before report/ is created in it.
    if not entries and not any((run / f).is_file() for f in _RESULT_FILES):
        raise ValueError(f"{str(run_dir)!r} holds no generated images (<00000>/samples/*.png) and no results "
                         f"({', '.join(_RESULT_FILES)}); pass the folder `miro eval generate` or `miro eval all` wrote")
    outdir = Path(outdir) if outdir else run / "report"
    outdir.mkdir(parents=True, exist_ok=True)
    from miro.data.shard_files import remove_stale_temps

    remove_stale_temps(outdir, "*")  # what a report killed while writing left (miro.io.atomic_path's names)
    gen = _load(run / "generation.json") or {}
    cfg = gen.get("config", {})
    row = P.paper_row(cfg.get("model"), cfg.get("variant"))
    unlike = _unlike_paper(cfg) if row else None
    doc = _Doc()
    title = f"Evaluation of {cfg.get('model', run.name)}" + (f" ({cfg['variant']})" if cfg.get("variant") else "")
    doc.h(1, title)
    doc.p(f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC from {run}.")
    if cfg:
        doc.table(["setting", "value"], [[k, json.dumps(v) if isinstance(v, dict) else v] for k, v in cfg.items()]
                  + [["prompts", gen.get("prompts")],
                     ["paper row", f"n/a ({unlike})" if unlike else row or "n/a (not a published checkpoint)"]])
    if unlike:  # the paper's numbers are one image per prompt at the published sampler settings
        row = None
    entries = _spread(entries, max_prompts)
    if entries:
        ncols = max(len(e.samples) for e in entries)
        paths = []
        for e in entries:
            paths += e.samples + [None] * (ncols - len(e.samples))  # a short row stays short (blank cells)
        skipped: list = []
        _save_png(plots.image_grid(paths, ncols, skipped=skipped), outdir / "samples.png")
        doc.h(2, "Samples")
        doc.img("samples.png", "samples: one row per prompt")
        _unreadable_note(doc, skipped)
        doc.table(["row", "tag", "prompt"], [[k, e.tag, e.prompt] for k, e in enumerate(entries)])
    _geneval_section(doc, run, outdir, row)
    _rewards_section(doc, run, outdir, row)
    _best_of_n_section(doc, run, outdir, row)
    _sweep_section(doc, run, outdir, row)
    judge = _load(run / "judge_summary.json")
    if judge:
        doc.h(2, "MLLM judge" + (f" ({judge['rubric']} rubric)" if judge.get("rubric") else ""))
        doc.table(["field", "mean", "n"], [[k, v["mean"], v["n"]] for k, v in judge.get("fields", {}).items()])
    atomic_write_text(outdir / "report.md", doc.markdown())
    atomic_write_text(outdir / "report.html", doc.html(title))
    return outdir / "report.md"
