"""Prompt testbeds for periodic training samples, and ``miro testbed precompute``.

A testbed is a folder with ``prompts.txt`` (one prompt per line) and ``metadata.csv``
(``file_name,text``, the image-folder convention). Two ship as package data under
``miro/assets/testbed/``: ``real`` (80 everyday prompts, the size of CAD/MIRO's logging testbed)
and ``shapes`` (32 prompts in the Shapes grammar covering GenEval's six categories).

``miro testbed precompute --testbed NAME --encoder ENC --out DIR`` writes, per prompt,
``<stem>.<schema>_embeddings.npy`` (float16, trimmed to the attention mask, as in the data
shards) plus ``uncond.<schema>_embeddings.npy``, so a training run can log images without
loading FLAN-T5-XL (``image_logger.embeddings_dir=DIR``).

``DIR/testbed.json`` (the manifest, written atomically before the embeddings) records the
testbed, a SHA-256 of each prompt by file stem, the encoder spec, its schema name and
``max_length``. Files are named by stem only, so a folder holding another testbed's or another
encoder's embeddings is refused (``--overwrite`` recomputes them), and :func:`load_testbed`
checks the prompts it is given against the manifest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miro.io import atomic_path, atomic_write_json

MANIFEST = "testbed.json"
MANIFEST_VERSION = 1

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "testbed"
DEFAULT_ENCODER = {"real": "flan_t5_xl", "shapes": "minilm"}


def testbed_dir(name_or_dir: str | os.PathLike) -> Path:
    """A built-in testbed name (``real``, ``shapes``) or a folder holding ``prompts.txt``."""
    p = Path(name_or_dir)
    if (p / "prompts.txt").is_file():
        return p
    builtin = ASSETS / str(name_or_dir)
    if (builtin / "prompts.txt").is_file():
        return builtin
    names = sorted(d.name for d in ASSETS.iterdir() if (d / "prompts.txt").is_file())
    raise ValueError(f"testbed {str(name_or_dir)!r} is neither a built-in ({', '.join(names)}) nor a folder "
                     "with prompts.txt")


def read_testbed(name_or_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(file_name, prompt)]`` from ``metadata.csv`` (or ``prompts.txt`` numbered 000.png, ...)."""
    d = testbed_dir(name_or_dir)
    if (d / "metadata.csv").is_file():
        where = d / "metadata.csv"
        with open(where, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"file_name", "text"} <= set(rows[0]):
            raise ValueError(f"{where} needs columns file_name,text; got {sorted(rows[0])}")
        out = [(r["file_name"] or "", r["text"] or "") for r in rows]
        lines = [f"{where}, line {n}" for n in range(2, len(out) + 2)]  # line 1: the header
    else:
        where = d / "prompts.txt"
        numbered = [(n, line.strip()) for n, line in enumerate(where.read_text(encoding="utf-8").splitlines(), 1)
                    if line.strip()]
        out = [(f"{i:03d}.png", p) for i, (_, p) in enumerate(numbered)]
        lines = [f"{where}, line {n}" for n, _ in numbered]
    if not out:
        raise ValueError(f"{where} holds no prompts")
    # Each prompt's embedding is a file named by its stem: two names with one stem would share a
    # file, and "uncond" is the empty prompt's own.
    seen: dict[str, str] = {}
    for (file_name, text), line in zip(out, lines):
        stem = _stem(file_name)
        if not text.strip():
            raise ValueError(f"{line}: empty prompt")
        if not stem:
            raise ValueError(f"{line}: file_name {file_name!r} has no name before its extension")
        if stem == "uncond":
            raise ValueError(f"{line}: file_name {file_name!r} is reserved (uncond.* holds the empty prompt's "
                             f"embedding); rename it")
        if stem in seen:
            raise ValueError(f"{line}: file_name {file_name!r} and {seen[stem]!r} share the name {stem!r}, so "
                             f"their embeddings would be one file; rename one")
        seen[stem] = file_name
    return out


def _stem(file_name: str) -> str:
    return Path(file_name).name.split(".")[0]


