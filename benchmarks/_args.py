"""The command line shared by the scripts of benchmarks/: one parser class, the argparse types, ``run_main``.

A bad value is answered with one line on stderr, ``<script>: error: argument --OPT: expected ...; got 'VALUE'``,
and exit status 2, before any model is loaded or any work starts. The scripts import this module from
their own folder: ``python benchmarks/<script>.py`` puts that folder first on ``sys.path`` (the tests
that import a script put it there too).
"""

from __future__ import annotations

import argparse
import math
import sys


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``<prog>: error: <message>``, exit status 2
    (no usage block: ``--help`` shows it). Sub-command parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_main(main, *args):
    """``sys.exit(main(*args))``, with a ValueError or FileNotFoundError (a bad --model, --config, --data,
    --folder, a missing published package) shown as one line ``error: <message>`` and exit status 2."""
    try:
        rc = main(*args)
    except FileNotFoundError as e:
        msg = f"{e.strerror}: {e.filename}" if e.strerror and e.filename and len(e.args) == 2 else str(e)
        print(f"error: {msg}", file=sys.stderr)
        rc = 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    sys.exit(rc)


def _int(text: str, least: int, what: str | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected {what or f'an integer >= {least}'}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count, a batch size, a number of threads or steps)."""
    return _int(text, 1)


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (warm-up steps, a seed, a limit where 0 means none)."""
    return _int(text, 0)


def int_in(low: int, high: int):
    """argparse type factory: an integer in [low, high] (a resolution the renderer draws)."""

    def parse(text: str) -> int:
        value = _int(text, low, f"an integer in [{low}, {high}]")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}]; got {text!r}")
        return value

    parse.__name__ = "int_in"
    return parse


def _float(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (not nan or inf)."""
    return _float(text, "a finite number", lambda v: True)


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a guidance scale, a norm bound, minutes where 0 means none)."""
    return _float(text, "a finite number >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate, a peak rate)."""
    return _float(text, "a finite number > 0", lambda v: v > 0)


def open_unit_float(text: str) -> float:
    """argparse type: a number in (0, 1) (a noise level gamma strictly between pure noise and the image)."""
    return _float(text, "a number in (0, 1)", lambda v: 0 < v < 1)


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1] (a reward target, a noise level gamma)."""
    return _float(text, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def list_of(item, what: str):
    """argparse type factory: comma-separated values, each read by the argparse type ``item``
    (``list_of(positive_int, "integers >= 1")("1,4,16")`` -> ``[1, 4, 16]``); no empty item."""

    def parse(text: str) -> list:
        try:
            return [item(t.strip()) for t in str(text).split(",")]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}; got {text!r}") from None

    parse.__name__ = "list_of"
    return parse


positive_int_list = list_of(positive_int, "integers >= 1")  # batch sizes, checkpoint steps, step counts
nonneg_float_list = list_of(nonneg_float, "finite numbers >= 0")  # guidance scales
positive_float_list = list_of(positive_float, "finite numbers > 0")  # time shifts


def name_eq_source(text: str) -> str:
    """argparse type: ``NAME=SRC``, both parts non-empty (a model named in the printed table); kept as given."""
    name, sep, src = str(text).partition("=")
    if not (name.strip() and sep and src.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=SRC; got {text!r}")
    return text


def comma_choices(choices):
    """argparse type factory: comma-separated names, each one of ``choices``; returned as ``a,b`` (order kept)."""
    allowed = tuple(choices)

    def parse(text: str) -> str:
        names = [t.strip() for t in str(text).split(",")]
        bad = [n for n in names if n not in allowed]
        if not text or bad:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(allowed)}; "
                                             f"got {text!r}")
        return ",".join(names)

    parse.__name__ = "comma_choices"
    return parse


def device(text: str) -> str:
    """argparse type: a device this machine has, checked as ``miro generate --device`` checks it
    (:func:`miro.generate_cli.check_device`): cpu, cuda, cuda:N or mps, where its backend is available."""
    from miro.generate_cli import check_device

    try:
        return check_device(text)
    except ValueError as e:  # its message starts with "--device 'x'": argparse names the option already
        msg = str(e)
        prefix = f"--device {text!r}"
        raise argparse.ArgumentTypeError(repr(text) + msg[len(prefix):] if msg.startswith(prefix) else msg) from None
