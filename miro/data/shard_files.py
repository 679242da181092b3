"""Files of a preprocessing run: score CSVs, per-shard logs, fingerprints and the enriched tar.

- ``{csv_dir}/{stem}_scores.csv``: one row per usable sample, column ``key`` then sorted columns
  (stored reward values, ``synthetic_<reward>``, and the resolved ``synthetic_caption`` /
  ``short_synthetic_caption``). Score stages merge their own columns in under a lock, so they may
  run in either order or at the same time.
- ``{csv_dir}/logs/{stem}.{stage}.json``: the per-shard log (status, counts, skipped samples with
  reasons, source fingerprint, stage config, output).
- ``{dest}/{stem}.tar``: the enriched shard, streamed through :class:`SortedShardWriter`.

Every file is written to a temporary name in its folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import secrets
import sys
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from miro.data.schema import TAR_FORMAT, check_key, encode_member, member_info, split_member
from miro.io import atomic_path, atomic_write_bytes

if TYPE_CHECKING:
    from miro.data.preprocess_io import ShardReport

# CSV columns holding text; every other column holds a float (empty = missing).
CAPTION_COLUMNS = ("short_synthetic_caption", "synthetic_caption")


# --------------------------------------------------------------------------- score CSVs


def scores_csv_path(csv_dir: str | os.PathLike, shard: str | os.PathLike) -> Path:
    return Path(csv_dir) / f"{Path(shard).stem}_scores.csv"


def _parse_cell(col: str, value: str):
    if col in CAPTION_COLUMNS:
        return value
    if value == "":
        return None
    return float(value)


def read_scores_csv(path: str | os.PathLike) -> dict[str, dict]:
    """``{key: {column: float | str | None}}``; ``ValueError`` if the file is not a score CSV."""
    rows: dict[str, dict] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            if not reader.fieldnames or reader.fieldnames[0] != "key":
                raise ValueError(f"{path} is not a score CSV: first column must be 'key'; got {reader.fieldnames}")
            for row in reader:
                key = row.pop("key")
                if None in row:
                    raise ValueError(f"{path}: row {key!r} has more cells than the header")
                if None in row.values():  # the writer writes whole rows: a short one is a broken row
                    raise ValueError(f"{path}: row {key!r} has fewer cells than the header")
                try:
                    rows[key] = {c: _parse_cell(c, v) for c, v in row.items()}
                except ValueError as e:
                    raise ValueError(f"{path}: row {key!r}: {e}") from None
        except (csv.Error, UnicodeDecodeError) as e:  # csv.Error is no ValueError: callers catch one type
            raise ValueError(f"{path} is not a readable score CSV: {e}") from None
    return rows


def check_scores_csv(path: str | os.PathLike, stage: str) -> dict[str, dict]:
    """The rows of a score CSV ({} when there is none yet), or a one-line ``ValueError`` naming the
    file and the way out when it cannot be read: a stage checks this before spending its time on
    a shard whose scores it could not merge."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return read_scores_csv(path)
    except ValueError as e:
        raise ValueError(f"{e}; rerun stage {stage!r} with --overwrite to rebuild it (the other score "
                         "stage's columns are then redone by its next run)") from None


def _format_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return repr(float(v))  # shortest round-tripping repr; NaN is written 'nan'


def write_scores_csv(path: str | os.PathLike, rows: dict[str, dict]) -> None:
    """Write rows sorted by key, columns sorted, atomically."""
    path = Path(path)
    cols = sorted({c for r in rows.values() for c in r})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # csv.writer quotes a '\n' but not a lone '\r' (it is not in the line terminator), and every
    # reader ends the row there: a row holding one is written with every cell quoted.
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    w.writerow(["key", *cols])
    for key in sorted(rows):
        cells = [key, *(_format_cell(rows[key].get(c)) for c in cols)]
        (quoted if any("\r" in c for c in cells) else w).writerow(cells)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive advisory lock (``flock``) on ``path``; serialises read-merge-write of a CSV."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clip(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def caption_conflict(old: dict, new: dict, columns: Iterable[str]) -> tuple[str, list[str]] | None:
    """``(message, other columns)`` when writing ``new`` (a score stage's row, replacing
    ``columns``) over the CSV row ``old`` would change a synthetic caption on which ``old``'s other
    ``synthetic_<reward>`` values were computed; None otherwise.

    Both score stages write the captions they scored; the CSV keeps one copy, which stage ``vae``
    embeds. A copy that changes under the other stage's synthetic values pairs them with captions
    they were never computed on (one stage given a TSV and not the other, or a TSV edited between).
    """
    columns = set(columns)
    others = sorted(c for c, v in old.items() if c.startswith("synthetic_") and c not in columns
                    and c not in CAPTION_COLUMNS and v is not None)
    if not others:  # nothing of the other stage depends on the stored captions
        return None
    for col in CAPTION_COLUMNS:
        was, now = old.get(col), new.get(col)
        if col in columns and now is not None and was not in (None, "") and was != now:
            return f"{col} {_clip(now)} differs from the CSV's {_clip(was)}", others
    return None


