"""Reward-scorer throughput (images/s) on CPU.

Three suites:

* ``tiny``: each of the seven published scorers (``clip_score``, ``aesthetic_score``,
  ``image_reward_score``, ``pick_a_score_score``, ``hpsv2_score``, ``vqa_score``,
  ``sciscore_score``) loaded through its real loading code from a tiny randomly initialised
  model saved in the published on-disk format (the tests' builders, ``tests/_rewards_support.py``),
  scoring random 320×256 PIL images (PIL path) and the same batch as a float tensor (tensor
  path). This measures the scorer machinery (preprocessing, tokenising, batching) around small
  models — not the cost of the full-size networks, which dominates on real weights.
* ``preprocess``: :class:`miro.rewards.preprocess.ImageTransform` alone at the real input sizes
  (224 crop, 224 pad as HPS, 336 expand2square as VQAScore, 512 as jina-clip-v2) from 512×384
  images, PIL path vs differentiable tensor path.
* ``shapes``: the five ``shapes_*`` rewards of the Shapes world (``miro.shapes.rewards``) through
  the same registry, on rendered web-like Shapes samples, or with ``--folder`` on generated images
  (a GenEval-layout folder, e.g. one target of a controllability sweep).

Usage::

    python benchmarks/bench_rewards.py [--suite tiny|preprocess|shapes|all] [--n 64] [--batch 16] [--threads 2] [--folder DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _args import ArgumentParser, positive_int, run_main  # beside this script

REPO = Path(__file__).resolve().parents[1]


def _images(n: int, w: int = 320, h: int = 256, seed: int = 0):
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = g.integers(0, 256, (8, 10, 3), dtype=np.uint8)  # smooth, photo-like content
        out.append(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    return out


def _as_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])


def _rate(fn, n: int, repeats: int = 3) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process), best of ``repeats``.

    On a shared machine the wall rate depends on the load; the CPU rate (all threads' CPU time)
    is what the work costs.
    """
    fn()  # warm-up (model loading, first-call overheads)
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return n / wall, n / max(cpu, 1e-9)


def _fmt(r: tuple[float, float]) -> str:
    return f"{r[0]:>9.1f} /{r[1]:>8.1f}"


def build_tiny_scorers(root: Path) -> dict:
    """Every published scorer on a tiny model in its published format (built as the tests build them)."""
    sys.path.insert(0, str(REPO / "tests"))
    import _rewards_support as rs  # noqa: E402
    import test_rewards_hpsv2 as th  # noqa: E402
    import test_rewards_image_reward as ti  # noqa: E402
    import test_rewards_vqascore as tv  # noqa: E402

    from miro.rewards import load_scorer
    from miro.rewards.aesthetic import AestheticMLP

    class _Factory:  # stands in for pytest's tmp_path_factory
        def mktemp(self, name):
            p = root / name
            p.mkdir(parents=True, exist_ok=True)
            return p

    clip = rs.save_tiny_clip(root / "clip", seed=0)
    torch.manual_seed(0)
    torch.save(AestheticMLP(16).state_dict(), str(root / "aesthetic.pth"))
    hps_root, hps_tok, vocab, _ = th.hps_repo.__wrapped__(_Factory())
    ir_root, ir_tok, _ = ti.ir_repo.__wrapped__(_Factory())
    vqa_full, _, vqa_tok, *_ = tv.vqa_repos.__wrapped__(_Factory())
    cpu = dict(device="cpu")
    return {
        "clip_score": load_scorer("clip_score", model=str(clip), **cpu),
        "aesthetic_score": load_scorer("aesthetic_score", model=str(clip), mlp_weights=str(root / "aesthetic.pth"), **cpu),
        "image_reward_score": load_scorer("image_reward_score", model=str(ir_root), tokenizer=str(ir_tok), vision=ti.VISION, **cpu),
        "pick_a_score_score": load_scorer("pick_a_score_score", model=str(clip), tokenizer=str(clip), image_size=32, **cpu),
        "hpsv2_score": load_scorer("hpsv2_score", model=str(hps_root), tokenizer=str(hps_tok),
                                   open_clip_config=th.TINY_OPEN_CLIP(vocab), **cpu),
        "vqa_score": load_scorer("vqa_score", model=str(vqa_full), tokenizer=str(vqa_tok), **cpu),
        "sciscore_score": load_scorer("sciscore_score", model=str(clip), tokenizer=str(clip), image_size=32, **cpu),
    }


