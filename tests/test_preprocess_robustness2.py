"""``miro preprocess`` robustness: stale vae checkpoints, captions that differ between the score
stages, --no-synthetic score stages under a synthetic vae, killed --isolate-stages children, the
SLURM recipe, hidden shards, empty --resolutions and tars whose samples are not contiguous.

Stage objects run directly with stand-in models where the CLI would load real ones (a fake text
encoder, the identity codec), so every test is cheap.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from miro.data import preprocess_io as pio
from miro.data.encode_stage import EncodeSpec, EncodeStage, MissingStageError
from miro.data.preprocess import main
from miro.data.stages import ScoreStage, StageOptions
from test_preprocess_helpers import SCORERS, Redness, Words, image, jpeg_bytes, make_raw_shards, reset


@pytest.fixture(autouse=True)
def _reset():
    reset()
    yield
    reset()


def _args(src, csv, stage, *extra):
    return ["--stage", stage, "--src", str(src), "--csv_dir", str(csv), "--scorers", SCORERS,
            "--vqa-scorer", "ptest_vqa", "--no-progress", "--batch-size", "2", "--num-workers", "0", *extra]


class FakeTextEncoder:
    """Embeddings from the prompt's length; raises KeyboardInterrupt (a kill) at call ``die_at``."""

    schema_name = "fake"

    def __init__(self, die_at: int | None = None, value: float | None = None):
        self.n, self.die_at, self.value = 0, die_at, value

    def encode(self, prompts):
        self.n += 1
        if self.n == self.die_at:
            raise KeyboardInterrupt("simulated kill")
        emb = torch.tensor([[[float(len(p)), i, j, 1.0] for j in range(3)] for i, p in enumerate(prompts)])
        if self.value is not None:
            emb.fill_(self.value)
        return emb, torch.ones(len(prompts), 3, dtype=torch.bool)


def _vae(csv, dest, res=(16,), enc=None, synthetic=True, **kw):
    from miro.encoders import IdentityCodec

    opts = StageOptions(csv_dir=csv, dest=dest, batch_size=2, progress=False, synthetic=synthetic, **kw)
    return EncodeStage(enc or FakeTextEncoder(), IdentityCodec(), EncodeSpec(resolutions=res,
                       required_stages=("rewards",)), opts)


# --------------------------------------------------------------------------- 1. stale vae checkpoint


def test_a_vae_run_that_starts_afresh_never_leaves_a_checkpoint_for_its_spool(tmp_path, monkeypatch):
    """Run A (16 px) is killed after a checkpoint; run B (32 px: another config) starts afresh and
    is SIGKILLed before its first checkpoint, leaving its spool; run C (A's config again) must not
    resume A's index into B's bytes (a corrupt tar marked complete)."""
    shard = make_raw_shards(tmp_path / "raw", n_shards=1, per_shard=6)[0]
    csv = tmp_path / "csv"
    ScoreStage("rewards", {"ptest_red": Redness()}, StageOptions(csv_dir=csv, progress=False)).run_shard(shard)
    _vae(csv, tmp_path / "ref").run_shard(shard)
    ref = (tmp_path / "ref" / shard.name).read_bytes()

    dest = tmp_path / "out"
    a = _vae(csv, dest, enc=FakeTextEncoder(die_at=3), checkpoint_seconds=0)  # dies in batch 2, after batch 1's save
    with pytest.raises(KeyboardInterrupt):
        a.run_shard(shard)
    ckpt = a.checkpoint_path(shard)
    assert ckpt.is_file() and (dest / f".{shard.name}.spool").is_file()

    # a SIGKILL runs no cleanup: the spool stays although no checkpoint of run B refers to it
    monkeypatch.setattr(pio.SortedShardWriter, "abort", pio.SortedShardWriter.close)
    b = _vae(csv, dest, res=(32,), enc=FakeTextEncoder(die_at=5), checkpoint_seconds=1e9)
    with pytest.raises(KeyboardInterrupt):
        b.run_shard(shard)
    monkeypatch.undo()
    assert not ckpt.exists()  # deleted before B recreated the spool

    c = _vae(csv, dest)
    c.run_shard(shard)
    assert (dest / shard.name).read_bytes() == ref
    assert c.is_complete(shard)


