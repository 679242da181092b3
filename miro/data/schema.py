"""The one sample schema used by the Shapes writer, preprocessing and training.

A sample is a group of tar members sharing a key (``{key}.{ext}``; keys contain no dots):

==========================================  ===============================================
member                                      content
==========================================  ===============================================
``{key}.jpg`` / ``{key}.png``               the image
``{key}.txt``                               the original caption (UTF-8)
``{key}.json``                              metadata: ``synthetic_caption``,
                                            ``short_synthetic_caption``, each reward's stored
                                            (normalised) value under its key, and for the
                                            synthetic caption under ``synthetic_<key>``
``{key}.<enc>_embeddings.npy``              text embeddings (L, E) float16, trimmed to mask
``{key}.synthetic_<enc>_embeddings.npy``    the same for the synthetic caption
``{key}.vae_embeddings_{mean,std}_{res}.npy``  SDXL-VAE latent moments (4, res/8, res/8) fp16
==========================================  ===============================================

Tars are reproducible: members sorted by name, fixed mtime/uid/gid/mode, written to a temporary
file and renamed into place (a killed writer never leaves a half shard under the final name).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from miro.io import atomic_path, to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_ENCODERS = ("flan_t5_xl", "minilm")
LATENT_RESOLUTIONS = (256, 512)
# Fixed tar header fields so that identical content gives identical bytes.
TAR_MTIME = 0
# POSIX pax: a member whose header fits ustar (ASCII names up to 100 bytes, as every short key's)
# is written byte for byte as ustar; a longer or non-ASCII name gets a pax record (deterministic:
# no times in it) instead of failing the whole shard on ustar's 100-byte name field.
TAR_FORMAT = tarfile.PAX_FORMAT


def text_embedding_name(encoder: str, synthetic: bool = False) -> str:
    """Member suffix of a caption's text embeddings, e.g. ``flan_t5_xl_embeddings.npy``."""
    return f"{'synthetic_' if synthetic else ''}{encoder}_embeddings.npy"


def latent_name(stat: str, resolution: int) -> str:
    """Member suffix of VAE latent moments, e.g. ``vae_embeddings_mean_256.npy``."""
    if stat not in ("mean", "std"):
        raise ValueError(f"latent stat must be 'mean' or 'std'; got {stat!r}")
    return f"vae_embeddings_{stat}_{resolution}.npy"


def synthetic_reward_key(key: str) -> str:
    """JSON key under which a reward of the synthetic caption is stored."""
    return f"synthetic_{key}"


def check_key(key: str) -> str:
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} is invalid: keys are non-empty and contain no '.' or '/'")
    return key


def split_member(name: str) -> tuple[str, str]:
    """``dir/abc.vae_embeddings_mean_256.npy`` -> (``dir/abc``, ``vae_embeddings_mean_256.npy``).

    The key is everything before the first dot of the basename (webdataset's convention).
    """
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{head}/{stem}" if head else stem), ext


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def encode_member(ext: str, value) -> bytes:
    """Serialise one member value by its extension (bytes pass through)."""
    if isinstance(value, bytes):
        return value
    if ext.endswith("npy"):
        return npy_bytes(np.asarray(value))
    if ext == "json":
        return json_bytes(value)
    if ext in ("txt", "cls"):
        return str(value).encode("utf-8")
    if ext in IMAGE_EXTS:
        buf = io.BytesIO()
        fmt = "PNG" if ext == "png" else ("WEBP" if ext == "webp" else "JPEG")
        kwargs = {"quality": 95} if fmt == "JPEG" else {}
        value.save(buf, format=fmt, **kwargs)
        return buf.getvalue()
    raise ValueError(f"cannot encode member with extension {ext!r}; pass bytes")


