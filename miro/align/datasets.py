"""Prompt and image–text datasets for SRPO.

Readers (each returns a list of plain item dicts with at least ``caption``):

- :func:`read_fork_json`: the SRPO/FastVideo JSON list written by the FLUX embedding preprocessor
  (``caption``, ``prompt_embed_path``, ``pooled_prompt_embeds_path``, ``text_ids``; the three
  files live in ``prompt_embed/``, ``pooled_prompt_embeds/``, ``text_ids/`` beside the JSON),
  with the optional MIA fields ``mia_category``/``category``, ``mia_region``/``region``,
  ``pos_prompt``, ``neg_prompt``, ``image_path``, ``Item``/``item``.
- :func:`read_cure`: the CuRe benchmark CSVs (``Category, Region, [Time], Item, Continent, ...``),
  one item per artifact, caption ``"An image of {Item}"`` (the fork's ``prompts.txt`` form).
- :func:`read_items`: dispatch on a path (``.json``, ``.jsonl``, ``.txt``, ``.csv``, a folder of CSVs).

:class:`OfflineImageDataset` loads the real images of items for offline SRPO; unreadable images
are skipped and counted.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import torch

from miro.io import read_jsonl_objects, to_rgb

log = logging.getLogger(__name__)

CURE_TEMPLATE = "An image of {item}"


def normalize_item(raw: dict, base_dir: str | Path | None = None) -> dict:
    """Map one raw record to the item dict SRPO uses (MIA field aliases resolved)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a dataset item must be a JSON object; got {type(raw).__name__}")
    caption = raw.get("caption", raw.get("prompt", raw.get("text")))
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"dataset item has no caption/prompt/text string: {raw!r}")
    item = dict(raw)
    item["caption"] = caption.strip()
    # an empty or null alias falls back to the plain column, as Item/item does
    item["category"] = raw.get("mia_category") or raw.get("category")
    item["region"] = raw.get("mia_region") or raw.get("region")
    item["item"] = raw.get("Item") or raw.get("item")
    for key in ("pos_prompt", "neg_prompt", "image_path"):
        item[key] = raw.get(key)
    if base_dir is not None and item["image_path"] and not Path(item["image_path"]).is_absolute():
        item["image_path"] = str(Path(base_dir) / item["image_path"])
    return item


def read_fork_json(path: str | Path) -> list[dict]:
    """Read the SRPO JSON dataset (a list of objects). Embedding file names are resolved to absolute
    paths under ``prompt_embed/``, ``pooled_prompt_embeds/`` and ``text_ids/`` beside the JSON."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items; got {type(data).__name__}")
    base = path.parent
    items = []
    for raw in data:
        item = normalize_item(raw, base)
        for key, sub in (("prompt_embed_path", "prompt_embed"), ("pooled_prompt_embeds_path", "pooled_prompt_embeds"), ("text_ids", "text_ids")):
            if raw.get(key):
                item[key] = str(base / sub / raw[key])
        items.append(item)
    return items


def load_fork_embeddings(item: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_embeds (L, D), pooled (D',), text_ids (L, 3)) of a :func:`read_fork_json` item.

    The files are ``torch.save`` tensors (upstream format), read with ``weights_only=True``."""
    out = []
    for key in ("prompt_embed_path", "pooled_prompt_embeds_path", "text_ids"):
        if not item.get(key):
            raise ValueError(f"item {item.get('caption')!r} has no {key}; precompute embeddings first (miro.align.flux.precompute_embeddings)")
        out.append(torch.load(item[key], map_location="cpu", weights_only=True))
    return out[0], out[1], out[2]


