"""Optional dependencies: which extra (pyproject.toml) installs each, and one check before a command works.

``pip install miro`` gives generation, the Shapes world, the scorers and preprocessing; training,
alignment and the evaluation plots need extras. A command checks for what it needs before it
does any work, so that a base install fails in one line that names the extra, not with a
traceback after an hour of generation.
"""

from __future__ import annotations

from importlib.util import find_spec

# import name -> the extra that installs it (tests/test_extras.py keeps this in step with pyproject.toml)
EXTRA_OF: dict[str, str] = {
    "lightning": "train",
    "hydra": "train",
    "omegaconf": "train",
    "matplotlib": "eval",
    "peft": "align",
    "prodigyopt": "align",
}


class MissingExtra(ModuleNotFoundError):
    """An optional package a command needs is not installed; the message says which extra installs it."""


def require(*modules: str, extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` naming every one of ``modules`` that is not importable."""
    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise MissingExtra(f"{what} needs the optional package{'s' if len(missing) > 1 else ''} {names}: "
                           f"pip install 'miro[{extra}]'", name=missing[0])


def install_hint(e: ModuleNotFoundError, prog: str) -> str | None:
    """One line for ``prog``'s missing package, or None for a module of miro itself (a bug, not an install)."""
    if isinstance(e, MissingExtra):
        return str(e)
    top = (e.name or "").split(".")[0]
    if not top or top == "miro":
        return None
    if top in EXTRA_OF:
        return f"{prog} needs the optional package {top!r}: pip install 'miro[{EXTRA_OF[top]}]'"
    return f"{prog} needs the package {top!r}, which is not installed (pip install 'miro[all]' installs every optional one)"