def test_a_writer_state_never_resumes_into_a_spool_another_run_recreated(tmp_path):
    out = tmp_path / "x.tar"
    w = pio.SortedShardWriter(out)
    w.write({"__key__": "k0", "txt": "a first caption"})
    state = json.loads(json.dumps(w.checkpoint()))
    w.close()
    other = pio.SortedShardWriter(out)  # a later run started afresh over the same spool name
    other.write({"__key__": "k9", "txt": "another run's bytes, longer than the first"})
    other.checkpoint()
    other.close()
    with pytest.raises(ValueError, match="x.tar: its spool belongs to another run"):
        pio.SortedShardWriter(out, resume=state)
    legacy = {k: v for k, v in state.items() if k != "run_id"}  # a checkpoint written before run ids
    with pytest.raises(ValueError, match="belongs to another run"):
        pio.SortedShardWriter(out, resume=legacy)


# --------------------------------------------------------------------------- 2. captions of the two score stages


def test_score_stages_that_resolved_other_captions_are_refused(tmp_path, capsys):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    shard = make_raw_shards(src, n_shards=1, per_shard=2)[0]  # s0k1 has no JSON captions
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("s0k1.jpg\tshort from tsv\tlong from the tsv red\n")
    assert main(_args(src, csv, "rewards", "--synthetic_captions", str(tsv))) == 0
    before = (csv / "00000_scores.csv").read_bytes()
    capsys.readouterr()
    assert main(_args(src, csv, "vqa")) == 1  # no TSV: s0k1's captions are its original caption
    err = capsys.readouterr().err
    assert "sample 's0k1': stage 'vqa' resolved" in err and "the caption on which stage 'rewards' computed" in err
    assert "give both score stages the same --synthetic_captions" in err
    assert (csv / "00000_scores.csv").read_bytes() == before
    assert main(_args(src, csv, "vqa", "--synthetic_captions", str(tsv))) == 0  # the same TSV: fine
    rows = pio.read_scores_csv(csv / "00000_scores.csv")
    assert rows["s0k1"]["synthetic_caption"] == "long from the tsv red" and rows["s0k1"]["synthetic_ptest_vqa"] == 1.0

    # a deliberate change: --overwrite replaces the captions and drops the other stage's synthetic
    # values of the changed sample, so that stage 'vae' asks for that stage again
    assert main(_args(src, csv, "vqa", "--overwrite")) == 0
    assert "rerun stage 'rewards'" in capsys.readouterr().err
    rows = pio.read_scores_csv(csv / "00000_scores.csv")
    assert rows["s0k1"]["synthetic_caption"] == "a blue square above a  star"  # its original caption, cleaned
    assert rows["s0k1"].get("synthetic_ptest_words") is None and rows["s0k0"]["synthetic_ptest_words"] is not None
    with pytest.raises(MissingStageError, match="the scores of stage 'rewards' are no longer all in"):
        _vae(csv, tmp_path / "out").check_inputs(shard)


