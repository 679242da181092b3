"""Training input for MIRO: enriched shards (real or Shapes) -> padded, reward-binned batches.

A batch (dict) holds:

* ``latent_mean`` / ``latent_std`` (B, C, h, w) float32 — precomputed VAE moments (the module
  samples ``mean + std·ε``), or ``image`` (B, 3, H, W) float32 in [-1, 1] for pixel space;
* ``text_emb`` (B, L, E) float32 and ``text_mask`` (B, L) bool — precomputed embeddings padded to
  the longest in the batch (or to ``max_text_len``), or ``captions`` (list of str) for encoding
  on the fly by the module;
* ``rewards`` {key: (B,) float32} — bin values in [0, 1], NaN where the score is missing;
* ``synthetic`` (B,) bool — which caption was drawn; ``n_corrupt`` — samples that failed to
  decode and were replaced (indexed) or skipped (resampled) for this batch; ``position`` — this
  rank's stream position after the batch.

Caption choice: with probability ``synthetic_caption_rate`` (0.5 in the release recipe) a sample
uses its synthetic caption and then the rewards stored under ``synthetic_<key>`` (contracts,
"Data"). The draw is a function of (seed, epoch, index), so a resumed run makes the same choices.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import tarfile
import tokenize
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from miro.data import schema
from miro.data.indexed import IndexedTarDataset, ResumableDistributedSampler
from miro.encoders.text import pad_token_rows
from miro.rewards.binning import RewardBins, check_tie_rules

try:  # Lightning is an optional extra ("train"); the dataset pieces work without it.
    from lightning.pytorch import LightningDataModule
except ModuleNotFoundError:  # pragma: no cover
    LightningDataModule = object


@dataclass
class DataConfig:
    data_dir: str = ""  # folder of *.tar shards (sorted order), or one tar
    reward_keys: list[str] = field(default_factory=list)  # JSON keys conditioned on (empty: no rewards)
    num_bins: int = 64  # quantile bins per reward (release: 64)
    # Tied scores: "midrank" (release) or "spread", or one rule per reward (miro/rewards/binning.py).
    bin_ties: str | dict[str, str] = "midrank"
    bins_sample_size: int = 100_000  # samples used to fit bin edges (CAD: <= 100,001)
    bins_path: str | None = None  # reward_bins.json cache; None: fitted and kept in memory only
    # What a cached bins file is worth (BINS_CACHE): "reuse" it when it has this run's rewards and
    # num_bins, else fit anew (a fresh run); "keep" it, a mismatch being an error (a resumed run
    # trained on it); "refit" regardless (a fresh run replacing an old run's checkpoints).
    bins_cache: str = "reuse"
    image_source: str = "latents"  # "latents" (vae_embeddings_*.npy) or "pixels" (the image, in [-1, 1])
    latent_resolution: int = 256  # which latent moments to read (256 or 512)
    image_size: int | None = None  # pixels: centre-crop to 1:1, then resize (bicubic) to this size
    hflip: bool = False  # pixels: random horizontal flip (off for Shapes: "left of" must stay true)
    text_source: str = "precomputed"  # "precomputed" ({enc}_embeddings.npy), "on_the_fly" (captions) or "auto"
    text_encoder: str = "minilm"  # schema name of the embeddings: "flan_t5_xl" or "minilm"
    max_text_len: int = 77  # tokens kept per caption (published max_text_len)
    pad_to_max_text_len: bool = False  # fixed text length (static shapes for torch.compile)
    synthetic_caption_rate: float = 0.5  # P(synthetic caption); 0 = original captions only
    batch_size: int = 64  # per rank
    num_workers: int = 2  # DataLoader worker processes per rank
    seed: int = 3407  # data order, caption draws (CAD's seed)
    shuffle: bool = True  # shuffle each epoch (seeded by (seed, epoch))
    mode: str = "indexed"  # "indexed" (exact resume) or "resampled" (streaming; resume approximate)
    shuffle_buffer: int = 1000  # resampled mode: in-memory shuffle buffer per worker
    index_cache_dir: str | None = None  # where tar indexes are cached (default: beside the shards)
    max_corrupt_retries: int = 32  # replacement attempts before a batch fails


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


IMAGE_SOURCES = ("latents", "pixels")
TEXT_SOURCES = ("precomputed", "on_the_fly", "auto")  # "auto" is resolved by MiroDataModule.prepare
LOADER_MODES = ("indexed", "resampled")
BINS_CACHE = ("reuse", "keep", "refit")


def launch_rank() -> int:
    """This process's global rank as its launcher announces it, before any process group exists: the
    variables Lightning's ``rank_zero_only`` reads (torchrun's RANK, Lightning's own LOCAL_RANK,
    srun's SLURM_PROCID, jsrun's JSM_NAMESPACE_RANK), in its order; 0 for a single process."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def check_config(cfg: DataConfig) -> None:
    """One-line ``ValueError`` naming the first bad setting: a configuration error must surface
    as an error before any sample is read, never as a stream of "corrupt" samples."""
    for key, allowed in (("image_source", IMAGE_SOURCES), ("text_source", TEXT_SOURCES), ("mode", LOADER_MODES),
                         ("bins_cache", BINS_CACHE)):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    if isinstance(cfg.synthetic_caption_rate, bool) or not isinstance(cfg.synthetic_caption_rate, (int, float)) \
            or not 0.0 <= cfg.synthetic_caption_rate <= 1.0:
        raise ValueError(f"synthetic_caption_rate must be in [0, 1]; got {cfg.synthetic_caption_rate!r}")
    for key in ("shuffle", "hflip", "pad_to_max_text_len"):
        if not isinstance(getattr(cfg, key), bool):
            raise ValueError(f"{key} must be true or false; got {getattr(cfg, key)!r}")
    for key, low in (("seed", 0), ("batch_size", 1), ("num_workers", 0), ("bins_sample_size", 1), ("num_bins", 2)):
        if not _is_int(getattr(cfg, key)) or getattr(cfg, key) < low:
            raise ValueError(f"{key} must be an integer >= {low}; got {getattr(cfg, key)!r}")
    if cfg.image_size is not None and not (_is_int(cfg.image_size) and cfg.image_size > 0):
        raise ValueError(f"image_size must be a positive integer or null; got {cfg.image_size!r}")
    if not _is_int(cfg.latent_resolution) or cfg.latent_resolution <= 0:
        raise ValueError(f"latent_resolution must be a positive integer; got {cfg.latent_resolution!r}")
    if not _is_int(cfg.max_text_len) or cfg.max_text_len < 1:
        raise ValueError(f"max_text_len must be a positive integer; got {cfg.max_text_len!r}")
    if not _is_int(cfg.max_corrupt_retries) or cfg.max_corrupt_retries < 0:
        raise ValueError(f"max_corrupt_retries must be an integer >= 0; got {cfg.max_corrupt_retries!r}")
    if not _is_int(cfg.shuffle_buffer) or cfg.shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be an integer >= 1; got {cfg.shuffle_buffer!r}")
    if not isinstance(cfg.text_encoder, str) or not cfg.text_encoder:
        raise ValueError(f"text_encoder must be a schema name such as 'minilm'; got {cfg.text_encoder!r}")


