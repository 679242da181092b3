"""Value checks shared by the ``miro align`` config dataclasses: each failure is a ``ValueError``
whose one-line message names the key and what it allows (the CLI prints it as ``miro align: ...``)."""

from __future__ import annotations

import dataclasses
from typing import Any


def pos_int(key: str, value: Any, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return value


def number(key: str, value: Any, minimum: float | None = None, strict: bool = False, allow_none: bool = False) -> float | None:
    """A real number (int or float), > ``minimum`` when ``strict`` else >= ``minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{key} must be a number{' or null' if allow_none else ''}; got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{key} must be {'>' if strict else '>='} {minimum}; got {value!r}")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false; got {value!r}")
    return value


def choice(key: str, value: Any, allowed) -> Any:
    if value not in tuple(allowed):
        raise ValueError(f"{key}={value!r} is not allowed; choose one of: {', '.join(str(a) for a in allowed)}")
    return value


def pair(key: str, value: Any) -> tuple[float, float]:
    """Two numbers ``[a, b]``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{key} must be a list of two numbers [a, b]; got {value!r}")
    return (number(key, value[0]), number(key, value[1]))  # type: ignore[return-value]


def from_section(cls, values: dict | None, section: str, **extra):
    """``cls(**values)`` with unknown keys refused by name (``section.key``) and the allowed ones listed."""
    values = dict(values or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in values if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key {section}.{unknown[0]}; allowed keys of {section}: {', '.join(allowed)}")
    return cls(**{**values, **extra})
