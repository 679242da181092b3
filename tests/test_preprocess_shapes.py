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
    assert ran == [["--stage", s, *base] for s in ("rewards", "vqa", "vae")]
    assert len(list((tmp_path / "out").glob("*.tar"))) == 2
    assert main(["--stage", "vae", "--isolate-stages", *base]) == 2
    monkeypatch.undo()
    done = subprocess.run([sys.executable, "-m", "miro.cli", "preprocess", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--isolate-stages" in done.stdout
