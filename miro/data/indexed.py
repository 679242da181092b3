"""Map-style random access to samples in webdataset tar shards, and a resumable distributed sampler.

Training reads shards through an index (``wids``-style map-style access, without the dependency):
each tar is scanned once for its member headers, and the byte offset and size of every member
are cached as JSON. A sample is then one ``seek`` + ``read`` per member it needs, so a
data-parallel run can visit samples in any order, every rank sees a disjoint, exact part of an
epoch, and a resumed run continues at the exact sample it stopped at.

Damage is skipped, never fatal: a truncated tar keeps the samples whose members are complete
(the cut one is dropped) and is counted in :class:`miro.data.schema.ReadStats`.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from miro.data.schema import ReadStats, iter_sample_members
from miro.io import atomic_path

INDEX_VERSION = 2  # 2: numpy member tables (.npz)
# Shard files a process keeps open at once (least recently used closed first). Random access
# visits every shard, and one handle per shard ran out of descriptors: with `ulimit -n 128` and
# 200 shards, 790 of 2000 random reads failed with EMFILE, which the loader counts as corrupt
# samples and reward-bin fitting silently drops (a release-scale 10k shards exceeds the usual
# 1024). Reopening costs little: 50k random reads over 200 shards took 6.7-7.5 us each with every
# shard open and 11.7 us with 64 (docs/benchmarks.md, "Training data at scale").
MAX_OPEN_SHARDS = 64


def scan_tar(path: str | os.PathLike) -> tuple[list[dict], str | None]:
    """Member offsets of every complete sample of a tar: ``[{"key", "members": {ext: [offset, size]}}]``.

    Returns ``(samples, error)``; ``error`` is None for an intact archive. The sample being read
    when damage is found is dropped (it may be missing members).
    """
    path = str(path)
    size = os.path.getsize(path)
    samples: list[dict] = []
    current: dict | None = None
    error = None
    try:
        # "r:": plain tars only, as the sample reader. "r" would gunzip a compressed shard and
        # index offsets into its expanded stream, which random access then reads as garbage.
        with tarfile.open(path, mode="r:") as tar:
            for info, key, ext in iter_sample_members(tar, size):
                if info.offset_data + info.size > size:
                    raise EOFError(f"member {info.name} runs past the end of the file")
                if current is not None and current["key"] != key:
                    samples.append(current)
                    current = None
                if current is None:
                    current = {"key": key, "members": {}}
                current["members"][ext] = [info.offset_data, info.size]
    except (tarfile.TarError, OSError, EOFError) as e:
        error = str(e)
        current = None
    if current is not None:
        samples.append(current)
    return samples, error


class ShardIndex:
    """Compact member table of one shard: numpy arrays, so 10^7 samples stay a few hundred MB and
    forked DataLoader workers share the pages (no per-sample Python objects to refcount)."""

    def __init__(self, keys: np.ndarray, exts: list[str], offsets: np.ndarray, sizes: np.ndarray):
        self.keys, self.exts, self.offsets, self.sizes = keys, list(exts), offsets, sizes
        self._col = {e: i for i, e in enumerate(self.exts)}

    @classmethod
    def from_samples(cls, samples: list[dict]) -> "ShardIndex":
        exts = sorted({e for smp in samples for e in smp["members"]})
        col = {e: i for i, e in enumerate(exts)}
        offsets = np.full((len(samples), len(exts)), -1, dtype=np.int64)
        sizes = np.zeros((len(samples), len(exts)), dtype=np.int64)
        for r, smp in enumerate(samples):
            for e, (o, n) in smp["members"].items():
                offsets[r, col[e]], sizes[r, col[e]] = o, n
        # utf-8 bytes (1 byte per ASCII character; numpy's str dtype would take 4)
        keys = np.array([smp["key"].encode() for smp in samples], dtype=np.bytes_) if samples else np.zeros(0, "S1")
        return cls(keys, exts, offsets, sizes)

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, j: int) -> dict[str, tuple[int, int]]:
        """``{ext: (offset, size)}`` of the members sample ``j`` has."""
        row, sz = self.offsets[j], self.sizes[j]
        return {e: (int(row[c]), int(sz[c])) for e, c in self._col.items() if row[c] >= 0}


def _cache_file(path: Path, cache_dir: Path | None) -> Path:
    if cache_dir is None:
        return path.with_name(f".{path.name}.index.npz")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem}-{digest}.index.npz"


def _save_index_atomic(path: Path, idx: ShardIndex, stamp: dict, error: str | None) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=idx.keys, exts=np.array(idx.exts, dtype=np.str_), offsets=idx.offsets, sizes=idx.sizes,
                 meta=np.array(json.dumps({"stamp": stamp, "error": error})))


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_cached(cache: Path, stamp: dict) -> tuple[ShardIndex, str | None] | None:
    """The index cached at ``cache`` when its stamp matches the shard's; otherwise None."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("stamp") == stamp:
                return ShardIndex(z["keys"], [str(e) for e in z["exts"]], z["offsets"], z["sizes"]), meta.get("error")
    except (OSError, ValueError, KeyError):
        pass
    return None


