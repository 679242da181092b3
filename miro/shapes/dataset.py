"""Webdataset shards of web-like Shapes samples (``miro shapes make-dataset``).

Each sample (:func:`miro.shapes.imperfections.make_sample`) is written through
:func:`miro.data.schema.write_shard` as ``{key}.png``, ``{key}.txt`` (the web caption) and
``{key}.json`` with:

* ``synthetic_caption`` / ``short_synthetic_caption``: captions that describe the image
  correctly (long: with relation and background; short: the bare object list);
* every Shapes reward of the web caption under its key (``shapes_alignment``, ...), and of the
  synthetic caption under ``synthetic_<key>``. Text-dependent rewards use the long synthetic
  caption; the image-only rewards (sharpness, contrast) are the same for both;
* ``metadata`` (the caption's GenEval metadata), ``true_metadata`` (before caption defects),
  ``synthetic_metadata``, ``short_synthetic_metadata``, ``scene`` and ``imperfections``.

Sample ``i`` is a pure function of ``(seed, i)``, shards are written atomically with fixed tar
headers, so the same arguments give the same bytes, and a rerun skips every shard that is
complete and readable (a manifest refuses to mix arguments in one folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from miro.data.schema import ReadStats, iter_raw_samples, synthetic_reward_key, write_shard
from miro.data.shard_files import remove_stale_temps
from miro.io import atomic_write_text
from miro.shapes import world as W
from miro.shapes.imperfections import ImperfectionRates, make_sample
from miro.shapes.scene import SceneConfig

MANIFEST = "shapes_dataset.json"


@dataclass
class DatasetConfig:
    """What a Shapes dataset folder holds."""

    num_samples: int  # total samples
    shard_size: int = 1000  # samples per shard (the last shard may be shorter)
    seed: int = 0  # sample i uses (seed, i)
    resolution: int = W.DEFAULT_RESOLUTION  # image side in pixels (32-64)
    rates: ImperfectionRates = field(default_factory=ImperfectionRates)  # web-like defects
    varied_background: bool = True  # draw backgrounds and textures (else plain gray)

    def __post_init__(self):
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer; got {self.num_samples!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer; got {self.shard_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {self.seed!r}")
        W.check_resolution(self.resolution)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_key(index: int) -> str:
    return f"{index:09d}"


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shapes-{shard:06d}.tar"


def sample_record(index: int, cfg: DatasetConfig) -> dict:
    """The members of sample ``index`` (for :func:`write_shard`)."""
    from PIL import Image

    from miro.shapes.rewards import REWARD_KEYS, score_all

    scene_cfg = SceneConfig.varied() if cfg.varied_background else SceneConfig()
    s = make_sample(cfg.seed, index, cfg.rates, cfg.resolution, scene_cfg)
    # text rewards for both captions (one cached detection); image-only rewards once
    text_keys = ("shapes_alignment", "shapes_counting", "shapes_position")
    both = score_all([s.image, s.image], [s.caption, s.synthetic["prompt"]], keys=text_keys)
    image_only = score_all([s.image], [s.caption], keys=tuple(k for k in REWARD_KEYS if k not in text_keys))
    both.update({k: v.repeat(2) for k, v in image_only.items()})
    meta = {
        "synthetic_caption": s.synthetic["prompt"],
        "short_synthetic_caption": s.short_synthetic["prompt"],
        "metadata": s.metadata,
        "true_metadata": s.true_metadata,
        "synthetic_metadata": s.synthetic,
        "short_synthetic_metadata": s.short_synthetic,
        "scene": s.scene.to_dict(),
        "imperfections": s.imperfections,
        "resolution": cfg.resolution,
    }
    for k in REWARD_KEYS:
        meta[k] = float(both[k][0])
        meta[synthetic_reward_key(k)] = float(both[k][1])
    return {"__key__": sample_key(index), "png": Image.fromarray(s.image), "txt": s.caption, "json": meta}


def shard_is_complete(path: Path, expected_keys: list[str]) -> bool:
    """True when the shard reads back whole with exactly the expected keys (png, txt, json each)."""
    if not path.is_file():
        return False
    stats = ReadStats()
    keys = []
    for raw in iter_raw_samples(path, stats):
        if not {"png", "txt", "json"} <= raw.keys():
            return False
        keys.append(raw["__key__"])
    return stats.truncated_shards == 0 and keys == expected_keys


def _check_manifest(out: Path, cfg: DatasetConfig) -> None:
    path = out / MANIFEST
    cur = json.loads(json.dumps(cfg.to_dict()))
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old == cur:
            return
        # Sample i is a function of (seed, i) only, so a dataset grows in place: the shards it has
        # stay valid and a partial last shard fails the completeness check and is rewritten.
        grown = {**old, "num_samples": cur["num_samples"]} == cur and cur["num_samples"] > old.get("num_samples", 0)
        if not grown:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in cur.items() if old.get(k) != v)
            raise ValueError(f"{out} holds a Shapes dataset made with other arguments ({diff}); use another --out "
                             "(only a larger --num-samples may extend it in place)")
    atomic_write_text(path, json.dumps(cur, indent=2, sort_keys=True))


def _write_shard(out: Path, shard: int, cfg: DatasetConfig, bar=None) -> bool:
    """Write one shard unless it is already complete; True when written."""
    lo, hi = shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, cfg.num_samples)
    path = shard_path(out, shard)
    remove_stale_temps(out, path.name)  # a run killed while writing this shard left its temp tar
    if shard_is_complete(path, [sample_key(i) for i in range(lo, hi)]):
        if bar is not None:
            bar.update(hi - lo)
        return False

    def samples():
        for i in range(lo, hi):
            yield sample_record(i, cfg)
            if bar is not None:
                bar.update(1)

    write_shard(path, samples())
    return True


def make_dataset(out: str | os.PathLike, cfg: DatasetConfig, progress: bool = True, workers: int = 1) -> dict:
    """Write (or complete) the dataset in ``out``; returns counts of written and skipped shards.

    ``workers > 1`` writes shards in parallel processes (the bytes do not change).
    """
    from tqdm.auto import tqdm

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer; got {workers!r}")
    out = Path(out)
    _check_manifest(out, cfg)
    if workers == 1:
        bar = tqdm(total=cfg.num_samples, desc="shapes dataset", unit="sample", disable=not progress)
        written = [_write_shard(out, k, cfg, bar) for k in range(cfg.num_shards)]
        bar.close()
    else:
        from concurrent.futures import ProcessPoolExecutor

        bar = tqdm(total=cfg.num_shards, desc="shapes dataset", unit="shard", disable=not progress)
        with ProcessPoolExecutor(workers) as pool:
            written = []
            for w in pool.map(_write_shard, [out] * cfg.num_shards, range(cfg.num_shards), [cfg] * cfg.num_shards):
                written.append(w)
                bar.update(1)
        bar.close()
    n = sum(written)
    return {"shards": cfg.num_shards, "written": n, "skipped": cfg.num_shards - n, "samples": cfg.num_samples}
