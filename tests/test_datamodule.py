import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from miro.data import schema
from miro.data.datamodule import DataConfig, MiroDataModule
from miro.data.indexed import IndexedTarDataset, ResumableDistributedSampler, scan_tar


def _sample(i, rng, png_ok=True):
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    L, Ls = 2 + i % 4, 1 + i % 3
    return {"__key__": f"s{i:04d}", "png": img if png_ok else b"not a png", "txt": f"caption {i}",
            "json": {"synthetic_caption": f"synthetic {i}", "r": float(i), "synthetic_r": float(1000 + i),
                     "q": (None if i % 5 == 0 else float(i % 7))},
            "minilm_embeddings.npy": np.full((L, 4), i, dtype=np.float16),
            "synthetic_minilm_embeddings.npy": np.full((Ls, 4), -i, dtype=np.float16)}


def _shards(tmp_path, n_shards=3, per=10, corrupt=()):
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    for s in range(n_shards):
        schema.write_shard(d / f"shard-{s:03d}.tar",
                           [_sample(s * per + j, rng, png_ok=(s * per + j) not in corrupt) for j in range(per)])
    return d


def _cfg(d, **kw):
    base = dict(data_dir=str(d), reward_keys=["r", "q"], num_bins=4, image_source="pixels", text_source="precomputed",
                batch_size=4, num_workers=0, seed=1, synthetic_caption_rate=0.5)
    base.update(kw)
    return DataConfig(**base)