def _build(path: Path, cache: Path, stamp: dict) -> tuple[tuple[ShardIndex, str | None], bool]:
    """Scan ``path`` and cache its index; returns ((index, error), whether the cache was written)."""
    samples, error = scan_tar(path)
    idx = ShardIndex.from_samples(samples)
    try:
        _save_index_atomic(cache, idx, stamp, error)
    except OSError as e:
        warnings.warn(f"cannot cache the index of {path} at {cache} ({e}); set data.index_cache_dir")
        return (idx, error), False
    return (idx, error), True


class _ShardLock:
    """An exclusive ``flock`` on ``<cache>.lock``: the process that holds it scans the shard.

    ``acquire`` returns True (held), False (another process holds it; only when not blocking) or
    None (no lock here: no ``fcntl``, a read-only folder, or a file system without ``flock``, such
    as Lustre mounted without ``-o flock``), in which case the caller scans the shard itself, as
    every process did before. The kernel drops a lock when its process dies, so a killed rank
    never blocks the others: the next one to take the lock finds no cache and scans.
    """

    def __init__(self, cache: Path):
        self.path = cache.with_name(cache.name + ".lock")
        self.fd: int | None = None

    def acquire(self, blocking: bool) -> bool | None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            return None
        self.fd = fd
        return True

    def release(self, remove: bool) -> None:
        """Unlock; ``remove`` deletes the lock file first (only once the cache is written: a process
        that then locks a stale inode or a new file finds the cache before it would scan)."""
        if self.fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None


def load_indexes(paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                 bar=None) -> list[tuple[ShardIndex, str | None]]:
    """The index of every shard (:func:`scan_tar` as a :class:`ShardIndex`), in order, cached on disk.

    A cache is keyed on its tar's size and mtime and lies beside the shard (``.<name>.index.npz``),
    or in ``cache_dir`` when given (use it when the shard folder is read-only).

    Processes that index the same shards at once share the work: under ``srun`` or ``torchrun``
    every rank prepares the data at the same moment, and each used to scan every uncached shard
    itself (about 8 minutes per process at 10M samples, and N times the reads). A process scans
    only the shards whose lock (:class:`_ShardLock`) it takes first and skips those another process
    is scanning; once through the list, it waits for those in turn and reads their caches. Each
    shard is read once, by whichever process reached it first (docs/benchmarks.md, "Training data
    at scale"). ``bar``: a tqdm-like object updated once per shard.
    """
    paths = [Path(p) for p in paths]
    cdir = Path(cache_dir) if cache_dir is not None else None
    out: list[tuple[ShardIndex, str | None] | None] = [None] * len(paths)
    pending = list(range(len(paths)))
    blocking = False  # first pass: take what is free; later passes: wait for the rest in turn
    while pending:
        busy = []
        for i in pending:
            path = paths[i]
            stamp = _stamp(path)
            cache = _cache_file(path, cdir)
            hit = _read_cached(cache, stamp)
            if hit is None:
                lock = _ShardLock(cache)
                held = lock.acquire(blocking)
                if held is False:
                    busy.append(i)
                    continue
                written = found = False
                try:
                    # the holder before us may have written it between our read and our lock
                    hit = _read_cached(cache, stamp) if held else None
                    found = hit is not None
                    if hit is None:
                        hit, written = _build(path, cache, stamp)
                finally:
                    # with the cache on disk the lock file has done its work, whoever wrote the cache: a
                    # process that opened the lock path after its holder removed it made a new file
                    lock.release(remove=written or found)
            out[i] = hit
            if bar is not None:
                bar.update(1)
        pending, blocking = busy, True
    return out  # type: ignore[return-value]


