"""``pick_a_score_score``: PickScore v1 (Kirstain et al., 2023), a CLIP-H fine-tuned on Pick-a-Pic.

A transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``) with the processor of the model it
was fine-tuned from (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: shortest side 224, bicubic,
centre crop, OpenAI mean/std; text padded, truncated at 77), as in the PickScore README. The
raw score is ``exp(logit_scale) · cos`` (the diagonal of ``logits_per_image``, typically ~18–23);
MIRO stores it divided by 100.
"""

from __future__ import annotations

from miro.rewards.base import forwards, register
from miro.rewards.clip_base import ClipBackbone, ClipLikeScorer, load_clip_model
from miro.rewards.preprocess import ImageTransform

PICKSCORE_V1 = "yuvalkirstain/PickScore_v1"
LAION_CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickStyleScorer(ClipLikeScorer):
    """A CLIP-H fine-tuned with the PickScore recipe: raw score ``exp(logit_scale) · cos``
    (PickScore README), stored divided by 100. Subclasses name the reward key."""

    use_logit_scale = True  # exp(logit_scale) · cos, the diagonal of logits_per_image
    divisor = 100.0  # MIRO stores diag(logits_per_image) / 100
    score_range = (-100.0, 100.0)

    @classmethod
    def build(
        cls,
        model: str,
        *,
        tokenizer: str | None = LAION_CLIP_H14,
        image_size: int = 224,
        device=None,
        dtype=None,
        revision: str | None = None,
        local_files_only: bool = False,
        batch_size: int = 32,
    ):
        """The scorer on a transformers ``CLIPModel``; ``tokenizer=None`` takes the tokenizer from
        ``model`` itself."""
        bb = ClipBackbone(
            model, tokenizer=tokenizer, transform=ImageTransform(size=image_size, crop_rounding="floor"), max_length=77,
            device=device, dtype=dtype, revision=revision, local_files_only=local_files_only,
            loader=lambda: load_clip_model(model, tokenizer, revision=revision, local_files_only=local_files_only),
        )
        return cls(bb, batch_size=batch_size)


class PickScore(PickStyleScorer):
    keys = ("pick_a_score_score",)


@register("pick_a_score_score")
@forwards(PickScore.build)
def pickscore(model: str = PICKSCORE_V1, **kwargs) -> PickScore:
    """PickScore scorer; keyword options as in :meth:`PickStyleScorer.build`."""
    return PickScore.build(model, **kwargs)