class CaptionConflictError(ValueError):
    """A score stage resolved other synthetic captions than those the other score stage scored."""

    @classmethod
    def of(cls, path, key: str, found: tuple[str, list[str]], stage: str, other: str) -> "CaptionConflictError":
        what, others = found
        return cls(f"{path}: sample {key!r}: stage {stage!r} resolved {what}, the caption on which stage {other!r} "
                   f"computed {', '.join(others)}; give both score stages the same --synthetic_captions (or none to "
                   f"both), or, if the captions changed on purpose, rerun stage {stage!r} with --overwrite and then "
                   f"stage {other!r}")


def _check_captions(path: Path, rows: dict[str, dict], new_rows: dict[str, dict], columns: set[str],
                    stage: str, other: str, replace: bool) -> None:
    """Refuse (``CaptionConflictError`` naming the key and the way out) new captions that differ
    from the stored ones the other stage scored; with ``replace`` (``--overwrite``) drop that
    stage's synthetic values of those rows instead, so that stage ``vae`` asks for its rerun."""
    for key in sorted(new_rows.keys() & rows.keys()):
        found = caption_conflict(rows[key], new_rows[key], columns)
        if found is None:
            continue
        if not replace:
            raise CaptionConflictError.of(path, key, found, stage, other)
        what, others = found
        for c in others:
            rows[key].pop(c, None)
        print(f"miro preprocess: {path}: sample {key!r}: {what}; dropped {', '.join(others)} (computed on the "
              f"old captions): rerun stage {other!r}", file=sys.stderr)


def merge_scores_csv(path: str | os.PathLike, new_rows: dict[str, dict], columns: Iterable[str],
                     keys: set[str] | None = None, rebuild: bool = False, stage: str = "this stage",
                     other: str = "the other score stage") -> None:
    """Replace ``columns`` of the CSV by ``new_rows`` (other stages' columns are kept).

    ``keys``: the sample keys the shard holds now; rows of other keys (a rewritten source shard)
    are dropped. An existing CSV that cannot be read is a ``ValueError``; with ``rebuild``
    (``--overwrite``) it is moved aside to ``{name}.unreadable`` and the CSV starts afresh.
    New synthetic captions that differ from those ``other`` scored are a
    :class:`CaptionConflictError` (see :func:`_check_captions`; ``rebuild`` drops ``other``'s
    synthetic values of those rows instead).
    """
    path = Path(path)
    columns = set(columns)
    with file_lock(path.with_name(path.name + ".lock")):
        rows = {}
        if path.exists():
            try:
                rows = read_scores_csv(path)
            except ValueError as e:
                if not rebuild:
                    raise
                aside = path.with_name(path.name + ".unreadable")
                os.replace(path, aside)  # kept for inspection, never silently deleted
                print(f"miro preprocess: {e}; rebuilding it (the old file is kept as {aside})", file=sys.stderr)
        if keys is not None:
            rows = {k: v for k, v in rows.items() if k in keys}
        _check_captions(path, rows, new_rows, columns, stage, other, replace=rebuild)
        for r in rows.values():
            for c in columns:
                r.pop(c, None)
        for key, vals in new_rows.items():
            rows.setdefault(key, {}).update(vals)
        write_scores_csv(path, rows)


