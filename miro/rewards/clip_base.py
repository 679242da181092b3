"""CLIP-style dual encoders shared by clip_score, aesthetic, PickScore, HPSv2 and SciScore.

:class:`ClipBackbone` loads a dual encoder lazily (transformers ``CLIPModel`` by default; a
custom ``loader`` builds it otherwise, e.g. HPSv2 from an open_clip checkpoint) and computes
L2-normalised image and text embeddings on either image path of :mod:`.preprocess`.
:class:`ClipLikeScorer` turns it into a :class:`~miro.rewards.base.Scorer` whose raw score is
``s · cos(image, text)`` with ``s = exp(logit_scale)`` (CLIP score, PickScore, SciScore: the
diagonal of ``logits_per_image``) or ``s = 1`` (HPSv2: a plain cosine).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from miro.rewards.base import Scorer, check_batch_size, check_prompts
from miro.rewards.preprocess import ImageTransform, batches, num_images, paired_batches
from miro.rewards.weights import resolve_device, resolve_dtype


def _features(out) -> torch.Tensor:
    """Projected features from ``get_*_features``: a tensor, or (transformers >= 5) an output object."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        val = getattr(out, name, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read features from {type(out).__name__}")


def load_clip_model(model: str, tokenizer: str | None, *, revision=None, local_files_only=False):
    """transformers ``CLIPModel`` + tokenizer from a hub id or a local folder (no remote code)."""
    from transformers import AutoTokenizer, CLIPModel

    from miro.rewards.weights import from_pretrained_strict

    m = from_pretrained_strict(CLIPModel, model, "CLIP", revision=revision, local_files_only=local_files_only)
    # the model's own tokenizer from the same pinned revision (another repo's: its default)
    tok = AutoTokenizer.from_pretrained(tokenizer or model, revision=None if tokenizer else revision,
                                        local_files_only=local_files_only)
    return m, tok


class ClipBackbone:
    """Lazily loaded dual encoder with normalised image / text embeddings."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        transform: ImageTransform | None = None,
        max_length: int = 77,
        device=None,
        dtype=None,
        revision: str | None = None,
        local_files_only: bool = False,
        loader: Callable[[], tuple[torch.nn.Module, object]] | None = None,
        text_kwargs: dict | None = None,
        crop_rounding: str = "floor",
    ):
        self.model_name = str(model)
        self.tokenizer_name = tokenizer
        self.transform = transform
        # used when the transform is derived from the loaded config (image_size); transformers'
        # CLIPImageProcessor crops at (d // 2), torchvision CenterCrop at round(d / 2)
        self.crop_rounding = crop_rounding
        self.max_length = int(max_length)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.revision = revision
        self.local_files_only = bool(local_files_only)
        self._loader = loader or (
            lambda: load_clip_model(self.model_name, self.tokenizer_name, revision=revision, local_files_only=local_files_only)
        )
        # tokenizer call options; published CLIP processors pad to the longest prompt and truncate at 77
        self.text_kwargs = dict(padding=True, truncation=True) if text_kwargs is None else dict(text_kwargs)
        self.pass_attention_mask = True  # remote-code encoders that derive their own mask set this False
        # "clip": call CLIPModel's towers + projections directly; "generic": get_image/text_features
        # (remote-code dual encoders such as jina-clip-v2 expose only those)
        self.api = "clip"
        self.model = None
        self.tokenizer = None
        self._logit_scale: torch.Tensor | None = None

    # ----------------------------------------------------------------------------- loading
    def load(self) -> "ClipBackbone":
        if self.model is None:
            model, tok = self._loader()
            model.eval().requires_grad_(False)
            # Kept in float32 before any cast: exp() of a bf16-rounded logit scale is 1 % off
            # (ln 100 -> 98.86), a third of the published Baseline -> MIRO PickScore gap.
            ls = getattr(model, "logit_scale", None)
            self._logit_scale = ls.detach().float().clone() if isinstance(ls, torch.Tensor) else None
            self.model = model.to(device=self.device, dtype=self.dtype)
            self.tokenizer = tok
            if self.transform is None:
                self.transform = ImageTransform(
                    size=int(self.model.config.vision_config.image_size), crop_rounding=self.crop_rounding
                )
        return self

    def to(self, device=None, dtype=None) -> "ClipBackbone":
        if device is not None:
            self.device = resolve_device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        if self.model is not None:
            self.model.to(device=self.device, dtype=self.dtype)
        return self

    # ----------------------------------------------------------------------------- features
    def pixel_values(self, images) -> torch.Tensor:
        self.load()
        return self.transform(images, device=self.device, dtype=self.dtype)

    def _image_features_px(self, px: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.api == "clip":
            # transformers CLIPModel: CLS token after post-LayerNorm, then the projection.
            return m.visual_projection(m.vision_model(pixel_values=px).pooler_output)
        return _features(m.get_image_features(pixel_values=px))

    def image_features(self, images, normalize: bool = True) -> torch.Tensor:
        """(B, D) float32 image embeddings; gradients flow from a tensor input."""
        feats = self._image_features_px(self.pixel_values(images)).float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def text_features(self, prompts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """(B, D) float32 text embeddings."""
        self.load()
        enc = self.tokenizer(list(prompts), max_length=self.max_length, return_tensors="pt", **self.text_kwargs)
        ids = enc["input_ids"].to(self.device)
        m = self.model
        if self.api == "clip":
            mask = enc.get("attention_mask")
            out = m.text_model(input_ids=ids, attention_mask=None if mask is None else mask.to(self.device))
            feats = m.text_projection(out.pooler_output)
        elif self.pass_attention_mask and "attention_mask" in enc:
            feats = _features(m.get_text_features(input_ids=ids, attention_mask=enc["attention_mask"].to(self.device)))
        else:
            feats = _features(m.get_text_features(input_ids=ids))
        feats = feats.float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) as stored in the checkpoint (a float32 scalar, whatever ``dtype``)."""
        self.load()
        if self._logit_scale is None:
            raise ValueError(f"{type(self.model).__name__} has no logit_scale; this scorer needs one")
        return self._logit_scale.to(self.device).exp()


