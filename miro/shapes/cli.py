"""``miro shapes <sub-command>``: the Shapes world from the command line.

    miro shapes make-dataset --out data/shapes --num-samples 100000 [--shard-size 1000] [--seed 0]
                             [--imperfection-rates blur=0.2 noise=0 ...] [--resolution 32]
    miro shapes render "two red circles above a blue square" --out gt.png [--seed 0] [--n 4]
    miro shapes detect image.png ...
    miro shapes eval-generate --model shapes --outdir runs/shapes_eval [--n-samples 4 --steps 50
                              --cfg 7.0 --seed 0 --reward shapes_alignment=1.0 ...]
    miro shapes eval-score runs/shapes_eval [--options threshold=0.5 ...]
    miro shapes eval-prompts --out shapes_eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from miro.io import to_rgb


def _parser() -> argparse.ArgumentParser:
    from miro.shapes import world as W

    ap = argparse.ArgumentParser(prog="miro shapes", description="The Shapes world: data, ground truth, detection and ShapesEval.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-dataset", help="write webdataset shards of web-like samples with Shapes rewards")
    p.add_argument("--out", "--outdir", dest="out", required=True, help="output folder (resumable; a larger --num-samples grows it in place)")
    p.add_argument("--num-samples", type=int, required=True, help="number of samples")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; sample i is a function of (seed, i)")
    p.add_argument("--resolution", type=int, default=W.DEFAULT_RESOLUTION, help="image side, 32-64 (default 32)")
    p.add_argument("--imperfection-rates", nargs="*", default=[], metavar="NAME=RATE",
                   help="override defect rates, e.g. blur=0.3 noise=0; all=0 for clean data")
    p.add_argument("--plain-background", action="store_true", help="plain gray backgrounds (no colour/texture variety)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, one shard each (same bytes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("render", help="render the ground truth of a caption")
    p.add_argument("caption", help='a caption of the Shapes grammar, e.g. "two red circles above a blue square"')
    p.add_argument("--out", "--outdir", dest="out", default="shapes_render.png", help="PNG file (with --n > 1: a folder)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (image k of --n uses seed + k)")
    p.add_argument("--n", "--n-samples", dest="n", type=int, default=1, help="number of renders")
    p.add_argument("--resolution", type=int, default=W.DEFAULT_RESOLUTION, help="image side, 32-64")

    p = sub.add_parser("detect", help="print the objects the Shapes detector finds in images")
    p.add_argument("images", nargs="+", help="image files")

    p = sub.add_parser("eval-generate", help="generate ShapesEval images (GenEval folder layout, resumable)")
    p.add_argument("--model", default="shapes", help="built-in name, pipeline folder, hub id, .ckpt, or 'ground-truth' "
                   "(renders each prompt's scene; --steps, --cfg and --reward do not apply to it)")
    p.add_argument("--outdir", "--out", dest="outdir", required=True, help="output folder")
    p.add_argument("--n-samples", "--n", dest="n_samples", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--cfg", type=float, default=7.0, help="guidance scale (default 7.0)")
    p.add_argument("--seed", type=int, default=0, help="sample j of prompt i uses seed + 1000*i + j")
    p.add_argument("--reward", nargs="+", action="extend", default=[], metavar="KEY=TARGET",
                   help="reward targets in [0, 1] (repeatable, or several after one flag)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (same noise per image; pixels equal up to float rounding)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")

    p = sub.add_parser("eval-score", help="score a ShapesEval folder: results.jsonl + summary, 'overall: X'")
    p.add_argument("dir", help="folder written by eval-generate")
    p.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="GenEval options: threshold, counting_threshold, max_objects, max_overlap, position_threshold")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval-prompts", help="write the ShapesEval prompt set (GenEval metadata JSONL)")
    p.add_argument("--out", "--outdir", dest="out", required=True, help="output .jsonl file")
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # a missing sub-command is named by its choices
    return ap


def _make_dataset(args) -> int:
    from miro.shapes.dataset import DatasetConfig, make_dataset
    from miro.shapes.imperfections import ImperfectionRates

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; it names the dataset folder")
    cfg = DatasetConfig(num_samples=args.num_samples, shard_size=args.shard_size, seed=args.seed, resolution=args.resolution,
                        rates=ImperfectionRates.from_strings(args.imperfection_rates), varied_background=not args.plain_background)
    res = make_dataset(args.out, cfg, progress=not args.no_progress, workers=args.workers)
    print(f"{res['samples']} samples in {res['shards']} shards under {args.out} ({res['written']} written, {res['skipped']} complete shards skipped)")
    return 0


def _render(args) -> int:
    from miro.shapes import world as W
    from miro.shapes.captions import parse_caption
    from miro.eval.generate import atomic_save_image
    from miro.shapes.eval import render_prompt

    md = parse_caption(args.caption)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1; got {args.n}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer; got {args.seed}")
    W.check_resolution(args.resolution)  # before any folder is made
    out = Path(args.out)
    if args.n > 1 and out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file; with --n {args.n} it names a folder for {args.n} PNGs")
    if args.n == 1 and out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; with --n 1 it names a PNG file")
    if args.n == 1 and out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out} must be a .png file (with --n > 1: a folder)")
    paths = [out] if args.n == 1 else [out / f"{k:04d}.png" for k in range(args.n)]
    for k, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(render_prompt(md, args.seed + k, args.resolution), path)  # no cut PNG after a kill
    print(json.dumps(md))
    print(f"wrote {len(paths)} image(s) to {out}")
    return 0


def _detect(args) -> int:
    from PIL import Image

    from miro.shapes.detector import detect

    for f in args.images:
        with Image.open(f) as im:
            dets = detect(to_rgb(im, f))
        print(f"{f}: {len(dets)} object(s)")
        for d in dets:
            print(f"  {d.color:>6} {d.cls:<8} score={d.score:.3f} bbox=({', '.join(f'{v:.1f}' for v in d.bbox)})")
    return 0


def _eval_generate(args) -> int:
    from miro.eval.generate import parse_reward_args
    from miro.shapes.eval import eval_generate

    res = eval_generate(args.model, args.outdir, n_samples=args.n_samples, steps=args.steps, cfg=args.cfg, seed=args.seed,
                        reward_targets=parse_reward_args(args.reward), batch_size=args.batch_size, limit=args.limit)
    print(f"{res['images']} images for {res['prompts']} prompts in {args.outdir} ({res['generated']} generated, {res['skipped']} already there)")
    return 0


def _eval_score(args) -> int:
    from miro.eval.geneval import format_counts
    from miro.eval.geneval_rules import GenEvalOptions, format_summary
    from miro.shapes.eval import RESULTS_FILE, SHAPES_EVAL_OPTIONS, score_folder

    opts = GenEvalOptions.from_strings(args.options, base=SHAPES_EVAL_OPTIONS)
    summary = score_folder(args.dir, opts, progress=not args.no_progress)
    print(f"results: {Path(args.dir) / RESULTS_FILE}")
    print(format_counts(summary))
    print(format_summary(summary))  # ends with "overall: <score>"
    return 0


def _eval_prompts(args) -> int:
    from miro.shapes.eval import write_prompt_set

    write_prompt_set(args.out)
    print(f"wrote the ShapesEval prompt set to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"make-dataset": _make_dataset, "render": _render, "detect": _detect, "eval-generate": _eval_generate,
                "eval-score": _eval_score, "eval-prompts": _eval_prompts}
    from PIL import UnidentifiedImageError

    # Bad arguments exit 2: missing inputs, files that are not images, an --out that names a file
    # where a folder is needed (or the reverse). Other OSErrors (permissions, full disk) exit 1.
    bad_argument = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                    UnidentifiedImageError)
    try:
        return handlers[args.cmd](args)
    except bad_argument as e:
        print(f"miro shapes {args.cmd}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"miro shapes {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
