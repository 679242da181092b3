"""Atomic file writes: a temp file in the target's folder, renamed onto the target on success.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
truncated file, even when the writer is killed. ``os.replace`` is atomic only within one file
system, which is why the temp file lives beside the target rather than in the system temp folder.

Temp files are named ``.{name}.<random>.tmp`` (hidden, and never matching the target's own
extension, so folder scans for ``*.png`` or ``*.tar`` skip them); cleanup code that deletes what a
killed writer left (:func:`miro.data.shard_files.remove_stale_temps`) relies on that pattern.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

FILE_MODE = 0o644  # mkstemp makes 0600; outputs are ordinary files meant to be shared and read by others


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``.

    The parent folder is created. The temp file exists (empty, mode 0644) when the body starts;
    write it by name or through an open file object (``np.save`` on a *name* appends ``.npy``,
    so pass it ``open(tmp, "wb")``). On any exception (``KeyboardInterrupt`` included) the temp
    file is removed and ``path`` is left as it was. ``fsync=True`` flushes the data to disk
    before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
        yield tmp
        os.chmod(tmp, FILE_MODE)  # again: some writers replace the file (download-then-move)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], Any], *, fsync: bool = False) -> None:
    """Let ``writer(tmp_path)`` produce the file, then rename it onto ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(str(tmp))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically (no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      ensure_ascii: bool = True, default: Callable[[Any], Any] | None = None,
                      fsync: bool = False) -> None:
    """``json.dumps(obj, ...)`` plus a trailing newline, written as UTF-8, atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=default)
    atomic_write_text(path, text + "\n", fsync=fsync)


def read_jsonl_objects(path: str | os.PathLike, what: str = "line") -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSONL file; a line that does not parse,
    or is not an object, is a ValueError naming the file and line (json's own position is within
    the line, always "line 1"). ``what`` names a line in that message."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: {what} must be a JSON object; got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def open_append(path: str | os.PathLike):
    """``open(path, "a", encoding="utf-8")`` that refuses a symbolic link: logs are appended in
    place, so a link planted in a shared output folder would otherwise send every line to its
    target (the atomic writers above replace a link instead of writing through it)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    except OSError:
        if path.is_symlink():
            raise OSError(f"{path} is a symbolic link (to {os.readlink(path)}); logs are not appended through "
                          "links: remove it or choose another output folder") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def cache_root() -> Path:
    """miro's download cache: ``$MIRO_CACHE_DIR`` (``$MIRO_CACHE``, its older name, also works),
    else ``~/.cache/miro``. Read at call time, so a test or a script may set it late."""
    root = os.environ.get("MIRO_CACHE_DIR") or os.environ.get("MIRO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "miro"


# Variables that decide which programs and libraries run (in this process's children: compilers,
# torch.compile workers, srun); a .env in whatever folder miro runs from must not set them.
_CODE_VARIABLES = re.compile(r"PATH|IFS|ENV|BASH_ENV|LD_.*|DYLD_.*|PYTHON.*")


def load_dotenv(path: str | os.PathLike = ".env") -> dict[str, str]:
    """Read ``KEY=VALUE`` lines of ``path`` (``.env.example`` documents them) into ``os.environ``;
    variables already set win. Returns what was set. Every ``miro`` command reads ``./.env``.
    ``PATH``, ``LD_*``, ``DYLD_*``, ``PYTHON*`` (and ``IFS``, ``ENV``, ``BASH_ENV``) are not set
    from it, with one line on stderr: they belong in the shell."""
    p = Path(path)
    if not p.is_file():
        return {}
    set_ = {}
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key, value = key.strip().removeprefix("export ").strip(), value.strip().strip("'\"")
        if key and key not in os.environ:
            if _CODE_VARIABLES.fullmatch(key.upper()):
                print(f"miro: {p}: ignoring {key}= (PATH, LD_*, DYLD_* and PYTHON* variables choose which "
                      f"code runs; set them in the shell)", file=sys.stderr)
                continue
            os.environ[key] = value
            set_[key] = value
    return set_


def one_line(e: BaseException | str) -> str:
    """An error's text on one line. huggingface_hub and transformers put line breaks inside their
    messages ("... cached files.\\nCheck your internet connection ..."); a command's error is one
    ``miro <command>: ...`` line on stderr."""
    return " ".join(str(e).split())


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 without brackets) is this machine: ``localhost``
    or a loopback address. Names other than localhost are not resolved."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return False


def to_rgb(image, what: str = "image"):
    """An 8-bit RGB copy of a PIL image of any mode whose pixel range is defined, loaded.

    Pillow's ``convert("RGB")`` clips 16-bit grayscale (``I;16``, what a 16-bit PNG opens as) at
    255 instead of rescaling it, which turns most of such an image white; it is rescaled here
    (65535 -> 255). 32-bit integer (``I``) and float (``F``) pixels have no fixed range, so they are
    refused rather than guessed. Alpha is dropped, as ``convert`` does.
    """
    mode = image.mode
    if 0 in image.size:
        raise ValueError(f"{what} is empty ({image.size[0]}x{image.size[1]} pixels)")
    if mode.startswith("I;16"):
        import numpy as np
        from PIL import Image

        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    elif mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise ValueError(f"{what} has mode {mode!r} ({kind} pixels, no fixed range); save it as 8-bit RGB, RGBA, "
                         f"L or P, or as 16-bit grayscale (I;16)")
    return image.convert("RGB")  # a copy, and it loads the pixels (a truncated file fails here)
