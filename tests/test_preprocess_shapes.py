"""``miro preprocess`` on the Shapes world: Shapes rewards + MiniLM + identity codec, real code."""

from __future__ import annotations

import numpy as np
import pytest

from miro.data import preprocess_io as pio
from miro.data.preprocess import main
from miro.data.schema import decode_sample, iter_raw_samples

SHAPES_SCORERS = "shapes_alignment,shapes_counting,shapes_position,shapes_sharpness,shapes_contrast"


def _read(path):
    return {s["__key__"]: s for s in (decode_sample(r) for r in iter_raw_samples(path))}


@pytest.fixture(scope="module")
def shapes_raw(tmp_path_factory):
    from miro.shapes.dataset import DatasetConfig, make_dataset

    out = tmp_path_factory.mktemp("shapes")
    make_dataset(out, DatasetConfig(num_samples=6, shard_size=3, seed=3), progress=False)
    return out


def test_shapes_world_preprocess_matches_the_dataset_writer(shapes_raw, tmp_path):
    from miro.encoders import load_text_encoder

    csv, dest = tmp_path / "csv", tmp_path / "out"
    argv = ["--stage", "all", "--src", str(shapes_raw), "--csv_dir", str(csv), "--dest", str(dest),
            "--scorers", SHAPES_SCORERS, "--vqa-scorer", "none", "--text-encoder", "minilm",
            "--autoencoder", "identity", "--no-progress", "--batch-size", "4"]
    assert main(argv) == 0
    minilm = load_text_encoder("minilm")
    shards = sorted(shapes_raw.glob("*.tar"))
    assert [p.name for p in sorted(dest.glob("*.tar"))] == [p.name for p in shards]
    for shard in shards:
        src, out = _read(shard), _read(dest / shard.name)
        assert sorted(out) == sorted(src)
        for key, s in out.items():
            # identity codec: pixel-space training reads the image, so no latent members
            assert {k for k in s if not k.startswith("__")} == {
                "png", "txt", "json", "minilm_embeddings.npy", "synthetic_minilm_embeddings.npy"}
            meta, ref = s["json"], src[key]["json"]
            # the writer scored the web caption and the long synthetic caption with the same rewards
            for k in SHAPES_SCORERS.split(","):
                assert meta[k] == pytest.approx(ref[k], abs=1e-6)
                assert meta[f"synthetic_{k}"] == pytest.approx(ref[f"synthetic_{k}"], abs=1e-6)
            assert meta["metadata"] == ref["metadata"] and meta["synthetic_caption"] == ref["synthetic_caption"]
            emb = s["synthetic_minilm_embeddings.npy"]
            e, m = minilm.encode([ref["synthetic_caption"]])
            assert emb.dtype == np.float16 and emb.shape == (int(m.sum()), 384)
            np.testing.assert_allclose(emb.astype(np.float32), e[0, m[0]].numpy(), atol=3e-3, rtol=2e-3)


def test_shapes_identity_latents_on_request(shapes_raw, tmp_path):
    csv, dest = tmp_path / "csv", tmp_path / "out"
    base = ["--src", str(shapes_raw), "--csv_dir", str(csv), "--shard_id", "1", "--no-progress",
            "--scorers", "shapes_sharpness", "--vqa-scorer", "none"]
    assert main(["--stage", "rewards", *base]) == 0
    assert main(["--stage", "vae", *base, "--dest", str(dest), "--text-encoder", "minilm",
                 "--autoencoder", "identity", "--resolutions", "16"]) == 0
    src = _read(sorted(shapes_raw.glob("*.tar"))[1])
    for key, s in _read(dest / sorted(shapes_raw.glob("*.tar"))[1].name).items():
        mean, std = s["vae_embeddings_mean_16.npy"], s["vae_embeddings_std_16.npy"]
        expected = pio.to_model_input(src[key]["png"], 16).astype(np.float16)
        assert mean.shape == (3, 16, 16) and np.array_equal(mean, expected) and not std.any()
        assert s["json"]["shapes_sharpness"] == s["json"]["synthetic_shapes_sharpness"]


