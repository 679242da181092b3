"""Peers on the single-object probe: a plain in-context transformer and a small U-Net.

    python benchmarks/probe_peers.py --peer unet --dim 32 --out runs/peer_unet     # 0.86M parameters
    python benchmarks/probe_peers.py --peer dit --dim 192 --out runs/peer_dit      # 1.93M parameters

The question they answer: is the RIN slow to learn shape (``single_object_probe.py``), or is any
pixel transformer at this budget? Same data as the probe (one flat object on gray, "a photo of a
<colour> <class>", fresh every step), same flow convention (x_g = g x0 + (1 - g) eps, v = eps - x0,
t logit-normal, g = 1 - t), 10 % text dropout to the empty prompt, AdamW, batch 64; plain MSE (no
self-conditioning). Evaluation as the probe's: its 100 fixed prompts and noise, 25 Euler steps of
the conditional velocity (CFG 1), read by the Shapes detector (one object; one object of the asked
class). Results to ``<out>/log.json`` and ``grid_<step>.png``.

- ``dit``: [time token, mapped text tokens, 4x4-pixel patch tokens + sincos positions] through
  ``--depth`` published ``SelfAttentionBlock`` s (U-ViT-style in-context conditioning).
- ``unet``: ADM-style U-Net, widths C, 2C, 2C at 32, 16, 8 px, two ``pixel_unet.ResBlock`` s per
  level, FiLM from time + mean-pooled text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import ArgumentParser, positive_float, positive_int, run_main  # noqa: E402
from single_object_probe import CaptionCache, read_samples, save_grid, single_object_batch  # noqa: E402

from miro.models.flow import drop_text  # noqa: E402
from miro.models.layers import RMSNorm, SelfAttentionBlock, TimeEmbedder  # noqa: E402
from miro.models.pixel_unet import ResBlock  # noqa: E402
from miro.models.rin import sincos_2d_table  # noqa: E402


class PeerDiT(nn.Module):
    def __init__(self, dim: int, depth: int, patch: int, res: int = 32, label_dim: int = 384):
        super().__init__()
        self.p, self.g = patch, res // patch
        self.inp = nn.Linear(3 * patch * patch, dim)
        self.pos = nn.Parameter(sincos_2d_table(self.g, dim).clone())
        self.time = TimeEmbedder(dim // 4)
        self.text = nn.Linear(label_dim, dim)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, 4, 2) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, 3 * patch * patch)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, y, gamma, emb, mask):
        b, c, h, w = y.shape
        p, g = self.p, self.g
        x = self.inp(y.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)) + self.pos
        tok = torch.cat([self.time(gamma).reshape(b, 1, -1), self.text(emb), x], 1)
        m = torch.cat([torch.ones(b, 1, dtype=torch.bool), mask.bool(), torch.ones(b, g * g, dtype=torch.bool)], 1)
        for blk in self.blocks:
            tok = blk(tok, m)
        x = self.head(self.norm(tok[:, -g * g:]))
        return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class PeerUNet(nn.Module):
    def __init__(self, c: int, label_dim: int = 384):
        super().__init__()
        ed = 4 * c
        self.time, self.text = TimeEmbedder(c), nn.Linear(label_dim, ed)
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.d1 = nn.ModuleList([ResBlock(c, c, ed), ResBlock(c, c, ed)])
        self.down1 = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.d2 = nn.ModuleList([ResBlock(2 * c, 2 * c, ed), ResBlock(2 * c, 2 * c, ed)])
        self.down2 = nn.Conv2d(2 * c, 2 * c, 3, 2, 1)
        self.mid = nn.ModuleList([ResBlock(2 * c, 2 * c, ed), ResBlock(2 * c, 2 * c, ed)])
        self.up2 = nn.ConvTranspose2d(2 * c, 2 * c, 2, 2)
        self.u2 = nn.ModuleList([ResBlock(4 * c, 2 * c, ed), ResBlock(2 * c, 2 * c, ed)])
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, 2)
        self.u1 = nn.ModuleList([ResBlock(2 * c, c, ed), ResBlock(c, c, ed)])
        self.out = nn.Conv2d(c, 3, 3, padding=1)
        for m in [self.out, *(b.conv2 for b in self.modules() if isinstance(b, ResBlock))]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, y, gamma, emb, mask):
        m = mask.float()[..., None]
        e = F.silu(self.time(gamma) + self.text((emb * m).sum(1) / m.sum(1).clamp(min=1)))
        h = self.inp(y)
        for b in self.d1:
            h = b(h, e)
        s1 = h
        h = self.down1(h)
        for b in self.d2:
            h = b(h, e)
        s2 = h
        h = self.down2(h)
        for b in self.mid:
            h = b(h, e)
        h = torch.cat([self.up2(h), s2], 1)
        for b in self.u2:
            h = b(h, e)
        h = torch.cat([self.up1(h), s1], 1)
        for b in self.u1:
            h = b(h, e)
        return self.out(F.silu(h))


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["dit", "unet"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=positive_int, default=2000)
    ap.add_argument("--dim", type=positive_int, default=None, help="width (dit: 192, unet: 32)")
    ap.add_argument("--depth", type=positive_int, default=6, help="dit blocks")
    ap.add_argument("--patch", type=positive_int, choices=(1, 2, 4, 8, 16, 32), default=4,
                    help="dit patch (divides the 32-pixel side)")
    ap.add_argument("--lr", type=positive_float, default=5e-4)
    ap.add_argument("--eval-every", type=positive_int, default=500)
    ap.add_argument("--threads", type=positive_int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from miro.encoders import load_text_encoder

    enc = load_text_encoder("minilm", max_length=32)
    cache, uncond = CaptionCache(enc), enc.uncond_embedding()
    torch.manual_seed(0)
    model = PeerUNet(a.dim or 32) if a.peer == "unet" else PeerDiT(a.dim or 192, a.depth, a.patch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{a.peer}: {n_params} parameters", flush=True)
    _, ev_caps, ev_cls = single_object_batch(np.random.default_rng(12345), 100, 32)
    ev_noise = torch.randn((100, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(0)
    a.out.mkdir(parents=True, exist_ok=True)
    log = {"peer": a.peer, "parameters": n_params, "evals": []}

    @torch.no_grad()
    def evaluate(step, loss):
        model.eval()
        emb, mask = cache(ev_caps)
        x, n = ev_noise.clone(), 25
        for i in range(n):
            x = x - (1 / n) * model(x, torch.full((100,), i / n), emb, mask)
        model.train()
        img = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        scores = read_samples(img, ev_cls)
        save_grid(img[:40], a.out / f"grid_{step}.png")
        log["evals"].append({"step": step, "samples": 64 * step, "loss": loss, **scores})
        (a.out / "log.json").write_text(json.dumps(log, indent=1))
        print(f"eval {step} ({64 * step} samples): one object {scores['one_object']:.2f}, "
              f"right shape {scores['shape_right']:.2f}", flush=True)

    t0, ema = time.time(), None
    for step in range(1, a.steps + 1):
        imgs, caps, _ = single_object_batch(rng, 64, 32)
        emb, mask = cache(caps)
        x0 = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        drop = torch.rand(64, generator=gen) < 0.1
        if drop.any():
            emb, mask, _ = drop_text(emb, mask, {}, drop, uncond)
        gamma = 1 - torch.sigmoid(torch.randn(64, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        g = gamma[:, None, None, None]
        loss = ((model(g * x0 + (1 - g) * eps, gamma, emb, mask) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1, step / 100)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            print(f"step {step} loss {ema:.4f} ({64 * step / (time.time() - t0):.0f} samples/s)", flush=True)
        if step % a.eval_every == 0:
            evaluate(step, ema)
    return 0


if __name__ == "__main__":
    run_main(main)
