"""How the training data index scales: build, reload, memory, random reads, reward-bin fitting.

Writes ``--samples`` tiny samples (a JSON with three scores, a (2, 4) float16 embedding) into
``--shards`` tars with :func:`miro.data.schema.write_shard`, then measures on them:

* the cold index (every tar's headers scanned) and the cached reload, per sample;
* the index in memory (RSS growth, and the bytes of its numpy tables) and on disk (the caches);
* random member reads (50k, JSON + embedding), with every shard kept open and with
  :data:`miro.data.indexed.MAX_OPEN_SHARDS` open at once;
* :func:`miro.data.datamodule.fit_reward_bins` over ``--bins-sample`` samples;
* with ``--ranks N``: N processes indexing the fresh shards at once, as every rank of an srun job
  does, sharing the work through lock files (:func:`miro.data.indexed.load_indexes`) against N
  processes that each index everything (each its own cache folder: the behaviour before sharing).

Run it at two sizes to see the growth order. Usage::

    python benchmarks/bench_data_scale.py [--samples 200000] [--shards 200] [--bins-sample 100000] [--ranks N] [--dir D]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _args import ArgumentParser, positive_int, run_main  # beside this script


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_shards(d: Path, samples: int, shards: int) -> float:
    from miro.data.schema import write_shard

    rng = np.random.default_rng(0)
    emb = np.zeros((2, 4), np.float16)
    per = -(-samples // shards)
    t = time.perf_counter()
    for s in range(shards):
        keys = range(s * per, min((s + 1) * per, samples))
        write_shard(d / f"shard-{s:06d}.tar",
                    ({"__key__": f"{i:09d}", "minilm_embeddings.npy": emb,
                      "json": {"a": float(rng.random()), "synthetic_a": float(rng.random()), "b": float(rng.random())}}
                     for i in keys))
    return time.perf_counter() - t


def measure(d: Path, bins_sample: int) -> None:
    from miro.data import indexed
    from miro.data.datamodule import fit_reward_bins

    shards = sorted(d.glob("*.tar"))
    rows = []
    for label in ("cold", "cached"):
        r0, t = rss_mb(), time.perf_counter()
        ds = indexed.IndexedTarDataset(shards)
        dt, grown = time.perf_counter() - t, rss_mb() - r0
        n = len(ds)
        rows.append((f"index, {label}", f"{dt:.2f} s", f"{dt / n * 1e6:.1f} us", f"RSS +{grown:.1f} MB"))
    tables = sum(i.keys.nbytes + i.offsets.nbytes + i.sizes.nbytes for i in ds.index)
    cache = sum(p.stat().st_size for p in d.glob(".*.index.npz"))
    rows.append(("index tables in memory", f"{tables / 2**20:.1f} MB", f"{tables / n:.0f} B", ""))
    rows.append(("index caches on disk", f"{cache / 2**20:.1f} MB", f"{cache / n:.0f} B", ""))
    picks = np.random.default_rng(1).integers(0, n, 50_000).tolist()
    default = indexed.MAX_OPEN_SHARDS
    for cap in dict.fromkeys((len(shards), min(default, len(shards)))):  # one row when all fit
        indexed.MAX_OPEN_SHARDS = cap
        ds.close()
        t = time.perf_counter()
        for i in picks:
            ds.read(i, ["json", "minilm_embeddings.npy"])
        dt = time.perf_counter() - t
        rows.append((f"50k random reads, {min(cap, len(shards))} open", f"{dt:.2f} s",
                     f"{dt / len(picks) * 1e6:.1f} us", f"{len(ds._handles)} handles"))
    indexed.MAX_OPEN_SHARDS = default
    ds.close()
    k = min(bins_sample, n)
    t = time.perf_counter()
    fit_reward_bins(ds, ["a", "b"], 64, k, seed=0)
    dt = time.perf_counter() - t
    rows.append((f"fit_reward_bins, {k} samples", f"{dt:.2f} s", f"{dt / k * 1e6:.1f} us",
                 f"{len(ds._handles)} handles"))
    print(f"{n} samples in {len(shards)} shards")
    print("| measurement | total | per sample | note |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def _rank(shards, cache_dir, barrier, q) -> None:
    from miro.data import indexed

    scan, scans = indexed.scan_tar, []

    def counted(path):
        scans.append(path)
        return scan(path)

    indexed.scan_tar = counted
    barrier.wait()
    t = time.perf_counter()
    indexed.load_indexes(shards, cache_dir)
    q.put((time.perf_counter() - t, len(scans)))


def measure_ranks(d: Path, ranks: int) -> None:
    """Wall time and shard scans of ``ranks`` processes indexing the fresh shards at once."""
    import multiprocessing as mp

    shards = sorted(d.glob("*.tar"))
    ctx = mp.get_context("fork")
    print(f"| {ranks} processes indexing at once | wall | scans of a shard, all processes | slowest process |\n|---|---|---|---|")
    walls = {}
    for label in ("each its own cache (before)", "one cache, shared work"):
        shared = label.startswith("one")
        caches = [d / ".idx-shared" if shared else d / f".idx-{k}" for k in range(ranks)]
        for c in caches:
            shutil.rmtree(c, ignore_errors=True)
        barrier, q = ctx.Barrier(ranks + 1), ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(shards, c, barrier, q)) for c in caches]
        for p in procs:
            p.start()
        barrier.wait()
        t = time.perf_counter()
        got = [q.get() for _ in procs]
        walls[label] = time.perf_counter() - t
        for p in procs:
            p.join()
        print(f"| {label} | {walls[label]:.2f} s | {sum(n for _, n in got)} | {max(s for s, _ in got):.2f} s |")
        for c in set(caches):
            shutil.rmtree(c, ignore_errors=True)
    before, after = walls.values()
    print(f"shared work: x{before / after:.2f} faster ({len(shards)} shards, {ranks} processes)")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=positive_int, default=200_000, help="samples to write (default 200000)")
    p.add_argument("--shards", type=positive_int, default=200, help="tar shards to spread them over (default 200)")
    p.add_argument("--bins-sample", type=positive_int, default=100_000,
                   help="samples read to fit reward bins (data.bins_sample_size; default 100000)")
    p.add_argument("--ranks", type=positive_int, default=None,
                   help="also time this many processes indexing the fresh shards at once, shared vs each alone")
    p.add_argument("--dir", help="folder for the shards (kept); default: a temporary folder, deleted")
    args = p.parse_args(argv)
    if args.shards > args.samples:
        raise ValueError(f"--shards {args.shards} exceeds --samples {args.samples}")
    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="miro-data-scale-"))
    try:
        d.mkdir(parents=True, exist_ok=True)
        for cache in d.glob(".*.index.npz"):  # the cold measurement scans every tar
            cache.unlink()
        if not any(d.glob("*.tar")):
            print(f"wrote the shards in {write_shards(d, args.samples, args.shards):.1f} s")
        measure(d, args.bins_sample)
        if args.ranks:
            measure_ranks(d, args.ranks)
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
