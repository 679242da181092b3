"""``miro preprocess`` end to end: stages, layout, resume, damage, shard selection.

Real code paths with tiny models: a tiny T5 encoder + tokenizer and a tiny diffusers
AutoencoderKL saved in their real formats, and closed-form stand-in rewards (see
``test_preprocess_helpers``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from miro.data import preprocess_io as pio
from miro.data.preprocess import main
from miro.data.schema import decode_sample, iter_raw_samples, write_shard
from test_preprocess_helpers import (
    CALLS, CRASH, PROMPTS_SEEN, SCORERS, image, jpeg_bytes, make_raw_shards, reset)

RES = "16,32"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from miro.encoders.tiny import save_tiny_autoencoder_kl, save_tiny_t5

    root = tmp_path_factory.mktemp("models")
    return {"t5": str(save_tiny_t5(root / "t5")), "vae": str(save_tiny_autoencoder_kl(root / "vae"))}


@pytest.fixture(autouse=True)
def _reset():
    reset()
    yield
    reset()


def _args(src, csv, stage, *extra, dest=None):
    a = ["--stage", stage, "--src", str(src), "--csv_dir", str(csv), "--scorers", SCORERS,
         "--vqa-scorer", "ptest_vqa", "--no-progress", "--batch-size", "2", "--num-workers", "0"]
    return a + (["--dest", str(dest)] if dest else []) + list(extra)


def _vae_args(src, csv, dest, models, *extra, res=RES):
    return _args(src, csv, "vae", "--text-encoder", models["t5"], "--autoencoder", models["vae"],
                 "--resolutions", res, *extra, dest=dest)


def _read(path):
    return {s["__key__"]: s for s in (decode_sample(r) for r in iter_raw_samples(path))}


def test_all_stages_end_to_end_layout_dtypes_values(tmp_path, tiny_models):
    src, csv, dest = tmp_path / "raw", tmp_path / "csv", tmp_path / "out"
    shards = make_raw_shards(src, n_shards=2, per_shard=3)
    assert main(_args(src, csv, "all", "--text-encoder", tiny_models["t5"], "--autoencoder", tiny_models["vae"],
                      "--resolutions", RES, dest=dest)) == 0
    from miro.encoders import load_autoencoder, load_text_encoder

    t5 = load_text_encoder(tiny_models["t5"]).load()
    codec = load_autoencoder(tiny_models["vae"])
    raw = {k: s for p in shards for k, s in _read(p).items()}
    for shard in shards:
        out = dest / shard.name
        names = [m.name for m in __import__("tarfile").open(out)]
        assert names == sorted(names)
        got = _read(out)
        assert sorted(got) == sorted(_read(shard))
        for key, s in got.items():
            src_s = raw[key]
            members = {k for k in s if not k.startswith("__")}
            assert members == {"jpg", "txt", "json", "flan_t5_xl_embeddings.npy", "synthetic_flan_t5_xl_embeddings.npy",
                               "vae_embeddings_mean_16.npy", "vae_embeddings_std_16.npy",
                               "vae_embeddings_mean_32.npy", "vae_embeddings_std_32.npy"}
            assert s["txt"] == src_s["txt"]  # the original caption, <PERSON> tags included
            assert np.array_equal(np.asarray(s["jpg"]), np.asarray(src_s["jpg"]))
            meta = s["json"]
            long, short = meta["synthetic_caption"], meta["short_synthetic_caption"]
            if "synthetic_caption" in src_s["json"]:
                assert (long, short) == (src_s["json"]["synthetic_caption"], src_s["json"]["short_synthetic_caption"])
            else:
                assert long == short == pio.clean_caption(src_s["txt"])
            assert meta["url"] == src_s["json"]["url"]
            clean = pio.clean_caption(src_s["txt"])
            red = np.asarray(src_s["jpg"], np.float64)[..., 0].mean() / 255 / 2
            assert meta["ptest_red"] == pytest.approx(red, rel=1e-6) and meta["synthetic_ptest_red"] == meta["ptest_red"]
            assert meta["ptest_words"] == pytest.approx(len(clean.split()) / 100)
            assert meta["synthetic_ptest_words"] == pytest.approx(len(long.split()) / 100)  # long caption
            assert meta["ptest_chars"] == len(clean) and meta["synthetic_ptest_chars"] == len(short)  # short
            assert meta["ptest_vqa"] == float("red" in clean.split())
            assert meta["synthetic_ptest_vqa"] == float("red" in long.split())
            for synthetic, text in ((False, clean), (True, long)):
                e = s[("synthetic_" if synthetic else "") + "flan_t5_xl_embeddings.npy"]
                ref, mask = t5.encode([text])
                assert e.dtype == np.float16 and e.shape == (int(mask.sum()), t5.dim)
                np.testing.assert_allclose(e.astype(np.float32), ref[0, mask[0]].numpy(), atol=2e-3, rtol=1e-3)
            for r in (16, 32):
                m, sd = s[f"vae_embeddings_mean_{r}.npy"], s[f"vae_embeddings_std_{r}.npy"]
                shape = (codec.latent_channels, r // codec.downsample, r // codec.downsample)
                assert m.dtype == sd.dtype == np.float16 and m.shape == sd.shape == shape
                x = torch.from_numpy(pio.to_model_input(src_s["jpg"], r))[None]
                rm, rs = codec.encode(x)
                np.testing.assert_allclose(m.astype(np.float32), rm[0].numpy(), atol=2e-3, rtol=2e-3)
                np.testing.assert_allclose(sd.astype(np.float32), rs[0].numpy(), atol=2e-3, rtol=2e-3)
    log = json.loads((csv / "logs" / "00000.vae.json").read_text())
    assert log["status"] == "complete" and log["samples_ok"] == 3 and log["samples_skipped"] == 0
    # the rewards saw cleaned captions only
    assert not any("<PERSON>" in p for ps in PROMPTS_SEEN.values() for p in ps)


def test_encode_trimmed_equals_padding_to_max_length(tiny_models):
    from miro.data.encode_stage import encode_trimmed
    from miro.encoders import load_text_encoder

    enc = load_text_encoder(tiny_models["t5"], max_length=40)
    prompts = ["two red circles", "a blue square above a yellow star left of one green triangle", "star"]
    emb, mask = enc.encode(prompts)
    got = encode_trimmed(enc, prompts, cap=40)
    assert enc.max_length == 40  # restored
    for i, e in enumerate(got):
        assert e.shape == (int(mask[i].sum()), enc.dim) and e.dtype == np.float16
        np.testing.assert_allclose(e.astype(np.float32), emb[i, mask[i]].numpy(), atol=2e-3, rtol=1e-3)
    capped = encode_trimmed(enc, prompts, cap=4)
    assert [c.shape[0] for c in capped] == [4, 4, 2]


def test_synthetic_captions_tsv_and_csv_layout(tmp_path):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=1, per_shard=3)
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("s0k1.jpg\tshort from tsv\tlong from the tsv file red\nunrelated.jpg\tx\ty\n")
    assert main(_args(src, csv, "rewards", "--synthetic_captions", str(tsv))) == 0
    rows = pio.read_scores_csv(csv / "00000_scores.csv")
    header = (csv / "00000_scores.csv").read_text().splitlines()[0].split(",")
    assert header == ["key", "ptest_chars", "ptest_red", "ptest_words", "short_synthetic_caption",
                      "synthetic_caption", "synthetic_ptest_chars", "synthetic_ptest_red", "synthetic_ptest_words"]
    assert rows["s0k1"]["synthetic_caption"] == "long from the tsv file red"
    assert rows["s0k1"]["synthetic_ptest_chars"] == len("short from tsv")
    assert rows["s0k1"]["synthetic_ptest_words"] == pytest.approx(6 / 100)
    assert rows["s0k0"]["synthetic_caption"] == "a long synthetic caption number 0 with red"  # JSON fallback
    # without synthetic captions: no synthetic columns at all
    assert main(_args(src, tmp_path / "csv2", "rewards", "--no-synthetic")) == 0
    header2 = (tmp_path / "csv2" / "00000_scores.csv").read_text().splitlines()[0]
    assert header2 == "key,ptest_chars,ptest_red,ptest_words"


def test_a_tsv_edit_redoes_only_the_shards_whose_captions_changed(tmp_path):
    # The caption source was the TSV's name and size: a line for no shard redid every shard, and an
    # edit of the same length redid none. Now each shard carries a digest of its own TSV lines.
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=2, per_shard=2)  # keys s0k0, s0k1 | s1k0, s1k1
    tsv = tmp_path / "caps.tsv"
    lines = ["s0k1.jpg\tshort cap\tlong red", "s1k0.jpg\tshort one\tlong one"]
    tsv.write_text("\n".join(lines) + "\n")
    run = _args(src, csv, "rewards", "--synthetic_captions", str(tsv))
    assert main(run) == 0
    n = CALLS["ptest_words"]
    tsv.write_text("\n".join(lines + ["elsewhere.jpg\tx\ty"]) + "\n")  # a line for no shard
    assert main(run) == 0 and CALLS["ptest_words"] == n
    tsv.write_text("\n".join([lines[0].replace("short cap", "short cAp"), lines[1]]) + "\n")  # same length
    assert main(run) == 0
    redone = CALLS["ptest_words"] - n
    assert redone > 0 and pio.read_scores_csv(csv / "00000_scores.csv")["s0k1"]["short_synthetic_caption"] == "short cAp"
    assert pio.read_log(pio.log_path(csv, src / "00001.tar", "rewards"))["config"]["captions"].startswith("tsv:")
    assert main(run) == 0 and CALLS["ptest_words"] == n + redone  # shard 00001 kept, then both complete
    # the same second run with shard 00001 alone: nothing to do (its captions did not change)
    assert main(run + ["--shard_id", "1"]) == 0 and CALLS["ptest_words"] == n + redone


def test_rerun_skips_complete_shards_and_redoes_invalid_ones(tmp_path):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    shards = make_raw_shards(src, n_shards=2, per_shard=2)
    assert main(_args(src, csv, "rewards")) == 0
    first = CALLS["ptest_words"]
    assert CALLS["ptest_words.load"] == 1
    assert main(_args(src, csv, "rewards")) == 0
    assert CALLS["ptest_words"] == first  # both shards complete: no model call
    assert CALLS["ptest_words.load"] == 1  # ... and no model loaded
    # a damaged CSV is redone; so is a shard whose source changed
    path = csv / "00001_scores.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    assert main(_args(src, csv, "rewards")) == 0
    assert CALLS["ptest_words"] == first + 2  # one batch of 2 samples, original + synthetic = 2 calls
    write_shard(shards[0], [{"__key__": "new", "jpg": jpeg_bytes(image(9)), "txt": "one red star"}])
    assert main(_args(src, csv, "rewards")) == 0
    assert list(pio.read_scores_csv(csv / "00000_scores.csv")) == ["new"]  # stale rows dropped
    assert main(_args(src, csv, "rewards", "--overwrite")) == 0
    assert CALLS["ptest_words"] == first + 2 + 2 + (2 + 2)


def test_resume_after_crash_mid_shard_equals_uninterrupted_run(tmp_path, tiny_models):
    src = tmp_path / "raw"
    make_raw_shards(src, n_shards=2, per_shard=4)
    ref_csv, ref_dest = tmp_path / "ref_csv", tmp_path / "ref_out"
    for stage in ("rewards", "vqa"):
        assert main(_args(src, ref_csv, stage)) == 0
    assert main(_vae_args(src, ref_csv, ref_dest, tiny_models, res="16")) == 0
    reset()
    csv, dest = tmp_path / "csv", tmp_path / "out"
    # shard 0 takes 4 calls (2 batches x 2 captions); the crash hits shard 1's 2nd batch, after
    # its 1st batch was checkpointed (--checkpoint-seconds 0: after every batch)
    CRASH["ptest_words"] = 8
    with pytest.raises(KeyboardInterrupt):
        main(_args(src, csv, "rewards", "--checkpoint-seconds", "0"))
    assert (csv / "00000_scores.csv").is_file() and not (csv / "00001_scores.csv").exists()
    assert json.loads((csv / "logs" / "00001.rewards.json").read_text())["status"] == "running"
    partial = json.loads((csv / "logs" / "00001.rewards.partial.json").read_text())
    assert sorted(partial["rows"]) == ["s1k0", "s1k1"]
    CRASH.clear()
    calls = CALLS["ptest_words"]
    assert main(_args(src, csv, "rewards")) == 0
    assert CALLS["ptest_words"] == calls + 2  # shard 1's last batch only
    assert not (csv / "logs" / "00001.rewards.partial.json").exists()
    log1 = json.loads((csv / "logs" / "00001.rewards.json").read_text())
    assert (log1["status"], log1["samples_read"], log1["samples_ok"]) == ("complete", 4, 4)
    assert main(_args(src, csv, "vqa")) == 0
    for i in range(2):
        assert (csv / f"{i:05d}_scores.csv").read_bytes() == (ref_csv / f"{i:05d}_scores.csv").read_bytes()

    # stage vae killed mid-shard (after a checkpoint): no partial shard appears under the final
    # name, and the rerun encodes only the batch after the checkpoint
    import miro.encoders as enc

    real = enc.load_autoencoder

    class Counting:
        def __init__(self, codec, die_at=None):
            self.codec, self.n, self.die_at = codec, 0, die_at

        def encode(self, x):
            self.n += 1
            if self.n == self.die_at:
                raise KeyboardInterrupt("simulated kill")
            return self.codec.encode(x)

        def decode(self, z):
            return self.codec.decode(z)

    made = []

    def patched(die_at):
        def load(spec, **kw):
            made.append(Counting(real(spec, **kw), die_at))
            return made[-1]
        return load

    enc.load_autoencoder = patched(4)  # shard 0 takes 2 batches; dies in shard 1's 2nd batch
    try:
        with pytest.raises(KeyboardInterrupt):
            main(_vae_args(src, csv, dest, tiny_models, "--checkpoint-seconds", "0", res="16"))
        assert sorted(p.name for p in dest.iterdir()) == [".00001.tar.spool", "00000.tar"]
        # what a SIGKILL leaves besides the spool (a commit's temp file): removed on the rerun
        (dest / ".00001.tar.x2.tmp").write_bytes(b"partial")
        enc.load_autoencoder = patched(None)
        assert main(_vae_args(src, csv, dest, tiny_models, res="16")) == 0
        assert made[-1].n == 1  # shard 1's last batch only
    finally:
        enc.load_autoencoder = real
    assert sorted(p.name for p in dest.iterdir()) == ["00000.tar", "00001.tar"]
    assert not (csv / "logs" / "00001.vae.partial.json").exists()
    for i in range(2):
        assert (dest / f"{i:05d}.tar").read_bytes() == (ref_dest / f"{i:05d}.tar").read_bytes()
    # a deleted output is redone; so is a shard whose scores changed (a vqa rerun); others are skipped
    (dest / "00000.tar").unlink()
    assert main(_args(src, csv, "vqa", "--overwrite", "--shard_id", "1")) == 0
    logs = [(csv / "logs" / f"{i:05d}.vae.json").read_text() for i in range(2)]
    assert main(_vae_args(src, csv, dest, tiny_models, res="16")) == 0
    assert [(csv / "logs" / f"{i:05d}.vae.json").read_text() != logs[i] for i in range(2)] == [True, True]
    assert (dest / "00000.tar").read_bytes() == (ref_dest / "00000.tar").read_bytes()
    logs = [(csv / "logs" / f"{i:05d}.vae.json").read_text() for i in range(2)]
    assert main(_vae_args(src, csv, dest, tiny_models, res="16")) == 0
    assert [(csv / "logs" / f"{i:05d}.vae.json").read_text() for i in range(2)] == logs


def _corrupt_shard(path):
    good = jpeg_bytes(image(1))
    samples = [
        {"__key__": "ok1", "jpg": good, "txt": "two red circles", "json": {}},
        {"__key__": "cut", "jpg": good[:50], "txt": "a truncated jpeg"},
        {"__key__": "nocap", "jpg": good},
        {"__key__": "badjson", "jpg": good, "txt": "x", "json": b"{oops"},
        {"__key__": "narrow", "jpg": jpeg_bytes(image(3, (13, 20))), "txt": "ptest_chars fails on it"},
        {"__key__": "ok2", "png": image(2), "txt": "one green triangle"},
    ]
    write_shard(path, samples)


@pytest.mark.filterwarnings("ignore:shard .* is truncated or unreadable:UserWarning")  # asserted via the logs
def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, tiny_models):
    src, csv, dest = tmp_path / "raw", tmp_path / "csv", tmp_path / "out"
    src.mkdir()
    _corrupt_shard(src / "00000.tar")
    make_raw_shards(tmp_path / "tmp", n_shards=1, per_shard=4)
    data = (tmp_path / "tmp" / "00000.tar").read_bytes()
    (src / "00001.tar").write_bytes(data[: len(data) // 2])  # a truncated shard
    assert main(_args(src, csv, "rewards")) == 0
    log = json.loads((csv / "logs" / "00000.rewards.json").read_text())
    assert log["status"] == "complete" and log["samples_read"] == 6 and log["samples_ok"] == 2
    assert log["skipped"] == {"undecodable image": 1, "no .txt caption": 1, "unreadable .json": 1, "scoring failed": 1}
    assert any(e.startswith("narrow: scoring failed") for e in log["errors"])
    log1 = json.loads((csv / "logs" / "00001.rewards.json").read_text())
    assert log1["truncated"] and 0 < log1["samples_ok"] < 4
    assert main(_args(src, csv, "vqa")) == 0
    assert main(_vae_args(src, csv, dest, tiny_models)) == 0
    assert sorted(_read(dest / "00000.tar")) == ["ok1", "ok2"]
    assert "png" in _read(dest / "00000.tar")["ok2"]
    vlog = json.loads((csv / "logs" / "00000.vae.json").read_text())
    # the 'narrow' sample has VQA scores but no rewards (its scorer failed): skipped and named
    assert vlog["skipped"] == {"undecodable image": 1, "no .txt caption": 1, "unreadable .json": 1, "missing scores": 1}
    assert any(e.startswith("narrow: missing scores (ptest_red, ptest_words, ptest_chars") for e in vlog["errors"])
    assert len(_read(dest / "00001.tar")) == log1["samples_ok"]


def test_systematic_scorer_failure_fails_the_shard_not_the_job(tmp_path, capsys):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=2, per_shard=2)
    argv = _args(src, csv, "rewards")
    argv[argv.index("--scorers") + 1] = "ptest_red,ptest_broken"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "rewards 00000.tar failed: RuntimeError: always broken" in err and "00001.tar failed" in err
    assert not (csv / "00000_scores.csv").exists()
    assert json.loads((csv / "logs" / "00000.rewards.json").read_text())["status"] == "running"


def test_vae_stage_names_the_missing_stage(tmp_path, tiny_models, capsys):
    src, csv, dest = tmp_path / "raw", tmp_path / "csv", tmp_path / "out"
    make_raw_shards(src, n_shards=1, per_shard=2)
    assert main(_vae_args(src, csv, dest, tiny_models)) == 1
    assert "run `miro preprocess --stage rewards" in capsys.readouterr().err
    assert main(_args(src, csv, "rewards")) == 0
    assert main(_vae_args(src, csv, dest, tiny_models)) == 1
    assert "stage 'vqa' has not completed" in capsys.readouterr().err
    args = _vae_args(src, csv, dest, tiny_models)
    args[args.index("--vqa-scorer") + 1] = "none"
    assert main(args) == 0
    meta = _read(dest / "00000.tar")["s0k0"]["json"]
    assert "ptest_words" in meta and "ptest_vqa" not in meta


def test_dry_run_lists_work_without_loading_models(tmp_path, capsys):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=3, per_shard=1)
    assert main(_args(src, csv, "rewards", "--shard_id", "1")) == 0
    reset()
    capsys.readouterr()
    assert main(_args(src, csv, "rewards", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "rewards 00001.tar: complete, skipped" in out
    assert "rewards 00000.tar: to do" in out and "rewards 00002.tar: to do" in out
    assert CALLS == {} and not (csv / "00000_scores.csv").exists()


@pytest.mark.parametrize("flags, expected", [
    ([], [0, 1, 2, 3, 4]), (["--shard_id", "3"], [3]), (["--shard_ids", "0,4"], [0, 4]),
    (["--shard_range", "1-3"], [1, 2, 3]),
])
def test_shard_selection_flags(tmp_path, flags, expected):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=5, per_shard=1)
    assert main(_args(src, csv, "rewards", *flags)) == 0
    assert sorted(p.name for p in csv.glob("*_scores.csv")) == [f"{i:05d}_scores.csv" for i in expected]


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=2, per_shard=1)
    assert main(_args(src, csv, "rewards", "--shard_id", "7")) == 2
    assert "shard index 7 out of range: 2 shards" in capsys.readouterr().err
    assert main(_args(src, csv, "rewards", "--shard_range", "1-0")) == 2
    assert main(_args(src, csv, "all")) == 2
    assert "needs --dest" in capsys.readouterr().err
    assert main(_args(src, csv, "vae", dest=src)) == 2
    assert "is the source folder" in capsys.readouterr().err
    assert main(_args(src, csv, "rewards", "--scorer-kwargs", "[1]")) == 2
    assert main(_args(src, csv, "rewards", "--scorer-kwargs", '{"ptest_nope": {}}')) == 2
    assert "--scorer-kwargs names ['ptest_nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(_args(src, csv, "rewards", "--shard_id", "0", "--shard_range", "0-1"))
    assert e.value.code == 2 and "argument --shard_range: not allowed with argument --shard_id" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n")
    assert main(_args(src, csv, "rewards", "--synthetic_captions", str(bad))) == 2
    assert "expected 'file_name<TAB>short<TAB>long'" in capsys.readouterr().err
    bad.write_bytes(b"a\tb\tc\n\xff\tshort\tlong\n")
    assert main(_args(src, csv, "rewards", "--synthetic_captions", str(bad))) == 2
    assert "bad.tsv:2: not UTF-8 (invalid start byte at byte 0)" in capsys.readouterr().err
    assert main(_args(src, csv, "rewards", "--synthetic_captions", str(tmp_path / "none.tsv"))) == 2
    assert "--synthetic_captions " in capsys.readouterr().err
    # a file where a folder goes is named before any stage runs ('vae' failed every shard after 'rewards')
    (tmp_path / "afile").write_text("x")
    assert main(_args(src, csv, "all", dest=tmp_path / "afile")) == 2
    assert "--dest " in (err := capsys.readouterr().err) and "afile is a file, not a folder" in err
    assert main(_args(src, tmp_path / "afile" / "sub", "rewards")) == 2
    assert "--csv_dir " in (err := capsys.readouterr().err) and "afile is a file, not a folder" in err
    assert CALLS.get("ptest_words.load", 0) == 0
    assert main(_args(src, csv, "rewards", "--scorers", "no_such_reward")) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--shard_range" in capsys.readouterr().out


def test_resolution_defaults(tmp_path):
    from miro.data.preprocess import _parse_resolutions, build_parser

    p = build_parser()
    base = ["--stage", "vae", "--src", "x"]
    assert _parse_resolutions(p.parse_args(base), False) == (256, 512)
    assert _parse_resolutions(p.parse_args(base + ["--no_vae_512"]), False) == (256,)
    assert _parse_resolutions(p.parse_args(base), True) == ()
    assert _parse_resolutions(p.parse_args(base + ["--resolutions", "none"]), False) == ()
    with pytest.raises(ValueError, match="not a positive multiple of 8"):
        _parse_resolutions(p.parse_args(base + ["--resolutions", "20"]), False)


def test_published_reward_keys_with_tiny_real_scorers(tmp_path):
    """PickScore and SciScore code on a tiny CLIP: stored values = scorer score / 100, short caption."""
    from miro.rewards import load_scorer
    from test_preprocess_helpers import save_tiny_clip

    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=1, per_shard=3)
    clip = str(save_tiny_clip(tmp_path / "clip"))
    kw = {k: {"model": clip, "tokenizer": None, "image_size": 32} for k in ("pick_a_score_score", "sciscore_score")}
    argv = _args(src, csv, "rewards", "--scorer-kwargs", json.dumps(kw))
    argv[argv.index("--scorers") + 1] = "pick_a_score_score,sciscore_score"
    assert main(argv) == 0
    rows = pio.read_scores_csv(csv / "00000_scores.csv")
    raw = _read(src / "00000.tar")
    keys = sorted(raw)
    images = [raw[k]["jpg"] for k in keys]
    clean = [pio.clean_caption(raw[k]["txt"]) for k in keys]
    short = [raw[k]["json"].get("short_synthetic_caption", c) for k, c in zip(keys, clean)]
    for name in ("pick_a_score_score", "sciscore_score"):
        scorer = load_scorer(name, **kw[name])
        ref, ref_syn = scorer.score(images, clean) / 100, scorer.score(images, short) / 100
        for i, key in enumerate(keys):
            assert rows[key][name] == pytest.approx(ref[i].item(), rel=1e-4, abs=1e-6)
            assert rows[key][f"synthetic_{name}"] == pytest.approx(ref_syn[i].item(), rel=1e-4, abs=1e-6)
    assert len({rows[k]["pick_a_score_score"] for k in rows}) == 3  # really image/caption dependent


from test_rewards_vqascore import vqa_repos  # noqa: E402,F401  (a tiny CLIP-FlanT5 in the published format)


def test_vqa_stage_with_the_real_vqascore_code(tmp_path, vqa_repos):
    """Stage vqa through the real VQAScore (tiny CLIP-FlanT5): original + long synthetic caption."""
    from miro.rewards import load_scorer

    _, lean_dir, tok_dir, *_ = vqa_repos
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=1, per_shard=3)
    kw = {"vqa_score": {"model": str(lean_dir), "tokenizer": str(tok_dir)}}
    argv = _args(src, csv, "vqa", "--scorer-kwargs", json.dumps(kw))
    argv[argv.index("--vqa-scorer") + 1] = "vqa_score"
    assert main(argv) == 0
    rows = pio.read_scores_csv(csv / "00000_scores.csv")
    raw = _read(src / "00000.tar")
    keys = sorted(raw)
    clean = [pio.clean_caption(raw[k]["txt"]) for k in keys]
    long = [raw[k]["json"].get("synthetic_caption", c) for k, c in zip(keys, clean)]
    scorer = load_scorer("vqa_score", **kw["vqa_score"])
    ref, ref_long = scorer.score([raw[k]["jpg"] for k in keys], clean), scorer.score([raw[k]["jpg"] for k in keys], long)
    for i, k in enumerate(keys):
        assert 0 < rows[k]["vqa_score"] < 1
        assert rows[k]["vqa_score"] == pytest.approx(ref[i].item(), rel=1e-4)
        assert rows[k]["synthetic_vqa_score"] == pytest.approx(ref_long[i].item(), rel=1e-4)


def _write_tar(path, members):
    """A hand-built tar of ``(name, bytes)`` members in the given order (duplicates allowed)."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_bare_carriage_return_in_a_caption_and_an_unreadable_csv(tmp_path, tiny_models, capsys):
    """A caption holding a lone '\\r' round-trips through the CSV and every stage; a CSV the old
    writer broke fails each shard in one line naming the file and --overwrite, which rebuilds it
    (and stage vae then asks for the score stage whose columns were lost)."""
    src, csv, dest = tmp_path / "raw", tmp_path / "csv", tmp_path / "out"
    make_raw_shards(src, n_shards=1, per_shard=2, json_captions=False)
    shard = src / "00000.tar"
    samples = [decode_sample(r) for r in iter_raw_samples(shard)]
    samples[1]["json"]["synthetic_caption"] = "a red circle\rmore words"
    write_shard(shard, samples)
    capsys.readouterr()
    for stage in ("rewards", "vqa"):
        assert main(_args(src, csv, stage)) == 0
        # s0k0 has no synthetic caption: its stand-in (the original caption) is counted and said
        assert "1 without a synthetic caption (the original one stands in" in capsys.readouterr().out
        assert json.loads((csv / "logs" / f"00000.{stage}.json").read_text())["fallback_captions"] == 1
    assert pio.read_scores_csv(csv / "00000_scores.csv")["s0k1"]["synthetic_caption"] == "a red circle\rmore words"
    assert main(_vae_args(src, csv, dest, tiny_models, res="16")) == 0
    assert _read(dest / "00000.tar")["s0k1"]["json"]["synthetic_caption"] == "a red circle\rmore words"

    path = csv / "00000_scores.csv"
    path.write_bytes(b"key,ptest_red\ns0k0,0.5\rbroken\ns0k1,0.1\n")  # what the old writer left
    capsys.readouterr()
    assert main(_args(src, csv, "vqa")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "rerun stage 'vqa' with --overwrite" in err
    assert CALLS.get("ptest_vqa", 0) == 2  # the first run's 2 calls: no scoring was spent on the shard
    assert main(_args(src, csv, "rewards", "--overwrite")) == 0
    assert (csv / "00000_scores.csv.unreadable").is_file()
    assert "ptest_vqa" not in pio.read_scores_csv(path)["s0k0"]  # lost with the broken file...
    assert main(_vae_args(src, csv, dest, tiny_models, "--overwrite", res="16")) == 1
    assert "the scores of stage 'vqa' are no longer all in" in capsys.readouterr().err
    assert main(_args(src, csv, "vqa")) == 0  # ... and redone: its log no longer matches the CSV
    assert main(_vae_args(src, csv, dest, tiny_models, res="16")) == 0


def test_long_and_repeated_sample_keys(tmp_path, tiny_models):
    """A key too long for a ustar name is written (pax), not a failed shard; a repeated key is
    skipped as 'duplicate key' by every stage, the first sample kept."""
    src, csv, dest = tmp_path / "raw", tmp_path / "csv", tmp_path / "out"
    long_key = "k" * 90
    members = []
    for key, caption, seed in ((long_key, b"two red circles", 1), ("dup", b"one red star", 2),
                               ("other", b"a blue square", 3), ("dup", b"a second dup sample", 4)):
        members += [(f"{key}.jpg", jpeg_bytes(image(seed))), (f"{key}.txt", caption)]
    _write_tar(src / "00000.tar", members)
    for stage in ("rewards", "vqa"):
        assert main(_args(src, csv, stage)) == 0
        log = json.loads((csv / "logs" / f"00000.{stage}.json").read_text())
        assert (log["samples_read"], log["samples_ok"], log["skipped"]) == (4, 3, {"duplicate key": 1})
    rows = pio.read_scores_csv(csv / "00000_scores.csv")
    assert rows["dup"]["ptest_words"] == pytest.approx(3 / 100)  # the first 'dup', not overwritten
    assert main(_vae_args(src, csv, dest, tiny_models, res="16")) == 0
    got = _read(dest / "00000.tar")
    assert sorted(got) == sorted([long_key, "dup", "other"]) and got["dup"]["txt"] == "one red star"
    assert json.loads((csv / "logs" / "00000.vae.json").read_text())["skipped"] == {"duplicate key": 1}
    first = (dest / "00000.tar").read_bytes()
    assert main(_vae_args(src, csv, dest, tiny_models, "--overwrite", res="16")) == 0
    assert (dest / "00000.tar").read_bytes() == first  # reproducible, long names included
    assert sorted(p.name for p in dest.iterdir()) == ["00000.tar"]


def test_a_failed_vae_shard_without_saved_progress_leaves_no_spool(tmp_path, tiny_models, monkeypatch, capsys):
    src, csv, dest = tmp_path / "raw", tmp_path / "csv", tmp_path / "out"
    make_raw_shards(src, n_shards=1, per_shard=2)
    for stage in ("rewards", "vqa"):
        assert main(_args(src, csv, stage)) == 0

    def broken_commit(self):
        raise OSError("disk full")

    monkeypatch.setattr(pio.SortedShardWriter, "commit", broken_commit)
    assert main(_vae_args(src, csv, dest, tiny_models, res="16")) == 1
    assert "vae 00000.tar failed: OSError: disk full" in capsys.readouterr().err
    assert list(dest.iterdir()) == []


@pytest.mark.filterwarnings("ignore:shard .* is truncated or unreadable:UserWarning")
def test_a_source_that_is_not_a_readable_tar_fails_its_shard(tmp_path, capsys):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=1, per_shard=2)
    (src / "c.tar").write_bytes(b"garbage, not a tar " * 50)
    (src / "d.tar").write_bytes(b"")
    for _ in range(2):  # and not 'complete' on a rerun either
        assert main(_args(src, csv, "rewards")) == 1
        err = capsys.readouterr().err
        assert "rewards c.tar failed: UnreadableShardError:" in err and "c.tar is not a readable tar" in err
        assert "rewards d.tar failed: UnreadableShardError:" in err
    assert json.loads((csv / "logs" / "00000.rewards.json").read_text())["status"] == "complete"
    assert not (csv / "c_scores.csv").exists() and not (csv / "d_scores.csv").exists()
    afile = tmp_path / "afile"
    afile.write_text("just some text\n")
    assert main(_args(afile, csv, "rewards")) == 1
    assert "afile is not a readable tar" in capsys.readouterr().err


