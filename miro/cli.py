"""The ``miro`` command.

One entry point, many sub-commands. Each sub-command lives beside the code it drives and exposes
``main(argv: list[str] | None) -> int`` with its own ``argparse`` parser (or Hydra, for training
and alignment); this module only dispatches, importing the sub-command lazily so ``miro --help``
is instant and a missing optional extra only affects the command that needs it.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). The module's `main(argv)` parses the rest of the arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("miro.generate_cli", "generate images from a prompt with a MIRO pipeline"),
    "shapes": ("miro.shapes.cli", "the Shapes world: make-dataset, render, detect, eval-generate, eval-score, eval-prompts"),
    "preprocess": ("miro.data.preprocess", "enrich webdataset shards: reward, vqa and vae stages"),
    "train": ("miro.train.cli", "train a MIRO model (Hydra: experiment=<name> key=value ...)"),
    "convert": ("miro.train.convert", "convert a Lightning checkpoint into a pipeline folder"),
    "testbed": ("miro.train.testbed", "prompt testbed: precompute text embeddings"),
    "eval": ("miro.eval.cli", "evaluation: generate, geneval, rewards, summary, best-of-n, sweep, judge, report, all"),
    "align": ("miro.align.cli", "SRPO post-hoc alignment (Hydra: mode=online|offline ...)"),
    "download": ("miro.download", "download weights for one-time offline use"),
    "demo": ("miro.demo.server", "web demo: generate with reward sliders in the browser"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: miro <command> [options]", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()]
    lines += ["", "Run `miro <command> --help` (or `miro help <command>`) for the options of a command."]
    return "\n".join(lines)


def report_errors(prog: str, run, *args) -> int:
    """``run(*args)`` for a sub-command's ``main``, its failures as one line ``prog: message``:
    bad input (``ValueError``, a missing file) exits 2, the environment (any other ``OSError``:
    an unreachable hub, an unwritable folder) exits 1."""
    from miro.io import one_line  # library messages (transformers, the hub) hold line breaks

    try:
        return int(run(*args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "help":  # `miro help CMD` is `miro CMD --help`, as in git
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from miro import __version__

        print(f"miro {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"miro: unknown command {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    from miro.io import load_dotenv

    load_dotenv()  # site values (MIRO_DATA_DIR, MIRO_CACHE_DIR, ...) for every command
    try:
        return int(importlib.import_module(module_name).main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever torch was
        print(f"\nmiro {name}: interrupted; files already written are kept (long jobs resume on a rerun)",
              file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional extra not installed: one line naming it (miro/extras.py)
        from miro.extras import install_hint

        hint = install_hint(e, f"miro {name}")
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
