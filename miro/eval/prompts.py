"""Prompt sets for evaluation: GenEval, PartiPrompts, CuRe, ShapesEval, or a file.

Every loader returns a list of :class:`PromptItem`, whose ``metadata`` is the dict written to
``<outdir>/<00000>/metadata.jsonl`` (GenEval's layout). It always holds ``prompt`` and ``tag``
(the category the per-category tables group by).

Public files are never committed: ``--prompts geneval`` / ``parti`` / ``cure`` look in
``$MIRO_DATA_DIR/{geneval,partiprompts,cure}/`` (the same layout as the project's shared data
folder), then in the download cache, and otherwise fetch the file once from its public source.
"""

from __future__ import annotations

import csv
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from miro.io import atomic_write_bytes, read_jsonl_objects

# Public sources (fetched once into the cache). GenEval: djghosh13/geneval (MIT);
# PartiPrompts: google-research/parti (Apache-2.0); CuRe: aniketrege/cure-bench (MIT).
GENEVAL_URL = "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl"
PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
CURE_URL = "https://raw.githubusercontent.com/aniketrege/cure-bench/main/prepare_data/cure_dataset_csv/{name}.csv"
# The six CuRe super-category files (cure-bench prepare_data/cure_dataset_csv/).
CURE_FILES = ("architecture", "art", "celebrations", "fashion", "food", "people")
# CuRe's marginal-information variants: the item alone, + its category, + category and region.
CURE_VARIANTS = ("item", "item+category", "item+category+region")
PROMPT_SETS = ("geneval", "parti", "shapes", "cure")


@dataclass
class PromptItem:
    """One evaluation prompt."""

    prompt: str  # the text given to the generator
    metadata: dict = field(default_factory=dict)  # written verbatim to metadata.jsonl

    def __post_init__(self):
        self.metadata = dict(self.metadata)
        self.metadata.setdefault("prompt", self.prompt)
        self.metadata.setdefault("tag", "prompt")


def cache_dir() -> Path:
    """Where downloaded prompt files live: ``$MIRO_CACHE_DIR/prompts`` or ``~/.cache/miro/prompts``."""
    from miro.io import cache_root

    return cache_root() / "prompts"


def fetch(url: str, dest: Path, timeout: float = 30.0, hint: str = "") -> Path:
    """Download ``url`` to ``dest`` atomically (temp file + rename); offline, a clear error that
    ends with ``hint`` (where else the file can come from)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed https URLs
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(  # an OSError: the CLIs report it in one line
            f"could not download {url} ({e}){'; ' + hint if hint else ''} (see docs/evaluation.md)"
        ) from e
    atomic_write_bytes(dest, data)
    return dest


def _locate(subdir: str, filename: str, url: str | None, instead: str = "pass the file with --prompts PATH") -> Path:
    """Find a public data file in $MIRO_DATA_DIR, then the cache; download it if allowed.
    ``instead``: how else a user can give the file, named in the offline error."""
    data_dir = os.environ.get("MIRO_DATA_DIR")
    if data_dir:
        p = Path(data_dir) / subdir / filename
        if p.is_file():
            return p
    p = cache_dir() / subdir / filename
    if p.is_file():
        return p
    if url is None:
        raise FileNotFoundError(f"{subdir}/{filename} not found in $MIRO_DATA_DIR or {cache_dir()}")
    if offline():
        raise FileNotFoundError(f"{subdir}/{filename} is not in $MIRO_DATA_DIR or {cache_dir()}, and this run is "
                                f"offline (HF_HUB_OFFLINE, --local-files-only): {instead}, or put it at "
                                f"$MIRO_DATA_DIR/{subdir}/{filename}")
    return fetch(url, p, hint=f"{instead}, or put it at $MIRO_DATA_DIR/{subdir}/{filename}")


def offline() -> bool:
    """Whether the run must not use the network: ``HF_HUB_OFFLINE`` set to a true value (as the hub
    libraries read it), which ``--local-files-only`` sets for the whole command."""
    from miro.hub import env_flag

    return env_flag("HF_HUB_OFFLINE")


# --------------------------------------------------------------------------------------------
# Loaders


def load_geneval(path: str | Path | None = None) -> list[PromptItem]:
    """GenEval's ``evaluation_metadata.jsonl`` (553 lines with ``tag``, ``include``, ``prompt``)."""
    path = Path(path) if path is not None else _locate("geneval", "evaluation_metadata.jsonl", GENEVAL_URL)
    items = []
    for n, meta in read_jsonl_objects(path, "a GenEval metadata line"):
        if "prompt" not in meta or "tag" not in meta:
            raise ValueError(f"{path}:{n}: a GenEval metadata line needs 'prompt' and 'tag'; got keys {sorted(meta)}")
        items.append(PromptItem(meta["prompt"], meta))
    return items