class _Echo(torch.utils.data.Dataset):
    def __len__(self):
        return 1 << 30

    def __getitem__(self, item):
        return item[1]  # the sampler yields (position, index)


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 0), (4, 2)])
def test_sampler_partitions_epoch_across_ranks_and_workers(world, workers):
    n, bs = 103, 5
    seen = []
    for rank in range(world):
        s = ResumableDistributedSampler(n, world, rank, seed=7, max_epochs=1)
        dl = DataLoader(_Echo(), batch_size=bs, sampler=s, num_workers=workers)
        got = [int(i) for b in dl for i in b]
        assert len(got) == n // world
        seen += got
    assert len(seen) == len(set(seen)) == (n // world) * world  # disjoint and complete up to the tail
    # the epoch order is a function of (seed, epoch): epochs differ, same seed reproduces
    a = ResumableDistributedSampler(n, 1, 0, seed=7)
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert a.epoch_indices(1) == ResumableDistributedSampler(n, 1, 0, seed=7).epoch_indices(1)


def test_ranks_take_strided_slices_of_one_shared_epoch_order():
    """Every rank reads the same (seed, epoch) permutation: rank r takes elements r, r + W, ...
    of it, up to the tail that makes the ranks equal."""
    n, w = 23, 3
    for epoch in (0, 1):
        perm = ResumableDistributedSampler(n, 1, 0, seed=5).epoch_indices(epoch)
        for r in range(w):
            assert ResumableDistributedSampler(n, w, r, seed=5).epoch_indices(epoch) == perm[r: (n // w) * w: w]


def test_sampler_resume_is_exact():
    full = ResumableDistributedSampler(10, 2, 1, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(17)]  # crosses three epochs of 5
    resumed = ResumableDistributedSampler(10, 2, 1, seed=3, start=6)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(11)] == stream[6:]
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(10, 2, 2)


def test_workers_do_not_duplicate(tmp_path):
    dm = MiroDataModule(_cfg(_shards(tmp_path, 2, 12), num_workers=2, batch_size=3))
    dm.prepare()
    dm.cfg.shuffle = True
    dl = dm.train_dataloader()
    it = iter(dl)
    keys, seen = [], []
    for _ in range(8):  # one epoch of 24 samples
        b = next(it)
        keys.append(b["position"])
        seen += b["index"].tolist()
    assert keys == [3 * (k + 1) for k in range(8)]  # ordered positions across workers
    assert sorted(seen) == list(range(24))  # every sample once: none twice across the two workers


def test_batch_contents_and_padding(tmp_path):
    d = _shards(tmp_path)
    dm = MiroDataModule(_cfg(d, synthetic_caption_rate=0.0, shuffle=False))
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (4, 3, 8, 8) and -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    # the stored pixels, mapped 0 -> -1 and 255 -> 1
    rng = np.random.default_rng(0)
    for i in range(4):
        png = np.asarray(_sample(i, rng)["png"])
        assert torch.equal(b["image"][i], torch.from_numpy(png).permute(2, 0, 1).float() / 127.5 - 1.0)
    lengths = [2 + i % 4 for i in range(4)]
    assert b["text_emb"].shape == (4, max(lengths), 4)
    assert b["text_mask"].sum(1).tolist() == lengths
    for i in range(4):
        assert torch.all(b["text_emb"][i, : lengths[i]] == i) and torch.all(b["text_emb"][i, lengths[i]:] == 0)
    assert not b["synthetic"].any()
    # reward "r" is 0..29 (original) and 1000..1029 (synthetic) pooled: 4 quantile bins
    r = b["rewards"]["r"]
    assert r.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert math.isnan(b["rewards"]["q"][0])  # missing score -> NaN
    assert b["position"] == 4 and b["n_corrupt"] == 0


def test_synthetic_caption_uses_synthetic_rewards(tmp_path):
    dm = MiroDataModule(_cfg(_shards(tmp_path), synthetic_caption_rate=1.0, shuffle=False))
    b = next(iter(dm.train_dataloader()))
    assert b["synthetic"].all()
    assert torch.all(b["text_emb"][1, 0] == -1)
    # pooled scores 0..29 and 1000..1029: quartile edges ~14.75, 514.5, 1014.25 -> 1000..1003 in bin 2
    assert b["rewards"]["r"].tolist() == pytest.approx([2 / 3] * 4)
    # on-the-fly text gives the synthetic caption string
    dm2 = MiroDataModule(_cfg(_shards(tmp_path / "b"), synthetic_caption_rate=1.0, shuffle=False,
                              text_source="on_the_fly"))
    b2 = next(iter(dm2.train_dataloader()))
    assert b2["captions"][:2] == ["synthetic 0", "synthetic 1"] and "text_emb" not in b2


def test_caption_draw_rate_and_determinism(tmp_path):
    cfg = _cfg(_shards(tmp_path, 4, 25), batch_size=100, synthetic_caption_rate=0.5)
    b1 = next(iter(MiroDataModule(cfg).train_dataloader()))
    b2 = next(iter(MiroDataModule(cfg).train_dataloader()))
    assert torch.equal(b1["synthetic"], b2["synthetic"]) and torch.equal(b1["image"], b2["image"])
    assert 30 <= int(b1["synthetic"].sum()) <= 70


def test_corrupt_sample_and_truncated_shard_are_skipped(tmp_path):
    d = _shards(tmp_path, 3, 10, corrupt={3})
    last = d / "shard-002.tar"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="truncated"):
        dm = MiroDataModule(_cfg(d, shuffle=False, batch_size=5))
        dm.prepare()
    assert dm.stats.truncated_shards == 1 and 20 < len(dm.data) < 30
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = next(iter(dm.train_dataloader()))
    assert any("corrupt sample #3" in str(x.message) for x in w)
    assert b["n_corrupt"] == 1 and b["image"].shape[0] == 5
    assert torch.all(b["text_emb"][3, 0] == 4) or torch.all(b["text_emb"][3, 0] == -4)  # replaced by sample 4


def test_scan_tar_matches_reader(tmp_path):
    d = _shards(tmp_path, 1, 6)
    entries, err = scan_tar(d / "shard-000.tar")
    assert err is None and [e["key"] for e in entries] == [f"s{i:04d}" for i in range(6)]
    ds = IndexedTarDataset([d / "shard-000.tar"])
    raw = list(schema.iter_raw_samples(d / "shard-000.tar"))
    for i in range(6):
        got = ds.read(i)
        assert {k: v for k, v in got.items() if not k.startswith("__")} == {
            k: v for k, v in raw[i].items() if not k.startswith("__")}
    # the index is cached beside the shard and reused
    assert (d / ".shard-000.tar.index.npz").exists()
    ds2 = IndexedTarDataset([d / "shard-000.tar"])
    assert ds2.entry(5) == ds.entry(5) and ds2.read(2) == ds.read(2)


def test_scan_tar_refuses_a_compressed_shard(tmp_path):
    # a gzip stream named .tar: its members' offsets are not file offsets, so none is indexed
    import gzip
    import io
    import os
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(8):
            for ext, data in (("npy", os.urandom(20_000)), ("txt", b"caption %d" % i)):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(buf.getvalue()))
    entries, err = scan_tar(packed)
    assert entries == [] and err is not None