def decode_member(ext: str, data: bytes):
    """Inverse of :func:`encode_member`; images decode to RGB PIL images."""
    if ext.endswith("npy"):
        return load_npy(data)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext in ("txt", "cls"):
        return data.decode("utf-8")
    if ext in IMAGE_EXTS:
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        im.load()
        return to_rgb(im, f".{ext}")
    return data


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """The header of a regular member with fixed metadata, so equal content gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write samples (dicts with ``__key__`` and ``ext -> value``) to a reproducible tar, atomically.

    Returns the number of samples written.
    """
    members: list[tuple[str, bytes]] = []
    n = 0
    for sample in samples:
        key = check_key(sample["__key__"])
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            members.append((f"{key}.{ext}", encode_member(ext, value)))
        n += 1
    members.sort(key=lambda m: m[0])
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            tarfile.open(fileobj=f, mode="w", format=TAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(member_info(name, len(data)), io.BytesIO(data))
    return n


@dataclass
class ReadStats:
    """Counts of what a reader skipped (reported, never fatal)."""

    samples: int = 0
    corrupt_samples: int = 0
    truncated_shards: int = 0
    errors: list[str] = field(default_factory=list)


def iter_sample_members(tar: tarfile.TarFile, size: int) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """``(info, key, ext)`` of the regular ``key.ext`` members of an open tar of ``size`` bytes.

    After the last member, raises ``EOFError`` when the file stops before its end-of-archive
    marker: tarfile stops silently at a cut header, and an intact archive ends with two zero blocks.
    """
    end = 0
    for info in tar:
        if info.issparse():  # its size is the expanded one: a few stored bytes may claim gigabytes
            raise tarfile.TarError(f"member {info.name} is a sparse file of {info.size} bytes; "
                                   "shards hold plain members only")
        end = info.offset_data + -(-info.size // 512) * 512
        if not info.isfile():
            continue
        key, ext = split_member(info.name)
        if not ext:
            continue
        yield info, key, ext
    if size < end + 1024:
        raise EOFError(f"archive ends at byte {size}, before its end-of-archive marker")


def iter_raw_samples(path: str | os.PathLike, stats: ReadStats | None = None) -> Iterator[dict]:
    """Yield ``{"__key__", "__url__", ext: bytes}`` groups from a tar, in member order.

    A truncated or unreadable tar ends the iteration with a warning and ``stats.truncated_shards``
    incremented; samples read before the damage are kept.
    """
    stats = stats if stats is not None else ReadStats()
    current: dict | None = None
    try:
        size = os.path.getsize(path)
        # "r:": plain tars only. "r" would also gunzip, and a member of a compressed archive may
        # expand a thousandfold when read into memory below.
        with tarfile.open(path, mode="r:") as tar:
            for info, key, ext in iter_sample_members(tar, size):
                if info.offset_data + info.size > size:  # checked before its bytes are read
                    raise EOFError(f"member {info.name} runs past the end of the file")
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"member {info.name} has {len(data)} of {info.size} bytes")
                if current is not None and current["__key__"] != key:
                    stats.samples += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": str(path)}
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        stats.truncated_shards += 1
        stats.errors.append(f"{path}: {e}")
        warnings.warn(f"shard {path} is truncated or unreadable ({e}); kept {stats.samples} samples read before it")
        current = None  # the last group may be incomplete
    if current is not None:
        stats.samples += 1
        yield current


def decode_sample(raw: dict) -> dict:
    """Decode every member of a raw sample by extension."""
    return {k: (v if k.startswith("__") else decode_member(k, v)) for k, v in raw.items()}


def image_member(sample: dict) -> str | None:
    """The image extension present in a sample, if any."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def list_shards(src: str | os.PathLike) -> list[Path]:
    """The regular, non-hidden ``*.tar`` files of a directory in sorted order (``--shard_id N``
    indexes this list).

    Hidden files (macOS's ``._00000.tar`` resource forks, editors' temporaries) and folders named
    ``*.tar`` are no shards: listing them shifts every index against the shards a launcher counts
    (``glob.glob`` skips hidden names) and fails a stage on a file that holds no sample.
    """
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"shard source {src} does not exist")
    return sorted(p for p in src.glob("*.tar") if not p.name.startswith(".") and p.is_file())


def select_shards(shards: list[Path], shard_id: int | None = None, shard_ids: str | None = None,
                  shard_range: str | None = None) -> list[Path]:
    """Apply the SLURM-friendly selection flags: ``--shard_id N``, ``--shard_ids a,b,c``,
    ``--shard_range a-b`` (inclusive). No flag selects every shard."""
    given = [x is not None for x in (shard_id, shard_ids, shard_range)]
    if sum(given) > 1:
        raise ValueError("use at most one of --shard_id, --shard_ids, --shard_range")
    n = len(shards)

    def pick(i: int) -> Path:
        if not 0 <= i < n:
            raise ValueError(f"shard index {i} out of range: {n} shards (valid 0..{n - 1})")
        return shards[i]

    if shard_id is not None:
        return [pick(int(shard_id))]
    if shard_ids is not None:
        try:
            idx = [int(s) for s in str(shard_ids).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--shard_ids must be comma-separated integers; got {shard_ids!r}") from None
        if not idx:
            raise ValueError(f"--shard_ids {shard_ids!r} selects no shard; give comma-separated indices, e.g. 0,5,9")
        return [pick(i) for i in dict.fromkeys(idx)]  # a repeated index is one shard, processed once
    if shard_range is not None:
        try:
            a, b = (int(s) for s in str(shard_range).split("-"))
        except ValueError:
            raise ValueError(f"--shard_range must look like 'a-b' (inclusive); got {shard_range!r}") from None
        if b < a:
            raise ValueError(f"--shard_range {shard_range!r} is empty: end < start")
        return [pick(i) for i in range(a, b + 1)]
    return list(shards)
