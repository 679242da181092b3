"""Prompt testbeds for periodic training samples, and ``miro testbed precompute``.

A testbed is a folder with ``prompts.txt`` (one prompt per line) and ``metadata.csv``
(``file_name,text``, the image-folder convention). Two ship as package data under
``miro/assets/testbed/``: ``real`` (80 everyday prompts, the size of CAD/MIRO's logging testbed)
and ``shapes`` (32 prompts in the Shapes grammar covering GenEval's six categories).

``miro testbed precompute --testbed NAME --encoder ENC --out DIR`` writes, per prompt,
``<stem>.<schema>_embeddings.npy`` (float16, trimmed to the attention mask, as in the data
shards) plus ``uncond.<schema>_embeddings.npy``, so a training run can log images without
loading FLAN-T5-XL (``image_logger.embeddings_dir=DIR``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from miro.io import atomic_path

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
        with open(d / "metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"file_name", "text"} <= set(rows[0]):
            raise ValueError(f"{d / 'metadata.csv'} needs columns file_name,text; got {sorted(rows[0])}")
        return [(r["file_name"], r["text"]) for r in rows]
    prompts = [line.strip() for line in (d / "prompts.txt").read_text().splitlines() if line.strip()]
    return [(f"{i:03d}.png", p) for i, p in enumerate(prompts)]


def _stem(file_name: str) -> str:
    return Path(file_name).name.split(".")[0]


def load_testbed(name_or_dir: str | os.PathLike, embeddings_dir: str | os.PathLike | None = None,
                 encoder: str = "minilm") -> tuple[list[str], list[np.ndarray] | None]:
    """Prompts, and their precomputed embeddings when ``embeddings_dir`` holds them all."""
    rows = read_testbed(name_or_dir)
    prompts = [p for _, p in rows]
    if embeddings_dir is None:
        return prompts, None
    from miro.data.schema import text_embedding_name

    d = Path(embeddings_dir)
    files = [d / f"{_stem(fn)}.{text_embedding_name(encoder)}" for fn, _ in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"embeddings_dir {d} lacks {len(missing)} files, e.g. {missing[0]}; run "
                         f"`miro testbed precompute --testbed {name_or_dir} --encoder {encoder} --out {d}`")
    return prompts, [np.load(f, allow_pickle=False) for f in files]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save on a name appends .npy
        np.save(f, arr, allow_pickle=False)


def precompute(testbed: str, encoder, out_dir: str | os.PathLike, max_length: int | None = None,
               batch_size: int = 16, progress: bool = True) -> list[Path]:
    """Encode every testbed prompt (and the empty prompt); skip files already written (resumable)."""
    from miro.encoders import load_text_encoder

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    rows = read_testbed(testbed)  # a bad testbed name fails before a (possibly large) encoder is loaded
    enc = load_text_encoder(encoder, max_length=max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    member = f"{enc.schema_name}_embeddings.npy"
    todo = [(fn, p) for fn, p in rows if not (out / f"{_stem(fn)}.{member}").is_file()]
    it = range(0, len(todo), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="testbed embeddings", unit="batch")
    for s in it:
        chunk = todo[s:s + batch_size]
        emb, mask = enc.encode([p for _, p in chunk])
        for (fn, _), e, m in zip(chunk, emb, mask):
            _save_npy(out / f"{_stem(fn)}.{member}", e[m.bool()].float().cpu().numpy().astype(np.float16))
    _save_npy(out / f"uncond.{member}", enc.uncond_embedding().float().cpu().numpy().astype(np.float16))
    return [out / f"{_stem(fn)}.{member}" for fn, _ in rows]


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
    pc.add_argument("--batch-size", type=int, default=16)
    sub.add_parser("list", help="list the built-in testbeds")
    # argparse names a missing sub-command by its metavar ("required: cmd" by default): list the choices
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # bad testbed, batch size, max length
        print(f"miro testbed {args.cmd}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an encoder neither local nor reachable, an unwritable --out
        print(f"miro testbed {args.cmd}: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "list":
        for d in sorted(ASSETS.iterdir()):
            if (d / "prompts.txt").is_file():
                print(f"{d.name}\t{len(read_testbed(d))} prompts")
        return 0
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1; got {value}")
    encoder = args.encoder or DEFAULT_ENCODER.get(str(args.testbed), "minilm")
    files = precompute(args.testbed, encoder, args.out, args.max_length, args.batch_size)
    print(f"wrote {len(files)} prompt embeddings + uncond to {args.out}")
    return 0
