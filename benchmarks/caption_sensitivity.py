"""How much a Shapes model's denoising uses each word of the caption: the shape, the colour.

Clean one-object scenes (every class equally often, random colour, place and size, flat
background), fixed noise. Each image goes through the model once per caption at each noise level
gamma (x_gamma = gamma x0 + (1 - gamma) eps, every reward target 1.0, no self-conditioning latents):
its true caption "a photo of a <colour> <shape>", the same caption with the shape word swapped for
another class, and with the colour word swapped for another colour. Printed first, what is at stake: the MSE between each image and the
same scene drawn with the swapped word. Then per gamma: the MSE of
x̂0 = x_gamma - (1 - gamma) v̂ to x0 with the true caption, and the *gap* (MSE with the swapped
word minus MSE with the true one, paired per image, ± its standard error).

A model that ignores a word has a gap of zero for it: the gap is how much the denoiser's guess of
the image depends on that word at that noise level. Sampling draws the shape from the middle noise
levels (gamma 0.1-0.4), so the shape gap there is the first number to watch when a model draws the
right colour in the right place but not the right shape. Cheap (seconds per model), and paired, so
small differences between checkpoints are visible long before ShapesEval can see them.

    python benchmarks/caption_sensitivity.py --model shipped=shapes --model new=runs/.../step=3000.ckpt
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _args import (  # beside this script
    ArgumentParser, name_eq_source, nonneg_int, open_unit_float, positive_int, run_main)


def scenes(n: int, seed: int):
    """n clean one-object scenes, classes in turn, random colour: (true, shape-swapped,
    colour-swapped) uint8 HWC images and the matching captions. A swapped image is the same scene
    (place, size, background) with the other class or colour: what the swapped caption describes."""
    import dataclasses

    from miro.shapes import world as W
    from miro.shapes.render import render
    from miro.shapes.scene import rng_for, scene_from_metadata

    imgs = {"true": [], "shape": [], "colour": []}
    caps = {"true": [], "shape": [], "colour": []}
    for i in range(n):
        rng = rng_for(seed, i)
        cls, col = W.CLASSES[i % len(W.CLASSES)], W.COLORS[int(rng.integers(len(W.COLORS)))]
        md = {"tag": "single_object", "include": [{"class": cls, "count": 1, "color": col}]}
        scene = scene_from_metadata(md, rng)
        other_cls = [c for c in W.CLASSES if c != cls][int(rng.integers(len(W.CLASSES) - 1))]
        other_col = [c for c in W.COLORS if c != col][int(rng.integers(len(W.COLORS) - 1))]
        for word, (c, k) in {"true": (col, cls), "shape": (col, other_cls), "colour": (other_col, cls)}.items():
            obj = dataclasses.replace(scene.objects[0], cls=k, color=c)
            imgs[word].append(render(dataclasses.replace(scene, objects=[obj]), W.DEFAULT_RESOLUTION))
            caps[word].append(f"a photo of a {c} {k}")
    return {k: np.stack(v) for k, v in imgs.items()}, caps


def encode_batches(pipe, caps: list[str], batch_size: int) -> list[tuple[slice, tuple]]:
    """(slice, (emb, mask)) per batch of captions: encoded once, reused at every noise level."""
    sls = [slice(i, i + batch_size) for i in range(0, len(caps), batch_size)]
    return [(sl, pipe.encode_prompt(caps[sl])) for sl in sls]


def per_image_mse(model, x0_px, texts, eps, gamma: float) -> torch.Tensor:
    """(N,) MSE of x̂0 = x_gamma - (1 - gamma) v̂ to x0, in the units of ``x0_px``, one forward pass
    per batch of ``texts`` (:func:`encode_batches`), every reward target 1.0, no self-conditioning."""
    from miro.models.flow import interpolate, x0_from_velocity

    x0 = model.preprocess(x0_px)
    out = []
    for sl, (emb, mask) in texts:
        x = interpolate(x0[sl], eps[sl], gamma)
        with torch.no_grad():
            v, _ = model(x, torch.full((x.shape[0],), gamma), emb, mask, {k: 1.0 for k in model.coherence_keys})
        out.append((model.postprocess(x0_from_velocity(x, v, gamma)) - x0_px[sl]).pow(2).flatten(1).mean(1))
    return torch.cat(out)


def sensitivity(pipe, x0_px, caps, eps, gammas, batch_size: int = 100) -> list[dict]:
    """Per gamma: true-caption MSE and each swap's paired gap (mean, standard error)."""
    model = pipe.model.eval()
    texts = {word: encode_batches(pipe, c, batch_size) for word, c in caps.items()}
    rows = []
    for g in gammas:
        base = per_image_mse(model, x0_px, texts["true"], eps, g)
        row = {"gamma": g, "mse": base.mean().item()}
        for word in ("shape", "colour"):
            d = per_image_mse(model, x0_px, texts[word], eps, g) - base
            row[word] = (d.mean().item(), d.std().item() / len(d) ** 0.5)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", type=name_eq_source, required=True, metavar="NAME=SRC",
                    help=".ckpt (EMA weights unless --weights raw) or anything MiroPipeline loads; repeatable")
    ap.add_argument("--gammas", type=open_unit_float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                    help="noise levels, each in (0, 1)")
    ap.add_argument("--num-images", type=positive_int, default=200)
    ap.add_argument("--weights", choices=("raw", "ema"), default="ema")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--threads", type=positive_int, default=None)
    args = ap.parse_args(argv)
    if args.num_images < 2:
        ap.error(f"--num-images {args.num_images}: need at least 2 for a standard error")
    if args.threads:
        torch.set_num_threads(args.threads)
    from shapes_training_study import load  # beside this script

    imgs, caps = scenes(args.num_images, args.seed)
    px = {k: torch.from_numpy(v).permute(0, 3, 1, 2).float() / 127.5 - 1 for k, v in imgs.items()}
    x0_px = px["true"]
    eps = torch.randn(x0_px.shape, generator=torch.Generator().manual_seed(args.seed))
    print(f"{args.num_images} clean one-object scenes; MSE x1e3 of x̂0 (pixels in [-1, 1]); gap = swapped - true, ± s.e.")
    stake = {w: 1e3 * (px[w] - x0_px).pow(2).mean().item() for w in ("shape", "colour")}
    print(f"at stake (MSE x1e3 between the true image and the swapped one): shape {stake['shape']:.2f}, "
          f"colour {stake['colour']:.2f}")
    print("model".ljust(22) + "gamma  true MSE    shape gap        colour gap")
    for spec in args.model:
        name, _, src = spec.partition("=")  # NAME=SRC: checked by argparse (name_eq_source)
        for row in sensitivity(load(src, args.weights), x0_px, caps, eps, args.gammas):
            (s, se_s), (c, se_c) = row["shape"], row["colour"]
            print(f"{name[:21]:<22}{row['gamma']:5.2f}  {1e3 * row['mse']:8.2f}  {1e3 * s:7.2f} ± {1e3 * se_s:4.2f}"
                  f"   {1e3 * c:7.2f} ± {1e3 * se_c:4.2f}")
    return 0


if __name__ == "__main__":
    run_main(main)
