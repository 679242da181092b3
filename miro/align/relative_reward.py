"""Semantic relative preference (SRPO §SRP; Tencent-Hunyuan/SRPO ``fastvideo/SRPO.py`` ``SRP_cfg``).

For an image ``x`` and a pair of prompts (p+, p−) the reward is

    r = (1 + k)·s(x, p+) − s(x, p−) = k·s(x, p+) + [s(x, p+) − s(x, p−)]

so ``k`` lets a small amount of the absolute reward into a relative one. ``s`` is the reward
model's image–text similarity on its own embeddings:

- ``"cosine"`` (HPS-like): cosine of the L2-normalised embeddings, no logit scale;
- ``"logit"`` (CLIP / PickScore-like): ``exp(logit_scale)·cos / logit_divisor``; upstream divides
  by 20 to make it "comparable with hps";
- ``"scorer"``: the scorer's own ``similarity(image_emb, text_emb)``;
- ``"auto"``: the scorer's ``relative_similarity`` when it declares one (the Shapes proxy:
  ``"scorer"``), else ``"logit"`` for ``use_logit_scale = True`` (CLIP score, PickScore) and
  ``"cosine"`` otherwise (HPSv2).

The inversion branch swaps p+ and p− (see ``direct_align``); its ``k`` comes from the
``discount_inv`` schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

SIMILARITIES = ("auto", "cosine", "logit", "scorer")
LOSSES = ("hinge", "maximize")
# The rewards SRPO can use: the differentiable embedding scorers of miro.rewards and the Shapes proxy.
EMBEDDING_REWARDS = ("hpsv2_score", "pick_a_score_score", "clip_score", "sciscore_score", "shapes_proxy")


def _implements(scorer, method: str) -> bool:
    # The base Scorer defines raising stubs of the embedding methods, so callable() is always true
    # for a Scorer: the method must be overridden.
    from miro.rewards.base import Scorer

    if isinstance(scorer, Scorer):
        return getattr(type(scorer), method, None) is not getattr(Scorer, method)
    return callable(getattr(scorer, method, None))


def check_embedding_scorer(scorer, name: str | None = None) -> None:
    """``ValueError`` unless ``scorer`` is a differentiable embedding model (``embed_image`` and
    ``embed_text``), naming the reward and the ones allowed. Needs no weights: scorers load lazily."""
    name = name or (getattr(scorer, "keys", None) or (type(scorer).__name__,))[0]
    allowed = f"SRPO's relative reward needs one of: {', '.join(EMBEDDING_REWARDS)}"
    if not getattr(scorer, "differentiable", False):
        raise ValueError(f"reward {name!r} ({type(scorer).__name__}) is not differentiable; {allowed}")
    for method in ("embed_image", "embed_text"):
        if not _implements(scorer, method):
            raise ValueError(f"reward {name!r} ({type(scorer).__name__}) is not an embedding model (no {method}()); {allowed}")


def relative_reward(s_pos: torch.Tensor, s_neg: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """``(1+k)·s_pos − s_neg`` (upstream comment: ``(1−k)·neg + k·pos`` was less stable)."""
    return (1 + k) * s_pos - s_neg


def cosine_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (B, D) image and (B, D) text embeddings."""
    return (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)


def srpo_loss(reward: torch.Tensor, kind: str = "hinge", margin: float = 0.7) -> torch.Tensor:
    """Per-sample loss. ``"hinge"``: ``relu(margin − r)`` (ReFL-style, upstream margin 0.7; with
    HPS cosines ≈ 0.2–0.35 it is always active, i.e. linear maximisation). ``"maximize"``: ``−r``
    (the Qwen-Image recipe)."""
    if kind == "hinge":
        return F.relu(margin - reward)
    if kind == "maximize":
        return -reward
    raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")


@dataclass
class RelativeRewardConfig:
    similarity: str = "auto"  # "auto", "cosine" (HPSv2), "logit" (CLIP/PickScore), "scorer" (its own similarity)
    logit_divisor: float = 20.0  # "logit" only: exp(logit_scale)·cos / divisor (upstream /20)
    logit_scale: float | None = None  # "logit" only: log logit scale; None reads scorer.scale() / scorer.logit_scale


class SemanticRelativeReward:
    """Wrap a differentiable embedding scorer (``embed_image``/``embed_text``/``similarity``) into the
    relative reward. Text embeddings are cached (the reward model is frozen)."""

    def __init__(self, scorer, config: RelativeRewardConfig | None = None, cache_size: int = 4096):
        self.scorer = scorer
        self.config = config or RelativeRewardConfig()
        if self.config.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.config.similarity!r}; choose from {SIMILARITIES}")
        check_embedding_scorer(scorer)  # SRPO back-propagates through the reward's embeddings
        self.mode = self.config.similarity
        if self.mode == "auto":
            self.mode = getattr(scorer, "relative_similarity", None) or ("logit" if getattr(scorer, "use_logit_scale", False) else "cosine")
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_size = cache_size

    def _scale(self) -> float:
        ls = self.config.logit_scale
        if ls is not None:
            return float(torch.tensor(float(ls)).exp()) / self.config.logit_divisor
        if callable(getattr(self.scorer, "scale", None)):  # miro.rewards CLIP-like scorers: exp(logit_scale)
            return float(self.scorer.scale()) / self.config.logit_divisor
        raw = getattr(self.scorer, "logit_scale", None)
        if raw is None:
            raise ValueError("similarity='logit' needs logit_scale in the config, scorer.scale() or scorer.logit_scale")
        raw = float(raw.detach() if isinstance(raw, torch.Tensor) else raw)
        return float(torch.tensor(raw).exp()) / self.config.logit_divisor

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.no_grad():
                emb = self.scorer.embed_text(list(missing)).detach()
            if len(self._cache) + len(missing) > self._cache_size:
                self._cache.clear()
            self._cache.update(zip(missing, emb))
        return torch.stack([self._cache[p] for p in prompts])

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        text_emb = text_emb.to(image_emb.device)
        if self.mode == "cosine":
            return cosine_similarity(image_emb, text_emb)
        if self.mode == "logit":
            return self._scale() * cosine_similarity(image_emb, text_emb)
        return self.scorer.similarity(image_emb, text_emb).float()

    def __call__(self, images: torch.Tensor, pos: Sequence[str], neg: Sequence[str], k: torch.Tensor | float) -> dict:
        """Reward of (B,3,H,W) images in [0, 1] (gradients kept) for prompt pairs; returns a dict
        with ``reward`` (B,), ``s_pos`` and ``s_neg``."""
        if len(pos) != images.shape[0] or len(neg) != images.shape[0]:
            raise ValueError(f"need one (pos, neg) pair per image: {images.shape[0]} images, {len(pos)} pos, {len(neg)} neg")
        img = self.scorer.embed_image(images)
        s_pos = self.similarity(img, self.embed_text(pos))
        s_neg = self.similarity(img, self.embed_text(neg))
        if isinstance(k, torch.Tensor):
            k = k.to(s_pos)
        return {"reward": relative_reward(s_pos, s_neg, k), "s_pos": s_pos, "s_neg": s_neg}
