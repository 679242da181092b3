"""Held-out denoising error of Shapes checkpoints, per noise level: how much of a scene a model
recovers from one noisy look at it.

For every image of a Shapes dataset folder (make it with an unseen seed, e.g. ``miro shapes
make-dataset --out heldout --num-samples 256 --seed 99``) and fixed noise, x_gamma = gamma x0 +
(1 - gamma) eps goes through the model once (its own caption, every reward target 1.0, no
self-conditioning latents) and x̂0 = x_gamma - (1 - gamma) v̂ is compared with x0. Printed per
gamma and model: the MSE of x̂0, and for reference the MSE of the best *linear* estimate
(per-pixel Wiener filter on the data mean and variance, which knows no shapes). A model that uses
spatial context beats the Wiener filter at high noise; one that denoises patch by patch does not.
Every model sees the same images and noise, so differences between rows are paired.

``--ode-from G0 ...`` adds a second table: the same x_G0 integrated to gamma = 1 by the sampler
(``euler_sample``, ``--ode-steps`` steps, no CFG, self-conditioning latents carried), and
the MSE of the end point to x0. A model whose probability-flow ODE keeps the scene it is started
in scores low here; one that turns a half-noised shape into scattered patches (the 4x4 mosaics
of the early Shapes models) does not, even when its one-step x̂0 is good.

    python benchmarks/denoise_error.py --data heldout --model old=runs/.../step=1000.ckpt --model new=...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from _args import ArgumentParser, name_eq_source, nonneg_int, positive_int, run_main, unit_float  # beside this script


def load_images(folder: str, limit: int):
    """The first ``limit`` (image, caption) pairs of the folder's shards, through the shard reader
    of ``miro preprocess`` (damaged samples are skipped)."""
    from miro.data.preprocess_io import ShardReport, iter_decoded

    imgs, caps = [], []
    for shard in sorted(Path(folder).glob("*.tar")):
        for sample, _ in iter_decoded(shard, ShardReport("denoise_error", shard.name)):
            imgs.append(np.asarray(sample.image))
            caps.append(sample.caption)
            if len(imgs) == limit:
                break
        if len(imgs) == limit:
            break
    if not imgs:
        raise ValueError(f"--data {folder!r}: no samples in its .tar shards (a `miro shapes make-dataset` folder)")
    x0 = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x0, caps


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Shapes dataset folder (tar shards)")
    ap.add_argument("--model", action="append", type=name_eq_source, required=True, metavar="NAME=SRC",
                    help=".ckpt (raw weights unless --weights ema) or anything MiroPipeline loads; repeatable")
    ap.add_argument("--gammas", type=unit_float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.8],
                    help="noise levels, each in [0, 1]")
    ap.add_argument("--ode-from", type=unit_float, nargs="*", default=[], metavar="G0",
                    help="also integrate the ODE from these gammas to 1 and report the end point's MSE")
    ap.add_argument("--ode-steps", type=positive_int, default=25, help="Euler steps from G0 to 1 (default 25)")
    ap.add_argument("--num-images", type=positive_int, default=256)
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--weights", choices=("raw", "ema"), default="raw")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--threads", type=positive_int, default=None)
    args = ap.parse_args(argv)
    for g0 in args.ode_from:
        if not 0.0 <= g0 < 1.0:
            ap.error(f"--ode-from {g0}: a start gamma must be in [0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from caption_sensitivity import encode_batches, per_image_mse  # beside this script
    from miro.models.flow import interpolate
    from shapes_training_study import load

    x0_px, caps = load_images(args.data, args.num_images)
    eps = torch.randn(x0_px.shape, generator=torch.Generator().manual_seed(args.seed))
    mean, var = x0_px.mean(0), x0_px.var(0)
    wiener = {}
    for g in args.gammas:  # E[x0 | x] for Gaussian x0 with the data's per-pixel mean and variance
        x = interpolate(x0_px, eps, g)
        est = mean + g * var / (g**2 * var + (1 - g) ** 2) * (x - g * mean)
        wiener[g] = (est - x0_px).pow(2).mean().item()
    ode_rows = []
    print("gamma".ljust(24) + "".join(f"{g:>9.2f}" for g in args.gammas))
    print("linear (Wiener)".ljust(24) + "".join(f"{wiener[g]:>9.4f}" for g in args.gammas))
    for spec in args.model:
        name, _, src = spec.partition("=")  # NAME=SRC: checked by argparse (name_eq_source)
        pipe = load(src, args.weights)
        model = pipe.model.eval()
        x0 = model.preprocess(x0_px)
        texts = encode_batches(pipe, caps, args.batch_size)  # once per batch, not per gamma
        errs = [per_image_mse(model, x0_px, texts, eps, g).mean().item() for g in args.gammas]
        print(name[:23].ljust(24) + "".join(f"{e:>9.4f}" for e in errs))
        if args.ode_from:
            ode_rows.append((name, [ode_error(model, x0, x0_px, eps, texts, g0, args.ode_steps)
                                    for g0 in args.ode_from]))
    if ode_rows:
        print(f"\nODE from gamma0 to 1 ({args.ode_steps} Euler steps, no CFG): MSE of the end point to x0")
        print("gamma0".ljust(24) + "".join(f"{g:>9.2f}" for g in args.ode_from))
        for name, errs in ode_rows:
            print(name[:23].ljust(24) + "".join(f"{e:>9.4f}" for e in errs))
    return 0


def ode_error(model, x0, x0_px, eps, texts, g0: float, steps: int) -> float:
    """MSE to x0 of the sampler's end point (no CFG) started from x_g0 = g0 x0 + (1 - g0) eps."""
    from miro.models.flow import Scheduler, interpolate
    from miro.models.sampler import euler_sample

    tot = 0.0
    for sl, (emb, mask) in texts:
        with torch.no_grad():
            x = euler_sample(model, interpolate(x0[sl], eps[sl], g0), emb, mask, None, None, num_steps=steps,
                             guidance_scale=0.0, scheduler=Scheduler(end=g0))
        tot += (model.postprocess(x) - x0_px[sl]).pow(2).sum().item()
    return tot / x0_px.numel()

if __name__ == "__main__":
    run_main(main)