def read_cure(path: str | Path, template: str = CURE_TEMPLATE) -> list[dict]:
    """Items of the CuRe CSVs (a folder of ``*.csv`` or one file), in sorted file order.

    Each item: ``caption`` (``template`` with ``{item}``), ``item``, ``category``, ``region`` and the
    other columns (``continent``, ``time``, ``global_north_south``, ``supercategory`` = file stem).
    """
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no CuRe CSV files under {path}")
    items = []
    for file in files:
        with open(file, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            need = {"Category", "Region", "Item"}
            if not need <= set(reader.fieldnames or ()):
                raise ValueError(f"{file}: not a CuRe CSV; needs columns {sorted(need)}, has {reader.fieldnames}")
            for row in reader:
                name = row["Item"].strip()
                items.append(
                    {
                        "caption": template.format(item=name),
                        "item": name,
                        "category": row["Category"].strip() or None,
                        "region": row["Region"].strip() or None,
                        "time": (row.get("Time") or "").strip() or None,
                        "continent": (row.get("Continent") or "").strip() or None,
                        "global_north_south": (row.get("Global North/South") or "").strip() or None,
                        "supercategory": file.stem,
                        "pos_prompt": None,
                        "neg_prompt": None,
                        "image_path": None,
                    }
                )
    return items


def read_items(path: str | Path, caption_column: str = "caption") -> list[dict]:
    """Read SRPO items from a ``.json`` (SRPO list), ``.jsonl``, ``.txt`` (one caption per line),
    ``.csv`` (CuRe, or any CSV with ``caption_column``) or a folder of CuRe CSVs."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset path {path} does not exist")
    if path.is_dir() or (path.suffix == ".csv" and _is_cure_csv(path)):
        return read_cure(path)
    if path.suffix == ".json":
        return read_fork_json(path)
    if path.suffix == ".jsonl":
        items = []
        for lineno, row in read_jsonl_objects(path, "a dataset item"):
            if caption_column != "caption":
                row = {**row, "caption": _column(row, caption_column, path, lineno)}
            try:
                items.append(normalize_item(row, path.parent))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
        return items
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            return [normalize_item({"caption": line.strip()}) for line in f if line.strip()]
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and caption_column not in rows[0]:
            raise ValueError(f"{path}: no column {caption_column!r}; columns are {list(rows[0])}")
        return [normalize_item({**r, "caption": r[caption_column]}, path.parent) for r in rows]
    raise ValueError(f"unsupported dataset file {path}; use .json, .jsonl, .txt, .csv or a folder of CuRe CSVs")


def _column(row: dict, column: str, path: Path, lineno: int):
    """``row[column]``, refused by name when the row lacks it (otherwise the row's own caption was
    replaced by None and the error showed ``{'caption': None}``)."""
    if column not in row:
        raise ValueError(f"{path}:{lineno}: row has no column {column!r}; columns are {list(row)}")
    return row[column]


def _is_cure_csv(path: Path) -> bool:
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return {"Category", "Region", "Item"} <= set(header)


def load_image_tensor(path: str | Path, size: int | tuple[int, int]) -> torch.Tensor:
    """An RGB image resized with LANCZOS (upstream offline encoding) to (H, W), as (3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        im = to_rgb(im, str(path)).resize((w, h), Image.LANCZOS)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1


class OfflineImageDataset(torch.utils.data.Dataset):
    """Items that carry a real image (``image_path``) for offline SRPO.

    Items whose image cannot be read are dropped at construction and counted in ``skipped``
    (a dataset of real photos always has a few broken files)."""

    def __init__(self, items: list[dict], size: int | tuple[int, int], check: bool = True):
        self.size = size
        self.items, self.skipped = [], 0
        for it in items:
            p = it.get("image_path")
            if not p or not Path(p).is_file():
                self.skipped += 1
                continue
            if check:
                try:
                    from PIL import Image

                    with Image.open(p) as im:
                        im.verify()
                except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt file
                    log.warning("skipping unreadable image %s: %s", p, e)
                    self.skipped += 1
                    continue
            self.items.append(it)
        if not self.items:
            raise ValueError(f"no readable images among {len(items)} items (skipped {self.skipped}); training on real "
                             "images (mode=offline, flux-lora) needs items whose image_path is an image file")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict]:
        it = self.items[idx]
        return load_image_tensor(it["image_path"], self.size), it