class CorruptSampleError(ValueError):
    """The bytes of one sample cannot be decoded (damaged or missing member): the sample is
    skipped and counted, never fatal."""


# What reading and decoding a damaged sample raises (measured by fuzzing every member type:
# truncation, bit flips, random and zeroed bytes): PIL's UnidentifiedImageError and "image file is
# truncated" / "broken data stream" (OSError), "broken PNG file" (SyntaxError), "Truncated IHDR
# chunk" (ValueError) and DecompressionBombError; json.JSONDecodeError and UnicodeDecodeError
# (ValueError); np.load's "Cannot parse header" (ValueError), tokenize.TokenError, EOFError, and
# MemoryError for a header claiming an absurd shape. These are caught only around the bytes ->
# value step (:meth:`MiroSampleDecoder.decode`), so the same types raised by a bad setting later
# (e.g. resizing to ``image_size``) still surface as errors.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, SyntaxError, struct.error,
                                                   tokenize.TokenError, MemoryError, Image.DecompressionBombError)
# What the data path treats as a corrupt sample: decode failures (re-raised as CorruptSampleError)
# and I/O errors reading the member bytes from the shard.
CORRUPT_ERRORS: tuple[type[BaseException], ...] = (CorruptSampleError, OSError, EOFError, tarfile.TarError)


