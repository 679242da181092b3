"""Shapes world throughput and detector accuracy.

    python benchmarks/bench_shapes.py [--n 300] [--resolution 32]

Prints: rendering and dataset generation rates (samples/s, one process), reward scoring rate
(images/s, all five shapes_* rewards, fresh detector cache), ShapesEval scoring rate, and the
detector's per-object accuracy on clean renders and under each image-affecting imperfection.
Each rate is given per wall-clock second and per CPU second of this process (the second is
the one to compare on a shared machine).

Per-object accuracy = objects found with the right class and colour (box IoU > 0.5)
/ (ground-truth objects + false detections); recall and precision are printed beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from _args import ArgumentParser, int_in, positive_int, run_main  # beside this script


def visible_box(o, resolution: int) -> tuple[float, ...]:
    """An object's box clipped to the frame (what a detector can see)."""
    x1, y1, x2, y2 = o.bbox(resolution)
    return (max(x1, 0.0), max(y1, 0.0), min(x2, resolution), min(y2, resolution))


def accuracy_table(n: int, resolution: int) -> list[tuple[str, float, float, float, int]]:
    from miro.eval.geneval_rules import box_iou
    from miro.shapes.detector import DetectorConfig, detect_array
    from miro.shapes.imperfections import ImperfectionRates, make_sample

    rows = []
    for name in ("clean", "blur", "noise", "low_contrast", "color_cast", "clutter", "cut_by_frame"):
        rates = ImperfectionRates.none() if name == "clean" else ImperfectionRates.only(name)
        ok = tot = fp = ndet = 0
        for i in range(n):
            s = make_sample(1234, i, rates, resolution)
            dets = detect_array(s.image / 255.0, DetectorConfig())
            ndet += len(dets)
            used = set()
            for o in s.scene.objects:
                tot += 1
                m = next((k for k, d in enumerate(dets) if k not in used and box_iou(visible_box(o, resolution), d.bbox) > 0.5), None)
                if m is not None:
                    used.add(m)
                    ok += dets[m].cls == o.cls and dets[m].color == o.color
            fp += len(dets) - len(used)
        rows.append((name, ok / (tot + fp), ok / tot, ok / max(ndet, 1), tot))
    return rows


@contextmanager
def rate(label: str, n: int, unit: str):
    """Print n / wall seconds and n / CPU seconds of the block."""
    w, c = time.perf_counter(), time.process_time()
    yield
    w, c = time.perf_counter() - w, time.process_time() - c
    print(f"{label}: {n / w:.0f} {unit}/s wall, {n / c:.0f} {unit}/CPU-s")


def degraded_ground_truth(n_prompts: int, resolution: int) -> list[tuple[str, dict]]:
    """ShapesEval of ground-truth renders passed through fixed degradations (how the benchmark
    reacts to soft or noisy generator output): (condition, summary)."""
    from scipy import ndimage
    from PIL import Image

    from miro.shapes.eval import GroundTruthPipeline, eval_generate, score_folder

    conditions = {
        "ground truth": lambda a, r: a,
        "blur sigma 0.8 px": lambda a, r: ndimage.gaussian_filter(a, (0.8, 0.8, 0)),
        "blur sigma 1.2 px": lambda a, r: ndimage.gaussian_filter(a, (1.2, 1.2, 0)),
        "noise sigma 0.05": lambda a, r: np.clip(a + r.normal(0, 0.05, a.shape), 0, 1),
        "contrast x0.5": lambda a, r: a.mean((0, 1)) + 0.5 * (a - a.mean((0, 1))),
    }
    out = []
    for name, fn in conditions.items():

        class Degraded(GroundTruthPipeline):
            def __call__(self, prompt, **kw):
                ims = super().__call__(prompt, **kw)
                rng = np.random.default_rng(0)
                return [Image.fromarray(np.rint(np.clip(fn(np.asarray(im) / 255.0, rng), 0, 1) * 255).astype(np.uint8)) for im in ims]

        with tempfile.TemporaryDirectory() as d:
            eval_generate(Degraded(resolution), d, n_samples=4, limit=n_prompts, progress=False)
            out.append((name, score_folder(d, progress=False)))
    return out


def main(argv=None) -> None:
    from miro.shapes.world import MAX_RESOLUTION, MIN_RESOLUTION

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=positive_int, default=300, help="samples per measurement")
    ap.add_argument("--resolution", type=int_in(MIN_RESOLUTION, MAX_RESOLUTION), default=32,
                    help=f"image side in pixels, {MIN_RESOLUTION} to {MAX_RESOLUTION}")
    args = ap.parse_args(argv)
    from miro.shapes.dataset import DatasetConfig, make_dataset
    from miro.shapes.detector import ShapesDetector
    from miro.shapes.eval import GroundTruthPipeline, eval_generate, score_folder
    from miro.shapes.imperfections import make_sample
    from miro.shapes.render import render
    from miro.shapes.rewards import score_all

    n, res = args.n, args.resolution
    samples = [make_sample(99, i, resolution=res) for i in range(n)]
    with rate(f"render ({res}px, supersample 8)", n, "images"):
        for s in samples:
            render(s.scene, res)
    with rate("web-like samples (scene + caption + defects + render)", n, "samples"):
        for i in range(n):
            make_sample(7, i, resolution=res)
    with tempfile.TemporaryDirectory() as d:
        with rate("make-dataset (sample + 5 rewards x 2 captions + PNG + tar)", n, "samples"):
            make_dataset(d, DatasetConfig(num_samples=n, shard_size=max(n // 2, 1), resolution=res), progress=False)
    imgs = [s.image for s in samples]
    caps = [s.caption for s in samples]
    with rate("reward scoring (all five shapes_* keys, one detection per image)", n, "images"):
        score_all(imgs, caps, detector=ShapesDetector(cache_size=0))
    with tempfile.TemporaryDirectory() as d:
        eval_generate(GroundTruthPipeline(res), d, n_samples=4, progress=False)
        with rate("ShapesEval scoring (300 prompts x 4 ground-truth images)", 1200, "images"):
            summary = score_folder(d, progress=False)
        print(f"  ShapesEval overall on ground truth: {summary['overall']:.4f} ({summary['images']} images)")

    print()
    print("ShapesEval of degraded ground truth (300 prompts x 4 images)")
    print("| condition | overall | single | two | counting | colors | position | color_attr |")
    print("|---|---|---|---|---|---|---|---|")
    for name, summ in degraded_ground_truth(300, res):
        t = summ["tags"]
        cells = " | ".join(f"{t[k]['accuracy']:.3f}" for k in ("single_object", "two_object", "counting", "colors", "position", "color_attr"))
        print(f"| {name} | {summ['overall']:.3f} | {cells} |")

    print()
    print(f"detector per-object accuracy ({n} samples per row, {res}px)")
    print("| condition | accuracy | recall | precision | objects |")
    print("|---|---|---|---|---|")
    for name, acc, rec, prec, tot in accuracy_table(n, res):
        print(f"| {name} | {acc:.4f} | {rec:.4f} | {prec:.4f} | {tot} |")


if __name__ == "__main__":
    run_main(main)
