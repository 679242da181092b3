"""Building blocks of ``miro preprocess``: decoding, captions, score CSVs, shard logs, tar output.

Everything here is model-free and cheap to test; :mod:`miro.data.stages` runs the models.

Files a preprocessing run writes (``stem`` = shard file name without ``.tar``):

- ``{csv_dir}/{stem}_scores.csv``: one row per usable sample, column ``key`` then sorted columns
  (the stored reward values, ``synthetic_<reward>`` for the synthetic caption, and the resolved
  ``synthetic_caption`` / ``short_synthetic_caption``). Stages ``rewards`` and ``vqa`` merge their
  columns into it under a lock, so they may run in either order or concurrently.
- ``{csv_dir}/logs/{stem}.{stage}.json``: the per-shard log (counts, skipped samples with reasons,
  the source fingerprint and stage config). A stage is *complete* for a shard only when its log
  says so, the fingerprint and config still match and the output it names is present and valid.
- ``{dest}/{stem}.tar``: the enriched shard (stage ``vae``), reproducible and written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from miro.data.schema import (
    TAR_MTIME,
    ReadStats,
    check_key,
    encode_member,
    image_member,
    iter_raw_samples,
    split_member,
)

# Upstream MIRO strips this anonymisation tag from every caption before scoring and encoding
# (rewards_and_geneval_facts.md §1, "Text cleaning").
CAPTION_PLACEHOLDERS = ("<PERSON>",)
CAPTION_COLUMNS = ("short_synthetic_caption", "synthetic_caption")
# At most this many individual skip messages are kept in a shard log (counts are always exact).
MAX_LOGGED_ERRORS = 200


def clean_caption(text: str) -> str:
    for tag in CAPTION_PLACEHOLDERS:
        text = text.replace(tag, "")
    return text


# --------------------------------------------------------------------------- shard reports


@dataclass
class ShardReport:
    """What one stage did to one shard; serialised into the per-shard log."""

    stage: str
    shard: str
    samples_read: int = 0  # sample groups found in the tar
    samples_ok: int = 0  # samples written / scored
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    errors: list[str] = field(default_factory=list)  # first MAX_LOGGED_ERRORS "key: reason" lines
    truncated: bool = False  # the source tar was cut short (samples before the damage kept)
    seconds: float = 0.0

    skipped_keys: list[str] = field(default_factory=list)  # every skipped key (for checkpoints)

    def skip(self, key: str, reason: str, detail: str = "") -> None:
        self.skipped_keys.append(key)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.errors) < MAX_LOGGED_ERRORS:
            self.errors.append(f"{key}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        rate = self.samples_ok / self.seconds if self.seconds > 0 else float("nan")
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        extra = f" ({why})" if why else ""
        trunc = ", source truncated" if self.truncated else ""
        return (f"{self.stage} {self.shard}: {self.samples_ok} ok, {self.n_skipped} skipped{extra}{trunc}"
                f" in {self.seconds:.1f} s ({rate:.1f} samples/s)")


# --------------------------------------------------------------------------- decoding


@dataclass
class RawSample:
    """One decoded source sample. ``image`` is RGB; members keep their original bytes."""

    key: str
    image: object  # PIL.Image.Image, RGB
    caption: str  # the original caption exactly as stored in .txt
    meta: dict  # the source .json (empty when absent)
    image_ext: str
    image_bytes: bytes
    txt_bytes: bytes


def decode_raw(raw: dict) -> RawSample:
    """Decode a raw group from :func:`iter_raw_samples`; raises ``ValueError`` naming the damage."""
    from PIL import Image

    key = raw["__key__"]
    try:
        check_key(key)
    except ValueError as e:
        raise ValueError(f"invalid key: {e}") from None
    ext = image_member(raw)
    if ext is None:
        raise ValueError("no image member")
    if "txt" not in raw:
        raise ValueError("no .txt caption")
    try:
        caption = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption is not UTF-8: {e}") from None
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"unreadable .json: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f".json holds a {type(meta).__name__}, not an object")
    try:
        im = Image.open(io.BytesIO(raw[ext]))
        im.load()
        im = im.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None
    if min(im.size) < 1:
        raise ValueError(f"empty image {im.size}")
    return RawSample(key, im, caption, meta, ext, raw[ext], raw["txt"])


def shard_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a tar in member order, read from the headers only (no data is decoded)."""
    keys: list[str] = []
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member(info.name)
                if ext and key not in seen:
                    seen.add(key)
                    keys.append(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # a damaged tail is reported by the reader; keys seen so far are enough for captions
    return keys


def iter_decoded(path: str | os.PathLike, report: ShardReport, transform=None,
                 workers: int = 0, chunk: int = 32, done: set[str] | None = None) -> Iterator[tuple[RawSample, object]]:
    """Yield ``(sample, transform(sample))`` for every usable sample of a shard, in tar order.

    Damaged samples (bad key, image, caption or JSON, or an exception in ``transform``) are
    skipped and counted in ``report``; a truncated tar keeps the samples before the damage.
    ``workers > 0`` decodes in a thread pool (PIL releases the GIL while decoding) while the
    caller runs the models. Keys in ``done`` (handled by an earlier, interrupted run) are passed
    over without decoding or counting.
    """
    stats = ReadStats()

    def work(raw: dict):
        try:
            s = decode_raw(raw)
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            return None, None, (reason, detail)
        try:
            return s, (transform(s) if transform is not None else None), None
        except Exception as e:  # a per-sample failure is data damage, never fatal
            return None, None, ("preprocessing failed", f"{type(e).__name__}: {e}")

    def chunks() -> Iterator[list[dict]]:
        buf: list[dict] = []
        for raw in iter_raw_samples(path, stats):
            if done and raw["__key__"] in done:
                continue
            buf.append(raw)
            if len(buf) == chunk:
                yield buf
                buf = []
        if buf:
            yield buf

    def emit(raws, results):
        for raw, (s, t, err) in zip(raws, results):
            report.samples_read += 1
            if err is not None:
                report.skip(raw["__key__"], *err)
            else:
                yield s, t

    if workers <= 0:
        for raws in chunks():
            yield from emit(raws, [work(r) for r in raws])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: list = []
            for raws in chunks():
                pending.append((raws, [pool.submit(work, r) for r in raws]))
                if len(pending) > 2:  # keep two chunks decoding ahead of the consumer
                    raws0, futs = pending.pop(0)
                    yield from emit(raws0, [f.result() for f in futs])
            for raws0, futs in pending:
                yield from emit(raws0, [f.result() for f in futs])
    report.truncated = stats.truncated_shards > 0
    for err in stats.errors:
        if len(report.errors) < MAX_LOGGED_ERRORS:
            report.errors.append(f"(shard) {err}")


def batched(it: Iterable, n: int) -> Iterator[list]:
    buf: list = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# --------------------------------------------------------------------------- captions


def _caption_key(name: str) -> str:
    """``dir/000123.jpg`` -> ``000123``: how a TSV file name matches a sample key."""
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[0]


def load_synthetic_captions(path: str | os.PathLike, wanted: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """Read ``file_name<TAB>short<TAB>long`` lines (no header) into ``{key: (short, long)}``.

    ``wanted`` keeps only those keys, so a process handling a few shards of a large dataset holds
    only their captions. A caption containing tabs keeps them (the long caption is the rest of
    the line). Empty lines are ignored; a line with fewer than three fields is a ``ValueError``.
    """
    out: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) < 3:
                raise ValueError(f"{path}:{lineno}: expected 'file_name<TAB>short<TAB>long' (3 tab-separated "
                                 f"fields, no header); got {len(parts)} field(s): {line[:80]!r}")
            key = _caption_key(parts[0].strip())
            if wanted is None or key in wanted:
                out[key] = (parts[1], parts[2])
    return out


def resolve_captions(sample: RawSample, tsv: dict[str, tuple[str, str]] | None) -> tuple[str, str, str]:
    """``(long, short, source)`` synthetic captions of a sample, cleaned.

    Looked up in the TSV first, then in the sample JSON (``synthetic_caption`` /
    ``short_synthetic_caption``); a missing caption falls back to the original one (as upstream
    does), with ``source`` = ``"tsv"``, ``"json"`` or ``"original"``.
    """
    long = short = None
    source = "original"
    if tsv is not None and sample.key in tsv:
        short, long = tsv[sample.key]
        source = "tsv"
    else:
        j_long, j_short = sample.meta.get("synthetic_caption"), sample.meta.get("short_synthetic_caption")
        if isinstance(j_long, str) and j_long.strip():
            long, source = j_long, "json"
        if isinstance(j_short, str) and j_short.strip():
            short, source = j_short, "json"
    if not (isinstance(long, str) and long.strip()):
        long = short if isinstance(short, str) and short.strip() else sample.caption
    if not (isinstance(short, str) and short.strip()):
        short = long
    return clean_caption(long), clean_caption(short), source


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
        if not reader.fieldnames or reader.fieldnames[0] != "key":
            raise ValueError(f"{path} is not a score CSV: first column must be 'key'; got {reader.fieldnames}")
        for row in reader:
            key = row.pop("key")
            if None in row:
                raise ValueError(f"{path}: row {key!r} has more cells than the header")
            try:
                rows[key] = {c: _parse_cell(c, v if v is not None else "") for c, v in row.items()}
            except ValueError as e:
                raise ValueError(f"{path}: row {key!r}: {e}") from None
    return rows


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
    w.writerow(["key", *cols])
    for key in sorted(rows):
        w.writerow([key, *(_format_cell(rows[key].get(c)) for c in cols)])
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


def merge_scores_csv(path: str | os.PathLike, new_rows: dict[str, dict], columns: Iterable[str],
                     keys: set[str] | None = None) -> None:
    """Replace ``columns`` of the CSV by ``new_rows`` (other stages' columns are kept).

    ``keys``: the sample keys the shard holds now; rows of other keys (a rewritten source shard)
    are dropped.
    """
    path = Path(path)
    columns = set(columns)
    with file_lock(path.with_name(path.name + ".lock")):
        rows = read_scores_csv(path) if path.exists() else {}
        if keys is not None:
            rows = {k: v for k, v in rows.items() if k in keys}
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file: name, size and modification time."""
    st = os.stat(path)
    return {"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def log_path(csv_dir: str | os.PathLike, shard: str | os.PathLike, stage: str) -> Path:
    return Path(csv_dir) / "logs" / f"{Path(shard).stem}.{stage}.json"


def write_log(path: str | os.PathLike, report: ShardReport, status: str, **extra) -> None:
    body = {"status": status, "stage": report.stage, "shard": report.shard,
            "samples_read": report.samples_read, "samples_ok": report.samples_ok,
            "samples_skipped": report.n_skipped, "skipped": report.skipped,
            "truncated": report.truncated, "seconds": round(report.seconds, 3),
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

    Members are appended to a spool file as they are produced (memory stays at one sample); on
    :meth:`commit` they are copied in sorted name order into a tar whose headers match
    :func:`miro.data.schema.write_shard` exactly (same bytes for the same samples), which is then
    renamed into place. A killed run leaves only ``.{name}.*.tmp`` files, never a partial shard.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._spool_name = tempfile.mkstemp(prefix=f".{self.path.name}.spool.", suffix=".tmp",
                                                dir=self.path.parent)
        self._spool = os.fdopen(fd, "w+b")
        self._index: list[tuple[str, int, int]] = []  # (member name, offset, size)
        self._names: set[str] = set()
        self.n_samples = 0

    def write(self, sample: dict) -> None:
        key = check_key(sample["__key__"])
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            name = f"{key}.{ext}"
            if name in self._names:
                raise ValueError(f"duplicate member {name!r}: sample key {key!r} written twice")
            data = encode_member(ext, value)
            offset = self._spool.tell()
            self._spool.write(data)
            self._index.append((name, offset, len(data)))
            self._names.add(name)
        self.n_samples += 1

    def commit(self) -> int:
        self._index.sort(key=lambda m: m[0])
        self._spool.flush()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, offset, size in self._index:
                    info = tarfile.TarInfo(name)
                    info.size = size
                    info.mtime = TAR_MTIME
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    self._spool.seek(offset)
                    tar.addfile(info, _Window(self._spool, size))
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            self.abort()
        return self.n_samples

    def abort(self) -> None:
        if not self._spool.closed:
            self._spool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._spool_name)


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
        with tarfile.open(path, mode="r") as tar:
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


# --------------------------------------------------------------------------- image transforms


RESIZE_FILTERS = ("bicubic", "bilinear", "lanczos")


def center_crop_square(im):
    """The largest centred square of a PIL image (offsets rounded as torchvision's center_crop)."""
    w, h = im.size
    s = min(w, h)
    left = int(round((w - s) / 2.0))
    top = int(round((h - s) / 2.0))
    return im.crop((left, top, left + s, top + s))


def to_model_input(im, resolution: int, resize_filter: str = "bicubic") -> np.ndarray:
    """Centre-crop 1:1, resize to ``resolution`` and map to [-1, 1]: float32 (3, res, res).

    The crop and bicubic resize follow MIRO/CAD's data recipe (miro_facts.md §4, "Data":
    center-crop 1:1, bicubic resize, normalise to [-1, 1]). PIL filters downsampling with
    antialiasing, as torchvision's Resize does on PIL input.
    """
    from PIL import Image

    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"resize filter must be one of {RESIZE_FILTERS}; got {resize_filter!r}")
    flt = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[resize_filter]
    sq = center_crop_square(im)
    if sq.size != (resolution, resolution):
        sq = sq.resize((resolution, resolution), flt)
    arr = np.asarray(sq, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