def test_isolate_stages_runs_each_stage_as_a_child_command(shapes_raw, tmp_path, monkeypatch):
    """--isolate-stages: one `python -m miro.cli preprocess --stage X ...` per stage, same arguments.

    The children run in-process here (starting three interpreters costs more than the test); the
    command itself is checked to start with a real interpreter below."""
    import subprocess
    import sys

    ran = []

    def fake_run(cmd, check=False):
        assert cmd[:4] == [sys.executable, "-m", "miro.cli", "preprocess"]
        ran.append(cmd[4:])
        return subprocess.CompletedProcess(cmd, main(cmd[4:]))

    monkeypatch.setattr(subprocess, "run", fake_run)
    base = ["--src", str(shapes_raw), "--csv_dir", str(tmp_path / "csv"), "--dest", str(tmp_path / "out"),
            "--scorers", "shapes_sharpness", "--vqa-scorer", "none", "--text-encoder", "minilm",
            "--autoencoder", "identity", "--no-progress"]
    assert main(["--stage", "all", "--isolate-stages", *base]) == 0
    # --vqa-scorer none: no vqa child (`--stage vqa --vqa-scorer none` has nothing to do)
    assert ran == [["--stage", s, *base] for s in ("rewards", "vae")]
    assert len(list((tmp_path / "out").glob("*.tar"))) == 2
    assert main(["--stage", "vae", "--isolate-stages", *base]) == 2
    monkeypatch.undo()
    done = subprocess.run([sys.executable, "-m", "miro.cli", "preprocess", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--isolate-stages" in done.stdout


@pytest.mark.parametrize("drop, extra, message", [
    ("--dest", [], "needs --dest"),
    (None, ["--batch-size", "0"], "--batch-size must be >= 1"),
    (None, ["--num-workers", "-1"], "--num-workers must be >= 0"),
    (None, ["--checkpoint-seconds", "-5"], "--checkpoint-seconds must be >= 0"),
    (None, ["--shard_id", "9"], "shard index 9 out of range"),
    (None, ["--shard_ids", ","], "selects no shard"),
    (None, ["--device", "nonsense"], "--device 'nonsense' is not a device"),
    ("--src", ["--src", "/nonexistent/raw"], "does not exist"),
])
def test_isolate_stages_checks_every_argument_before_the_first_child(shapes_raw, tmp_path, monkeypatch, capsys,
                                                                     drop, extra, message):
    """A bad argument of any stage exits 2 in one line before the first child runs (not after the
    rewards and vqa stages have run in full)."""
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a child process was started"))
    argv = ["--stage", "all", "--isolate-stages", "--src", str(shapes_raw), "--csv_dir", str(tmp_path / "csv"),
            "--dest", str(tmp_path / "out"), "--scorers", "shapes_sharpness", "--vqa-scorer", "none",
            "--text-encoder", "minilm", "--autoencoder", "identity", "--no-progress"]
    if drop:
        i = argv.index(drop)
        del argv[i:i + 2]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_vqa_stage_without_a_vqa_reward_and_abbreviations_are_refused(shapes_raw, tmp_path, capsys):
    base = ["--src", str(shapes_raw), "--csv_dir", str(tmp_path / "csv"), "--no-progress"]
    assert main(["--stage", "vqa", "--vqa-scorer", "none", *base]) == 2
    assert "--stage vqa with --vqa-scorer none has nothing to do" in capsys.readouterr().err
    # an abbreviation (--isolate) would pass through to the children of --isolate-stages
    with pytest.raises(SystemExit) as e:
        main(["--stage", "all", "--isolate", *base])
    assert e.value.code == 2 and "unrecognized arguments: --isolate" in capsys.readouterr().err


def _png(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _shapes_plus_tiny(shapes_raw, folder):
    """Shard 0 of the Shapes fixture (3 samples) followed by one 1x1 image that the Shapes
    detector cannot read."""
    from PIL import Image

    from miro.data.schema import write_shard

    raws = list(iter_raw_samples(sorted(shapes_raw.glob("*.tar"))[0]))
    samples = [{k: v for k, v in r.items() if k != "__url__"} for r in raws]
    samples.append({"__key__": "zz_tiny", "png": _png(Image.new("RGB", (1, 1))), "txt": b"one red circle"})
    folder.mkdir()
    write_shard(folder / "00000.tar", samples)
    return [r["__key__"] for r in raws]


@pytest.mark.parametrize("batch_size", ["3", "1"])
def test_one_bad_sample_alone_in_a_batch_is_skipped_not_the_shard(shapes_raw, tmp_path, batch_size):
    """The 1x1 sample is a final batch of one (--batch-size 3) or every batch is one sample
    (--batch-size 1): it is skipped as 'scoring failed' and the shard completes."""
    import json

    src, csv = tmp_path / "raw", tmp_path / "csv"
    good = _shapes_plus_tiny(shapes_raw, src)
    assert main(["--stage", "rewards", "--src", str(src), "--csv_dir", str(csv), "--scorers", "shapes_alignment",
                 "--vqa-scorer", "none", "--no-progress", "--batch-size", batch_size]) == 0
    log = json.loads((csv / "logs" / "00000.rewards.json").read_text())
    assert (log["status"], log["samples_ok"], log["skipped"]) == ("complete", 3, {"scoring failed": 1})
    assert any(e.startswith("zz_tiny: scoring failed (ValueError: image too small") for e in log["errors"])
    assert sorted(pio.read_scores_csv(csv / "00000_scores.csv")) == sorted(good)


def test_a_scorer_failing_on_every_sample_fails_the_shard_with_batches_of_one(tmp_path, capsys):
    """Nothing of the shard scored: systematic, even when no batch held two samples."""
    from PIL import Image

    from miro.data.schema import write_shard

    src, csv = tmp_path / "raw", tmp_path / "csv"
    src.mkdir()
    write_shard(src / "00000.tar", [{"__key__": f"k{i}", "png": _png(Image.new("RGB", (1, 1))), "txt": "a circle"}
                                    for i in range(2)])
    assert main(["--stage", "rewards", "--src", str(src), "--csv_dir", str(csv), "--scorers", "shapes_alignment",
                 "--vqa-scorer", "none", "--no-progress", "--batch-size", "1"]) == 1
    assert "rewards 00000.tar failed: ValueError: image too small" in capsys.readouterr().err
    assert not (csv / "00000_scores.csv").exists()


def test_changed_scorer_kwargs_or_precision_redo_the_shard(shapes_raw, tmp_path, capsys):
    """--scorer-kwargs and --precision change scores: a rerun with other values is not 'complete'
    (like any other config change); arguments that only permit a download do not count."""
    import json

    base = ["--stage", "rewards", "--src", str(shapes_raw), "--csv_dir", str(tmp_path / "csv"), "--shard_id", "0",
            "--scorers", "shapes_sharpness", "--vqa-scorer", "none", "--no-progress"]

    def processed(*extra) -> bool:
        capsys.readouterr()
        assert main([*base, *extra]) == 0
        return "1 shard(s) processed" in capsys.readouterr().out

    assert processed()
    assert not processed()
    kw = {"shapes_sharpness": {"batch_size": 8}}
    assert processed("--scorer-kwargs", json.dumps(kw))
    assert not processed("--scorer-kwargs", json.dumps(kw))
    kw["shapes_sharpness"]["local_files_only"] = True  # where weights come from, not what is scored
    assert not processed("--scorer-kwargs", json.dumps(kw))
    assert processed("--scorer-kwargs", json.dumps(kw), "--precision", "bf16")
    assert processed()  # back to the defaults: redone again


def test_no_synthetic_drops_every_synthetic_key_from_the_json(shapes_raw, tmp_path):
    """The source JSON's synthetic captions and synthetic_* rewards, and the synthetic_* columns a
    synthetic rewards run left in the CSV, stay out of the enriched JSON under --no-synthetic."""
    csv, dest = tmp_path / "csv", tmp_path / "out"
    base = ["--src", str(shapes_raw), "--csv_dir", str(csv), "--shard_id", "0", "--no-progress",
            "--scorers", "shapes_sharpness", "--vqa-scorer", "none"]
    assert main(["--stage", "rewards", *base]) == 0  # with synthetic columns
    shard = sorted(shapes_raw.glob("*.tar"))[0]
    rows = pio.read_scores_csv(csv / f"{shard.stem}_scores.csv")
    assert all("synthetic_shapes_sharpness" in r for r in rows.values())
    src = _read(shard)
    assert all("synthetic_caption" in s["json"] for s in src.values())  # the fixture has them
    assert main(["--stage", "vae", *base, "--no-synthetic", "--dest", str(dest), "--text-encoder", "minilm",
                 "--autoencoder", "identity"]) == 0
    for key, s in _read(dest / shard.name).items():
        meta = s["json"]
        assert not [k for k in meta if k.startswith("synthetic_") or k == "short_synthetic_caption"], key
        assert meta["shapes_sharpness"] == pytest.approx(rows[key]["shapes_sharpness"])
        assert meta["metadata"] == src[key]["json"]["metadata"]  # everything else of the source JSON kept
        assert "synthetic_minilm_embeddings.npy" not in s
    # a --no-synthetic rewards rerun also drops its own stale synthetic columns from the CSV
    assert main(["--stage", "rewards", *base, "--no-synthetic"]) == 0
    rows = pio.read_scores_csv(csv / f"{shard.stem}_scores.csv")
    assert all("synthetic_shapes_sharpness" not in r for r in rows.values())