def _one_line(e: BaseException) -> str:
    text = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", " ".join(str(e).split()))  # PIL's buffer repr
    return text if isinstance(e, CorruptSampleError) else f"{type(e).__name__}: {text}"


class MiroSampleDecoder:
    """Turns raw member bytes of one sample into training tensors (picklable, worker-safe).

    Damaged content raises :class:`CorruptSampleError`; anything else (a bad setting, a bug)
    propagates unchanged.
    """

    def __init__(self, cfg: DataConfig, bins: RewardBins | None, expect: dict | None = None):
        check_config(cfg)
        self.cfg, self.bins = cfg, bins
        # The data's shapes (MiroDataModule.prepare reads them off the first samples): a damaged
        # .npy header can still decode, to another shape, which would fail the whole batch's stack.
        self.expect = dict(expect or {})
        res = cfg.latent_resolution
        self.lat = (schema.latent_name("mean", res), schema.latent_name("std", res))
        self.emb = (schema.text_embedding_name(cfg.text_encoder), schema.text_embedding_name(cfg.text_encoder, True))

    def members(self) -> list[str]:
        """Member extensions this decoder reads (others are never loaded from disk)."""
        exts = ["json", "txt"]
        exts += list(self.lat) if self.cfg.image_source == "latents" else list(schema.IMAGE_EXTS)
        if self.cfg.text_source == "precomputed":
            exts += list(self.emb)
        return exts

    @staticmethod
    def decode(raw: dict, ext: str):
        """Member ``ext`` of a raw sample as a value; damaged or missing: :class:`CorruptSampleError`."""
        key = raw.get("__key__")
        if ext not in raw:
            raise CorruptSampleError(f"sample {key} lacks its {ext} member")
        try:
            return schema.decode_member(ext, raw[ext])
        except _DECODE_ERRORS as e:
            raise CorruptSampleError(f"{ext}: {_one_line(e)}") from e

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        key = raw["__key__"]
        meta = self.decode(raw, "json") if "json" in raw else {}
        if not isinstance(meta, dict):
            raise CorruptSampleError(f"sample {key}: json is not an object")
        has_synth = (self.emb[1] in raw) if cfg.text_source == "precomputed" else bool(meta.get("synthetic_caption"))
        synthetic = bool(rng.random() < cfg.synthetic_caption_rate) and has_synth
        out: dict = {"key": key, "synthetic": synthetic}
        if cfg.image_source == "latents":
            for name, member in zip(("latent_mean", "latent_std"), self.lat):
                lat = self.decode(raw, member)
                if lat.ndim != 3:
                    raise CorruptSampleError(f"sample {key}: {member} has shape {lat.shape}, expected (C, h, w)")
                self._check_shape(key, member, "latent", tuple(lat.shape))
                out[name] = torch.from_numpy(lat.astype(np.float32))
        else:
            ext = schema.image_member(raw)
            if ext is None:
                raise CorruptSampleError(f"sample {key} has no image member ({', '.join(schema.IMAGE_EXTS)})")
            out["image"] = self._image(self.decode(raw, ext), rng)
            self._check_shape(key, ext, "image", tuple(out["image"].shape))
        if cfg.text_source == "precomputed":
            member = self.emb[1] if synthetic else self.emb[0]
            emb = self.decode(raw, member)
            if emb.ndim != 2 or emb.shape[0] == 0:
                raise CorruptSampleError(f"sample {key}: {member} has shape {emb.shape}, expected (L>0, E)")
            self._check_shape(key, member, "text_width", int(emb.shape[1]))
            out["text_emb"] = torch.from_numpy(emb[: cfg.max_text_len].astype(np.float32))
        else:
            out["caption"] = str(meta["synthetic_caption"]) if synthetic else self.decode(raw, "txt")
        prefix = "synthetic_" if synthetic else ""
        scores = {k: meta.get(prefix + k) for k in cfg.reward_keys}
        out["rewards"] = self.bins.values(scores, cfg.reward_keys, rng) if self.bins is not None else {}
        return out

    def _check_shape(self, key, member: str, kind: str, got) -> None:
        want = self.expect.get(kind)
        if want is not None and got != want:
            what = "width" if kind == "text_width" else "shape"
            raise CorruptSampleError(f"sample {key}: {member} has {what} {got}, where the data's is {want}")

    def _image(self, im, rng: np.random.Generator) -> torch.Tensor:
        size = self.cfg.image_size
        w, h = im.size
        if w != h:  # centre crop to 1:1 first (CAD's preprocessing), so resizing never distorts
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        if self.cfg.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        return x


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The per-sample generator: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


