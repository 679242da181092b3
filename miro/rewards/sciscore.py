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

from miro.rewards.base import forwards, register
from miro.rewards.pickscore import PickStyleScorer

SCISCORE = "Jialuo21/SciScore"


class SciScore(PickStyleScorer):
    keys = ("sciscore_score",)


@register("sciscore_score")
@forwards(SciScore.build)
def sciscore(model: str = SCISCORE, **kwargs) -> SciScore:
    """SciScore scorer; keyword options as in :meth:`~miro.rewards.pickscore.PickStyleScorer.build`
    (the LAION ViT-H tokenizer and 224 px preprocessing by default)."""
    return SciScore.build(model, **kwargs)
