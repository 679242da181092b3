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

import json
import math
import shutil
from pathlib import Path

import numpy as np

from miro.eval.folder import atomic_write_json, read_folder
from miro.eval.rewards import merge_records, recorded_versions
from miro.io import atomic_path


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


def write_best_folder(src_root: str | Path, records: list[dict], select_key: str, dst_root: str | Path) -> dict:
    """Copy each prompt's best candidate to ``dst_root/<00000>/samples/0000.png`` (GenEval layout)."""
    src_root, dst_root = Path(src_root), Path(dst_root)
    if src_root.resolve() == dst_root.resolve():
        raise ValueError("the best-of-N folder must differ from the candidate folder")
    best = select_best(records, select_key)
    entries = {e.index: e for e in read_folder(src_root)}
    chosen = {}
    for i, rec in sorted(best.items()):
        src = src_root / rec["filename"]
        d = dst_root / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        meta = dict(entries[i].metadata) if i in entries else {"prompt": rec["prompt"], "tag": rec["tag"]}
        (d / "metadata.jsonl").write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
        with atomic_path(d / "samples" / "0000.png") as tmp:
            shutil.copyfile(src, tmp)
        chosen[i] = {"filename": rec["filename"], select_key: rec[select_key]}
    atomic_write_json(dst_root / "best_of_n.json", {"select_by": select_key, "source": str(src_root), "chosen": chosen})
    return chosen