def prompt_hash(prompt: str) -> str:
    """The manifest's fingerprint of one prompt (SHA-256 of its UTF-8 bytes, hex)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def read_manifest(embeddings_dir: str | os.PathLike) -> dict | None:
    """``DIR/testbed.json``, or None when the folder has none (written before manifests existed)."""
    path = Path(embeddings_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); rerun `miro testbed precompute` "
                         "with --overwrite") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("prompts"), dict):
        raise ValueError(f"{path} is not a testbed manifest (no 'prompts' object); rerun `miro testbed "
                         "precompute` with --overwrite")
    return manifest


def _prompt_conflict(manifest: dict, rows: list[tuple[str, str]]) -> str | None:
    """Why the manifest does not describe these rows' embeddings (None: it does)."""
    known = manifest["prompts"]
    for fn, prompt in rows:
        stem = _stem(fn)
        if stem not in known:
            return f"it has no prompt {stem} ({prompt!r})"
        if known[stem] != prompt_hash(prompt):
            return f"its {stem} embeddings encode another prompt than {prompt!r}"
    return None


def load_testbed(name_or_dir: str | os.PathLike, embeddings_dir: str | os.PathLike | None = None,
                 encoder: str = "minilm") -> tuple[list[str], list[np.ndarray] | None]:
    """Prompts, and their precomputed embeddings when ``embeddings_dir`` holds them all.

    When the folder has a manifest (``testbed.json``), every prompt and the encoder's schema name
    must match it: embeddings are named by file stem only, so another testbed's would load silently.
    """
    rows = read_testbed(name_or_dir)
    prompts = [p for _, p in rows]
    if embeddings_dir is None:
        return prompts, None
    from miro.data.schema import text_embedding_name

    d = Path(embeddings_dir)
    manifest = read_manifest(d)
    if manifest is not None:
        redo = (f"; rerun `miro testbed precompute --testbed {name_or_dir} --encoder {encoder} --out {d} "
                "--overwrite` or point embeddings_dir elsewhere")
        if manifest.get("schema_name") != encoder:
            raise ValueError(f"embeddings_dir {d} holds {manifest.get('schema_name')!r} embeddings "
                             f"(testbed.json), not {encoder!r}{redo}")
        why = _prompt_conflict(manifest, rows)
        if why is not None:
            raise ValueError(f"embeddings_dir {d} was written for testbed {manifest.get('testbed')!r} and "
                             f"{why} (testbed.json){redo}")
    files = [d / f"{_stem(fn)}.{text_embedding_name(encoder)}" for fn, _ in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"embeddings_dir {d} lacks {len(missing)} files, e.g. {missing[0]}; run "
                         f"`miro testbed precompute --testbed {name_or_dir} --encoder {encoder} --out {d}`")
    return prompts, [np.load(f, allow_pickle=False) for f in files]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save on a name appends .npy
        np.save(f, arr, allow_pickle=False)


@dataclass
class Precomputed:
    """What :func:`precompute` did: every prompt's embedding file, and how many it wrote or kept."""

    out: Path
    files: list[Path] = field(default_factory=list)
    written: int = 0  # prompt embeddings encoded by this call
    skipped: int = 0  # prompt embeddings already present (the manifest matched)
    uncond_written: bool = False


