"""Reward scorers: one interface (:class:`Scorer`), one registry, every reward by name.

``REGISTRY`` maps a reward key to a factory; ``available()`` lists them; ``load_scorer(name,
**kwargs)`` builds one. Scorer modules register themselves on import; they are imported here
lazily by :func:`_populate` so that ``import miro.rewards`` stays light.
"""

from __future__ import annotations

import importlib

from miro.rewards.base import REGISTRY, Scorer, register

# Modules that register scorers when imported. Missing optional modules are skipped.
_SCORER_MODULES = (
    "miro.shapes.rewards",
    "miro.rewards.clip_score",
    "miro.rewards.aesthetic",
    "miro.rewards.image_reward",
    "miro.rewards.pickscore",
    "miro.rewards.hpsv2",
    "miro.rewards.vqascore",
    "miro.rewards.sciscore",
)
_populated = False


def _populate() -> None:
    global _populated
    if _populated:
        return
    for name in _SCORER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:  # module not written yet / optional dependency absent
            if e.name != name:
                raise
    _populated = True


def available() -> list[str]:
    """Sorted names of every registered reward."""
    _populate()
    return sorted(REGISTRY)


def load_scorer(name: str, **kwargs) -> Scorer:
    """Build the scorer registered under ``name``."""
    _populate()
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**kwargs)


__all__ = ["REGISTRY", "Scorer", "available", "load_scorer", "register"]
