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


def check_scorer_kwargs(name: str, kwargs: dict) -> None:
    """A one-line ``ValueError`` naming the reward and the argument its factory does not take
    (instead of the factory's ``TypeError``), checked before anything is built."""
    import inspect

    _populate()
    try:
        sig = inspect.signature(REGISTRY[name])
    except (TypeError, ValueError):  # no signature to read (a builtin): the factory decides
        return
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in takes]
    if unknown:
        raise ValueError(f"reward {name!r} takes no argument {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(takes) or 'none'}")
    try:
        sig.bind(**kwargs)
    except TypeError as e:  # e.g. a required argument left out
        raise ValueError(f"reward {name!r}: {e}") from None


def load_scorer(name: str, **kwargs) -> Scorer:
    """Build the scorer registered under ``name``."""
    _populate()
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(REGISTRY))}")
    check_scorer_kwargs(name, kwargs)
    scorer = REGISTRY[name](**kwargs)
    _label_settings(scorer, name, kwargs)
    return scorer


# Arguments that change where or how fast a scorer runs, not its scores (up to float rounding).
_RUN_ONLY = frozenset({"device", "batch_size", "local_files_only", "trust_remote_code"})


def _label_settings(scorer, name: str, kwargs: dict) -> None:
    """Extend ``scorer.version`` (what ``miro eval rewards`` records beside each score and compares
    before reusing it) with the arguments that change the scores and differ from the factory's
    defaults (another model, checkpoint, dtype, preprocessing...). Scores of another model are
    then rescored instead of merged into the same column, and the default scorer keeps its label."""
    import inspect

    try:
        params = inspect.signature(REGISTRY[name]).parameters
    except (TypeError, ValueError):
        params = {}
    changed = []
    for k, v in sorted(kwargs.items()):
        if k in _RUN_ONLY or k == "version":  # HPS's version is the label's own first part
            continue
        default = params[k].default if k in params else inspect.Parameter.empty
        if default is inspect.Parameter.empty or v != default:
            changed.append(f"{k}={v}")
    if changed:
        base = getattr(scorer, "version", None)
        scorer.version = "; ".join(([str(base)] if base is not None else []) + changed)


def scorer_kwargs_from_cli(text: str, names, trust_remote_code: bool = False) -> dict[str, dict]:
    """The factory arguments the CLIs pass to :func:`load_scorer`: ``--scorer-kwargs`` JSON
    (``{"reward": {kwarg: value}}``, only for rewards in ``names``) plus, with ``--trust-remote-code``,
    ``trust_remote_code=True`` for every named reward whose factory takes it (jina-clip-v2's
    ``clip_score``). Remote code is never enabled without that explicit flag."""
    import inspect
    import json

    try:
        kwargs = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"--scorer-kwargs is not valid JSON ({e}): {text!r}") from None
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        raise ValueError(f'--scorer-kwargs must map reward names to objects, e.g. {{"clip_score": {{}}}}; got {text!r}')
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"--scorer-kwargs names {unknown}, which are not among the scorers in use ({', '.join(sorted(names))})")
    _populate()
    for n, kw in kwargs.items():  # a misspelt argument fails here, before any model is loaded
        if n in REGISTRY:
            try:
                check_scorer_kwargs(n, kw)
            except ValueError as e:
                raise ValueError(f"--scorer-kwargs: {e}") from None
    if trust_remote_code:
        for n in names:
            if n in REGISTRY and "trust_remote_code" in inspect.signature(REGISTRY[n]).parameters:
                kwargs.setdefault(n, {}).setdefault("trust_remote_code", True)
    return kwargs


__all__ = ["REGISTRY", "Scorer", "available", "check_scorer_kwargs", "load_scorer", "register",
           "scorer_kwargs_from_cli"]