def _encoder_id(enc) -> str:
    spec = str(getattr(enc, "spec", None) or getattr(enc, "name_or_path", "") or type(enc).__name__)
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def precompute(testbed: str, encoder, out_dir: str | os.PathLike, max_length: int | None = None,
               batch_size: int = 16, progress: bool = True, overwrite: bool = False) -> Precomputed:
    """Encode every testbed prompt (and the empty prompt) into ``out_dir`` with a manifest.

    Files already written for the same prompts and encoder are kept (resumable). A folder whose
    manifest describes other prompts or another encoder, or that holds embeddings without a
    manifest, is refused with a ``ValueError`` unless ``overwrite`` (then everything is redone).
    No folder is left behind when nothing could be written (e.g. the encoder does not load).
    """
    from miro.encoders import load_text_encoder

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    rows = read_testbed(testbed)  # a bad testbed name fails before a (possibly large) encoder is loaded
    enc = load_text_encoder(encoder, max_length=max_length)
    out = Path(out_dir)
    member = f"{enc.schema_name}_embeddings.npy"
    files = [out / f"{_stem(fn)}.{member}" for fn, _ in rows]
    uncond = out / f"uncond.{member}"
    want = {"version": MANIFEST_VERSION, "testbed": str(testbed), "encoder": _encoder_id(enc),
            "schema_name": enc.schema_name, "max_length": int(getattr(enc, "max_length", 0) or 0) or None}
    prompts = {_stem(fn): prompt_hash(p) for fn, p in rows}
    old = None if overwrite else read_manifest(out)
    if old is not None:
        redo = "; pass --overwrite to recompute them, or choose another --out"
        for k in ("schema_name", "encoder", "max_length"):
            if old.get(k) != want[k]:
                raise ValueError(f"{out} holds testbed embeddings with {k}={old.get(k)!r}, not {want[k]!r} "
                                 f"(testbed.json){redo}")
        why = _prompt_conflict({"prompts": {**prompts, **old["prompts"]}}, rows)
        if why is not None:
            raise ValueError(f"{out} holds embeddings of testbed {old.get('testbed')!r}: {why} (testbed.json){redo}")
        prompts = {**old["prompts"], **prompts}  # stems of other prompts keep describing their files
    elif not overwrite:
        present = [f for f in [*files, uncond] if f.is_file()]
        if present:
            raise ValueError(f"{out} holds {len(present)} {member} files but no {MANIFEST}, so their prompts "
                             "cannot be checked; pass --overwrite to recompute them, or choose another --out")
    todo = [(fn, p) for (fn, p), f in zip(rows, files) if overwrite or not f.is_file()]
    result = Precomputed(out, files, 0, len(rows) - len(todo))
    if not todo and uncond.is_file() and old is not None:
        return result
    if callable(getattr(enc, "load", None)):
        enc.load()  # weights that do not load fail here, before any folder is made
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if overwrite:
        # The new manifest goes in first, and a rerun keeps every file it finds under it: old
        # embeddings not yet replaced when an --overwrite run is killed would pass as new ones.
        for f in [*files, uncond]:
            f.unlink(missing_ok=True)
    try:
        atomic_write_json(manifest, {**want, "prompts": prompts}, indent=1, sort_keys=True)
        it = range(0, len(todo), batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="testbed embeddings", unit="batch")
        for s in it:
            chunk = todo[s:s + batch_size]
            emb, mask = enc.encode([p for _, p in chunk])
            for (fn, _), e, m in zip(chunk, emb, mask):
                _save_npy(out / f"{_stem(fn)}.{member}", e[m.bool()].float().cpu().numpy().astype(np.float16))
                result.written += 1
        _save_npy(uncond, enc.uncond_embedding().float().cpu().numpy().astype(np.float16))
        result.uncond_written = True
    except BaseException:
        if created and result.written == 0:  # leave no empty (manifest-only) folder behind
            manifest.unlink(missing_ok=True)
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="miro testbed", description="Prompt testbeds for training image logs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("precompute", help="write per-prompt text embeddings of a testbed")
    pc.add_argument("--testbed", default="shapes", help="built-in name (real, shapes) or a folder with prompts.txt")
    pc.add_argument("--encoder", default=None,
                    help="text encoder: minilm, flan_t5_xl, a folder or hub id (default: flan_t5_xl for real, "
                         "minilm for shapes)")
    pc.add_argument("--out", "--outdir", dest="out", required=True, help="output folder")
    pc.add_argument("--max-length", type=int, default=None, help="tokens per prompt (default: the encoder's)")
    pc.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call (default 16)")
    pc.add_argument("--overwrite", action="store_true",
                    help="recompute every embedding, even when --out holds another testbed's or encoder's")
    sub.add_parser("list", help="list the built-in testbeds")
    # argparse names a missing sub-command by its metavar ("required: cmd" by default): list the choices
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    args = p.parse_args(argv)
    from miro.cli import report_errors

    # 2: a bad testbed, batch size, max length; 1: an encoder neither local nor reachable, an unwritable --out
    return report_errors(f"miro testbed {args.cmd}", _run, args)


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "list":
        for d in sorted(ASSETS.iterdir()):
            if (d / "prompts.txt").is_file():
                print(f"{d.name}\t{len(read_testbed(d))} prompts")
        return 0
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1; got {value}")
    out = Path(args.out)
    if not str(args.out).strip() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {args.out!r} must name a folder (it is made if missing)")
    encoder = args.encoder or DEFAULT_ENCODER.get(str(args.testbed), "minilm")
    res = precompute(args.testbed, encoder, args.out, args.max_length, args.batch_size, overwrite=args.overwrite)
    print(f"wrote {res.written} prompt embeddings{' + uncond' if res.uncond_written else ''} to {args.out}, "
          f"kept {res.skipped} already present ({len(res.files)} prompts; manifest {MANIFEST})")
    return 0
