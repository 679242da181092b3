"""Build the built-in ``shapes-untrained`` pipeline and time generation with it.

The folder ``miro/assets/pipelines/shapes-untrained/`` holds a *freshly initialised* model on the
``shapes`` config (pixel space 32x32, embedded MiniLM text, identity codec). It exists so that
``make demo`` and ``miro generate`` run end to end on a fresh machine before the trained
``shapes`` model ships; its images are noise-like by construction.

Layout: ``config.json`` and ``uncond_embedding.npy`` as published, and ``init.json``
(``{"seed": 0}``) in place of ``model.safetensors``: the weights are the seeded initialisation
``MiroModel.from_config(config, generator=Generator().manual_seed(seed))``, rebuilt at load time,
so the repository does not carry ~33 MB of random numbers. The script checks that loading the
folder reproduces the in-memory model bit for bit.

    python benchmarks/make_untrained_shapes.py            # build + time 8 images x 50 steps
    python benchmarks/make_untrained_shapes.py --no-time  # build only
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from _args import ArgumentParser, nonneg_int, positive_int, run_main  # beside this script

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "miro" / "assets" / "pipelines" / "shapes-untrained"


def build(out: Path, seed: int = 0):
    import shutil

    from miro.encoders.text import load_text_encoder
    from miro.hub import atomic_write_json
    from miro.models import MiroModel, get_config
    from miro.pipeline import MiroPipeline

    cfg = get_config("shapes")
    model = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(seed))
    text = load_text_encoder(cfg["text_encoder"], max_length=int(cfg["max_text_len"]))
    pipe = MiroPipeline(model, text, cfg["autoencoder"], cfg, text.uncond_embedding())
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "model.safetensors").unlink()
    atomic_write_json(tmp / "init.json", {"seed": seed})
    loaded = MiroPipeline.from_pretrained(tmp)
    for k, v in model.state_dict().items():
        if not torch.equal(loaded.model.state_dict()[k], v):
            raise RuntimeError(f"seeded initialisation is not reproducible at {k!r}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return pipe


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="pipeline folder to write")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="initialisation seed")
    ap.add_argument("--no-time", action="store_true", help="skip the generation timing")
    ap.add_argument("--n", type=positive_int, default=8, help="images in the timed generation")
    ap.add_argument("--steps", type=positive_int, default=50, help="Euler steps in the timed generation")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: %(default)s)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipe = build(args.out, args.seed)
    n_params = sum(p.numel() for p in pipe.model.parameters())
    size = sum(f.stat().st_size for f in args.out.iterdir())
    blob = b"".join(v.numpy().tobytes() for _, v in sorted(pipe.model.state_dict().items()))
    digest = hashlib.sha256(blob).hexdigest()[:16]
    print(f"wrote {args.out}: {n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB as fp32, not "
          f"stored), folder {size / 1e3:.1f} kB, weights sha256 {digest}")
    if args.no_time:
        return 0

    from miro.pipeline import MiroPipeline

    t0 = time.perf_counter()
    loaded = MiroPipeline.from_pretrained(args.out)
    t_load = time.perf_counter() - t0
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, num_images_per_prompt=args.n, output_type="np")
    prompt = "two red circles above a blue square"
    t0 = time.perf_counter()
    loaded(prompt, generator=torch.Generator().manual_seed(0), **kw)  # includes MiniLM loading
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded(prompt, generator=torch.Generator().manual_seed(0), **kw)
    t_warm = time.perf_counter() - t0
    print(f"load {t_load:.2f} s; first call (incl. text encoder load) {t_first:.2f} s; "
          f"warm call {t_warm:.2f} s for {args.n} images x {args.steps} steps "
          f"({args.n * args.steps / t_warm:.1f} image-steps/s, batched CFG, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    run_main(main)
