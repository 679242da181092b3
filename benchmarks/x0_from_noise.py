"""What a Shapes checkpoint predicts from (almost) pure noise: its layout prior.

For a few prompts and fixed noise, x_gamma = (1 - gamma) * eps (no image at all) goes through
the model once and x̂0 = x_gamma - (1 - gamma) * v̂ (miro.models.flow) is read back. A model
with a text-dependent layout prior draws a coarse picture of the prompt at gamma near 0; one
that decides the layout patch by patch predicts a flat image whose details follow the noise.
Printed per gamma: the spatial std of x̂0 (mean over images), its std across images, and the
correlation of x̂0 with the noise. ``--out`` writes the x̂0 grid (rows: gammas).

    python benchmarks/x0_from_noise.py runs/.../step=3000.ckpt --out x0.png
"""

from __future__ import annotations

import argparse

import torch

from _args import ArgumentParser, nonneg_int, positive_int, run_main, unit_float  # beside this script

PROMPTS = ("two red circles above a blue square", "a yellow triangle")


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help=".ckpt (raw weights) or anything MiroPipeline loads")
    ap.add_argument("--gammas", type=unit_float, nargs="+", default=[0.02, 0.1, 0.3], help="noise levels in [0, 1]")
    ap.add_argument("--per-prompt", type=positive_int, default=4, help="images per prompt (>= 1)")
    ap.add_argument("--seed", type=nonneg_int, default=1)
    ap.add_argument("--out", default=None, help="PNG of x̂0 (one row per gamma)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from miro.models.flow import x0_from_velocity
    from shapes_training_study import load  # beside this script: .ckpt raw weights or any pipeline

    pipe = load(args.model, "raw")
    model = pipe.model.eval()
    caps = [p for p in PROMPTS for _ in range(args.per_prompt)]
    emb, mask = pipe.encode_prompt(caps)
    b = len(caps)
    rows = []
    for gamma in args.gammas:
        eps = torch.randn(b, *model.latent_shape, generator=torch.Generator().manual_seed(args.seed))
        x = (1 - gamma) * eps
        with torch.no_grad():
            v, _ = model(x, torch.full((b,), gamma), emb, mask, {k: 1.0 for k in model.coherence_keys})
        x0 = x0_from_velocity(x, v, gamma)
        corr = torch.corrcoef(torch.stack([x0.flatten(), eps.flatten()]))[0, 1].item()
        print(f"gamma {gamma}: spatial std {x0.std(dim=(2, 3)).mean():.3f}, std across images "
              f"{x0.std(0).mean():.3f}, corr(x0_hat, noise) {corr:.3f}")
        rows.append(model.postprocess(x0).clamp(-1, 1))
    if args.out:
        from PIL import Image

        cell = 64
        grid = Image.new("RGB", (b * cell, len(rows) * cell))
        for r, t in enumerate(rows):
            a = ((t + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            for c in range(b):
                grid.paste(Image.fromarray(a[c]).resize((cell, cell), Image.NEAREST), (c * cell, r * cell))
        grid.save(args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