class MiroTrainDataset(torch.utils.data.Dataset):
    """Map-style dataset over indexed shards; items are addressed by ``(position, index)``.

    A sample that fails to decode (:data:`CORRUPT_ERRORS`) is replaced, with a warning naming its
    shard and key: first by its neighbour (same shard, usually an isolated bad sample), then by
    indices drawn anywhere in the dataset from a generator seeded by (seed, epoch, index), so a
    whole unreadable shard is escaped and a resumed run makes the same replacements. The number
    of failures travels in the sample as ``n_corrupt``. After ``max_corrupt_retries``
    replacements the item fails with one line naming the shards involved. Other errors (a bad
    setting, a bug) propagate: they are not corruption.
    """

    def __init__(self, data: IndexedTarDataset, decoder: MiroSampleDecoder, per_rank: int | None = None):
        self.data, self.decoder = data, decoder
        self.per_rank = per_rank or len(data)

    def __len__(self) -> int:
        return len(self.data)

    def replacements(self, index: int, epoch: int):
        """The indices tried after ``index`` fails: its neighbour, then seeded draws (endless)."""
        n = len(self.data)
        yield (index + 1) % n
        rng = np.random.default_rng([int(self.decoder.cfg.seed), int(epoch), int(index), 1])
        while True:
            yield int(rng.integers(n))

    def __getitem__(self, item) -> dict:
        pos, index = item if isinstance(item, tuple) else (item, item)
        epoch = pos // self.per_rank
        cfg = self.decoder.cfg
        failed: list[int] = []
        last: BaseException | None = None
        candidates = self.replacements(index, epoch)
        i = index
        for _ in range(cfg.max_corrupt_retries + 1):
            try:
                raw = self.data.read(i, self.decoder.members())
                out = self.decoder(raw, sample_rng(cfg.seed, epoch, i))
            except CORRUPT_ERRORS as e:  # damage in one sample is skipped and counted, never fatal
                failed.append(i)
                last = e
                shard, key = self.data.where(i)
                warnings.warn(f"skipping corrupt sample #{i} (key {key} in {shard}): {_one_line(e)}")
                i = next(candidates)
                continue
            out.update(position=pos, index=i, n_corrupt=len(failed))
            return out
        shards = Counter(self.data.where(j)[0] for j in failed)
        named = ", ".join(f"{s} ({k} failed)" for s, k in shards.most_common())
        raise RuntimeError(f"{len(failed)} samples failed to decode in a row replacing sample #{index} "
                           f"(data.max_corrupt_retries={cfg.max_corrupt_retries}), from {named}; last error "
                           f"{_one_line(last)}; repair or remove these shards")