def suite_tiny(n: int, batch: int) -> None:
    images = _images(n)
    x = _as_tensor(images)
    prompts = ["a photo of two red cats on the left of a blue dog"] * n
    with tempfile.TemporaryDirectory() as tmp:
        scorers = build_tiny_scorers(Path(tmp))
        print(f"tiny models, {n} images of 320x256, batch {batch}; images per wall second / per CPU second")
        print(f"{'scorer':<22}{'PIL':>19}{'tensor':>19}{'tensor + backward':>19}")
        for key, s in scorers.items():
            s.batch_size = batch
            with torch.no_grad():
                pil = _rate(lambda: s.score(images, prompts), n)
                ten = _rate(lambda: s.score(x, prompts), n)

            def fwd_bwd():
                xg = x.clone().requires_grad_(True)
                s.score(xg, prompts).sum().backward()

            grad = _rate(fwd_bwd, n)
            print(f"{key:<22}{_fmt(pil):>19}{_fmt(ten):>19}{_fmt(grad):>19}")


def suite_preprocess(n: int) -> None:
    from miro.rewards.preprocess import OPENAI_CLIP_MEAN, ImageTransform

    images = _images(n, 512, 384, seed=1)
    x = _as_tensor(images)
    specs = {
        "224 crop (CLIP/Pick/IR)": ImageTransform(size=224),
        "224 pad (HPS official)": ImageTransform(size=224, resize="longest_pad"),
        "336 square pad (VQA)": ImageTransform(size=336, pad_to_square=OPENAI_CLIP_MEAN),
        "512 crop (jina-clip-v2)": ImageTransform(size=512),
    }
    print(f"preprocessing only, {n} images of 512x384; images per wall second / per CPU second")
    print(f"{'transform':<26}{'PIL':>19}{'tensor':>19}")
    for name, t in specs.items():
        pil = _rate(lambda: t.from_pil(images), n)
        with torch.no_grad():
            ten = _rate(lambda: t.from_tensor(x), n)
        print(f"{name:<26}{_fmt(pil):>19}{_fmt(ten):>19}")


def suite_shapes(n: int, folder: str = "") -> None:
    from miro.rewards import load_scorer
    from miro.shapes import rewards as shapes_rewards
    from PIL import Image

    if folder:  # generated images (GenEval layout), which the detector fits harder than renders
        from miro.eval.folder import read_folder

        pairs = [(p, e.prompt) for e in read_folder(folder) for p in e.samples][:n]
        images = [Image.open(p).convert("RGB") for p, _ in pairs]
        prompts = [t for _, t in pairs]
        what = f"generated images from {folder}"
    else:
        from miro.shapes.imperfections import make_sample

        samples = [make_sample(7, i) for i in range(n)]
        images = [Image.fromarray(s.image) for s in samples]
        prompts = [s.caption for s in samples]
        what = "web-like Shapes samples"
    n = len(images)
    print(f"shapes rewards, {n} {what} at {images[0].width}x{images[0].height}")
    print(f"{'scorer':<22}{'img/s (wall / CPU)':>19}")
    for key in ("shapes_alignment", "shapes_counting", "shapes_position", "shapes_sharpness", "shapes_contrast"):
        def run():
            # the detections live in the module's one detector, shared by every scorer (so that the
            # five rewards cost one detection): empty its cache, or every run after the first is hits
            shapes_rewards._DETECTOR.cache_clear()
            load_scorer(key).score(images, prompts)

        print(f"{key:<22}{_fmt(_rate(run, n)):>19}")


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("tiny", "preprocess", "shapes", "all"), default="all")
    ap.add_argument("--n", type=positive_int, default=64, help="images per measurement")
    ap.add_argument("--batch", type=positive_int, default=16, help="scorer batch size (tiny suite)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--folder", default="", help="shapes suite: score these generated images (GenEval layout) "
                    "instead of rendered samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.suite in ("tiny", "all"):
        suite_tiny(args.n, args.batch)
    if args.suite in ("preprocess", "all"):
        suite_preprocess(args.n)
    if args.suite in ("shapes", "all"):
        suite_shapes(args.n, args.folder)


if __name__ == "__main__":
    run_main(main)
