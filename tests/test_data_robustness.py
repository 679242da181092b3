"""Data-path robustness: corruption is skipped and counted, configuration errors surface, a whole
unreadable shard is escaped deterministically, resampled mode counts its skips, testbed embedding
folders carry a manifest, and ``miro preprocess`` resolves every model name before any stage runs.

Tiny shards only (8x8 images, 8 samples per shard); every test runs in a few seconds on one CPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from miro.data import schema
from miro.data.datamodule import DataConfig, MiroDataModule, MiroTrainDataset
from tests._train_helpers import write_tiny_shards

PER = 8


def _zero_images(shard):
    """Every image of a shard replaced by zero bytes of the same length: the tar still indexes."""
    raw = list(schema.iter_raw_samples(shard))
    for r in raw:
        r["png"] = bytes(len(r["png"]))
    schema.write_shard(shard, [dict(r) for r in raw])


def _data(tmp_path, n_shards=4, bad=(1,)):
    d = write_tiny_shards(tmp_path / "data", n_shards=n_shards, per=PER)
    for s in bad:
        _zero_images(d / f"shard-{s:05d}.tar")
    return d


def _cfg(d, **kw):
    base = dict(data_dir=str(d), reward_keys=[], image_source="pixels", text_source="precomputed",
                text_encoder="minilm", image_size=8, batch_size=4, num_workers=0, seed=5, shuffle=False)
    base.update(kw)
    return DataConfig(**base)


def _dataset(cfg):
    dm = MiroDataModule(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare(progress=False)
    return dm, MiroTrainDataset(dm.data, dm.decoder())


def _skips(caught):
    return [str(w.message) for w in caught if "skipping corrupt sample" in str(w.message)]


# ------------------------------------------------------------------ configuration vs corruption

def test_bad_image_size_is_a_config_error_not_corruption(tmp_path):
    d = _data(tmp_path, n_shards=1, bad=())
    with pytest.raises(ValueError, match="image_size must be a positive integer or null; got 'abc'"):
        MiroDataModule(_cfg(d, image_size="abc")).prepare(progress=False)
    # past the checks (set after construction): the TypeError propagates, nothing is "corrupt"
    dm, ds = _dataset(_cfg(d))
    ds.decoder.cfg.image_size = "abc"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="'str' object cannot be interpreted as an integer"):  # the resize's
            ds[(0, 0)]
    assert _skips(caught) == []


def test_code_errors_propagate_while_decode_errors_are_counted(tmp_path, monkeypatch):
    d = _data(tmp_path, n_shards=2, bad=(0,))
    dm, ds = _dataset(_cfg(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ds[(0, 0)]  # shard 0 is garbage: replaced from shard 1
    assert out["n_corrupt"] == len(_skips(caught)) >= 1 and out["index"] >= PER
    msg = _skips(caught)[0]
    assert "key k00000 in" in msg and "shard-00000.tar" in msg and "png:" in msg and "\n" not in msg

    def broken(self, im, rng):
        raise AttributeError("a bug in the transform")

    monkeypatch.setattr(type(ds.decoder), "_image", broken)
    with pytest.raises(AttributeError, match="a bug"):
        ds[(PER, PER)]


def test_missing_member_everywhere_is_a_config_error(tmp_path):
    d = _data(tmp_path, n_shards=1, bad=())
    with pytest.raises(ValueError, match="flan_t5_xl_embeddings.npy member, which text_encoder='flan_t5_xl'"):
        MiroDataModule(_cfg(d, text_encoder="flan_t5_xl")).prepare(progress=False)
    with pytest.raises(ValueError, match="latent_resolution=256"):
        MiroDataModule(_cfg(d, image_source="latents")).prepare(progress=False)


def test_cli_reports_bad_image_size_in_one_line(tmp_path, capsys):
    from miro.train import cli
    from tests._train_helpers import tiny_overrides

    d = _data(tmp_path, n_shards=1, bad=())
    argv = [o for o in tiny_overrides(d, tmp_path / "run") if not o.startswith("data.image_size")]
    assert cli.main([*argv, "data.image_size=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image_size" in err and "abc" in err and "corrupt" not in err


# ------------------------------------------------------------------ a fully unreadable shard

def test_garbage_shard_is_escaped_with_a_deterministic_replacement_sequence(tmp_path):
    d = _data(tmp_path, n_shards=4, bad=(1,))

    def epoch():
        dm, ds = _dataset(_cfg(d))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = [ds[(i, i)] for i in range(len(ds))]
        return items, _skips(caught)

    items, skips = epoch()
    assert len(items) == 4 * PER
    n_corrupt = [it["n_corrupt"] for it in items]
    assert sum(n_corrupt) == len(skips)  # every failure is counted once, in the item it delayed
    bad = range(PER, 2 * PER)
    assert all(n_corrupt[i] >= 1 for i in bad)  # every garbage sample was met and replaced...
    assert all(n_corrupt[i] == 0 for i in range(len(items)) if i not in bad)
    assert all(not PER <= it["index"] < 2 * PER for it in items)  # ...by a good one from another shard
    assert all("shard-00001.tar" in s for s in skips)
    again, skips2 = epoch()
    assert [it["index"] for it in again] == [it["index"] for it in items] and skips2 == skips
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(items, again))


def test_garbage_shard_through_the_dataloader_counts_per_batch(tmp_path):
    d = _data(tmp_path, n_shards=4, bad=(2,))
    dm = MiroDataModule(_cfg(d, shuffle=True, batch_size=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare(progress=False)
        it = iter(dm.train_dataloader())
        batches = [dm.on_before_batch_transfer(next(it)) for _ in range(2 * 4 * PER // 4)]  # two epochs
    assert sum(b["n_corrupt"] for b in batches) == len(_skips(caught)) >= 2 * PER
    assert all(b["image"].shape == (4, 3, 8, 8) for b in batches)
    # resume from the middle replays the same replacements
    dm2 = MiroDataModule(_cfg(d, shuffle=True, batch_size=4))
    dm2.load_state_dict({"position": int(batches[3]["position"])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it2 = iter(dm2.train_dataloader())
        for k in range(4, 8):
            b = next(it2)
            assert torch.equal(b["image"], batches[k]["image"]) and b["n_corrupt"] == batches[k]["n_corrupt"]


def test_an_embedding_of_another_width_is_skipped_not_a_failed_batch(tmp_path):
    # a damaged .npy header can decode to another shape ((3, 283) for (3, 384)): stacking it
    # with the rest of the batch used to fail the DataLoader
    import io

    d = write_tiny_shards(tmp_path / "data", n_shards=1, per=PER)
    raw = [dict(r) for r in schema.iter_raw_samples(d / "shard-00000.tar")]
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 283), np.float16))
    raw[5]["minilm_embeddings.npy"] = buf.getvalue()
    raw[5]["synthetic_minilm_embeddings.npy"] = buf.getvalue()
    schema.write_shard(d / "shard-00000.tar", raw)
    dm = MiroDataModule(_cfg(d, batch_size=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare(progress=False)
        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(PER // 4)]  # one epoch
    assert dm.expect["text_width"] == 384
    assert [b["text_emb"].shape[-1] for b in batches] == [384, 384]
    assert sum(b["n_corrupt"] for b in batches) == 1
    (skip,) = _skips(caught)
    assert "key k00005" in skip and "has width 283, where the data's is 384" in skip


def test_a_resumed_run_takes_its_checkpoints_bins_when_the_file_is_gone(tmp_path):
    from miro.rewards.binning import RewardBins

    d = write_tiny_shards(tmp_path / "data", n_shards=1, per=PER)
    key = "shapes_alignment"
    saved = RewardBins(4, {key: [0.0, 0.1, 0.2, 0.3, 0.4]})
    path = tmp_path / "run" / "reward_bins.json"
    path.parent.mkdir()
    dm = MiroDataModule(_cfg(d, reward_keys=[key], num_bins=4, bins_path=str(path), bins_cache="keep"))
    dm.prepare(progress=False)
    assert dm.bins is None and not path.exists()  # not fitted: the checkpoint's come next
    dm.load_state_dict({"position": 8, "bins": saved.to_dict()})
    assert dm.bins.edges[key] == saved.edges[key] and RewardBins.load(path).edges[key] == saved.edges[key]
    lost = MiroDataModule(_cfg(d, reward_keys=[key], num_bins=4, bins_path=str(tmp_path / "none.json"),
                               bins_cache="keep"))
    lost.prepare(progress=False)
    with pytest.raises(ValueError, match="the checkpoint holds no reward bins and the run's reward_bins.json is gone"):
        lost.load_state_dict({"position": 8})


def test_retry_bound_names_the_shards_in_one_line(tmp_path):
    d = _data(tmp_path, n_shards=2, bad=(0, 1))
    dm, ds = _dataset(_cfg(d, max_corrupt_retries=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError) as e:
            ds[(3, 3)]
    msg = str(e.value)
    assert "\n" not in msg and "6 samples failed to decode" in msg and "replacing sample #3" in msg
    assert "shard-00000.tar" in msg and "shard-00001.tar" in msg and "max_corrupt_retries=5" in msg


# ------------------------------------------------------------------ resampled mode

def test_resampled_mode_counts_skipped_samples(tmp_path):
    d = _data(tmp_path, n_shards=3, bad=(0,))
    dm = MiroDataModule(_cfg(d, mode="resampled", shuffle_buffer=4, batch_size=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare(progress=False)
        it = iter(dm.train_dataloader())
        total = sum(next(it)["n_corrupt"] for _ in range(24))
    # the stream is suspended at a yield: every skip so far travelled in a yielded sample
    assert total == len(_skips(caught)) > 0
    assert all("shard-00000.tar" in s for s in _skips(caught))


def test_resampled_mode_with_no_decodable_shard_fails_naming_them(tmp_path):
    d = _data(tmp_path, n_shards=2, bad=(0, 1))
    dm = MiroDataModule(_cfg(d, mode="resampled", shuffle_buffer=2, max_corrupt_retries=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare(progress=False)
        with pytest.raises(RuntimeError, match="4 shard draws in a row gave no decodable sample") as e:
            next(iter(dm.train_dataloader()))
    assert "\n" not in str(e.value) and "shard-0000" in str(e.value)


# ------------------------------------------------------------------ testbed manifest

class _FakeEncoder:
    """A deterministic stand-in text encoder (embedding = prompt length), no weights."""

    schema_name, spec, max_length = "minilm", "fake-encoder", 8

    def __init__(self, fail_load=False, fail_encode=False):
        self.fail_load, self.fail_encode, self.calls = fail_load, fail_encode, 0

    def load(self):
        if self.fail_load:
            raise OSError("could not load the text encoder 'fake-encoder'")

    def encode(self, prompts):
        if self.fail_encode:
            raise RuntimeError("encoder crashed")
        self.calls += len(prompts)
        emb = torch.stack([torch.full((self.max_length, 4), float(len(p))) for p in prompts])
        return emb, torch.ones(len(prompts), self.max_length, dtype=torch.bool)

    def uncond_embedding(self):
        return torch.zeros(self.max_length, 4)


@pytest.fixture
def fake_encoder(monkeypatch):
    import miro.encoders

    made = []

    def load(spec, max_length=None, **kw):
        made.append(_FakeEncoder(fail_load=spec == "broken", fail_encode=spec == "crash"))
        return made[-1]

    monkeypatch.setattr(miro.encoders, "load_text_encoder", load)
    return made


def _testbed(root, name, prompts):
    d = root / name
    d.mkdir()
    (d / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return d


def test_testbed_manifest_refuses_another_testbed_and_overwrite_redoes(tmp_path, capsys, fake_encoder):
    from miro.train.testbed import MANIFEST, load_testbed, main, read_manifest

    a = _testbed(tmp_path, "a", ["a red dog", "a blue cat"])
    b = _testbed(tmp_path, "b", ["a photo of a red circle", "a photo of two blue squares"])
    out = tmp_path / "emb"
    assert main(["precompute", "--testbed", str(a), "--encoder", "minilm", "--out", str(out)]) == 0
    assert "wrote 2 prompt embeddings + uncond" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["testbed"] == str(a) and manifest["encoder"] == "fake-encoder" and manifest["max_length"] == 8
    assert manifest["schema_name"] == "minilm" and set(manifest["prompts"]) == {"000", "001"}
    before = (out / "000.minilm_embeddings.npy").read_bytes()

    # another testbed into the same folder: refused in one line, nothing touched
    assert main(["precompute", "--testbed", str(b), "--encoder", "minilm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"holds embeddings of testbed {str(a)!r}" in err and "--overwrite" in err
    assert (out / "000.minilm_embeddings.npy").read_bytes() == before and read_manifest(out) == manifest

    # the same testbed again: nothing to encode, the count says so
    assert main(["precompute", "--testbed", str(a), "--encoder", "minilm", "--out", str(out)]) == 0
    assert "wrote 0 prompt embeddings to" in capsys.readouterr().out and fake_encoder[-1].calls == 0

    # the training image logger checks the prompts it is given
    with pytest.raises(ValueError, match="was written for testbed .* another prompt than 'a photo of a red circle'"):
        load_testbed(b, out, "minilm")
    prompts, embs = load_testbed(a, out, "minilm")
    assert prompts == ["a red dog", "a blue cat"] and embs[0][0, 0] == len("a red dog")

    assert main(["precompute", "--testbed", str(b), "--encoder", "minilm", "--out", str(out), "--overwrite"]) == 0
    assert "wrote 2 prompt embeddings + uncond" in capsys.readouterr().out
    prompts, embs = load_testbed(b, out, "minilm")
    assert embs[1][0, 0] == len("a photo of two blue squares") and read_manifest(out)["testbed"] == str(b)
    with pytest.raises(ValueError, match="another prompt than 'a red dog'"):
        load_testbed(a, out, "minilm")
    assert (out / MANIFEST).is_file()


def test_killed_overwrite_then_plain_rerun_keeps_no_old_embedding(tmp_path, monkeypatch, fake_encoder):
    from miro.train.testbed import load_testbed, precompute

    a = _testbed(tmp_path, "a", ["a red dog", "a blue cat"])
    b = _testbed(tmp_path, "b", ["a photo of a red circle", "a photo of two blue squares"])
    out = tmp_path / "emb"
    precompute(str(a), "minilm", out, batch_size=1, progress=False)

    real_encode = _FakeEncoder.encode

    def killed_after_one(self, prompts):  # the --overwrite run dies after its first prompt
        if self.calls:
            raise KeyboardInterrupt
        return real_encode(self, prompts)

    monkeypatch.setattr(_FakeEncoder, "encode", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        precompute(str(b), "minilm", out, batch_size=1, progress=False, overwrite=True)
    monkeypatch.setattr(_FakeEncoder, "encode", real_encode)

    res = precompute(str(b), "minilm", out, batch_size=1, progress=False)  # resumed without --overwrite
    assert res.written == 1 and res.skipped == 1 and res.uncond_written
    _, embs = load_testbed(b, out, "minilm")
    assert [e[0, 0] for e in embs] == [len("a photo of a red circle"), len("a photo of two blue squares")]


def test_testbed_folder_without_manifest_is_refused(tmp_path, capsys, fake_encoder):
    from miro.train.testbed import main

    out = tmp_path / "legacy"
    out.mkdir()
    np.save(out / "000.minilm_embeddings.npy", np.zeros((2, 4), np.float16))
    assert main(["precompute", "--testbed", "shapes", "--encoder", "minilm", "--out", str(out)]) == 2
    assert "no testbed.json" in capsys.readouterr().err


@pytest.mark.parametrize("spec,error,message", [("broken", OSError, "could not load the text encoder"),
                                                  ("crash", RuntimeError, "encoder crashed")])
def test_failed_precompute_leaves_no_folder(tmp_path, fake_encoder, spec, error, message):
    from miro.train.testbed import precompute

    out = tmp_path / "never"
    with pytest.raises(error, match=message):
        precompute("shapes", spec, out, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------ preprocess model names

def _raw(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    write_tiny_shards(src, n_shards=2, per=2)
    return src


def _pp_args(src, tmp_path, *extra):
    return ["--stage", "all", "--src", str(src), "--csv_dir", str(tmp_path / "csv"), "--dest", str(tmp_path / "out"),
            "--scorers", "shapes_sharpness,shapes_contrast", "--vqa-scorer", "none", "--text-encoder", "minilm",
            "--autoencoder", "identity", "--no-progress", "--device", "cpu", *extra]


@pytest.mark.parametrize("flag, value, match", [
    ("--autoencoder", "bogus", "unknown autoencoder 'bogus'"),
    ("--autoencoder", "no/such/vae", "unknown --autoencoder 'no/such/vae'"),
    ("--text-encoder", "bogus", "unknown --text-encoder 'bogus'"),
    ("--scorers", "shapes_sharpness,nope", "--scorers: unknown reward 'nope'"),
    ("--vqa-scorer", "nope", "--vqa-scorer: unknown reward 'nope'"),
    ("--resolutions", "20", "not a positive multiple of 8"),
])
def test_preprocess_resolves_every_model_name_before_any_stage(tmp_path, capsys, flag, value, match):
    from miro.data.preprocess import main

    src = _raw(tmp_path)
    argv = _pp_args(src, tmp_path)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err
    assert not (tmp_path / "csv").exists() and not (tmp_path / "out").exists()  # the rewards stage never ran
    assert main([*argv, "--isolate-stages"]) == 2  # checked before the first child process too
    assert not (tmp_path / "csv").exists()


def test_preprocess_dry_run_counts_shards_to_do(tmp_path, capsys):
    from miro.data.preprocess import main

    src = _raw(tmp_path)
    assert main(_pp_args(src, tmp_path, "--stage", "rewards", "--shard_id", "0")) == 0
    capsys.readouterr()
    assert main(_pp_args(src, tmp_path, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "stage rewards: 1 to do, 1 already complete" in out
    assert "stage vae: 2 to do, 0 already complete" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("seed", -1, "seed must be an integer >= 0; got -1"),
    ("synthetic_caption_rate", True, "synthetic_caption_rate must be in [0, 1]; got True"),
    ("shuffle_buffer", 0, "shuffle_buffer must be an integer >= 1; got 0"),
    ("bins_sample_size", 0, "bins_sample_size must be an integer >= 1; got 0"),
    ("shuffle", "no", "shuffle must be true or false; got 'no'"),
    ("hflip", "yes", "hflip must be true or false; got 'yes'"),
    ("batch_size", 0, "batch_size must be an integer >= 1; got 0"),
    ("num_workers", -1, "num_workers must be an integer >= 0; got -1"),
])
def test_data_settings_are_checked_by_name(tmp_path, field, value, message):
    from miro.data.datamodule import check_config

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_config(_cfg(tmp_path, **{field: value}))


def test_a_synthetic_caption_rate_without_synthetic_captions_is_refused(tmp_path):
    d = write_tiny_shards(tmp_path / "data", n_shards=1, per=PER)
    raw = [{k: v for k, v in r.items() if not k.startswith("synthetic_")} for r in schema.iter_raw_samples(d / "shard-00000.tar")]
    schema.write_shard(d / "shard-00000.tar", raw)
    with pytest.raises(ValueError, match="no sample has a synthetic_minilm_embeddings.npy member, which "
                                         "synthetic_caption_rate=0.5 needs; set data.synthetic_caption_rate=0"):
        MiroDataModule(_cfg(d, synthetic_caption_rate=0.5)).prepare(progress=False)
    MiroDataModule(_cfg(d, synthetic_caption_rate=0.0)).prepare(progress=False)


def test_unshuffled_epochs_rotate_the_cut_so_every_sample_is_seen():
    from miro.data.indexed import ResumableDistributedSampler

    seen = set()
    for rank in range(2):
        s = ResumableDistributedSampler(53, num_replicas=2, rank=rank, shuffle=False)
        for epoch in range(3):
            seen.update(s.epoch_indices(epoch))
            assert len(set(s.epoch_indices(epoch))) == 26
    assert seen == set(range(53))
    whole = ResumableDistributedSampler(8, num_replicas=2, rank=0, shuffle=False)
    assert whole.epoch_indices(0) == whole.epoch_indices(5) == [0, 2, 4, 6]  # no cut: identity order
