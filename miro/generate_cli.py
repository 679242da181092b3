"""``miro generate``: prompt -> PNG files and a grid.

    miro generate "two red circles above a blue square" --n 8 --seed 0 --out miro-out/demo
    miro generate "a photo of a cat" --model nicolas-dufour/miro-ablations --variant miro-no-clip \
        --reward aesthetic_score=0.625 --negative-reward aesthetic_score=0 --steps 50 --cfg 7

``--model`` takes a built-in name (default ``shapes``), a pipeline folder, a hub repo id, or a
Lightning ``.ckpt`` (converted in memory by ``miro.train.convert``). Sample ``j`` is written as
``{j:03d}.png``; ``grid.png`` tiles all samples, upscaled with nearest-neighbour when they are
small so that a 32-pixel image is visible. The folder ends up holding this run only: numbered
images an earlier run with more samples left there are removed (with a notice).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
from pathlib import Path

from miro.eval.generate import parse_reward_cfg, reward_dict

DEFAULT_MODEL = "shapes"
# Where the trained Shapes model is not installed, `shapes` falls back to the honestly named untrained one.
FALLBACK_MODEL = "shapes-untrained"
GRID_MIN_TILE = 256  # grid tiles are upscaled (nearest) to at least this many pixels
# The device kinds a pipeline runs on. torch.device parses many more (xla, meta, hpu, ...), which
# would only fail deep inside loading or sampling, with a traceback.
DEVICE_KINDS = ("cpu", "cuda", "mps")
SAMPLE_NAME = re.compile(r"\d{3,}\.png")  # sample j is written as f"{j:03d}.png"


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value of {key!r} must be a number, got {value!r}") from None


def check_device(name: str | None) -> str:
    """``--device`` of ``miro generate``, ``miro eval`` and ``miro demo``, checked before any model
    is loaded: None -> cuda when available, else cpu; cpu, cuda, cuda:N and mps are allowed where
    their backend is. Raises ValueError naming the value and what is allowed."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    allowed = "cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use {allowed}") from None
    if dev.type not in DEVICE_KINDS:
        raise ValueError(f"--device {name!r} is not supported; use {allowed}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name!r}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name!r}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name!r}: MPS is not available here; use --device cpu")
    return name


def check_dtype(dtype: str | None, device: str) -> None:
    """``--dtype`` against the (checked) ``--device``, in CLI words and before loading: half
    precision samples under CUDA autocast only (the pipeline refuses it elsewhere, but only once
    the model is loaded, and in Python-API words)."""
    import torch

    from miro.hub import parse_dtype

    if dtype is None:
        return
    try:
        dt = parse_dtype(dtype)
    except ValueError:
        raise ValueError(f"--dtype {dtype!r} is not supported; use float32, bfloat16 or float16") from None
    kind = torch.device(device).type
    if dt != torch.float32 and kind != "cuda":
        raise ValueError(f"--dtype {dtype} needs --device cuda; on {kind} use --dtype float32")


def prepare_out_dir(out: Path) -> None:
    """Create the output folder before the model is loaded, so that a path that cannot be a
    writable folder (an existing file, /proc/...) fails before any compute is spent (OSError)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", str(out))
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "the folder is not writable", str(out))


def remove_stale_samples(out: Path, n: int) -> list[str]:
    """Remove the numbered images ``NNN.png`` with number >= ``n`` (an earlier run with more
    samples left them), so the folder holds this run's samples only, as its grid.png shows;
    returns their names. Other files are left alone."""
    stale = sorted((p for p in out.iterdir()
                    if SAMPLE_NAME.fullmatch(p.name) and p.name == f"{int(p.stem):03d}.png" and int(p.stem) >= n),
                   key=lambda p: int(p.stem))
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


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
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="text of the unconditional branch instead of the empty prompt (default: none, as published)")
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
                   help="output folder, created if missing; it ends up holding this run only: 000.png ... and "
                        "grid.png are replaced, and numbered images left by an earlier run with a larger --n are "
                        "removed (with a notice); other files are kept (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), or bfloat16 / float16 with --device cuda")
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
    try:  # bad flags are refused before anything is loaded or written
        device = check_device(args.device)
        check_dtype(args.dtype, device)
        reward = reward_dict(args.reward)
        negative = reward_dict(args.negative_reward, "--negative-reward")
    except ValueError as e:
        print(f"miro generate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not args.list_rewards:
        try:
            prepare_out_dir(out)
        except OSError as e:
            print(f"miro generate: cannot write images to --out {str(out)!r}: {e.strerror or e}", file=sys.stderr)
            return 1
    try:
        pipe = load_pipeline(args.model, args.variant, device, args.dtype, args.text_encoder, args.vae)
        if args.list_rewards:
            print("\n".join(pipe.coherence_keys))
            return 0
        generator = torch.Generator(device=device).manual_seed(args.seed)
        images = pipe(
            args.prompt,
            reward_targets=reward or None,
            negative_reward_targets=negative or None,
            negative_prompt=args.negative_prompt,
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
    from miro.eval.generate import atomic_save_image

    try:  # each file is complete or absent (a full disk or a kill leaves no truncated PNG)
        for j, im in enumerate(images):
            atomic_save_image(im, out / f"{j:03d}.png")
        atomic_save_image(make_grid(images), out / "grid.png")
        stale = remove_stale_samples(out, len(images))
    except OSError as e:
        print(f"miro generate: cannot write images to --out {str(out)!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    if stale:
        print(f"notice: removed {len(stale)} image(s) left in {out} by an earlier run with more samples "
              f"({stale[0]}{' to ' + stale[-1] if len(stale) > 1 else ''})", file=sys.stderr)
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
