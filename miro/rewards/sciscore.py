"""``sciscore_score``: SciScore (Science-T2I), a CLIP-H fine-tuned for scientific plausibility.

``Jialuo21/SciScore`` loads as a transformers ``CLIPModel`` (fine-tuned from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` with a PickScore-style trainer, Science-T2I
``SciScore_trainer/conf/experiment/sciscore.yaml``). The score is ``exp(logit_scale) · cos`` of
the image and text features (Science-T2I ``eval/eval_t2i_with_SciScore.py``); MIRO stores it
divided by 100. The preprocessing is taken to be the LAION ViT-H processor (shortest side 224,
bicubic, centre crop, OpenAI mean/std; text truncated at 77) — not confirmed against the
reference code here.
"""

from __future__ import annotations

from miro.rewards.base import register
from miro.rewards.clip_base import ClipBackbone, ClipLikeScorer, load_clip_model
from miro.rewards.pickscore import LAION_CLIP_H14
from miro.rewards.preprocess import ImageTransform

SCISCORE = "Jialuo21/SciScore"


class SciScore(ClipLikeScorer):
    keys = ("sciscore_score",)
    use_logit_scale = True  # exp(logit_scale) · cos
    divisor = 100.0  # MIRO stores diag(logits_per_image) / 100
    score_range = (-100.0, 100.0)


@register("sciscore_score")
def sciscore(
    model: str = SCISCORE,
    *,
    tokenizer: str | None = LAION_CLIP_H14,
    image_size: int = 224,
    device=None,
    dtype=None,
    revision: str | None = None,
    local_files_only: bool = False,
    batch_size: int = 32,
) -> SciScore:
    """SciScore scorer; ``tokenizer=None`` takes the tokenizer from ``model`` itself."""
    bb = ClipBackbone(
        model, tokenizer=tokenizer, transform=ImageTransform(size=image_size, crop_rounding="floor"), max_length=77,
        device=device, dtype=dtype, revision=revision, local_files_only=local_files_only,
        loader=lambda: load_clip_model(model, tokenizer, revision=revision, local_files_only=local_files_only),
    )
    return SciScore(bb, batch_size=batch_size)