class ClipLikeScorer(Scorer):
    """Raw score ``s · cos(image, text)``; MIRO stores ``raw / divisor``."""

    differentiable = True
    use_logit_scale: bool = True  # s = exp(logit_scale); False gives the plain cosine (HPSv2)
    divisor: float = 1.0  # normalize(raw) = raw / divisor

    def __init__(self, backbone: ClipBackbone, *, batch_size: int = 32):
        batch_size = check_batch_size(batch_size)
        self.backbone = backbone
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def load(self) -> "ClipLikeScorer":
        """Load the weights now (they otherwise load on first use); returns self."""
        self.backbone.load()
        return self

    def to(self, device=None, dtype=None) -> "ClipLikeScorer":
        self.backbone.to(device, dtype)
        return self

    def embed_image(self, images) -> torch.Tensor:
        """L2-normalised image embeddings (B, D), float32."""
        return torch.cat([self.backbone.image_features(c) for c in batches(images, self.batch_size)])

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, D), float32."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts = check_prompts(prompts, len(prompts))
        return torch.cat([self.backbone.text_features(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)])

    def scale(self) -> torch.Tensor:
        return self.backbone.logit_scale() if self.use_logit_scale else torch.ones((), device=self.device)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Row-wise score of paired (or broadcast) normalised embeddings: ``s · <img, txt>``."""
        return self.scale().to(image_emb.device) * (image_emb * text_emb.to(image_emb.device)).sum(-1)

    def score(self, images, prompts) -> torch.Tensor:
        n = num_images(images)
        prompts = check_prompts(prompts, n, scorer=self.key)
        if n == 0:
            return torch.zeros(0, device=self.device)
        out = []
        for chunk, ps in paired_batches(images, prompts, self.batch_size):
            txt = self.backbone.text_features(ps)
            out.append(self.similarity(self.backbone.image_features(chunk), txt))
        return torch.cat(out)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return raw / self.divisor