def test_open_shard_files_are_bounded(tmp_path, monkeypatch):
    # random access visits every shard: one handle per shard ran out of descriptors at scale
    from miro.data import indexed

    monkeypatch.setattr(indexed, "MAX_OPEN_SHARDS", 2)
    d = _shards(tmp_path, 5, 3)
    ds = IndexedTarDataset(sorted(d.glob("*.tar")))
    raw = [r for s in sorted(d.glob("*.tar")) for r in schema.iter_raw_samples(s)]
    seen = []
    for i in np.random.default_rng(0).permutation(len(ds)).tolist() * 2:
        assert ds.read(i)["__key__"] == raw[i]["__key__"] and ds.read(i)["json"] == raw[i]["json"]
        assert len(ds._handles) <= 2
        seen += [fh for fh in ds._handles.values() if fh not in seen]
    assert len(seen) > 5 and sum(not fh.closed for fh in seen) == 2  # evicted handles are closed
    ds.close()
    assert all(fh.closed for fh in seen)


def test_datamodule_resume_continues_stream(tmp_path):
    cfg = _cfg(_shards(tmp_path, 2, 10), batch_size=3)
    dm = MiroDataModule(cfg)
    it = iter(dm.train_dataloader())
    batches = [dm.on_before_batch_transfer(next(it)) for _ in range(9)]  # crosses the epoch boundary
    dm2 = MiroDataModule(cfg)
    ref = MiroDataModule(cfg)
    it_ref = iter(ref.train_dataloader())
    for _ in range(4):
        ref.on_before_batch_transfer(next(it_ref))
    dm2.load_state_dict(ref.state_dict())
    assert dm2.position == 12
    it2 = iter(dm2.train_dataloader())
    for k in range(4, 9):
        b = next(it2)
        assert torch.equal(b["image"], batches[k]["image"]) and torch.equal(b["synthetic"], batches[k]["synthetic"])


def test_resampled_mode_streams(tmp_path):
    import io

    d = _shards(tmp_path)
    raw = {r["__key__"]: r for s in sorted(d.glob("*.tar")) for r in schema.iter_raw_samples(s)}
    dm = MiroDataModule(_cfg(d, mode="resampled", shuffle_buffer=4, synthetic_caption_rate=0.0))
    it = iter(dm.train_dataloader())
    seen = set()
    for _ in range(5):
        b = next(it)
        assert b["image"].shape == (4, 3, 8, 8) and b["n_corrupt"] == 0 and not b["synthetic"].any()
        # each row is one stored sample, whole: its pixels (in [-1, 1]), its caption embedding and length
        for row in range(4):
            i = int(b["text_emb"][row, 0, 0])
            n = 2 + i % 4
            assert int(b["text_mask"][row].sum()) == n and torch.all(b["text_emb"][row, :n] == i)
            png = np.asarray(Image.open(io.BytesIO(raw[f"s{i:04d}"]["png"])).convert("RGB"))
            assert torch.equal(b["image"][row], torch.from_numpy(png).permute(2, 0, 1).float() / 127.5 - 1.0)
            seen.add(i)
    assert len(seen) > 4  # samples from more than one buffer fill


