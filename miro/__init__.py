"""miro: reward-aware text-to-image models.

MIRO (multi-reward conditioned pretraining) flow models, reward scorers, the embedded Shapes
world, evaluation and SRPO post-hoc alignment. Heavy modules are imported lazily, so
``import miro`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The seven reward keys of the released MIRO model, in the published `coherence_keys` order.
REWARD_KEYS: tuple[str, ...] = (
    "clip_score",
    "aesthetic_score",
    "image_reward_score",
    "pick_a_score_score",
    "hpsv2_score",
    "vqa_score",
    "sciscore_score",
)

__all__ = ["MiroPipeline", "REWARD_KEYS", "__version__"]


def __getattr__(name: str):
    if name == "MiroPipeline":
        from miro.pipeline import MiroPipeline

        return MiroPipeline
    raise AttributeError(f"module 'miro' has no attribute {name!r}")
