"""``clip_score``: image–text CLIP score, jina-clip-v2 as in MIRO or an OpenAI/LAION CLIP.

MIRO's ``clip_score`` is ``diag(logits_per_image) / 100`` of ``jinaai/jina-clip-v2``
(data/preprocess_data.py in the MIRO code): ``exp(logit_scale) · cos(image, text)`` taken from
the checkpoint. jina-clip-v2 has no transformers-native class; its own modelling code is run only
when the caller passes ``trust_remote_code=True``. Any transformers ``CLIPModel`` (e.g.
``openai/clip-vit-large-patch14``, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) is the no-remote-code
alternative; its values are on the same ``exp(ls)·cos / 100`` footing but are not the values the
released MIRO model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from miro.rewards.base import register
from miro.rewards.clip_base import ClipBackbone, ClipLikeScorer, load_clip_model
from miro.rewards.preprocess import ImageTransform

JINA_CLIP_V2 = "jinaai/jina-clip-v2"
OPENAI_CLIP_L14 = "openai/clip-vit-large-patch14"
# jina-clip-v2 preprocessor_config.json: shortest side 512, bicubic, centre crop, OpenAI mean/std.
JINA_IMAGE_SIZE = 512
# MIRO tokenises jina prompts with padding="longest", truncation=True, max_length=1024.
JINA_MAX_LENGTH = 1024
_BACKENDS = ("auto", "clip", "remote")


def needs_remote_code(model: str) -> bool:
    """True for jina-clip checkpoints (hub id or local folder whose config carries remote code)."""
    p = Path(str(model)).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        return cfg.get("model_type") != "clip" and ("auto_map" in cfg or "jina" in str(cfg.get("model_type", "")))
    return "jina-clip" in str(model).lower()


class ClipScore(ClipLikeScorer):
    keys = ("clip_score",)
    use_logit_scale = True  # diag(logits_per_image) = exp(logit_scale) · cos
    divisor = 100.0  # MIRO stores diag(logits_per_image) / 100
    score_range = (-100.0, 100.0)  # |cos| <= 1 times exp(ls) (CLIP caps ls at ln 100)


@register("clip_score")
def clip_score(
    model: str = JINA_CLIP_V2,
    *,
    backend: str = "auto",
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    image_size: int | None = None,
    max_length: int | None = None,
    device=None,
    dtype=None,
    revision: str | None = None,
    local_files_only: bool = False,
    batch_size: int = 32,
) -> ClipScore:
    """Build the CLIP-score scorer.

    ``model``: ``jinaai/jina-clip-v2`` (default, as in MIRO; needs ``trust_remote_code=True``) or
    any transformers ``CLIPModel`` hub id / folder. ``backend``: ``"auto"`` (remote code for
    jina-clip checkpoints, ``CLIPModel`` otherwise), ``"clip"`` or ``"remote"`` (any dual encoder
    exposing ``get_image_features`` / ``get_text_features`` / ``logit_scale``).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if not isinstance(trust_remote_code, bool):  # "false" is truthy: only a real True opts in
        raise ValueError(f"trust_remote_code must be True or False; got {trust_remote_code!r}")
    for name, value in (("image_size", image_size), ("max_length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer or None (the model's own); got {value!r}")
    remote = backend == "remote" or (backend == "auto" and needs_remote_code(model))
    if remote and not trust_remote_code:
        raise ValueError(
            f"model {model!r} runs its own modelling code from the hub; pass trust_remote_code=True to allow it "
            f"(clip_score(model={model!r}, trust_remote_code=True); miro eval and miro preprocess: "
            f"--trust-remote-code; miro align: reward.kwargs.trust_remote_code=true), "
            f"or choose a transformers CLIPModel that needs "
            f"none, e.g. clip_score(model={OPENAI_CLIP_L14!r})"
        )
    if remote:
        def loader():
            from transformers import AutoModel, AutoTokenizer

            m = AutoModel.from_pretrained(model, trust_remote_code=True, revision=revision, local_files_only=local_files_only)
            # the tokenizer's own code comes from the model's repo too: from the same pinned revision
            tok = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=True,
                                                revision=None if tokenizer else revision, local_files_only=local_files_only)
            return m, tok

        # jina's processor follows open_clip's torchvision transforms (CenterCrop rounds its offset).
        transform = ImageTransform(size=image_size or JINA_IMAGE_SIZE, crop_rounding="round")
        bb = ClipBackbone(model, tokenizer=tokenizer, transform=transform, max_length=max_length or JINA_MAX_LENGTH,
                          device=device, dtype=dtype, revision=revision, local_files_only=local_files_only, loader=loader,
                          text_kwargs=dict(padding="longest", truncation=True))
        bb.api = "generic"
        bb.pass_attention_mask = False  # MIRO calls model(input_ids, pixel_values): the mask is not passed
    else:
        transform = ImageTransform(size=image_size, crop_rounding="floor") if image_size else None
        bb = ClipBackbone(model, tokenizer=tokenizer, transform=transform, max_length=max_length or 77, device=device,
                          dtype=dtype, revision=revision, local_files_only=local_files_only,
                          loader=lambda: load_clip_model(model, tokenizer, revision=revision, local_files_only=local_files_only),
                          crop_rounding="floor")
    return ClipScore(bb, batch_size=batch_size)
