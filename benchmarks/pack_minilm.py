"""A small copy of the embedded MiniLM text encoder for the Shapes world, for a machine that cannot
take the 84 MB wheel (an offline GPU box with a transfer limit; benchmarks/gpu_checks.sh).

    python benchmarks/pack_minilm.py pack OUT_DIR [--samples 20000] [--data SHARD_DIR ...]
    python benchmarks/pack_minilm.py unpack PACK_DIR MINILM_DIR [--check-data SHARD_DIR]
    MIRO_MINILM_DIR=MINILM_DIR miro train experiment=shapes_miro ...

``pack`` keeps every transformer weight in float16 (the encoder still runs in float32 after
``unpack``) and, of the 30,522-row word-embedding table, only the rows of the tokens that Shapes
captions use: those of the caption grammar's word lists, of ``--samples`` generated samples (web caption and both synthetic captions,
several seeds), of the ShapesEval prompts and of the Shapes testbed, and of every caption in
``--data`` shards. 91 MB of float32 become about 22 MB. ``unpack`` rebuilds a folder that
``MIRO_MINILM_DIR`` points the built-in ``minilm`` encoder at (rows not kept are zero), and with
``--check-data`` refuses if any caption of those shards needs a token that was not kept.
Embeddings agree with the full encoder to float16 rounding (tests/test_pack_minilm.py), the
precision training caches them in anyway.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from _args import ArgumentParser, nonneg_int, run_main  # beside this script

WORD_EMB = "embeddings.word_embeddings.weight"
PACK_FILE = "pack.safetensors"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def grammar_words() -> list[str]:
    """Every word list of the Shapes caption grammar (rare ones too: "beneath" is one relation
    word in twelve of the rarest caption kind)."""
    from miro.shapes import captions as C
    from miro.shapes import world as W

    return [*C.PREFIXES, *C.JOINERS, *(w for ws in C.RELATION_WORDS.values() for w in ws),
            *C.TEXTURE_WORDS.values(), *W.CLASSES, *W.PLURALS.values(), *W.COLORS, *W.BACKGROUNDS,
            *W.COUNT_WORDS.values(), "a an the one, on background"]


def generated_captions(samples: int) -> list[str]:
    """The grammar's words, the web and synthetic captions of ``samples`` Shapes samples over five
    seeds, ShapesEval's prompts and the Shapes testbed's."""
    from miro.shapes.eval import build_prompt_set
    from miro.shapes.imperfections import make_sample
    from miro.train.testbed import load_testbed

    caps = grammar_words()
    for i in range(samples):
        s = make_sample(100 + i % 5, i // 5)
        caps += [s.caption, s.synthetic["prompt"], s.short_synthetic["prompt"]]
    caps += [m["prompt"] for m in build_prompt_set()]
    caps += list(load_testbed("shapes", None, "minilm")[0])
    return caps


def shard_captions(folder: Path) -> list[str]:
    """Every caption the training loader can draw from the shards under ``folder``."""
    from miro.data.schema import ReadStats, iter_raw_samples

    caps, stats = [], ReadStats()
    for tar in sorted(Path(folder).glob("*.tar")):
        for raw in iter_raw_samples(tar, stats):
            if "txt" in raw:
                caps.append(raw["txt"].decode() if isinstance(raw["txt"], bytes) else str(raw["txt"]))
            if "json" in raw:
                meta = json.loads(raw["json"])
                caps += [meta[k] for k in ("synthetic_caption", "short_synthetic_caption") if meta.get(k)]
    return caps


def token_ids(tok, captions: list[str]) -> set[int]:
    ids = set(tok.all_special_ids)
    for start in range(0, len(captions), 4096):
        for row in tok(captions[start:start + 4096])["input_ids"]:
            ids.update(row)
    return ids


def pack(out: Path, samples: int, data: list[Path]) -> dict:
    from safetensors.torch import load_file, save_file

    from miro.encoders.text import embedded_minilm_path

    src = embedded_minilm_path()
    tok = _tokenizer(src)
    caps = generated_captions(samples)
    for d in data:
        caps += shard_captions(d)
    keep = torch.tensor(sorted(token_ids(tok, caps)), dtype=torch.int64)
    state = load_file(str(src / "model.safetensors"))
    table = state.pop(WORD_EMB)
    packed = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    packed["kept_ids"] = keep
    packed["kept_rows"] = table[keep].half()
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out / PACK_FILE), metadata={"vocab_size": str(table.shape[0])})
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    info = {"captions": len(caps), "kept_tokens": int(keep.numel()), "vocab": int(table.shape[0]),
            "bytes": sum(f.stat().st_size for f in out.iterdir())}
    (out / "pack.json").write_text(json.dumps(info, indent=1))
    return info


def unpack(pack_dir: Path, out: Path, check_data: list[Path] = ()) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(pack_dir / PACK_FILE), "pt") as f:
        vocab = int(f.metadata()["vocab_size"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    keep, rows = state.pop("kept_ids"), state.pop("kept_rows")
    kept = set(keep.tolist())
    tok = _tokenizer(pack_dir)
    for d in check_data:
        missing = token_ids(tok, shard_captions(d)) - kept
        if missing:
            words = tok.convert_ids_to_tokens(sorted(missing))[:20]
            raise ValueError(f"captions under {d} use {len(missing)} token(s) the pack dropped: {words}; "
                             f"pack again with --data {d}")
    table = torch.zeros(vocab, rows.shape[1])
    table[keep] = rows.float()
    full = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    full[WORD_EMB] = table
    out.mkdir(parents=True, exist_ok=True)
    save_file(full, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy(pack_dir / name, out / name)
    return {"kept_tokens": len(kept), "vocab": vocab}


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write a packed copy of the embedded MiniLM")
    p.add_argument("out", type=Path)
    p.add_argument("--samples", type=nonneg_int, default=20000, help="generated Shapes samples whose captions are kept")
    p.add_argument("--data", type=Path, nargs="*", default=[], help="shard folders whose captions are kept too")
    u = sub.add_parser("unpack", help="rebuild a MiniLM folder for MIRO_MINILM_DIR")
    u.add_argument("pack_dir", type=Path)
    u.add_argument("out", type=Path)
    u.add_argument("--check-data", type=Path, nargs="*", default=[], help="refuse if these shards need a dropped token")
    a = ap.parse_args(argv)
    try:
        info = pack(a.out, a.samples, a.data) if a.cmd == "pack" else unpack(a.pack_dir, a.out, a.check_data)
    except ValueError as e:
        print(f"pack_minilm: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    run_main(main)