def test_resampled_streams_differ_across_ranks_and_workers(tmp_path, monkeypatch):
    """Each (rank, worker) of the resampled mode draws its own stream, seeded by (seed, rank,
    worker, restart): the same four reproduce it, another rank or worker gives another one."""
    from types import SimpleNamespace

    import miro.data.datamodule as dmod

    dm = MiroDataModule(_cfg(_shards(tmp_path), mode="resampled", shuffle_buffer=4))
    dm.prepare()
    shards = [str(x) for x in dm.data.shards]

    def keys(rank, worker=0, restart=0):
        monkeypatch.setattr(dmod, "get_worker_info", lambda: SimpleNamespace(id=worker))
        it = iter(dmod.ResampledStreamDataset(shards, dm.decoder(), rank, restart))
        return [next(it)["key"] for _ in range(12)]

    base = keys(0)
    assert keys(0) == base
    assert keys(1) != base and keys(0, worker=1) != base and keys(0, restart=5) != base
    assert keys(1) != keys(0, worker=1)


def test_the_sample_generator_follows_the_epoch(tmp_path):
    """Item (position, index) is decoded with the generator of (seed, position // per_rank, index):
    its first draw picks the caption, so the choice is new in every epoch."""
    from miro.data.datamodule import MiroTrainDataset, sample_rng

    dm = MiroDataModule(_cfg(_shards(tmp_path, 2, 10), synthetic_caption_rate=0.5))
    dm.prepare()
    ds = MiroTrainDataset(dm.data, dm.decoder(), per_rank=10)  # 20 samples over two ranks
    for epoch in (0, 1, 2, 3):
        got = [ds[(10 * epoch + k, 2 * k + 1)]["synthetic"] for k in range(10)]
        assert got == [bool(sample_rng(1, epoch, 2 * k + 1).random() < 0.5) for k in range(10)], epoch


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="image_source"):
        MiroDataModule(_cfg(_shards(tmp_path), image_source="jpeg")).train_dataloader()
    with pytest.raises(ValueError, match="no finite value"):
        MiroDataModule(_cfg(tmp_path / "data", reward_keys=["nope"])).prepare()
    with pytest.raises(ValueError, match="no \\*.tar"):
        (tmp_path / "empty").mkdir()
        MiroDataModule(_cfg(tmp_path / "empty")).prepare()


def test_pixels_are_centre_cropped_then_resized():
    from miro.data.datamodule import MiroSampleDecoder

    dec = MiroSampleDecoder(DataConfig(image_source="pixels", image_size=4), None)
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, 4:12] = 255  # the centre 8x8 square is white, the sides black
    x = dec._image(Image.fromarray(a), np.random.default_rng(0))
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.ones_like(x))


