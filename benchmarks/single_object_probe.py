"""Can a network configuration learn shape from text at all? Train it on the simplest Shapes scenes.

    python benchmarks/single_object_probe.py --steps 1500 --out runs/probe
    python benchmarks/single_object_probe.py --override network.data_mixer='"conv_attn"' --out runs/probe_attn

The full Shapes world (textures, backgrounds, up to four objects, relations, caption defects)
mixes the shape signal with much else. This probe keeps one flat object on the plain gray
background, any of the 5 classes and 10 colours, any position and size, captioned "a photo of a
<colour> <class>", drawn fresh every step (no dataset, no rewards to fit: every reward token gets
1.0). The model is the ``--config`` network (the Shapes config by default, ``--override
section.key=JSON`` to change it), trained from scratch (or ``--init`` a pipeline) with the
flow loss of the recipe (self-conditioning 0.9, text dropout 0.1), AdamW, batch 64.

Every ``--eval-every`` steps: ``--eval-images`` fixed prompts are sampled (25 Euler steps, CFG
``--guidance``, fixed noise) and read by the Shapes detector: the share of images with exactly one
object, and with exactly one object of the prompt's class (chance among detected single objects:
0.2). A grid of the first 40 images is written as ``grid_<step>.png``, the numbers to
``probe.json`` (atomically, after every evaluation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _args import (  # beside this script
    ArgumentParser, nonneg_float, nonneg_int, positive_float, positive_int, run_main)

from miro.encoders.text import pad_token_rows
from miro.io import atomic_write_json

PROMPT = "a photo of a {color} {cls}"


def single_object_batch(rng: np.random.Generator, n: int, resolution: int):
    """(images uint8 (n, H, W, 3), captions, classes): one flat object on the default background."""
    from miro.shapes import world as W
    from miro.shapes.render import render
    from miro.shapes.scene import scene_from_metadata

    imgs, caps, classes = [], [], []
    for _ in range(n):
        cls = W.CLASSES[int(rng.integers(len(W.CLASSES)))]
        color = W.COLORS[int(rng.integers(len(W.COLORS)))]
        scene = scene_from_metadata({"tag": "single_object", "include": [{"class": cls, "count": 1, "color": color}]},
                                    rng)
        imgs.append(render(scene, resolution))
        caps.append(PROMPT.format(color=color, cls=cls))
        classes.append(cls)
    return np.stack(imgs), caps, classes


class CaptionCache:
    """Text embeddings per caption (the probe's 50 captions repeat every step)."""

    def __init__(self, encoder):
        self.encoder, self.rows = encoder, {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted(set(captions) - set(self.rows))
        if missing:
            emb, mask = self.encoder.encode(missing)
            for c, e, m in zip(missing, emb, mask):
                self.rows[c] = e[m.bool()]
        return pad_token_rows([self.rows[c] for c in captions])


def to_model_space(model, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return model.preprocess(x)


@torch.no_grad()
def evaluate(model, captions, classes, noise, cache, uncond, guidance: float) -> tuple[dict, np.ndarray]:
    """``uncond`` (L_u, E): the empty prompt's tokens, all valid (as the pipeline samples)."""
    from miro.models import euler_sample

    emb, mask = cache(captions)
    n = len(captions)
    x = euler_sample(model, noise, emb, mask, uncond[None].expand(n, -1, -1),
                     torch.ones(n, uncond.shape[0], dtype=torch.bool), num_steps=25, guidance_scale=guidance)
    img = ((model.postprocess(x).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return read_samples(img, classes), img


def read_samples(images: np.ndarray, classes: list[str]) -> dict:
    """Detector reading of float (N, H, W, 3) images in [0, 1]: the share with exactly one object,
    and with exactly one object of the asked class."""
    from miro.shapes.detector import detect_array

    one = right = 0
    for im, cls in zip(images, classes):
        dets = detect_array(im)
        if len(dets) == 1:
            one += 1
            right += dets[0].cls == cls
    n = len(classes)
    return {"one_object": one / n, "shape_right": right / n}


def save_grid(images: np.ndarray, path: Path, cols: int = 10, scale: int = 3) -> None:
    """Float (N, H, W, 3) images in [0, 1] as one PNG, ``cols`` per row, upscaled ``scale``x (nearest)."""
    from miro.train.callbacks import make_grid, save_png_atomic

    tile = make_grid((images * 255).round().astype(np.uint8), cols)
    save_png_atomic(tile.repeat(scale, 0).repeat(scale, 1), path)


def main(argv=None) -> int:
    from miro.models import CONFIG_NAMES

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", choices=CONFIG_NAMES, default="shapes")
    ap.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=JSON")
    ap.add_argument("--init", default=None, help="warm start from a pipeline (name or folder)")
    ap.add_argument("--steps", type=positive_int, default=1500)
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--lr", type=positive_float, default=5e-4)
    ap.add_argument("--warmup", type=nonneg_int, default=100)
    ap.add_argument("--eval-every", type=positive_int, default=500)
    ap.add_argument("--eval-images", type=positive_int, default=100)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the starting weights only")
    ap.add_argument("--guidance", type=nonneg_float, default=1.0)
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--threads", type=positive_int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from miro.encoders import load_text_encoder
    from miro.models import LossConfig, MiroModel, flow_loss, get_config
    from miro.pipeline import MiroPipeline

    cfg = get_config(a.config)
    sections = sorted(k for k, v in cfg.items() if isinstance(v, dict))
    for spec in a.override:  # one line and exit 2 (run_main) for a malformed one
        key, sep, value = spec.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in sections or not name:
            raise ValueError(f"--override {spec!r}: expected SECTION.KEY=JSON with SECTION in {sections}")
        try:
            cfg[section][name] = json.loads(value)
        except ValueError:
            raise ValueError(f"--override {spec!r}: {value!r} is not JSON (e.g. 4, 0.5, true, \"sincos\")") from None
    torch.manual_seed(a.seed)
    model = MiroModel.from_config(cfg)
    model.network.init_position_table("sincos")  # the Shapes recipe's position_init
    if a.init:
        model.load_state_dict_checked(MiroPipeline.from_pretrained(a.init).model.state_dict())
    encoder = load_text_encoder(cfg.get("text_encoder", "minilm"), max_length=int(cfg["max_text_len"]))
    cache, uncond = CaptionCache(encoder), encoder.uncond_embedding()  # uncond: what training drops text to
    res = int(cfg["data_resolution"])
    keys = model.coherence_keys
    ev_imgs, ev_caps, ev_cls = single_object_batch(np.random.default_rng(12345), a.eval_images, res)
    del ev_imgs
    noise = torch.randn((a.eval_images, *model.latent_shape), generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    loss_cfg = LossConfig(cond_drop_rate=0.1)
    rng, gen = np.random.default_rng(a.seed + 1), torch.Generator().manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    log = {"config": a.config, "overrides": a.override, "init": a.init, "batch": a.batch, "lr": a.lr, "evals": []}

    def run_eval(step, loss):
        scores, img = evaluate(model, ev_caps, ev_cls, noise, cache, uncond, a.guidance)
        model.train()
        log["evals"].append({"step": step, "samples": step * a.batch, "loss": loss, **scores})
        save_grid(img[:40], a.out / f"grid_{step}.png")
        atomic_write_json(a.out / "probe.json", log)
        print(f"eval step {step} ({step * a.batch} samples): one object {scores['one_object']:.2f}, "
              f"right shape {scores['shape_right']:.2f}", flush=True)

    if a.eval_only:
        run_eval(0, None)
        return 0
    model.train()
    t0, ema_loss = time.time(), None
    for step in range(1, a.steps + 1):
        images, caps, _ = single_object_batch(rng, a.batch, res)
        emb, mask = cache(caps)
        coh = {k: torch.ones(a.batch) for k in keys}
        loss, _ = flow_loss(model, to_model_space(model, images), emb, mask, coh, uncond, loss_cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / max(1, a.warmup))
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 100 == 0:
            print(f"step {step} loss {ema_loss:.4f} ({a.batch * step / (time.time() - t0):.0f} samples/s)", flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            run_eval(step, ema_loss)
    return 0


if __name__ == "__main__":
    run_main(main)