def keys_digest(keys: Iterable[str]) -> str:
    h = hashlib.sha1()
    for k in sorted(keys):
        h.update(k.encode("utf-8") + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- logs and fingerprints


def fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file: name, size and modification time."""
    st = os.stat(path)
    return {"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def log_path(csv_dir: str | os.PathLike, shard: str | os.PathLike, stage: str) -> Path:
    return Path(csv_dir) / "logs" / f"{Path(shard).stem}.{stage}.json"


def write_log(path: str | os.PathLike, report: "ShardReport", status: str, **extra) -> None:
    body = {"status": status, "stage": report.stage, "shard": report.shard,
            "samples_read": report.samples_read, "samples_ok": report.samples_ok,
            "samples_skipped": report.n_skipped, "skipped": report.skipped,
            "truncated": report.truncated, "fallback_captions": report.fallback_captions,
            "seconds": round(report.seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "errors": report.errors, **extra}
    atomic_write_bytes(path, json.dumps(body, indent=1, sort_keys=True, default=str).encode("utf-8"))


def read_log(path: str | os.PathLike) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def remove_stale_temps(directory: str | os.PathLike, name: str) -> int:
    """Delete temp files a killed writer left for ``name`` (``.{name}.*.tmp``)."""
    n = 0
    for p in Path(directory).glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


# --------------------------------------------------------------------------- enriched tar output


class SortedShardWriter:
    """Streams enriched samples to disk and commits a reproducible tar, atomically.

    Members are appended to a spool file (``.{name}.spool`` beside the target) as they are
    produced, so memory stays at one batch; :meth:`commit` copies them in sorted name order into
    a tar whose headers match :func:`miro.data.schema.write_shard` exactly (same bytes for the
    same samples) and renames it into place, so a killed run never leaves a partial shard under
    the final name. :meth:`checkpoint` makes the spool durable and returns a small state from
    which ``SortedShardWriter(path, resume=state)`` continues after a crash. The spool starts with
    a random run id that the state also holds: a state is never resumed into a spool that a later
    run recreated (``ValueError``, as for a missing spool).
    """

    def __init__(self, path: str | os.PathLike, resume: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spool_path = self.path.with_name(f".{self.path.name}.spool")
        self._index: list[tuple[str, int, int]] = []  # (member name, offset, size)
        self._names: set[str] = set()
        self._keys: set[str] = set()
        self.n_samples = 0
        if resume is not None:
            size = int(resume["spool_size"])
            if not self.spool_path.is_file() or self.spool_path.stat().st_size < size:
                raise ValueError(f"cannot resume {self.path.name}: its spool is missing or shorter than checkpointed")
            if self._read_header() != _spool_header(str(resume.get("run_id"))):
                # a later run that started afresh reused the spool: the saved index would point
                # into its bytes, and the tar would be corrupt yet look complete
                raise ValueError(f"cannot resume {self.path.name}: its spool belongs to another run")
            self.run_id = str(resume["run_id"])
            self._spool = open(self.spool_path, "r+b")
            self._spool.truncate(size)  # drop what was written after the checkpoint
            self._spool.seek(size)
            self._index = [(str(n), int(o), int(z)) for n, o, z in resume["index"]]
            self._names = {n for n, _, _ in self._index}
            self._keys = set(resume["keys"])
            self.n_samples = int(resume["n_samples"])
        else:
            self.run_id = secrets.token_hex(16)
            self._spool = open(self.spool_path, "w+b")
            self._spool.write(_spool_header(self.run_id))  # members start after it (offsets are indexed)

    def _read_header(self) -> bytes:
        with open(self.spool_path, "rb") as f:
            return f.read(len(_spool_header("0" * 32)))

    @property
    def keys(self) -> set[str]:
        """Keys of the samples written so far."""
        return set(self._keys)

    def write(self, sample: dict) -> None:
        key = check_key(sample["__key__"])
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice")
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            name = f"{key}.{ext}"
            data = encode_member(ext, value)
            offset = self._spool.tell()
            self._spool.write(data)
            self._index.append((name, offset, len(data)))
            self._names.add(name)
        self._keys.add(key)
        self.n_samples += 1

    def checkpoint(self) -> dict:
        """Flush the spool to disk and return the state :class:`SortedShardWriter` resumes from."""
        self._spool.flush()
        os.fsync(self._spool.fileno())
        return {"run_id": self.run_id, "spool_size": self._spool.tell(), "index": [list(m) for m in self._index],
                "keys": sorted(self._keys), "n_samples": self.n_samples}

    def commit(self) -> int:
        self._index.sort(key=lambda m: m[0])
        self._spool.flush()
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f, \
                tarfile.open(fileobj=f, mode="w", format=TAR_FORMAT) as tar:
            for name, offset, size in self._index:
                self._spool.seek(offset)
                tar.addfile(member_info(name, size), _Window(self._spool, size))
        self.abort()
        return self.n_samples

    def close(self) -> None:
        """Close the spool but keep it on disk (for a later resume)."""
        if not self._spool.closed:
            self._spool.close()

    def abort(self) -> None:
        """Close and delete the spool."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool_path)


def _spool_header(run_id: str) -> bytes:
    """The first bytes of a spool: ties it to the checkpoints of the run that created it."""
    return b"MIRO-SPOOL " + run_id.encode("ascii", "replace")[:32].ljust(32, b"-") + b"\n"


class _Window:
    """A read-only view of ``size`` bytes from the current position of a file."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def tar_sample_count(path: str | os.PathLike) -> int | None:
    """Number of sample keys in a complete tar, or None if it is damaged (headers only)."""
    try:
        size = os.path.getsize(path)
        keys: set[str] = set()
        end = 0
        with tarfile.open(path, mode="r:") as tar:  # plain tars only, as the sample reader
            for info in tar:
                end = info.offset_data + -(-info.size // 512) * 512
                key, ext = split_member(info.name)
                if ext:
                    keys.add(key)
        if size < end + 1024:
            return None
        return len(keys)
    except (tarfile.TarError, OSError, EOFError):
        return None