def test_spread_ties_draw_per_sample_and_replace_the_files_rule(tmp_path):
    d = _shards(tmp_path, 2, 20)
    path = tmp_path / "reward_bins.json"
    kw = dict(shuffle=False, batch_size=40, synthetic_caption_rate=0.0, num_bins=8, bins_path=str(path))
    mid = MiroDataModule(_cfg(d, **kw))
    b_mid = next(iter(mid.train_dataloader()))
    assert mid.bins.ties == "midrank" and '"midrank"' in path.read_text()
    with pytest.warns(UserWarning, match="tie rule 'midrank' replaced by the run's 'spread'"):
        spread = MiroDataModule(_cfg(d, bin_ties="spread", **kw))
        spread.prepare()
    assert spread.bins.edges == mid.bins.edges and '"spread"' in path.read_text()
    b1 = next(iter(spread.train_dataloader()))
    b2 = next(iter(MiroDataModule(_cfg(d, bin_ties="spread", **kw)).train_dataloader()))
    # q is i % 7 (seven levels, tied edges): each value is drawn within its score's bins, the same
    # for the same (seed, epoch, index), and spread over more values than the rule of the file
    from miro.rewards.binning import bin_span
    raw = np.array([np.nan if i % 5 == 0 else i % 7 for i in range(40)], dtype=float)
    q1, q2, qm = (b["rewards"]["q"].numpy() for b in (b1, b2, b_mid))
    np.testing.assert_array_equal(np.isnan(q1), np.isnan(raw))
    np.testing.assert_array_equal(q1[~np.isnan(q1)], q2[~np.isnan(q2)])
    ok = ~np.isnan(raw)
    lo, hi = bin_span(spread.bins.edges["q"], raw[ok])
    assert np.all((lo <= q1[ok] * 7 + 1e-9) & (q1[ok] * 7 <= hi + 1e-9))
    assert len(np.unique(q1[ok])) > len(np.unique(qm[ok]))
    with pytest.raises(ValueError, match=r"bin_ties: unknown tie rule 'mean'; choose from \['midrank', 'spread'\]"):
        MiroDataModule(_cfg(d, bin_ties="mean", **kw)).prepare()
    # the continuous reward r (distinct scores) keeps its values
    np.testing.assert_array_equal(b1["rewards"]["r"].numpy(), b_mid["rewards"]["r"].numpy())
    # one rule per reward: q spread (the same draws as above), r midrank; the file records the mapping
    with pytest.warns(UserWarning, match="replaced by the run's"):
        b3 = next(iter(MiroDataModule(_cfg(d, bin_ties={"q": "spread"}, **kw)).train_dataloader()))
    np.testing.assert_array_equal(b3["rewards"]["q"].numpy(), q1)
    np.testing.assert_array_equal(b3["rewards"]["r"].numpy(), b_mid["rewards"]["r"].numpy())
    assert json.loads(path.read_text())["ties"] == {"q": "spread"}
    with pytest.raises(ValueError, match=r"bin_ties: tie rules name rewards \['zz'\] that are not binned"):
        MiroDataModule(_cfg(d, bin_ties={"zz": "spread"}, **kw)).prepare()


def test_cached_bins_are_reused_only_when_they_are_the_runs(tmp_path):
    """A reward_bins.json beside a run (a dry run's, an earlier run's) sets the training targets only
    when it holds the run's rewards and num_bins; a resumed run refuses another; "refit" ignores it."""
    from miro.rewards.binning import RewardBins

    d = _shards(tmp_path, 2, 20)
    path = tmp_path / "reward_bins.json"
    fitted = MiroDataModule(_cfg(d, num_bins=4, bins_path=str(path)))
    fitted.prepare()
    mine = RewardBins(4, {"r": [0, 1, 2, 3, 100], "q": [0, 1, 2, 3, 100]})  # not the data's edges
    assert mine.edges != fitted.bins.edges
    mine.save(path)
    reused = MiroDataModule(_cfg(d, num_bins=4, bins_path=str(path)))
    reused.prepare()
    assert reused.bins.edges == mine.edges  # the run's settings: the cache is used as it is
    refit = MiroDataModule(_cfg(d, num_bins=4, bins_path=str(path), bins_cache="refit"))
    refit.prepare()
    assert refit.bins.edges == fitted.bins.edges and RewardBins.load(path).edges == fitted.bins.edges
    for kw, what in ((dict(num_bins=8), "4 bins where the run asks num_bins=8"),
                     (dict(reward_keys=["r"]), "rewards ['q', 'r'] where the run conditions on ['r']")):
        fitted.bins.save(path)
        with pytest.raises(ValueError, match=re.escape(what) + ".*a resumed run keeps the bins it was trained with"):
            MiroDataModule(_cfg(d, bins_path=str(path), bins_cache="keep", **{"num_bins": 4, **kw})).prepare()
        with pytest.warns(UserWarning, match=re.escape(what) + ": fitting the run's own bins"):
            dm = MiroDataModule(_cfg(d, bins_path=str(path), **{"num_bins": 4, **kw}))
            dm.prepare()
        assert dm.bins.num_bins == kw.get("num_bins", 4) and dm.bins.keys == kw.get("reward_keys", ["r", "q"])
        assert RewardBins.load(path).to_dict() == dm.bins.to_dict()  # the file is the run's now
    with pytest.raises(ValueError, match="bins_cache must be one of reuse, keep, refit; got 'x'"):
        MiroDataModule(_cfg(d, bins_cache="x")).prepare()