class IndexedTarDataset:
    """Random access to the samples of a list of tar shards (global index over sorted shards).

    ``read(i, exts)`` returns ``{"__key__", "__url__", ext: bytes}`` for the requested member
    extensions present in sample ``i`` (all members when ``exts`` is None). File handles are
    opened lazily per process, at most :data:`MAX_OPEN_SHARDS` at once, so the object can be
    handed to DataLoader workers.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                 stats: ReadStats | None = None, progress: bool = False):
        if not shards:
            raise ValueError("no shards given: the data folder holds no *.tar files")
        self.shards = [str(s) for s in shards]
        self.stats = stats if stats is not None else ReadStats()
        self.index: list[ShardIndex] = []
        bar = None
        if progress and len(self.shards) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.shards), desc="indexing shards", unit="shard")
        try:
            loaded = load_indexes(self.shards, cache_dir, bar)
        finally:
            if bar is not None:
                bar.close()
        for s, (idx, error) in zip(self.shards, loaded):
            if error is not None:
                self.stats.truncated_shards += 1
                self.stats.errors.append(f"{s}: {error}")
                warnings.warn(f"shard {s} is truncated or unreadable ({error}); indexed {len(idx)} complete "
                              "samples before the damage")
            self.index.append(idx)
        self.offsets = [0]
        for idx in self.index:
            self.offsets.append(self.offsets[-1] + len(idx))
        self.stats.samples = self.offsets[-1]
        self._handles: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, index inside the shard) of global sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} out of range [0, {len(self)})")
        s = bisect.bisect_right(self.offsets, i) - 1
        return s, i - self.offsets[s]

    def entry(self, i: int) -> dict:
        """``{"key", "members": {ext: (offset, size)}}`` of sample ``i``."""
        s, j = self.locate(i)
        return {"key": self.index[s].keys[j].decode(), "members": self.index[s].members(j)}

    def where(self, i: int) -> tuple[str, str]:
        """(shard path, sample key) of global sample ``i``, for messages."""
        s, j = self.locate(i)
        return self.shards[s], self.index[s].keys[j].decode()

    def member_exts(self) -> set[str]:
        """Every member extension present in at least one sample of any shard."""
        return {e for idx in self.index for e in idx.exts}

    def _handle(self, s: int):
        if os.getpid() != self._pid:  # forked into a worker: never share file offsets with the parent
            self._handles, self._pid = collections.OrderedDict(), os.getpid()
        fh = self._handles.get(s)
        if fh is not None:
            self._handles.move_to_end(s)
            return fh
        while len(self._handles) >= MAX_OPEN_SHARDS:  # bounded: see MAX_OPEN_SHARDS
            self._handles.popitem(last=False)[1].close()
        fh = self._handles[s] = open(self.shards[s], "rb")
        return fh

    def read(self, i: int, exts: Sequence[str] | None = None) -> dict:
        entry = self.entry(i)
        s, _ = self.locate(i)
        out = {"__key__": entry["key"], "__url__": self.shards[s]}
        fh = self._handle(s)
        for ext, (offset, size) in entry["members"].items():
            if exts is not None and ext not in exts:
                continue
            fh.seek(offset)
            data = fh.read(size)
            if len(data) != size:
                raise EOFError(f"{self.shards[s]}: member {entry['key']}.{ext} has {len(data)} of {size} bytes")
            out[ext] = data
        return out

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = collections.OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = collections.OrderedDict()
        return state


class ResumableDistributedSampler(Sampler):
    """An endless stream of ``(position, index)`` pairs for one rank, deterministic in (seed, epoch).

    Epoch ``e`` is ``randperm(N)`` drawn from a generator seeded with ``(seed, e)`` (identity order
    without shuffle), truncated to a multiple of ``num_replicas`` so every rank gets exactly
    ``N // num_replicas`` samples (unequal counts hang DDP); rank ``r`` takes every
    ``num_replicas``-th element starting at ``r``. The stream position ``p`` (samples this rank
    has consumed) maps to epoch ``p // per_rank`` and offset ``p % per_rank``, so resuming with
    ``start = p`` continues exactly where the run stopped. DataLoader workers receive whole
    batches in turn, so no sample is duplicated or skipped across workers.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 start: int = 0, max_epochs: int | None = None):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas; got rank={rank}, num_replicas={num_replicas}")
        if num_samples < num_replicas:
            raise ValueError(f"{num_samples} samples cannot be split over {num_replicas} ranks")
        self.num_samples, self.num_replicas, self.rank = int(num_samples), int(num_replicas), int(rank)
        self.seed, self.shuffle, self.start, self.max_epochs = int(seed), bool(shuffle), int(start), max_epochs
        self.per_rank = self.num_samples // self.num_replicas

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            perm = torch.randperm(self.num_samples, generator=g)
        else:  # each epoch starts where the last one's cut began, so the cut tail is not always the same samples
            perm = torch.arange(self.num_samples).roll(-epoch * (self.num_samples % self.num_replicas))
        return perm[self.rank: self.per_rank * self.num_replicas: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        epoch, j = divmod(pos, self.per_rank)
        while self.max_epochs is None or epoch < self.max_epochs:
            indices = self.epoch_indices(epoch)
            for k in range(j, self.per_rank):
                yield pos, indices[k]
                pos += 1
            epoch, j = epoch + 1, 0

    def __len__(self) -> int:
        if self.max_epochs is None:
            raise TypeError("an endless sampler has no length")
        return max(0, self.max_epochs * self.per_rank - self.start)
