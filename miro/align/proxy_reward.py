"""A learned, text-conditioned, differentiable reward for the Shapes world (the SRPO study's proxy).

The exact Shapes reward ``shapes_alignment`` reads scenes back with a detector and is not
differentiable. SRPO needs a differentiable reward model, so — as HPS or PickScore stand in for
human judgement — a small CLIP-like model is trained to predict ``shapes_alignment`` from
(image, caption) pairs. It has the blind spots of any learned reward (a small CNN, 32 px, a few
thousand training pairs), which is what lets a study measure reward hacking: the proxy reward
goes up while the exact reward does not.

Model: image → 4-layer CNN → a 4×4 map of ``D``-d features with learned positions; caption →
frozen MiniLM token embeddings → masked mean → MLP → ``D``; ``similarity``: the caption's feature
attends over the 16 image positions and an MLP scores the attended feature against it (a cosine of
pooled features cannot tell "a red circle" from "a blue circle"). It implements the ``Scorer`` embedding interface
(``embed_image``/``embed_text``/``similarity``, ``differentiable = True``), so SRPO's relative
reward ``(1+k)·s(x, p+) − s(x, p−)`` uses it like HPSv2.

Training pairs (:func:`make_pairs`): web-like Shapes samples with their (sometimes wrong)
captions, the same images with another sample's caption, and their clean captions; the target is
the exact ``shapes_alignment`` of each pair.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from miro.rewards.base import Scorer, check_prompts, images_to_tensor


@dataclass
class ProxyConfig:
    resolution: int = 32  # images are resized (bilinear, differentiable) to this side
    width: int = 32  # channels of the first conv layer (doubles twice)
    dim: int = 128  # joint embedding width
    text_encoder: str = "minilm"  # miro.encoders spec of the frozen text encoder
    text_dim: int = 384  # its embedding width (all-MiniLM-L6-v2: 384)
    max_text_len: int = 32


class ProxyRewardModel(nn.Module, Scorer):
    keys = ("shapes_proxy_alignment",)
    differentiable = True
    use_logit_scale = False
    relative_similarity = "scorer"  # SRPO's relative reward uses this model's own learned similarity
    score_range = (None, None)

    def __init__(self, config: ProxyConfig | None = None, text_encoder=None):
        nn.Module.__init__(self)
        self.config = c = config or ProxyConfig()
        w = c.width
        self.image_net = nn.Sequential(  # GroupNorm: batch-independent, so SRPO's batch-1 rewards are unaffected
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(4, w), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(4, 4 * w), nn.GELU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(4, 4 * w), nn.GELU(),
        )
        self.image_proj = nn.Conv2d(4 * w, c.dim, 1)  # per-position features of the 4x4 map
        self.pos = nn.Parameter(torch.randn(16, c.dim) * 0.02)  # learned positions (relations need them)
        self._text = text_encoder
        self.text_proj = nn.Sequential(nn.Linear(c.text_dim, 256), nn.GELU(), nn.Linear(256, c.dim))
        # similarity(image, text): the text attends over the 16 image positions, then an MLP scores
        # the attended feature against the text. A plain cosine of pooled features could not tell
        # "a red circle" from "a blue circle" after mean pooling of the caption.
        self.query = nn.Linear(c.dim, c.dim)
        self.head = nn.Sequential(nn.Linear(3 * c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, 1))
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- text -------------------------------------------------------------------------------
    @property
    def text_encoder(self):
        if self._text is None:
            from miro.encoders.text import load_text_encoder

            self._text = load_text_encoder(self.config.text_encoder, max_length=self.config.max_text_len)
        return self._text

    def _pooled_text(self, prompts: list[str]) -> torch.Tensor:
        """Masked mean of the frozen encoder's token embeddings, (B, text_dim), cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                emb, mask = self.text_encoder.encode(missing)
                m = mask.float().unsqueeze(-1)
                pooled = (emb.float() * m).sum(1) / m.sum(1).clamp(min=1)
            self._text_cache.update(zip(missing, pooled.cpu()))
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.text_proj[0].weight.device)

    # -- Scorer embedding interface ---------------------------------------------------------
    def embed_image(self, images) -> torch.Tensor:
        x = images_to_tensor(images).to(self.text_proj[0].weight.device, torch.float32)
        r = self.config.resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        h = self.image_proj(F.adaptive_avg_pool2d(self.image_net(x * 2 - 1), 4))  # (B, D, 4, 4)
        return h.flatten(2).transpose(1, 2).flatten(1)  # (B, 16·D), position-major

    def embed_text(self, prompts) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.text_proj(self._pooled_text(prompts))

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        d = self.config.dim
        f = image_emb.view(image_emb.shape[0], 16, d) + self.pos
        t = text_emb.to(image_emb)
        att = torch.softmax((f @ self.query(t).unsqueeze(-1)).squeeze(-1) / math.sqrt(d), dim=-1)  # (B, 16)
        pooled = (att.unsqueeze(-1) * f).sum(1)
        return self.head(torch.cat([pooled * t, pooled, t], dim=-1)).squeeze(-1)

    def score(self, images, prompts) -> torch.Tensor:
        """Predicted ``shapes_alignment`` (B,), differentiable in the images."""
        x = images_to_tensor(images)
        prompts = check_prompts(prompts, x.shape[0])
        return self.similarity(self.embed_image(x), self.embed_text(prompts))

    def forward(self, images, prompts) -> torch.Tensor:
        return self.score(images, prompts)

    def to(self, *args, **kwargs):  # nn.Module.to (Scorer.to is a no-op)
        return nn.Module.to(self, *args, **kwargs)

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        from miro.hub import atomic_write_json
        from miro.io import atomic_write_with

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_with(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
        atomic_write_json(folder / "config.json", asdict(self.config))
        return folder

    @classmethod
    def load(cls, folder: str | Path, text_encoder=None) -> "ProxyRewardModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a proxy reward folder (config.json + model.safetensors)")
        model = cls(ProxyConfig(**json.loads((folder / "config.json").read_text())), text_encoder)
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        model.eval().requires_grad_(False)
        return model