def test_the_merge_refuses_captions_that_changed_under_the_other_stage(tmp_path):
    """The check under the lock: the other stage merged after this one read the CSV at start."""
    path = tmp_path / "x_scores.csv"
    pio.write_scores_csv(path, {"a": {"r": 0.1, "synthetic_r": 0.2, "synthetic_caption": "long A",
                                      "short_synthetic_caption": "short A"},
                                "b": {"r": 0.3, "synthetic_r": 0.4, "synthetic_caption": "long B",
                                      "short_synthetic_caption": "short B"}})
    cols = ["v", "synthetic_v", "synthetic_caption", "short_synthetic_caption"]
    new = {"a": {"v": 1.0, "synthetic_v": 1.0, "synthetic_caption": "long A", "short_synthetic_caption": "short A"},
           "b": {"v": 0.0, "synthetic_v": 0.0, "synthetic_caption": "long B", "short_synthetic_caption": "other"}}
    with pytest.raises(pio.CaptionConflictError, match=r"sample 'b': stage 'vqa' resolved short_synthetic_caption "
                                                       r"'other' differs from the CSV's 'short B'.*stage 'rewards'"):
        pio.merge_scores_csv(path, new, cols, stage="vqa", other="rewards")
    pio.merge_scores_csv(path, new, cols, rebuild=True, stage="vqa", other="rewards")
    rows = pio.read_scores_csv(path)
    assert rows["a"]["synthetic_r"] == 0.2 and rows["b"]["synthetic_r"] is None and rows["b"]["r"] == 0.3
    # no synthetic value of another stage depends on the stored captions: replaced silently
    pio.write_scores_csv(path, {"a": {"r": 0.1, "synthetic_caption": "old", "short_synthetic_caption": "old"}})
    pio.merge_scores_csv(path, {"a": {"v": 1.0, "synthetic_v": 1.0, "synthetic_caption": "new",
                                      "short_synthetic_caption": "new"}}, cols)
    assert pio.read_scores_csv(path)["a"]["synthetic_caption"] == "new"


# --------------------------------------------------------------------------- 3. --no-synthetic score stages


def test_vae_refuses_synthetic_embeddings_over_a_no_synthetic_score_stage(tmp_path):
    shard = make_raw_shards(tmp_path / "raw", n_shards=1, per_shard=2)[0]
    csv = tmp_path / "csv"
    ScoreStage("rewards", {"ptest_words": Words()},
               StageOptions(csv_dir=csv, progress=False, synthetic=False)).run_shard(shard)
    with pytest.raises(MissingStageError, match="stage 'rewards' ran with --no-synthetic.*rerun stage 'rewards' "
                                                "without --no-synthetic, or run stage 'vae' with --no-synthetic"):
        _vae(csv, tmp_path / "out").check_inputs(shard)
    _vae(csv, tmp_path / "out", synthetic=False).run_shard(shard)  # consistent: nothing synthetic anywhere
    # the other way round is fine: a --no-synthetic vae drops the synthetic columns
    ScoreStage("rewards", {"ptest_words": Words()}, StageOptions(csv_dir=csv, progress=False)).run_shard(shard)
    _vae(csv, tmp_path / "out2", synthetic=False).run_shard(shard)


# --------------------------------------------------------------------------- 4. --isolate-stages


def test_isolate_stages_stops_at_a_child_killed_by_a_signal(tmp_path, monkeypatch, capsys):
    import subprocess

    make_raw_shards(tmp_path / "raw", n_shards=1, per_shard=1)
    ran = []

    def killed(cmd, check=False):
        ran.append(cmd[cmd.index("--stage") + 1])
        return subprocess.CompletedProcess(cmd, -9)  # SIGKILL (the OOM killer)

    monkeypatch.setattr(subprocess, "run", killed)
    argv = _args(tmp_path / "raw", tmp_path / "csv", "all", "--isolate-stages", "--dest", str(tmp_path / "out"),
                 "--text-encoder", "minilm", "--autoencoder", "identity")
    assert main(argv) == 128 + 9
    assert ran == ["rewards"]  # the next stages would only find its outputs missing
    assert "miro preprocess: stage rewards killed by signal 9" in capsys.readouterr().err


# --------------------------------------------------------------------------- 5. SLURM recipe


