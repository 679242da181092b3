"""Reading GenEval-layout image folders and append-only JSONL result files.

Result files (``rewards.jsonl``, ``results.jsonl``) are written one line per image and flushed
as they go; a killed run leaves at most one torn last line, which :func:`read_jsonl` drops, so a
rerun continues where the last complete line stopped.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from miro.io import atomic_write_json as _atomic_write_json, atomic_write_text, open_append, to_rgb


@dataclass
class FolderEntry:
    """One prompt folder ``<dir>/<00000>/``."""

    index: int  # prompt index (the folder name)
    metadata: dict  # the metadata.jsonl line
    samples: list[Path]  # samples/*.png, sorted by sample index

    @property
    def prompt(self) -> str:
        return self.metadata.get("prompt", "")

    @property
    def tag(self) -> str:
        return self.metadata.get("tag", "prompt")


def read_folder(root: str | Path) -> list[FolderEntry]:
    """All prompt folders under ``root`` (GenEval layout), sorted by index."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of generated images")
    entries = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = d / "metadata.jsonl"
        lines = meta_path.is_file() and [ln for ln in meta_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            # images whose prompt is lost cannot be scored; dropping them in silence would score
            # the run over fewer prompts (generation writes the line before any image)
            if any((d / "samples").glob("*.png")):
                raise ValueError(f"{d} holds images but {'an empty' if meta_path.is_file() else 'no'} "
                                 f"metadata.jsonl (the prompt they were made for); restore it or remove the folder")
            continue
        try:
            meta = json.loads(lines[0])
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: line 1 is not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: line 1 must be a JSON object (with a \"prompt\"); "
                             f"got {type(meta).__name__}")
        samples = sorted((d / "samples").glob("*.png"), key=lambda p: (len(p.stem), p.stem))
        samples = [p for p in samples if p.stem.isdigit()]
        entries.append(FolderEntry(int(d.name), meta, samples))
    if not entries:
        raise ValueError(f"{root} holds no <00000>/metadata.jsonl prompt folders")
    return entries


def summary_beside(outfile: str | Path, default_file: str, default_summary: str) -> Path:
    """Where the summary of a result file goes: ``default_summary`` beside the default file, else
    ``<stem>_summary.json`` beside it, so a second result file (another detector, another scorer
    version) does not overwrite the summary of the first, which the report shows."""
    outfile = Path(outfile)
    return outfile.with_name(default_summary if outfile.name == default_file else f"{outfile.stem}_summary.json")


def image_id(root: str | Path, path: Path) -> str:
    """The image's path relative to the folder root, the key result files use."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def load_rgb(path: str | Path):
    """The image at ``path`` as an RGB PIL image, or None when it cannot be read (a truncated or
    corrupt PNG). Every reader of a folder skips and counts such an image instead of failing the
    whole run on it; it is tried again on the next run."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb(im, str(path))  # loads the pixels, so a truncated file fails here
    except Exception:  # PIL raises OSError, SyntaxError or ValueError depending on the damage
        return None


def read_jsonl(path: str | Path) -> list[dict]:
    """Complete lines of a JSONL file; a torn last line (killed writer) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n >= len(lines) - 2:  # only the last line may be torn
                # said, not silent: a summary read now lacks that line's image
                warnings.warn(f"{path}:{n + 1}: the last line is cut (a run killed while writing it); left out, "
                              "and its image is scored again by the next scoring run")
                break
            raise ValueError(f"{path}:{n + 1}: corrupt JSON line") from None
    return out


class JsonlAppender:
    """Append lines to a JSONL file, first truncating a torn tail so lines never merge."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        open_append(self.path).close()  # refuses a symbolic link before anything reads through it
        good = read_jsonl(self.path)
        if self.path.is_file():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good)
            if text != self.path.read_text(encoding="utf-8"):
                atomic_write_text(self.path, text)
        self._f = open_append(self.path)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def atomic_write_json(path: str | Path, obj) -> None:
    """Evaluation outputs keep non-ASCII prompts readable (``ensure_ascii=False``)."""
    _atomic_write_json(path, obj, indent=2, ensure_ascii=False)