def make_pairs(n: int, seed: int = 0, resolution: int = 32, progress: bool = False) -> dict:
    """Training pairs from the Shapes world with exact ``shapes_alignment`` targets.

    Each web-like sample contributes three pairs: its own caption (sometimes wrong), its clean
    caption, and the caption of another sample. Returns ``{"images": uint8 (3n, H, W, 3),
    "captions": [...], "targets": float32 (3n,)}``.
    """
    from miro.shapes.imperfections import make_sample
    from miro.shapes.rewards import score_all

    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="proxy data")
    samples = [make_sample(seed, i, resolution=resolution) for i in it]
    rng = np.random.default_rng(seed)
    other = rng.permutation(n)
    images, captions = [], []
    for i, s in enumerate(samples):
        for cap in (s.caption, s.true_metadata["prompt"], samples[other[i]].caption):
            images.append(s.image)
            captions.append(cap)
    arr = np.stack(images)
    targets = []
    for start in range(0, len(arr), 256):
        x = torch.from_numpy(arr[start : start + 256]).permute(0, 3, 1, 2).float() / 255
        targets.append(score_all(x, captions[start : start + 256], ("shapes_alignment",))["shapes_alignment"])
    return {"images": arr, "captions": captions, "targets": torch.cat(targets).numpy().astype(np.float32)}


@dataclass
class ProxyTrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    contrastive_weight: float = 0.5  # weight of the in-batch matching loss (0 = MSE only)
    contrastive_batch: int = 32  # (image, clean caption) pairs per matching batch
    contrastive_scale: float = 5.0  # logit scale of the matching loss


def train_proxy(pairs: dict, config: ProxyConfig | None = None, train: ProxyTrainConfig | None = None,
                text_encoder=None, progress: bool = False) -> tuple[ProxyRewardModel, dict]:
    """Fit the predicted alignment to the exact one. Returns the model (eval, frozen) and metrics:
    train/val MSE and the Pearson correlation on the pairs of held-out images.

    Loss: MSE to ``shapes_alignment`` plus ``contrastive_weight`` × a symmetric in-batch matching
    loss (CLIP-style cross-entropy over the B×B similarities of (image, clean caption) pairs). MSE
    alone barely moves in 20 epochs on ~1k pairs (held-out Pearson ≈ 0); with the matching term
    the same run reaches ≈ 0.6 (docs/benchmarks.md). AdamW, cosine LR."""
    train = train or ProxyTrainConfig()
    g = torch.Generator().manual_seed(train.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        model = ProxyRewardModel(config, text_encoder)
    images = torch.from_numpy(pairs["images"]).permute(0, 3, 1, 2).float() / 255
    targets = torch.from_numpy(pairs["targets"])
    captions = list(pairs["captions"])
    n = len(captions)
    if n % 3:
        raise ValueError(f"pairs must come in make_pairs triples (own, clean, other caption per image); got {n} pairs")
    # Split by image, so no held-out image is seen in training under another caption.
    samples = torch.randperm(n // 3, generator=g)
    n_val = max(1, int(n // 3 * train.val_fraction))
    val = (samples[:n_val, None] * 3 + torch.arange(3)).flatten()
    tr = (samples[n_val:, None] * 3 + torch.arange(3)).flatten()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr, weight_decay=train.weight_decay)
    steps = max(1, train.epochs * math.ceil(len(tr) / train.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    epochs = range(train.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="proxy train")
    # (image, clean caption) training pairs: make_pairs puts the clean caption second of each triple
    trs = set(tr.tolist())
    clean = torch.tensor([i for i in range(1, n, 3) if i in trs], dtype=torch.long)
    model.train()
    for _ in epochs:
        order = tr[torch.randperm(len(tr), generator=g)]
        for start in range(0, len(order), train.batch_size):
            idx = order[start : start + train.batch_size]
            pred = model.score(images[idx], [captions[i] for i in idx])
            loss = F.mse_loss(pred, targets[idx])
            if train.contrastive_weight > 0 and len(clean):
                c = clean[torch.randint(len(clean), (min(train.contrastive_batch, len(clean)),), generator=g)]
                b = len(c)
                ie, te = model.embed_image(images[c]), model.embed_text([captions[i] for i in c])
                sim = model.similarity(ie.repeat_interleave(b, 0), te.repeat(b, 1)).view(b, b) * train.contrastive_scale
                labels = torch.arange(b)
                loss = loss + train.contrastive_weight * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        pv = torch.cat([model.score(images[val[i : i + 256]], [captions[j] for j in val[i : i + 256]]) for i in range(0, len(val), 256)])
        pt = torch.cat([model.score(images[tr[i : i + 256]], [captions[j] for j in tr[i : i + 256]]) for i in range(0, len(tr), 256)])
    tv, tt = targets[val], targets[tr]
    corr = float(torch.corrcoef(torch.stack([pv, tv]))[0, 1]) if tv.std() > 0 else float("nan")
    return model, {"train_mse": float(F.mse_loss(pt, tt)), "val_mse": float(F.mse_loss(pv, tv)), "val_pearson": corr,
                   "val_target_var": float(tv.var()), "n_pairs": n}