def test_the_slurm_recipe_chains_stages_with_afterany():
    """`miro preprocess` exits 1 when one shard of a block failed: aftercorr would strand the
    whole block's next stage; vae itself refuses shards whose scores are not complete."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "preprocessing.md").read_text()
    chain = [line for line in text.splitlines() if "--dependency=" in line]
    assert len(chain) == 2 and all("--dependency=afterany:" in line for line in chain)
    assert "aftercorr:" not in text


# --------------------------------------------------------------------------- 6. shard listing


def test_hidden_files_and_folders_named_tar_are_no_shards(tmp_path, capsys):
    from miro.data.schema import list_shards

    src = tmp_path / "raw"
    shards = make_raw_shards(src, n_shards=2, per_shard=1)
    (src / "._00000.tar").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (src / "a_folder.tar").mkdir()
    assert list_shards(src) == shards
    assert main(_args(src, tmp_path / "csv", "rewards", "--shard_id", "1")) == 0
    assert (tmp_path / "csv" / "00001_scores.csv").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden.tar").write_bytes(b"")
    capsys.readouterr()
    assert main(_args(empty, tmp_path / "csv", "rewards", "--shard_id", "3")) == 2
    err = capsys.readouterr().err
    assert f"no *.tar shards in {empty}" in err and "out of range" not in err


# --------------------------------------------------------------------------- 7. --resolutions


@pytest.mark.parametrize("extra, message", [
    (["--resolutions", ""], "--resolutions '' lists no resolution"),
    (["--resolutions", ","], "--resolutions ',' lists no resolution"),
    (["--resolutions", "512", "--no_vae_512"], "--no_vae_512 leaves no latent resolution of --resolutions '512'"),
])
def test_a_resolution_list_that_names_no_size_is_refused(extra, message):
    from miro.data.preprocess import _parse_resolutions, build_parser

    args = build_parser().parse_args(["--stage", "vae", "--src", "x", *extra])
    with pytest.raises(ValueError, match="'none'|--resolutions none") as e:
        _parse_resolutions(args, False)
    assert message in str(e.value)
    assert _parse_resolutions(build_parser().parse_args(["--stage", "vae", "--src", "x", "--no_vae_512"]), True) == ()


# --------------------------------------------------------------------------- 8. non-contiguous members


def _write_tar(path: Path, members) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_tar_whose_sample_members_are_not_together_fails_its_shard(tmp_path, capsys):
    src, csv = tmp_path / "raw", tmp_path / "csv"
    # what `tar cf 00000.tar *.jpg *.txt` builds: every image, then every caption
    _write_tar(src / "00000.tar", [(f"k{i}.jpg", jpeg_bytes(image(i))) for i in range(4)]
               + [(f"k{i}.txt", f"caption {i} red".encode()) for i in range(4)])
    assert main(_args(src, csv, "rewards")) == 1
    err = capsys.readouterr().err
    assert "none of its 8 samples could be used (sample members not contiguous: 8); first: k0: sample members " \
           "not contiguous" in err
    assert json.loads((csv / "logs" / "00000.rewards.json").read_text())["status"] == "running"
    assert not (csv / "00000_scores.csv").exists()
    # one split key among whole samples: named and skipped, the others scored; a repeated whole
    # sample stays a 'duplicate key'
    good = jpeg_bytes(image(1))
    _write_tar(src / "00000.tar", [("a.jpg", good), ("a.txt", b"a"), ("s.jpg", good), ("b.jpg", good),
                                   ("b.txt", b"b"), ("s.txt", b"s"), ("a.jpg", good), ("a.txt", b"again")])
    report = pio.ShardReport("t", "00000.tar")
    assert [x.key for x, _ in pio.iter_decoded(src / "00000.tar", report)] == ["a", "b"]
    assert report.skipped == {"sample members not contiguous": 2, "duplicate key": 1}
    assert report.errors[0].startswith("s: sample members not contiguous")
    assert main(_args(src, csv, "rewards")) == 0


def test_a_vae_shard_that_writes_no_sample_of_those_it_read_fails(tmp_path):
    shard = make_raw_shards(tmp_path / "raw", n_shards=1, per_shard=2)[0]
    csv, dest = tmp_path / "csv", tmp_path / "out"
    ScoreStage("rewards", {"ptest_red": Redness()}, StageOptions(csv_dir=csv, progress=False)).run_shard(shard)
    stage = _vae(csv, dest, enc=FakeTextEncoder(value=float("nan")))  # every embedding non-finite
    with pytest.raises(pio.NoUsableSampleError, match=r"00000.tar: none of its 2 samples could be used "
                                                      r"\(non-finite embedding: 2\)"):
        stage.run_shard(shard)
    assert not (dest / shard.name).exists() and not stage.is_complete(shard)
    assert [p.name for p in dest.iterdir()] == []
