"""SRPO post-hoc alignment (Direct-Align + semantic relative preference) with MIA prompts.

Public API:

- maths: :mod:`miro.align.direct_align` (``add_noise``, ``recover_x0``, ``direct_align_branch``,
  ``DirectAlignSchedule``, ``discount_schedule``), :mod:`miro.align.relative_reward`
  (``relative_reward``, ``SemanticRelativeReward``, ``srpo_loss``);
- prompts: :func:`mia_prompts`, :func:`build_reward_prompts`, control words;
- data: :mod:`miro.align.datasets` (fork JSON, CuRe CSVs, offline images);
- targets: :class:`miro.align.miro_target.MiroTarget`, :class:`miro.align.flux.FluxTarget`;
- training: :class:`miro.align.trainer.SRPOTrainer`, :func:`miro.align.step.srpo_step`;
- ``miro align`` (:mod:`miro.align.cli`).

Heavy modules (diffusers, peft, lightning) are imported only by the modules that need them.
"""

from miro.align.prompts import NEGATIVE_CONTROL_WORDS, POSITIVE_CONTROL_WORDS, PromptConfig, build_reward_prompts, mia_prompts

__all__ = ["mia_prompts", "build_reward_prompts", "PromptConfig", "POSITIVE_CONTROL_WORDS", "NEGATIVE_CONTROL_WORDS"]