def test_cached_bins_of_other_data_are_not_reused(tmp_path):
    """The file records what its edges were fitted on (the shards, the sample): a fresh run over
    other data, or another sample of it, fits its own; the same data copied elsewhere reuses them;
    a resumed run keeps the bins it trained with."""
    import shutil

    from miro.rewards.binning import RewardBins

    d = _shards(tmp_path, 2, 20)
    path = tmp_path / "reward_bins.json"
    first = MiroDataModule(_cfg(d, bins_path=str(path)))
    first.prepare()
    assert RewardBins.load(path).fitted_on == {"shards": first.bins.fitted_on["shards"], "samples": 40,
                                               "sample_size": None, "seed": None}
    hand = RewardBins(4, {"r": [0, 1, 2, 3, 100], "q": [0, 1, 2, 3, 100]}, fitted_on=first.bins.fitted_on)
    hand.save(path)  # marked as this data's: reused as it is
    copy = shutil.copytree(d, tmp_path / "copy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = MiroDataModule(_cfg(copy, bins_path=str(path)))
        dm.prepare()
    assert dm.bins.edges == hand.edges
    other = _shards(tmp_path / "o", 3, 20)  # other data, same rewards and num_bins
    with pytest.warns(UserWarning, match=r"edges fitted on other data \(shards '[0-9a-f]{16}' -> '[0-9a-f]{16}', "
                                         r"samples 40 -> 60\): fitting the run's own bins"):
        dm = MiroDataModule(_cfg(other, bins_path=str(path)))
        dm.prepare()
    assert dm.bins.edges != hand.edges and RewardBins.load(path).fitted_on["samples"] == 60
    with pytest.warns(UserWarning, match=r"other data \(sample_size None -> 30, seed None -> 1\)"):
        MiroDataModule(_cfg(other, bins_path=str(path), bins_sample_size=30)).prepare()
    hand.save(path)
    dm = MiroDataModule(_cfg(other, bins_path=str(path), bins_cache="keep"))  # a resumed run: its own bins
    dm.prepare()
    assert dm.bins.edges == hand.edges


def test_only_rank_zero_writes_the_bins(tmp_path, monkeypatch):
    """Under srun or torchrun every rank prepares the data at once, before any process group exists:
    each fits the same seeded bins, and only global rank 0 (from the launcher's variables) writes them."""
    from miro.data.datamodule import launch_rank

    d = _shards(tmp_path, 2, 20)
    path = tmp_path / "reward_bins.json"
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert launch_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert launch_rank() == 3
    monkeypatch.setenv("RANK", "1")  # torchrun's global rank comes first, as for Lightning's rank_zero_only
    assert launch_rank() == 1
    other = MiroDataModule(_cfg(d, bins_path=str(path)))
    other.prepare()
    assert not path.exists()
    monkeypatch.setenv("RANK", "0")
    zero = MiroDataModule(_cfg(d, bins_path=str(path)))
    zero.prepare()
    assert path.exists() and zero.bins.to_dict() == other.bins.to_dict()
    monkeypatch.setenv("RANK", "1")
    before = path.read_bytes()
    with pytest.warns(UserWarning, match="tie rule 'midrank' replaced"):
        MiroDataModule(_cfg(d, bins_path=str(path), bin_ties="spread")).prepare()
    assert path.read_bytes() == before  # rank 1 rewrites nothing either


def _index_in_child(shards, log, barrier, q):
    import os

    from miro.data import indexed

    scan = indexed.scan_tar

    def logged_scan(path):  # slow enough that the processes overlap, and logged by pid
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        import time

        time.sleep(0.25)
        return scan(path)

    indexed.scan_tar = logged_scan
    barrier.wait()
    got = indexed.load_indexes(shards)
    q.put([(idx.keys.tolist(), idx.offsets.tolist(), err) for idx, err in got])


def test_processes_indexing_at_once_scan_each_shard_once(tmp_path):
    # every rank of an srun/torchrun job indexes the same fresh shards at the same moment: the work is
    # shared through lock files, every shard read once, and every process gets the whole index
    import multiprocessing as mp

    from miro.data.indexed import load_indexes

    d = _shards(tmp_path, 6, 4)
    shards = sorted(d.glob("*.tar"))
    log = tmp_path / "scans.log"
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_index_in_child, args=(shards, log, barrier, q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert sorted(path for _, path in lines) == sorted(map(str, shards))  # each shard scanned exactly once
    assert len({pid for pid, _ in lines}) >= 2  # by more than one process
    expect = [(idx.keys.tolist(), idx.offsets.tolist(), err) for idx, err in load_indexes(shards)]
    assert all(r == expect for r in results) and len(expect[0][0]) == 4
    assert not list(d.glob(".*.lock"))  # lock files are removed once their cache is written


def test_a_lock_taken_after_its_holder_finished_is_removed(tmp_path, monkeypatch):
    # the race behind a stray lock file: a process misses the cache, its holder writes the cache and
    # removes the lock file, the process then creates a fresh lock file, takes it and finds the cache;
    # that file is removed too, not left beside the shard
    from miro.data import indexed

    d = _shards(tmp_path, 1, 3)
    shards = sorted(d.glob("*.tar"))
    expect = [(idx.keys.tolist(), err) for idx, err in indexed.load_indexes(shards)]  # writes the cache
    real, calls = indexed._read_cached, []

    def miss_first(cache, stamp):  # the first read comes before the holder's write
        calls.append(cache)
        return None if len(calls) == 1 else real(cache, stamp)

    monkeypatch.setattr(indexed, "_read_cached", miss_first)
    monkeypatch.setattr(indexed, "_build", lambda *a: pytest.fail("the shard was scanned again"))
    assert [(idx.keys.tolist(), err) for idx, err in indexed.load_indexes(shards)] == expect
    assert len(calls) == 2 and not list(d.glob(".*.lock"))


def test_indexing_waits_for_a_holder_and_survives_its_death(tmp_path):
    # a process that dies while holding a shard's lock leaves no cache: the kernel drops its lock and
    # the waiting process scans the shard itself
    import fcntl
    import os
    import time

    from miro.data import indexed

    d = _shards(tmp_path, 2, 3)
    shards = sorted(d.glob("*.tar"))
    lock_path = d / ".shard-000.tar.index.npz.lock"
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, then is killed before writing anything
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        time.sleep(0.6)
        os._exit(9)
    for _ in range(200):  # until the child holds the lock
        if lock_path.exists():
            probe = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(probe, fcntl.LOCK_UN)
            except BlockingIOError:
                break
            finally:
                os.close(probe)
        time.sleep(0.01)
    t0 = time.monotonic()
    got = indexed.load_indexes(shards)
    waited = time.monotonic() - t0
    os.waitpid(pid, 0)
    assert waited > 0.2  # it waited for the holder instead of scanning beside it
    assert [idx.keys.tolist() for idx, _ in got] == [[b"s0000", b"s0001", b"s0002"], [b"s0003", b"s0004", b"s0005"]]
    assert (d / ".shard-000.tar.index.npz").exists() and not lock_path.exists()


def test_indexing_without_flock_scans_alone(tmp_path, monkeypatch):
    # file systems without flock (Lustre without -o flock: ENOSYS) index as a single process would
    import errno
    import fcntl

    from miro.data.indexed import load_indexes

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    d = _shards(tmp_path, 2, 3)
    got = load_indexes(sorted(d.glob("*.tar")))
    assert [len(idx) for idx, _ in got] == [3, 3] and (d / ".shard-001.tar.index.npz").exists()