def collate(samples: list[dict], max_text_len: int | None = None) -> dict:
    """Stack a list of decoded samples; text embeddings are right-padded with a bool mask."""
    batch: dict = {}
    for name in ("latent_mean", "latent_std", "image"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    if "text_emb" in samples[0]:
        batch["text_emb"], batch["text_mask"] = pad_token_rows([s["text_emb"] for s in samples], max_text_len)
    if "caption" in samples[0]:
        batch["captions"] = [s["caption"] for s in samples]
    keys = list(samples[0]["rewards"])
    batch["rewards"] = {k: torch.tensor([s["rewards"][k] for s in samples], dtype=torch.float32) for k in keys}
    batch["synthetic"] = torch.tensor([s["synthetic"] for s in samples])
    batch["n_corrupt"] = int(sum(s.get("n_corrupt", 0) for s in samples))
    batch["position"] = int(max(s.get("position", -1) for s in samples)) + 1
    batch["index"] = torch.tensor([s.get("index", -1) for s in samples])  # which samples (after replacements)
    return batch


class _Collate:
    def __init__(self, max_text_len: int | None):
        self.max_text_len = max_text_len

    def __call__(self, samples):
        return collate(samples, self.max_text_len)


class ResampledStreamDataset(IterableDataset):
    """Streaming alternative: shards drawn with replacement, read sequentially, buffer-shuffled.

    Each (rank, worker) draws from its own generator seeded by (seed, rank, worker, restart), so
    streams differ across ranks and workers without a node splitter. Resume is approximate: a
    restarted run draws a fresh stream (``restart`` = the resumed sample position) instead of continuing.
    """

    def __init__(self, shards: list[str], decoder: MiroSampleDecoder, rank: int = 0, restart: int = 0):
        self.shards, self.decoder, self.rank, self.restart = shards, decoder, rank, restart

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        cfg = self.decoder.cfg
        rng = np.random.default_rng([cfg.seed, self.rank, wid, self.restart])
        wanted = set(self.decoder.members())
        buf: list[dict] = []
        n = 0
        pending = 0  # samples skipped since the last yield: carried by the next yielded sample
        barren: list[str] = []  # consecutive shard draws without one decodable sample
        while True:
            shard = self.shards[int(rng.integers(len(self.shards)))]
            good = 0
            for raw in schema.iter_raw_samples(shard):
                raw = {k: v for k, v in raw.items() if k.startswith("__") or k in wanted}
                try:
                    sample = self.decoder(raw, rng)
                except CORRUPT_ERRORS as e:  # skipped and counted, never fatal
                    pending += 1
                    warnings.warn(f"skipping corrupt sample (key {raw.get('__key__')} in {shard}): {_one_line(e)}")
                    continue
                good += 1
                sample.update(position=n, index=-1, n_corrupt=0)
                n += 1
                buf.append(sample)
                if len(buf) >= max(1, cfg.shuffle_buffer):
                    out = buf.pop(int(rng.integers(len(buf))))
                    out["n_corrupt"], pending = pending, 0
                    yield out
            if good:
                barren.clear()
                continue
            barren.append(str(shard))
            if len(barren) > cfg.max_corrupt_retries:
                named = ", ".join(f"{s} ({k} draws)" for s, k in Counter(barren).most_common())
                raise RuntimeError(f"{len(barren)} shard draws in a row gave no decodable sample "
                                   f"(data.max_corrupt_retries={cfg.max_corrupt_retries}): {named}; "
                                   "repair or remove these shards")


def fit_reward_bins(data: IndexedTarDataset, keys: list[str], num_bins: int, sample_size: int,
                    seed: int = 0, ties: str | dict[str, str] = "midrank") -> RewardBins:
    """Quantile edges per reward over (a seeded sample of) the data, both captions' scores pooled."""
    n = len(data)
    idx = np.arange(n) if n <= sample_size else np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
    scores: dict[str, list[float]] = {k: [] for k in keys}
    seen_keys: list[str] | None = None
    for i in idx:
        try:
            meta = MiroSampleDecoder.decode(data.read(int(i), ["json"]), "json")
        except CORRUPT_ERRORS:  # damaged or missing JSON: this sample has no scores
            continue
        if not isinstance(meta, dict):
            continue
        if seen_keys is None:
            seen_keys = sorted(meta)
        for k in keys:
            for name in (k, schema.synthetic_reward_key(k)):
                v = meta.get(name)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    scores[k].append(float(v))
    missing = [k for k, v in scores.items() if not v]
    if missing:
        raise ValueError(f"rewards {missing} have no finite value in the data's JSON; check `reward_keys` "
                         f"(first readable sample's keys: {seen_keys or []})")
    bins = RewardBins.fit(scores, num_bins, ties)
    bins.fitted_on = bins_source(data, sample_size, seed)
    return bins


def bins_source(data: IndexedTarDataset, sample_size: int, seed: int) -> dict:
    """What fitted bins depend on besides the settings: the shards (names and sizes, a digest: a
    copy of the data elsewhere matches), the samples' count and, when a sample was drawn, its size
    and seed."""
    digest = hashlib.sha256()
    for shard in data.shards:
        digest.update(f"{Path(shard).name}\0{os.path.getsize(shard)}\n".encode())
    n = len(data)
    drawn = n > sample_size
    return {"shards": digest.hexdigest()[:16], "samples": n,
            "sample_size": sample_size if drawn else None, "seed": seed if drawn else None}


class MiroDataModule(LightningDataModule):
    """Lightning datamodule: shards -> :class:`MiroTrainDataset` -> DataLoader, resumable.

    Under DDP set ``use_distributed_sampler=False`` on the Trainer: ranks are split here. The
    stream position is saved in checkpoints (``state_dict``) and restored before the loader is
    built, so a resumed run sees exactly the samples an uninterrupted run would have seen.
    """

    def __init__(self, cfg: DataConfig, bins: RewardBins | None = None):
        super().__init__()
        self.cfg = cfg
        self.bins = bins
        self.position = 0  # samples of this rank's stream consumed so far
        self.restart_step = 0
        self.stats = schema.ReadStats()
        self.data: IndexedTarDataset | None = None

    # -- setup -----------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        if t is not None:
            return int(t.global_rank), int(t.world_size)
        return 0, 1

    def prepare(self, progress: bool = True) -> None:
        """Index shards (a bar when ``progress``) and fit/load reward bins (idempotent; cached on disk)."""
        if self.data is not None:
            return
        cfg = self.cfg
        shards = schema.list_shards(cfg.data_dir) if cfg.data_dir else []
        if not shards:
            raise ValueError(f"data_dir {cfg.data_dir!r} holds no *.tar shards")
        self.data = IndexedTarDataset(shards, cfg.index_cache_dir, self.stats, progress=progress)
        if len(self.data) == 0:
            raise ValueError(f"data_dir {cfg.data_dir!r}: no readable samples")
        if cfg.text_source == "auto":  # precomputed when the shards carry this encoder's embeddings
            member = schema.text_embedding_name(cfg.text_encoder)
            cfg.text_source = "precomputed" if member in self.data.entry(0)["members"] else "on_the_fly"
        check_config(cfg)
        self._check_members()
        self.expect = self._reference_shapes()
        try:
            cfg.bin_ties = check_tie_rules(cfg.bin_ties, cfg.reward_keys)
        except ValueError as e:
            raise ValueError(f"bin_ties: {e}") from None
        if cfg.reward_keys and self.bins is None:
            path = Path(cfg.bins_path) if cfg.bins_path else None
            if path is not None and path.exists() and cfg.bins_cache != "refit":
                self.bins = self._cached_bins(path)
            if self.bins is None and cfg.bins_cache == "keep":
                # A resumed run without the file: its checkpoint's bins are restored next
                # (load_state_dict); fitting new ones here would replace them unseen.
                return
            if self.bins is not None:
                if self.bins.ties != cfg.bin_ties:  # the edges are the data's; the tie rule is the run's
                    warnings.warn(f"{path}: tie rule {self.bins.ties!r} replaced by the run's {cfg.bin_ties!r}")
                    self.bins.ties = cfg.bin_ties
                    if launch_rank() == 0:
                        self.bins.save(path)
            else:
                self.bins = fit_reward_bins(self.data, list(cfg.reward_keys), cfg.num_bins, cfg.bins_sample_size,
                                            cfg.seed, cfg.bin_ties)
                # every rank fits the same bins (seeded); one writes them, as one writes checkpoints
                if path is not None and launch_rank() == 0:
                    self.bins.save(path)
        if self.bins is not None:
            absent = [k for k in cfg.reward_keys if k not in self.bins.edges]
            if absent:
                raise ValueError(f"reward bins lack {absent}; have {self.bins.keys}")

    def _cached_bins(self, path: Path) -> RewardBins | None:
        """The bins in ``path`` when they are this run's (its rewards, its ``num_bins``); otherwise
        None (fit anew) or, for a resumed run (``bins_cache="keep"``), an error: a cache left by a
        dry run or an earlier run with other settings must not silently set this run's targets."""
        cfg, bins = self.cfg, RewardBins.load(path)
        diff = []
        if bins.num_bins != cfg.num_bins:
            diff.append(f"{bins.num_bins} bins where the run asks num_bins={cfg.num_bins}")
        if sorted(bins.keys) != sorted(cfg.reward_keys):
            diff.append(f"rewards {sorted(bins.keys)} where the run conditions on {sorted(cfg.reward_keys)}")
        # Fitted on other data (or another sample of it): a fresh run fits its own. A resumed run
        # keeps what it trained with; a file without the record (made before it) is taken as it is.
        if cfg.bins_cache != "keep" and bins.fitted_on is not None:
            source = bins_source(self.data, cfg.bins_sample_size, cfg.seed)
            changed = [f"{k} {bins.fitted_on.get(k)!r} -> {source[k]!r}" for k in source if bins.fitted_on.get(k) != source[k]]
            if changed:
                diff.append(f"edges fitted on other data ({', '.join(changed)})")
        if not diff:
            return bins
        if cfg.bins_cache == "keep":
            raise ValueError(f"{path} holds {' and '.join(diff)}; a resumed run keeps the bins it was trained "
                             f"with: resume with their settings, or start a new run under another experiment_name")
        warnings.warn(f"{path} holds {' and '.join(diff)}: fitting the run's own bins, which replace it")
        return None

    def _check_members(self) -> None:
        """A member the settings need that no shard holds is a configuration error (e.g. the wrong
        ``latent_resolution`` or ``text_encoder``), not thousands of corrupt samples."""
        cfg, have = self.cfg, self.data.member_exts()
        need = {"latent_resolution": MiroSampleDecoder(cfg, None).lat} if cfg.image_source == "latents" else {}
        if cfg.text_source == "precomputed":
            need["text_encoder"] = (schema.text_embedding_name(cfg.text_encoder),)
        elif cfg.synthetic_caption_rate < 1.0:  # the original caption is drawn at times
            need["text_source"] = ("txt",)
        for setting, members in need.items():
            absent = [m for m in members if m not in have]
            if absent:
                raise ValueError(f"data_dir {cfg.data_dir!r}: no sample has a {absent[0]} member, which "
                                 f"{setting}={getattr(cfg, setting)!r} needs; members present: {sorted(have)}")
        if cfg.synthetic_caption_rate > 0:  # else the rate silently falls to 0 (original captions only)
            fix = "set data.synthetic_caption_rate=0 to train on the original captions"
            synthetic = MiroSampleDecoder(cfg, None).emb[1]
            if cfg.text_source == "precomputed" and synthetic not in have:
                raise ValueError(f"data_dir {cfg.data_dir!r}: no sample has a {synthetic} member, which "
                                 f"synthetic_caption_rate={cfg.synthetic_caption_rate!r} needs; {fix}")
            if cfg.text_source == "on_the_fly":
                metas = self._first_decoded(16, lambda i: MiroSampleDecoder.decode(self.data.read(i, ["json"]), "json"))
                if not any(isinstance(m, dict) and m.get("synthetic_caption") for m in metas):
                    raise ValueError(f"data_dir {cfg.data_dir!r}: none of the first samples has a 'synthetic_caption' "
                                     f"in its JSON, which synthetic_caption_rate={cfg.synthetic_caption_rate!r} needs; "
                                     f"{fix}")
        if cfg.image_source == "pixels" and not have & set(schema.IMAGE_EXTS):
            raise ValueError(f"data_dir {cfg.data_dir!r}: image_source='pixels' but no sample has an image member "
                             f"({', '.join(schema.IMAGE_EXTS)}); members present: {sorted(have)}")

    def _first_decoded(self, n: int, decode) -> list:
        """``decode(i)`` of the first ``n`` samples, those that fail to decode left out."""
        out = []
        for i in range(min(n, len(self.data))):
            try:
                out.append(decode(i))
            except CORRUPT_ERRORS:
                continue
        return out

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def teardown(self, stage: str | None = None) -> None:
        if self.data is not None:
            self.data.close()  # the shard files this process opened (reopened on the next read)

    def decoder(self) -> MiroSampleDecoder:
        return MiroSampleDecoder(self.cfg, self.bins if self.cfg.reward_keys else None, getattr(self, "expect", None))

    def _reference_shapes(self, n: int = 16) -> dict:
        """The most common latent shape, text-embedding width and (without ``image_size``) image
        shape among the first ``n`` readable samples: what every sample must match to be stacked."""
        dec, seen = MiroSampleDecoder(self.cfg, None), {}
        decoded = self._first_decoded(n, lambda i: dec(self.data.read(i, dec.members()), sample_rng(self.cfg.seed, 0, i)))
        for out in decoded:
            shapes = {"latent": tuple(out["latent_mean"].shape) if "latent_mean" in out else None,
                      "text_width": int(out["text_emb"].shape[1]) if "text_emb" in out else None,
                      "image": tuple(out["image"].shape) if "image" in out else None}
            for kind, shape in shapes.items():
                if shape is not None:
                    seen.setdefault(kind, Counter())[shape] += 1
        return {kind: counts.most_common(1)[0][0] for kind, counts in seen.items()}

    def sampler(self) -> ResumableDistributedSampler:
        rank, world = self._rank_world()
        return ResumableDistributedSampler(len(self.data), world, rank, self.cfg.seed, self.cfg.shuffle,
                                           start=self.position)

    def train_dataloader(self) -> DataLoader:
        self.prepare()
        cfg = self.cfg
        col = _Collate(cfg.max_text_len if cfg.pad_to_max_text_len else None)
        kw = dict(num_workers=cfg.num_workers, collate_fn=col, persistent_workers=False,
                  pin_memory=torch.cuda.is_available())
        if cfg.num_workers > 0:
            kw["prefetch_factor"] = 4
        if cfg.mode == "resampled":
            rank, _ = self._rank_world()
            ds = ResampledStreamDataset([str(s) for s in self.data.shards], self.decoder(), rank, self.restart_step)
            return DataLoader(ds, batch_size=cfg.batch_size, **kw)
        if cfg.mode != "indexed":
            raise ValueError(f"data mode must be 'indexed' or 'resampled'; got {cfg.mode!r}")
        sampler = self.sampler()
        ds = MiroTrainDataset(self.data, self.decoder(), sampler.per_rank)
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **kw)

    # -- resume ----------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        # Called in the main process right before each training step: the batch's position is
        # the number of samples consumed once this step is done.
        if isinstance(batch, dict) and "position" in batch:
            if self.cfg.mode == "indexed":
                self.position = int(batch["position"])
            else:
                self.position += len(batch["synthetic"])
        return batch

    def state_dict(self) -> dict:
        return {"position": int(self.position), "stats": {"truncated_shards": self.stats.truncated_shards},
                "bins": self.bins.to_dict() if self.bins is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state.get("position", 0))
        if state.get("bins") and self.bins is None:
            self.bins = RewardBins.from_dict(state["bins"])
            path = Path(self.cfg.bins_path) if self.cfg.bins_path else None
            if path is not None and not path.exists() and launch_rank() == 0:
                self.bins.save(path)  # the run's file again, as a fresh run leaves it
        elif self.cfg.reward_keys and self.bins is None:
            raise ValueError("the checkpoint holds no reward bins and the run's reward_bins.json is gone; put the "
                             "file back beside the checkpoints, or start a new run")
        # resampled streams are re-seeded with the resumed position (approximate resume)
        self.restart_step = self.position
