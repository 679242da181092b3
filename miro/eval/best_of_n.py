"""Best-of-N selection and test-time-scaling curves, computed from already scored candidates.

Generate N candidates per prompt once (``miro eval generate --n-samples N``), score them
(``miro eval rewards``), then:

* :func:`select_best` keeps, per prompt, the candidate that maximises a selection scorer and
  :func:`write_best_folder` copies it into a new GenEval-layout folder (which GenEval-like can
  score: the paper's "IR-scaled MIRO, best-of-128" row);
* :func:`curve` gives the score-vs-N curve (the paper's test-time-scaling figure) for every
  n <= N without regenerating. ``mode="expected"`` is the exact mean over all size-n subsets of
  the N candidates: with candidates sorted by the selection score, the k-th smallest (1-based)
  is the pick of a random n-subset with probability C(k-1, n-1) / C(N, n). ``mode="prefix"``
  uses the first n candidates (what generating only n would have given, same seeds).

Selection and reporting scorers may differ (select by HPSv2, report ImageReward). Ties in the
selection score go to the candidate with the higher sample index, in both modes' ordering.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import numpy as np

from miro.eval.folder import atomic_write_json, read_folder
from miro.eval.generate import RUN_FILE
from miro.eval.rewards import merge_records, recorded_versions
from miro.io import atomic_path, atomic_write_text


def _order(select: np.ndarray) -> np.ndarray:
    """Indices sorting candidates by selection score ascending; ties: lower sample index first."""
    return np.lexsort((np.arange(len(select)), select))


def expected_best(select, value, n: int) -> float:
    """E[value of the argmax-``select`` candidate of a uniformly random n-subset]."""
    select = np.asarray(select, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    N = len(select)
    if len(value) != N:
        raise ValueError(f"select has {N} candidates but value has {len(value)}")
    if not 1 <= n <= N:
        raise ValueError(f"n must be in [1, {N}]; got {n}")
    order = _order(select)
    total = math.comb(N, n)
    weights = np.array([math.comb(k - 1, n - 1) / total for k in range(1, N + 1)])
    return float(np.dot(weights, value[order]))


def prefix_best(select, value, n: int) -> float:
    """Value of the argmax-``select`` candidate among the first n."""
    select = np.asarray(select, dtype=np.float64)[:n]
    value = np.asarray(value, dtype=np.float64)[:n]
    if len(select) < n or n < 1:
        raise ValueError(f"n must be in [1, {len(np.atleast_1d(select))}]; got {n}")
    return float(value[_order(select)[-1]])


def default_ns(N: int) -> list[int]:
    """1, 2, 4, ... up to N (N itself included), as in the paper's figure (N = 1 ... 128)."""
    ns = [1 << p for p in range(int(math.log2(N)) + 1)] if N >= 1 else []
    if ns and ns[-1] != N:
        ns.append(N)
    return ns


def group_candidates(records: list[dict], keys: list[str]) -> dict[int, list[dict]]:
    """prompt index -> its candidates (merged reward lines holding every key), sorted by sample."""
    merged = merge_records(records)
    groups: dict[int, list[dict]] = {}
    for r in merged.values():
        if all(k in r and r[k] is not None and math.isfinite(r[k]) for k in keys):
            groups.setdefault(int(r["index"]), []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: int(r["sample"]))
    return groups


def curve(records: list[dict], select_key: str, value_keys: list[str] | None = None,
          ns: list[int] | None = None, mode: str = "expected") -> dict:
    """Mean over prompts of the best-of-n value, for each n (see the module docstring)."""
    if mode not in ("expected", "prefix"):
        raise ValueError(f"mode must be 'expected' or 'prefix'; got {mode!r}")
    value_keys = list(value_keys or [select_key])
    groups = group_candidates(records, [select_key, *value_keys])
    if not groups:
        raise ValueError(f"no prompt has candidates scored with {', '.join({select_key, *value_keys})}")
    N = min(len(g) for g in groups.values())
    uneven = sorted({len(g) for g in groups.values()})
    ns = list(ns or default_ns(N))
    if max(ns) > N:
        raise ValueError(f"n up to {max(ns)} requested but some prompts have only {N} scored candidates")
    fn = expected_best if mode == "expected" else prefix_best
    out = {"select_by": select_key, "mode": mode, "n": ns, "n_prompts": len(groups), "candidates": N,
           "candidates_per_prompt": uneven, "values": {}, "versions": recorded_versions(records, value_keys)}
    for vk in value_keys:
        means = []
        for n in ns:
            per_prompt = [fn([r[select_key] for r in g[:N]], [r[vk] for r in g[:N]], n) for g in groups.values()]
            means.append(float(np.mean(per_prompt)))
        out["values"][vk] = means
    return out


def select_best(records: list[dict], select_key: str) -> dict[int, dict]:
    """prompt index -> the record of its best candidate by ``select_key``."""
    groups = group_candidates(records, [select_key])
    return {i: g[int(_order(np.array([r[select_key] for r in g]))[-1])] for i, g in groups.items()}


