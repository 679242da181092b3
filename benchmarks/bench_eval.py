"""Evaluation throughput: generation images/s vs batch size, and scoring images/s.

    python benchmarks/bench_eval.py                       # shapes model, 20 steps, batches 1,4,16, 1 thread
    python benchmarks/bench_eval.py --steps 50 --batch-sizes 1,8,32 --images 32

Generation runs through ``miro.eval.generate.generate_folder`` (GenEval layout, per-sample
seeds, PNG writes included), so the number is what ``miro eval generate`` achieves. Scoring
covers ShapesEval (Shapes detector + GenEval rules) and the ``shapes_*`` rewards on the images
just generated.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _args import ArgumentParser, positive_int, positive_int_list, run_main  # beside this script


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes", help="pipeline (falls back to shapes-untrained, same architecture)")
    ap.add_argument("--steps", type=positive_int, default=20)
    ap.add_argument("--images", type=positive_int, default=16, help="images generated per batch size")
    ap.add_argument("--batch-sizes", type=positive_int_list, default=[1, 4, 16],
                    help="comma-separated batch sizes (integers >= 1; default 1,4,16)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from miro.eval.generate import GenerateConfig, generate_folder, load_pipeline
    from miro.eval.prompts import load_prompts

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    n_prompts = max(1, args.images // 4)
    items = load_prompts("shapes", limit=n_prompts)
    print(f"model={getattr(pipe, 'source', args.model)} steps={args.steps} images={n_prompts * 4} threads={args.threads}")
    print(f"{'batch':>6} {'images/s':>10} {'s/image':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        last = None
        for bs in args.batch_sizes:
            out = Path(tmp) / f"bs{bs}"
            cfg = GenerateConfig(model=args.model, n_samples=4, steps=args.steps, batch_size=bs)
            generate_folder(pipe, items[:1], Path(tmp) / f"warm{bs}", GenerateConfig(n_samples=1, steps=2, batch_size=bs),
                            progress=False)
            t = time.perf_counter()
            counts = generate_folder(pipe, items, out, cfg, progress=False)
            dt = time.perf_counter() - t
            print(f"{bs:>6} {counts['generated'] / dt:>10.2f} {dt / counts['generated']:>9.3f}")
            last = out

        from miro.eval.geneval import GenEvalLike, GenEvalLikeConfig, evaluate_folder
        from miro.eval.rewards import score_folder
        from miro.rewards import available, load_scorer
        from miro.shapes.eval import SHAPES_EVAL_OPTIONS

        n = n_prompts * 4
        ev = GenEvalLike(GenEvalLikeConfig(detector="shapes", options=SHAPES_EVAL_OPTIONS))
        t = time.perf_counter()
        evaluate_folder(last, last / "results.jsonl", ev, progress=False)
        dt = time.perf_counter() - t
        print(f"ShapesEval scoring: {n / dt:.1f} images/s")
        names = [s for s in available() if s.startswith("shapes_")]
        scorers = {s: load_scorer(s) for s in names}
        t = time.perf_counter()
        score_folder(last, scorers, last / "rewards.jsonl", progress=False)
        dt = time.perf_counter() - t
        print(f"rewards ({len(names)} shapes_* scorers): {n / dt:.1f} images/s ({n * len(names) / dt:.1f} image-scores/s)")


if __name__ == "__main__":
    run_main(main)
