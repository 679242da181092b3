"""Score a folder of generated images with reward models; summarise the scores.

``rewards.jsonl`` holds one line per (image, batch of scorers): ``filename`` (relative to the
image folder), ``index``, ``sample``, ``tag``, ``prompt``, then for every scorer ``<name>`` (the
raw score) and ``<name>_normalized`` (the value MIRO conditions on, ``Scorer.normalize``), and
``<name>_version`` for a scorer that comes in versions (HPS v2.0 / v2.1, whose scores are not
comparable) or is built with other weights or settings than its defaults (``model=...``, see
``miro.rewards.load_scorer``). Lines for the same image merge, so adding a scorer later appends only its columns,
scoring again with another version of a scorer replaces its columns, and a killed run resumes
where it stopped. Unreadable images are skipped and counted, never scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from miro.eval.folder import JsonlAppender, atomic_write_json, image_id, load_rgb, read_folder, read_jsonl, summary_beside

META_FIELDS = ("filename", "index", "sample", "tag", "prompt", "item")


def default_scorers(root: str | Path | None = None, model: str | None = None) -> list[str]:
    """The scorers ``--scorers auto`` uses: the ``shapes_*`` rewards for a Shapes model
    (:func:`miro.eval.generate.is_shapes_run` on the reward keys recorded in ``generation.json``,
    else on ``model``'s own), else MIRO's seven."""
    import json

    from miro import REWARD_KEYS
    from miro.eval.generate import is_shapes_run, model_reward_keys
    from miro.rewards import available

    keys, prompts = None, None
    if root is not None and (Path(root) / "generation.json").is_file():
        run = json.loads((Path(root) / "generation.json").read_text(encoding="utf-8"))
        keys, prompts = run.get("reward_keys"), run.get("prompts")
        model = model or run.get("config", {}).get("model")
    if not keys and model:
        keys = model_reward_keys(model)
    names = available()
    if is_shapes_run(keys, model, prompts):
        return [n for n in names if n.startswith("shapes_")]
    return [k for k in REWARD_KEYS if k in names]


def scorer_version(scorer) -> str | None:
    """The version a scorer records beside its scores (HPS: ``"v2.0"``/``"v2.1"``), or None."""
    v = getattr(scorer, "version", None)
    return str(v) if v is not None else None


def recorded_versions(records: list[dict], names) -> dict[str, str]:
    """name -> the scorer version recorded beside its scores (``"mixed"`` if they differ, the
    default scorer's None counting as one), for the ``names`` not scored by the default alone."""
    merged = merge_records(records).values()
    out = {}
    for name in names:
        versions = {r.get(f"{name}_version") for r in merged if name in r}
        if versions - {None}:
            out[name] = versions.pop() if len(versions) == 1 else "mixed"
    return out


def read_records(path: str | Path) -> list[dict]:
    """The lines of a rewards.jsonl, each an object with a ``filename`` (the key lines merge on);
    any other file is a one-line error naming it and the missing field."""
    records = read_jsonl(path)
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or "filename" not in r:
            raise ValueError(f"{path}: JSON line {n} has no 'filename' field; expected a rewards.jsonl written by "
                             f"`miro eval rewards`")
    return records


def merge_records(records: list[dict]) -> dict[str, dict]:
    """filename -> the union of its lines (later lines win)."""
    merged: dict[str, dict] = {}
    for r in records:
        merged.setdefault(r["filename"], {}).update(r)
    return merged


def score_folder(root: str | Path, scorers: dict, outfile: str | Path, batch_size: int = 16,
                 progress: bool = True) -> dict:
    """Score every image under ``root`` with ``scorers`` (name -> Scorer), appending to ``outfile``.

    Returns counts: ``images``, ``scored`` (new image x scorer batches written), ``skipped``
    (already scored), ``corrupt`` (unreadable images).
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not scorers:
        raise ValueError("no scorers given")
    root = Path(root)
    done = merge_records(read_records(outfile))
    todo = []  # (filename, meta, path, names still missing)
    n_images = 0
    for entry in read_folder(root):
        for path in entry.samples:
            n_images += 1
            fid = image_id(root, path)
            rec = done.get(fid, {})
            missing = [n for n in scorers
                       if n not in rec or rec.get(f"{n}_version") != scorer_version(scorers[n])]
            if missing:
                meta = {"filename": fid, "index": entry.index, "sample": int(path.stem), "tag": entry.tag,
                        "prompt": entry.prompt}
                if "item" in entry.metadata:  # CuRe: pairs the MIA variants of one artifact
                    meta["item"] = entry.metadata["item"]
                todo.append((meta, path, tuple(missing)))
    counts = {"images": n_images, "scored": 0, "skipped": n_images - len(todo), "corrupt": 0, "corrupt_files": []}
    # group by the set of missing scorers so each batch runs the same models
    groups: dict[tuple, list] = {}
    for t in todo:
        groups.setdefault(t[2], []).append(t)
    from miro.rewards.base import Scorer, load_weights

    for name in dict.fromkeys(n for t in todo for n in t[2]):  # a missing model fails here, named, before the bar
        if isinstance(scorers[name], Scorer):
            load_weights(scorers[name], name)
    bar = tqdm(total=len(todo), desc="rewards", unit="img", disable=not progress)
    with JsonlAppender(outfile) as out:
        for names, group in groups.items():
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                images, metas = [], []
                for meta, path, _ in batch:
                    im = load_rgb(path)
                    if im is None:  # unreadable or truncated PNG: skip and count
                        counts["corrupt"] += 1
                        counts["corrupt_files"].append(meta["filename"])
                    else:
                        images.append(im)
                        metas.append(meta)
                if images:
                    prompts = [m["prompt"] for m in metas]
                    cols, versions = {}, {}
                    with torch.no_grad():
                        for name in names:
                            sc = scorers[name]
                            raw = sc.score(images, prompts).detach().float().cpu()
                            cols[name] = raw.tolist()
                            cols[f"{name}_normalized"] = sc.normalize(raw).float().tolist()
                            # written when None too: it replaces the label of an earlier
                            # run with other settings (lines merge, later lines winning)
                            versions[f"{name}_version"] = scorer_version(sc)
                    for k, meta in enumerate(metas):
                        out.write({**meta, **{c: float(v[k]) for c, v in cols.items()}, **versions})
                        counts["scored"] += 1
                bar.update(len(batch))
    bar.close()
    return counts


def _stats(values: list[float]) -> dict:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "std": None, "sem": None, "min": None, "max": None}
    sem = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "sem": sem,
            "min": float(a.min()), "max": float(a.max())}


def reward_names(records: dict[str, dict]) -> list[str]:
    """Reward columns present in merged records (raw scores, not the ``_normalized`` twins)."""
    cols = set()
    for r in records.values():
        cols.update(k for k, v in r.items() if k not in META_FIELDS and isinstance(v, (int, float)))
    return sorted(c for c in cols if not c.endswith("_normalized"))


def summarize(records: list[dict]) -> dict:
    """Per-reward statistics (``std`` is the population std, ``sem`` the standard error), per tag.

    ``overall`` is the mean over rewards of the mean normalised value clipped to [0, 1]: the
    scale MIRO conditions on, so rewards with different raw ranges weigh alike.
    """
    merged = merge_records(records)
    out = {"n_images": len(merged), "rewards": {}}
    norms = []
    names = reward_names(merged)
    versions = recorded_versions(list(merged.values()), names)
    for name in names:
        rows = [r for r in merged.values() if name in r]
        st = _stats([r[name] for r in rows])
        nst = _stats([r.get(f"{name}_normalized") for r in rows])
        tags = sorted({r.get("tag", "prompt") for r in rows})
        st["by_tag"] = {t: _stats([r[name] for r in rows if r.get("tag", "prompt") == t]) for t in tags}
        st["normalized_mean"] = nst["mean"]
        if name in versions:
            st["version"] = versions[name]
        out["rewards"][name] = st
        if nst["mean"] is not None:
            norms.append(min(1.0, max(0.0, nst["mean"])))
    out["overall"] = float(np.mean(norms)) if norms else None
    deltas = mia_deltas(merged)
    if deltas:
        out["mia_deltas"] = deltas
    return out


def mia_deltas(merged: dict[str, dict], base: str = "item") -> dict:
    """CuRe: per reward and MIA variant, score(variant) - score(item alone), paired by artifact and
    sample index (same seed offset within a prompt), as mean/std/n."""
    rows = [r for r in merged.values() if "item" in r]
    if not rows or not any(r.get("tag") == base for r in rows):
        return {}
    out = {}
    for name in reward_names(merged):
        ref = {(r["item"], r["sample"]): r[name] for r in rows if r.get("tag") == base and name in r}
        per = {}
        for r in rows:
            key = (r["item"], r["sample"])
            if r.get("tag") != base and name in r and key in ref:
                per.setdefault(r["tag"], []).append(r[name] - ref[key])
        if per:
            out[name] = {v: _stats(d) for v, d in sorted(per.items())}
    return out


def _fmt(x) -> str:
    return f"{x:.4f}" if x is not None else "-"  # None: no finite value to average


def format_summary(summary: dict) -> str:
    lines = [f"{'reward':<28} {'n':>6} {'mean':>10} {'std':>10} {'norm.mean':>10}"]
    for name, st in summary["rewards"].items():
        label = f"{name} ({st['version']})" if st.get("version") else name
        lines.append(f"{label:<28} {st['n']:>6} {_fmt(st['mean']):>10} {_fmt(st['std']):>10} "
                     f"{_fmt(st['normalized_mean']):>10}")
    return "\n".join(lines)


def summarize_file(path: str | Path, outfile: str | Path | None = None) -> dict:
    """Summarise ``rewards.jsonl`` into ``rewards_summary.json`` beside it (another file
    ``X.jsonl`` into ``X_summary.json``), or into ``outfile``."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise ValueError(f"{path} holds no reward lines")
    summary = summarize(records)
    atomic_write_json(outfile or summary_beside(path, "rewards.jsonl", "rewards_summary.json"), summary)
    return summary