# Files a best-of-N folder holds (from this module, then from scoring, judging and reporting it):
# all that --overwrite removes, so that no score of the old selection outlives its images.
BEST_FOLDER_FILES = ("generation.json", "best_of_n.json", "results.jsonl", "geneval_summary.json",
                     "shapes_eval_summary.json", "rewards.jsonl", "rewards_summary.json", "best_of_n_curve.json",
                     "best_of_n.png", "judge.jsonl", "judge_summary.json")
REPORT_FILES = ("report.md", "report.html", "*.png")  # in report/ (miro.eval.report.build_report)


def _is_best_folder(root: Path) -> bool:
    """Whether ``root`` was written by :func:`write_best_folder` (its run record says so)."""
    if (root / "best_of_n.json").is_file():
        return True
    run = root / RUN_FILE
    try:
        return "best_of_n" in json.loads(run.read_text(encoding="utf-8")).get("config", {})
    except (OSError, ValueError, AttributeError):
        return False


def check_best_destination(src_root: str | Path, dst_root: str | Path, overwrite: bool = False) -> None:
    """Refuse a destination that would mix selections: anything in it but an empty folder, unless
    ``overwrite`` and it is an earlier best-of-N folder. Checked before anything is written.

    Copying over an earlier selection would leave its results.jsonl, rewards.jsonl and prompt folders
    beside the new images, and every score read from the folder would then describe other images.
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    if dst_root.exists() and not dst_root.is_dir():
        raise ValueError(f"--outdir {dst_root} is a file; it names the folder for the best candidates")
    if dst_root.exists() and src_root.resolve() == dst_root.resolve():
        raise ValueError("the best-of-N folder must differ from the candidate folder")
    if not dst_root.is_dir() or not any(dst_root.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--outdir {dst_root} is not empty; pass --overwrite to replace an earlier best-of-N "
                         f"folder there (its images and scores), or choose another --outdir")
    if not _is_best_folder(dst_root):
        raise ValueError(f"--outdir {dst_root} holds no best_of_n.json: --overwrite replaces only a folder "
                         f"`miro eval best-of-n` wrote; choose another --outdir")


def _clear_best_folder(root: Path) -> None:
    """Remove what :data:`BEST_FOLDER_FILES`, :data:`REPORT_FILES` and the prompt folders
    (``<00000>/metadata.jsonl``, ``samples/<0000>.png``) name; anything else stays."""
    for d in (p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for png in (d / "samples").glob("*.png"):
            if png.stem.isdigit():
                png.unlink()
        (d / "metadata.jsonl").unlink(missing_ok=True)
        for sub in (d / "samples", d):
            with contextlib.suppress(OSError):  # kept when it holds something of the user's
                sub.rmdir()
    for name in BEST_FOLDER_FILES:
        (root / name).unlink(missing_ok=True)
    for pattern in REPORT_FILES:
        for f in (root / "report").glob(pattern):
            f.unlink()
    with contextlib.suppress(OSError):
        (root / "report").rmdir()


def write_best_folder(src_root: str | Path, records: list[dict], select_key: str, dst_root: str | Path,
                      overwrite: bool = False) -> dict:
    """Copy each prompt's best candidate to ``dst_root/<00000>/samples/0000.png`` (GenEval layout).

    ``dst_root`` must be empty or new; ``overwrite`` replaces an earlier best-of-N folder there
    (:func:`check_best_destination`). Its ``generation.json`` is the candidates' run record (so
    ``--detector auto`` and ``--scorers auto`` pick as for the candidates) with ``n_samples`` 1 and
    ``best_of_n`` (``select_by``, ``source``) added, which also stops ``miro eval generate`` from
    adding samples to it.
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    if src_root.resolve() == dst_root.resolve():
        raise ValueError("the best-of-N folder must differ from the candidate folder")
    check_best_destination(src_root, dst_root, overwrite)
    best = select_best(records, select_key)
    entries = {e.index: e for e in read_folder(src_root)}
    if dst_root.is_dir():
        _clear_best_folder(dst_root)
    src_run = json.loads((src_root / RUN_FILE).read_text(encoding="utf-8")) if (src_root / RUN_FILE).is_file() else {}
    config = {**src_run.get("config", {}), "n_samples": 1, "best_of_n": {"select_by": select_key, "source": str(src_root)}}
    # written first: a run killed half-way still leaves a folder that --overwrite recognises
    atomic_write_json(dst_root / RUN_FILE, {"config": config, "prompts": src_run.get("prompts"), "n_prompts": len(best),
                                            "reward_keys": src_run.get("reward_keys")})
    chosen = {}
    for i, rec in sorted(best.items()):
        src = src_root / rec["filename"]
        d = dst_root / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        meta = dict(entries[i].metadata) if i in entries else {"prompt": rec["prompt"], "tag": rec["tag"]}
        atomic_write_text(d / "metadata.jsonl", json.dumps(meta, ensure_ascii=False) + "\n")
        with atomic_path(d / "samples" / "0000.png") as tmp:
            shutil.copyfile(src, tmp)
        chosen[i] = {"filename": rec["filename"], select_key: rec[select_key]}
    atomic_write_json(dst_root / "best_of_n.json", {"select_by": select_key, "source": str(src_root), "chosen": chosen})
    return chosen
