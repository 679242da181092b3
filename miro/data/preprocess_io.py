"""Building blocks of ``miro preprocess``: per-shard reports, damage-tolerant decoding, synthetic
captions and the image transform. The files a run writes (score CSVs, logs, enriched tars) are in
:mod:`miro.data.shard_files`, re-exported here so stages use one namespace.

Everything here is model-free and cheap to test; :mod:`miro.data.stages` runs the models.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from miro.data.schema import ReadStats, check_key, image_member, iter_raw_samples, iter_sample_members, split_member
from miro.io import to_rgb
from miro.data.shard_files import (
    CAPTION_COLUMNS,
    CaptionConflictError,
    SortedShardWriter,
    atomic_write_bytes,
    caption_conflict,
    check_scores_csv,
    file_lock,
    fingerprint,
    keys_digest,
    log_path,
    merge_scores_csv,
    read_log,
    read_scores_csv,
    remove_stale_temps,
    scores_csv_path,
    tar_sample_count,
    write_log,
    write_scores_csv,
)

__all__ = [
    "CAPTION_COLUMNS", "CAPTION_PLACEHOLDERS", "RESIZE_FILTERS", "CaptionConflictError", "NoUsableSampleError",
    "RawSample", "ShardReport", "SortedShardWriter", "UnreadableShardError", "atomic_write_bytes", "batched",
    "caption_conflict", "center_crop_square", "check_scores_csv", "check_some_usable", "captions_digest",
    "clean_caption", "decode_raw", "file_lock", "fingerprint", "finite", "iter_decoded", "keys_digest",
    "load_synthetic_captions", "log_path", "merge_scores_csv", "read_log", "read_scores_csv", "remove_stale_temps",
    "resolve_captions", "scores_csv_path", "shard_keys", "split_sample_keys", "tar_sample_count", "to_model_input",
    "write_log", "write_scores_csv",
]

# Upstream MIRO strips this anonymisation tag from every caption before scoring and encoding
# (rewards_and_geneval_facts.md §1, "Text cleaning").
CAPTION_PLACEHOLDERS = ("<PERSON>",)
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
    # samples whose synthetic captions fell back to the original one (neither the TSV nor the
    # sample JSON had them): their "synthetic" rewards and embeddings are the original caption's
    fallback_captions: int = 0

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
        fell = (f", {self.fallback_captions} without a synthetic caption (the original one stands in; "
                "--synthetic_captions TSV?)") if self.fallback_captions else ""
        return (f"{self.stage} {self.shard}: {self.samples_ok} ok, {self.n_skipped} skipped{extra}{trunc}{fell}"
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
        im = to_rgb(im, f".{ext}")
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
        with tarfile.open(path, mode="r:") as tar:  # plain tars only, as the sample reader
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


def split_sample_keys(path: str | os.PathLike) -> set[str]:
    """Keys whose members are not together in the tar, read from the headers only.

    Readers group consecutive members by key, so ``tar cf s.tar *.jpg *.txt`` (every image, then
    every caption) reads as an image-only sample and a caption-only one per key. A key is split
    when it reappears after other keys' members with none of the extensions it already had; a
    reappearance repeating an extension is a second sample under the same key (``duplicate key``).
    """
    groups: dict[str, list[set[str]]] = {}
    last = None
    try:
        with tarfile.open(path, mode="r:") as tar:  # plain tars only, as the sample reader
            for _, key, ext in iter_sample_members(tar, os.path.getsize(path)):
                if key != last:
                    groups.setdefault(key, []).append(set())
                    last = key
                groups[key][-1].add(ext)
    except (tarfile.TarError, OSError, EOFError):
        pass  # a damaged tail is reported by the reader; the groups seen so far are enough
    return {k for k, g in groups.items() if len(g) > 1 and sum(map(len, g)) == len(set().union(*g))}


class UnreadableShardError(ValueError):
    """A source shard from which not one sample could be read: not a tar, empty, or cut before
    its first sample. The shard fails (it must not look complete with nothing in it)."""


class NoUsableSampleError(ValueError):
    """A shard whose samples were all skipped: it fails rather than look complete with nothing in it."""


def check_some_usable(report: ShardReport, n_usable: int) -> None:
    """:class:`NoUsableSampleError` naming the reasons when samples were read but none was usable."""
    if n_usable or not report.samples_read:  # an empty tar is not damage
        return
    why = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())) or "none usable"
    first = next((e for e in report.errors if not e.startswith("(shard)")), None)
    raise NoUsableSampleError(f"{report.shard}: none of its {report.samples_read} samples could be used ({why})"
                              + (f"; first: {first}" if first else ""))


def iter_decoded(path: str | os.PathLike, report: ShardReport, transform=None, workers: int = 0, chunk: int = 32,
                 done: Iterable[str] | None = None) -> Iterator[tuple[RawSample, object]]:
    """Yield ``(sample, transform(sample))`` for every usable sample of a shard, in tar order.

    Damaged samples (bad key, image, caption or JSON, or an exception in ``transform``) are
    skipped and counted in ``report``; so is a repeat of an earlier sample's key (the first is
    kept: outputs hold one row and one sample per key), and every part of a sample whose members
    other samples' members split (:func:`split_sample_keys`). A truncated tar keeps the samples before
    the damage; one that yields nothing at all raises :class:`UnreadableShardError` at the end.
    ``workers > 0`` decodes in a thread pool (PIL releases the GIL while decoding) while the
    caller runs the models. Keys in ``done`` (handled by an earlier, interrupted run, once per
    occurrence handled) are passed over without decoding or counting.
    """
    stats = ReadStats()
    handled = Counter(done or ())

    split = split_sample_keys(path)

    def work(raw: dict):
        if raw.get("__split__"):
            return None, None, ("sample members not contiguous", "other samples' members lie between its own; a "
                                "shard holds each sample's members together (`tar cf s.tar *.jpg *.txt` does not)")
        if raw.get("__duplicate__"):
            return None, None, ("duplicate key", "an earlier sample of the shard has it; the first is kept")
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
        seen: set[str] = set()
        for raw in iter_raw_samples(path, stats):
            key = raw["__key__"]
            if handled[key] > 0:
                handled[key] -= 1
                seen.add(key)
                continue
            if key in split:  # every group of it: neither is a whole sample
                raw = {"__key__": key, "__split__": True}
            elif key in seen:  # decided here, in tar order, not in the decoding threads
                raw = {"__key__": key, "__duplicate__": True}
            seen.add(key)
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
    if report.truncated and report.samples_read == 0:
        why = stats.errors[0].split(": ", 1)[-1] if stats.errors else "unreadable"
        # tarfile lists every compression it tried, on several lines: keep the plain tar's reason
        why = " ".join(why.rsplit("- method tar: ", 1)[-1].split())
        raise UnreadableShardError(f"{path} is not a readable tar, or holds no sample before its damage ({why})")


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
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"--synthetic_captions {path}: cannot be read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); "
                                 "the captions TSV must be UTF-8 text") from None
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


def captions_digest(captions: dict[str, tuple[str, str]], keys: Iterable[str]) -> str:
    """SHA-1 of the ``(key, short, long)`` TSV entries of ``keys`` (those the TSV holds), in key order."""
    import hashlib

    h = hashlib.sha1()
    for k in sorted(set(keys) & captions.keys()):
        h.update(json.dumps([k, *captions[k]], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


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
