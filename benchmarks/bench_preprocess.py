"""Throughput of ``miro preprocess`` per stage (samples/s), on CPU.

Two suites, each run through the real CLI entry point (``miro.data.preprocess.main``):

* ``tiny``: web-like raw shards (random 320x256 JPEGs, captions of 8-30 words, JSON synthetic
  captions), scored by the real CLIP-family code (``pick_a_score_score``, ``sciscore_score``)
  on a tiny random ``CLIPModel`` saved in the transformers format, and encoded by a tiny
  FLAN-T5-shaped encoder plus a tiny ``AutoencoderKL`` with SDXL's geometry (4 latent channels,
  downsample 8) at 256 and 512 px. This measures the pipeline (decode, crop/resize, tokenise,
  CSV/JSON merge, tar writing) around small models, not the cost of the full-size models.
* ``shapes``: a Shapes dataset (``miro shapes make-dataset``) through the same command with the
  five Shapes rewards, the embedded MiniLM and the identity codec: the Shapes world end to end.

The per-stage rate is samples / seconds from the per-shard logs (model loading excluded);
``wall`` includes loading. Usage::

    python benchmarks/bench_preprocess.py [--suite tiny|shapes|all] [--samples 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from _args import ArgumentParser, positive_int, run_main  # beside this script

WORDS = ("a photo of red blue green yellow circle square star triangle above below left right two three "
         "small large bright dark wooden table street dog cat car tree house sky water near the on with").split()


def _caption(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_web_shards(folder: Path, n: int, per_shard: int, seed: int = 0) -> None:
    from PIL import Image

    from miro.data.schema import write_shard

    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    for s in range(0, n, per_shard):
        samples = []
        for i in range(s, min(n, s + per_shard)):
            # smooth random image (JPEG-compressible like a photo), 320x256 as web images are not square
            small = nprng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((320, 256), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            meta = {"synthetic_caption": _caption(rng, 20, 30), "short_synthetic_caption": _caption(rng, 6, 10)}
            samples.append({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": _caption(rng, 8, 16), "json": meta})
        write_shard(folder / f"{s // per_shard:05d}.tar", samples)


def save_tiny_clip(path: Path) -> Path:
    """A tiny random CLIPModel (224 px, patch 32) + word-level tokenizer, in transformers format."""
    import torch
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    from miro.encoders.tiny import word_level_tokenizer

    tok, n_vocab = word_level_tokenizer(["<|endoftext|>", "<|startoftext|>", "<unk>"], "<unk>",
                                        "<|startoftext|> $A <|endoftext|>", words=sorted(set(WORDS)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=77)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=eos,
                         bos_token_id=tok.token_to_id("<|startoftext|>"), pad_token_id=eos),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def save_sdxl_geometry_vae(path: Path) -> Path:
    """A tiny AutoencoderKL with SDXL's latent geometry (4 channels, 3 downsamplings = factor 8)."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                            layers_per_block=1, norm_num_groups=4, sample_size=256,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(path)
    return path


def stage_rates(csv_dir: Path, stage: str) -> tuple[int, float]:
    n, secs = 0, 0.0
    for p in sorted((csv_dir / "logs").glob(f"*.{stage}.json")):
        log = json.loads(p.read_text())
        n += log["samples_ok"]
        secs += log["seconds"]
    return n, secs


def run(label: str, argvs: list[tuple[str, list[str]]], csv_dir: Path) -> list[dict]:
    from miro.data.preprocess import main

    rows = []
    for stage, argv in argvs:
        t0 = time.perf_counter()
        rc = main(argv)
        wall = time.perf_counter() - t0
        if rc != 0:
            print(f"{label} {stage}: FAILED (exit {rc})")
            continue
        n, secs = stage_rates(csv_dir, stage)
        rows.append({"suite": label, "stage": stage, "samples": n, "seconds": secs, "wall": wall,
                     "rate": n / secs if secs else float("nan")})
        print(f"{label:7s} {stage:8s} {n:5d} samples  {n / secs:8.1f} samples/s  (wall incl. loading {wall:.1f} s)")
    return rows


def suite_tiny(root: Path, n: int, batch: int) -> list[dict]:
    from miro.encoders.tiny import save_tiny_t5

    raw, csv, dest = root / "raw", root / "csv", root / "out"
    make_web_shards(raw, n, per_shard=max(1, n // 2))
    clip = save_tiny_clip(root / "clip")
    t5 = save_tiny_t5(root / "t5", d_model=64)
    vae = save_sdxl_geometry_vae(root / "vae")
    kw = json.dumps({k: {"model": str(clip), "tokenizer": None} for k in ("pick_a_score_score", "sciscore_score")})
    common = ["--src", str(raw), "--csv_dir", str(csv), "--batch-size", str(batch), "--no-progress"]
    return run("tiny", [
        ("rewards", ["--stage", "rewards", *common, "--scorers", "pick_a_score_score,sciscore_score",
                     "--scorer-kwargs", kw]),
        ("vae", ["--stage", "vae", *common, "--dest", str(dest), "--vqa-scorer", "none", "--text-encoder", str(t5),
                 "--autoencoder", str(vae)]),
    ], csv)


def suite_shapes(root: Path, n: int, batch: int) -> list[dict]:
    from miro.shapes.dataset import DatasetConfig, make_dataset

    raw, csv, dest = root / "shapes", root / "csv", root / "out"
    make_dataset(raw, DatasetConfig(num_samples=n, shard_size=max(1, n // 2), seed=0), progress=False)
    common = ["--src", str(raw), "--csv_dir", str(csv), "--batch-size", str(batch), "--no-progress",
              "--vqa-scorer", "none"]
    scorers = "shapes_alignment,shapes_counting,shapes_position,shapes_sharpness,shapes_contrast"
    return run("shapes", [
        ("rewards", ["--stage", "rewards", *common, "--scorers", scorers]),
        ("vae", ["--stage", "vae", *common, "--dest", str(dest), "--text-encoder", "minilm",
                 "--autoencoder", "identity"]),
    ], csv)


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("tiny", "shapes", "all"), default="all")
    p.add_argument("--samples", type=positive_int, default=128, help="samples per suite (two shards)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: small ops on a shared 2-core machine stall less)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import os

    print(f"torch {torch.__version__}, {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as d:
        if args.suite in ("tiny", "all"):
            suite_tiny(Path(d) / "tiny", args.samples, args.batch_size)
        if args.suite in ("shapes", "all"):
            suite_shapes(Path(d) / "shapes", args.samples, args.batch_size)


if __name__ == "__main__":
    run_main(main)