def test_device_and_scorer_kwargs_errors_are_one_line(tmp_path, capsys):
    from miro.rewards import load_scorer

    src, csv = tmp_path / "raw", tmp_path / "csv"
    make_raw_shards(src, n_shards=1, per_shard=1)
    cases = [(["--device", "nonsense"], "--device 'nonsense' is not a device; use cpu, cuda, cuda:N or mps"),
             (["--scorer-kwargs", '{"ptest_red": {"bogus": 1}}'], "reward 'ptest_red' takes no argument 'bogus'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device 'cuda': CUDA is not available"))
    for extra, message in cases:
        assert main(_args(src, csv, "rewards", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert CALLS == {}
    with pytest.raises(ValueError, match=r"reward 'shapes_alignment' takes no argument 'bogus'; it takes: detector, "):
        load_scorer("shapes_alignment", bogus=1)


def test_shard_ids_empty_or_repeated(tmp_path, capsys):
    from miro.data.schema import select_shards

    src, csv = tmp_path / "raw", tmp_path / "csv"
    shards = make_raw_shards(src, n_shards=3, per_shard=1)
    assert select_shards(shards, shard_ids="1,1,0,1") == [shards[1], shards[0]]
    assert main(_args(src, csv, "rewards", "--shard_ids", "1,1")) == 0
    assert capsys.readouterr().out.count("00001.tar") == 1  # processed once, not then 'complete, skipped'
    assert main(_args(src, csv, "rewards", "--shard_ids", ",")) == 2
    assert "--shard_ids ',' selects no shard" in capsys.readouterr().err


def _documented_commands(text: str) -> list[str]:
    """The ``miro preprocess`` command lines of the markdown's bash blocks, continuations joined."""
    import re

    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("miro preprocess"):
                lines.append(line)
    return lines


def test_documented_commands_run_with_the_default_rewards():
    """Every documented `miro preprocess` command builds the rewards its stages use (no weights
    are loaded): clip_score's jina-clip-v2 needs the explicit --trust-remote-code."""
    import re
    import shlex
    from pathlib import Path

    from miro.data.preprocess import _csv_list, build_parser
    from miro.rewards import load_scorer, scorer_kwargs_from_cli

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "preprocessing.md").read_text()
    commands = _documented_commands(text) + _documented_commands((root / "README.md").read_text())
    assert len(commands) >= 8
    for line in commands:
        for stage in ("rewards", "vqa", "vae"):
            argv = shlex.split(line.replace("$STAGE", stage).replace("$START-$END", "0-1"))[2:]
            args = build_parser().parse_args(argv)
            if args.stage not in ("all", "rewards"):
                continue
            names = _csv_list(args.scorers)
            kwargs = scorer_kwargs_from_cli(args.scorer_kwargs, names, args.trust_remote_code)
            for name in names:
                load_scorer(name, **kwargs.get(name, {}))  # clip_score: ValueError without the flag
    launcher = re.search(r"```python\n(# launch_preprocess.py.*?)```", text, flags=re.S).group(1)
    assert '"--trust-remote-code"' in launcher


def test_vae_writes_only_the_current_score_stages_columns(tmp_path, tiny_models):
    """A scorer dropped from --scorers (or a vqa run before --vqa-scorer none) leaves its column in
    the CSV: the enriched JSON takes the columns the score stages' logs name, not every column."""
    src, csv, dest = tmp_path / "raw", tmp_path / "csv", tmp_path / "out"
    make_raw_shards(src, n_shards=1, per_shard=2)
    for stage in ("rewards", "vqa"):
        assert main(_args(src, csv, stage)) == 0
    a = ["--stage", "rewards", "--src", str(src), "--csv_dir", str(csv), "--scorers", "ptest_red",
         "--no-progress", "--batch-size", "2", "--num-workers", "0"]
    assert main(a) == 0  # ptest_words and ptest_chars stay in the CSV, scored by the earlier run
    assert "ptest_words" in pio.read_scores_csv(csv / "00000_scores.csv")["s0k0"]
    assert main(_vae_args(src, csv, dest, tiny_models, "--vqa-scorer", "none", res="16")) == 0
    meta = _read(dest / "00000.tar")["s0k0"]["json"]
    assert "ptest_red" in meta and "synthetic_ptest_red" in meta
    assert not {"ptest_words", "ptest_chars", "ptest_vqa", "synthetic_ptest_vqa"} & set(meta)
