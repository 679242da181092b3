"""``miro generate``: prompt -> PNG files and a grid.

    miro generate "two red circles above a blue square" --n 8 --seed 0 --out miro-out/demo
    miro generate "a photo of a cat" --model nicolas-dufour/miro-ablations --variant miro-no-clip \
        --reward aesthetic_score=0.625 --negative-reward aesthetic_score=0 --steps 50 --cfg 7

``--model`` takes a built-in name (default ``shapes``), a pipeline folder, a hub repo id, or a
Lightning ``.ckpt`` (converted in memory by ``miro.train.convert``). Sample ``j`` is written as
``{j:03d}.png``; ``grid.png`` tiles all samples, upscaled with nearest-neighbour when they are
small so that a 32-pixel image is visible.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from miro.eval.generate import parse_reward_cfg

DEFAULT_MODEL = "shapes"
# Until the trained Shapes model ships, the demo falls back to the honestly named untrained one.
FALLBACK_MODEL = "shapes-untrained"
GRID_MIN_TILE = 256  # grid tiles are upscaled (nearest) to at least this many pixels


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value of {key!r} must be a number, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="miro generate",
        description="Generate images from a prompt with a MIRO pipeline, steered by reward targets.",
    )
    p.add_argument("prompt", nargs="?", help="the text prompt (not needed with --list-rewards)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (shapes, shapes-untrained), pipeline folder, hub repo id, or "
                        "Lightning .ckpt (default: %(default)s)")
    p.add_argument("--variant", default=None, help="subfolder of the model repo (e.g. miro-no-clip)")
    p.add_argument("--reward", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="target in [0, 1] for a reward of the positive branch (repeatable; default 1.0)")
    p.add_argument("--negative-reward", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE",
                   help="target in [0, 1] for a reward of the negative branch (repeatable; default 0.0)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default: %(default)s)")
    p.add_argument("--cfg", type=float, default=7.0,
                   help="guidance w in (1+w)*cond - w*uncond; 0 disables (default: %(default)s)")
    p.add_argument("--reward-cfg", type=parse_reward_cfg, default=None,
                   help="separate guidance of the reward direction, w_r*(v(prompt, r+) - v(prompt, r-)); "
                        "default: --cfg (the published single scale); or one scale per reward, KEY=W,KEY=W "
                        "(rewards left out keep --cfg; the README explains the chain)")
    p.add_argument("--reward-direction", choices=("prompt", "null"), default="prompt",
                   help="with --reward-cfg: take the reward direction with the prompt, v(prompt, r+) - "
                        "v(prompt, r-), or with the null text (default: %(default)s)")
    p.add_argument("--n-samples", "--n", dest="n", type=int, default=4,
                   help="images to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise generator (default: %(default)s)")
    p.add_argument("--outdir", "--out", dest="out", default="miro-out/generate",
                   help="output folder (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--text-encoder", default=None, help="override the config's text encoder")
    p.add_argument("--vae", default=None, help="override the config's autoencoder")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on an oversubscribed machine)")
    p.add_argument("--list-rewards", action="store_true", help="print the model's reward keys and exit")
    return p


def make_grid(images, min_tile: int = GRID_MIN_TILE):
    """Tile PIL images (same size) into a near-square grid, upscaling small ones (nearest)."""
    from PIL import Image

    w, h = images[0].size
    scale = max(1, math.ceil(min_tile / max(w, h)))
    tw, th = w * scale, h * scale
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * tw, rows * th), (255, 255, 255))
    for i, im in enumerate(images):
        tile = im.resize((tw, th), Image.NEAREST) if scale > 1 else im
        grid.paste(tile, ((i % cols) * tw, (i // cols) * th))
    return grid


def load_pipeline(model: str, variant=None, device=None, dtype=None, text_encoder=None, vae=None):
    """Resolve ``--model``: a Lightning ``.ckpt`` goes through ``miro.train.convert``; the
    default built-in ``shapes`` falls back to ``shapes-untrained`` (with a notice) where the
    trained model is not installed."""
    from miro.hub import builtin_pipelines
    from miro.pipeline import MiroPipeline

    kw = dict(device=device, dtype=dtype, text_encoder=text_encoder, vae=vae)
    if str(model).endswith(".ckpt"):
        if not Path(model).is_file():
            raise ValueError(f"checkpoint {model!r} does not exist")
        try:
            from miro.train.convert import pipeline_from_checkpoint
        except ImportError as e:
            raise ValueError(
                f"loading a Lightning .ckpt needs miro.train.convert.pipeline_from_checkpoint ({e}); "
                "convert it with `miro convert` and pass the folder instead"
            ) from e
        pipe = pipeline_from_checkpoint(model, text_encoder=text_encoder, autoencoder=vae,
                                        device=device or "cpu")
        if dtype is not None:
            pipe.to(dtype=dtype)
        return pipe
    if model == DEFAULT_MODEL and DEFAULT_MODEL not in builtin_pipelines() and not Path(model).is_dir():
        print(f"notice: the trained '{DEFAULT_MODEL}' model is not installed; using "
              f"'{FALLBACK_MODEL}' (random weights, images are noise-like)", file=sys.stderr)
        model = FALLBACK_MODEL
    return MiroPipeline.from_pretrained(model, variant=variant, **kw)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is None and not args.list_rewards:
        parser.error("the prompt is required")
    import torch

    for name, value in (("--steps", args.steps), ("--n-samples", args.n)):
        if value < 1:
            print(f"miro generate: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"miro generate: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = load_pipeline(args.model, args.variant, device, args.dtype, args.text_encoder, args.vae)
        if args.list_rewards:
            print("\n".join(pipe.coherence_keys))
            return 0
        generator = torch.Generator(device=device).manual_seed(args.seed)
        images = pipe(
            args.prompt,
            reward_targets=dict(args.reward) or None,
            negative_reward_targets=dict(args.negative_reward) or None,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            reward_guidance_scale=args.reward_cfg,
            reward_direction=args.reward_direction,
            num_images_per_prompt=args.n,
            generator=generator,
            output_type="pil",
        )
    except ValueError as e:  # bad input: named in the message
        print(f"miro generate: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreachable hub, missing cache, unreadable files
        print(f"miro generate: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for j, im in enumerate(images):
        im.save(out / f"{j:03d}.png")
    make_grid(images).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