def load_parti(path: str | Path | None = None) -> list[PromptItem]:
    """PartiPrompts TSV (``Prompt, Category, Challenge, Note``); tag = Category.

    Read with ``QUOTE_NONE``: some prompts begin with a quoted word ("G I G G L E" ...), which
    the default CSV dialect would strip.
    """
    path = Path(path) if path is not None else _locate("partiprompts", "PartiPrompts.tsv", PARTI_URL)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or [c.strip() for c in rows[0][:2]] != ["Prompt", "Category"]:
        raise ValueError(f"{path}: expected a PartiPrompts TSV with header 'Prompt\\tCategory\\t...'")
    header = [c.strip().lower() for c in rows[0]]
    items = []
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        rec = dict(zip(header, row + [""] * (len(header) - len(row))))
        meta = {"tag": rec["category"], "prompt": rec["prompt"], "challenge": rec.get("challenge", ""),
                "note": rec.get("note", "")}
        items.append(PromptItem(rec["prompt"], meta))
    return items


def load_txt(path: str | Path) -> list[PromptItem]:
    """One prompt per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [PromptItem(line.strip(), {"tag": "prompt"}) for line in f if line.strip()]


def cure_prompt(item: str, category: str | None = None, region: str | None = None) -> str:
    """A CuRe prompt with marginal information added (CuRe: name, then category, then region).

    The base caption "An image of {item}" follows the SRPO+MIA prompt list; attributes are
    appended by :func:`miro.align.mia_prompts` (the one definition shared with SRPO), which reads
    ``Rice_Dish`` as "Rice Dish".
    """
    from miro.align.prompts import mia_prompts

    pos, _ = mia_prompts(f"An image of {item}", category=category, region=region)
    return pos


def load_cure(cure_dir: str | Path | None = None, variants: tuple[str, ...] = CURE_VARIANTS) -> list[PromptItem]:
    """CuRe's 300 artifacts x MIA variants; tag = the variant, ``supercategory`` = the CSV name."""
    bad = [v for v in variants if v not in CURE_VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown CuRe variant(s) {bad or variants!r}; choose from {', '.join(CURE_VARIANTS)}")
    if cure_dir is not None:
        paths = [Path(cure_dir) / f"{n}.csv" for n in CURE_FILES]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"CuRe CSV(s) not found: {', '.join(missing)}")
    else:
        paths = [_locate("cure", f"{n}.csv", CURE_URL.format(name=n),
                         instead=f"pass --cure-dir DIR, a folder of CuRe's {len(CURE_FILES)} CSVs ({', '.join(CURE_FILES)})")
                 for n in CURE_FILES]
    items = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            if not r.get("Item"):
                continue
            base = {"item": r["Item"], "category": r.get("Category", ""), "region": r.get("Region", ""),
                    "supercategory": path.stem, "continent": r.get("Continent", ""),
                    "global_north_south": r.get("Global North/South", "")}
            for v in variants:
                cat = base["category"] if "category" in v else None
                reg = base["region"] if "region" in v else None
                prompt = cure_prompt(base["item"], cat, reg)
                items.append(PromptItem(prompt, {**base, "tag": v, "prompt": prompt, "mia_variant": v}))
    return items


def load_shapes() -> list[PromptItem]:
    """ShapesEval's prompts (GenEval-format metadata from the Shapes world)."""
    from miro.shapes import eval as shapes_eval

    return [PromptItem(m["prompt"], m) for m in shapes_eval.evaluation_metadata()]


def load_prompts(spec: str, cure_dir: str | None = None, cure_variants: tuple[str, ...] = CURE_VARIANTS,
                 limit: int | None = None) -> list[PromptItem]:
    """Resolve ``--prompts``: a set name (geneval, parti, shapes, cure) or a .jsonl/.tsv/.txt file."""
    if spec == "geneval":
        items = load_geneval()
    elif spec == "parti":
        items = load_parti()
    elif spec == "shapes":
        items = load_shapes()
    elif spec == "cure":
        items = load_cure(cure_dir, cure_variants)
    else:
        p = Path(spec)
        if not p.is_file():
            raise ValueError(f"--prompts {spec!r}: not one of {', '.join(PROMPT_SETS)} and not an existing file")
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            items = load_geneval(p)
        elif suffix == ".tsv":
            items = load_parti(p)
        elif suffix == ".txt":
            items = load_txt(p)
        else:
            raise ValueError(f"--prompts {spec!r}: unsupported file type {suffix!r}; use .jsonl, .tsv or .txt")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        items = items[:limit]
    if not items:
        raise ValueError(f"--prompts {spec!r} holds no prompts")
    return items
