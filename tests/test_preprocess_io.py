"""Model-free building blocks of ``miro preprocess``: captions, CSVs, tar writer, transforms."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from miro.data import preprocess_io as pio
from miro.data.schema import iter_raw_samples, write_shard
from test_preprocess_helpers import image, jpeg_bytes


def _sample(key="k", caption="c", meta=None):
    im = image(0)
    return pio.RawSample(key, im, caption, meta or {}, "jpg", b"", caption.encode())


def test_clean_caption_strips_person_tag():
    assert pio.clean_caption("a <PERSON> on a <PERSON> bike") == "a  on a  bike"
    assert pio.clean_caption("no tag") == "no tag"


def test_tsv_captions_parse_filter_and_reject_bad_lines(tmp_path):
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("000001.jpg\tshort one\tlong one\twith a tab\n\n"
                   "dir/000002.png\tshort two\tlong two\n000003\ts3\tl3\n", encoding="utf-8")
    caps = pio.load_synthetic_captions(tsv)
    assert caps == {"000001": ("short one", "long one\twith a tab"), "000002": ("short two", "long two"),
                    "000003": ("s3", "l3")}
    assert pio.load_synthetic_captions(tsv, wanted={"000002"}) == {"000002": ("short two", "long two")}
    bad = tmp_path / "bad.tsv"
    bad.write_text("000001.jpg\tshort only\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected 'file_name<TAB>short<TAB>long'"):
        pio.load_synthetic_captions(bad)


def test_resolve_captions_precedence_and_fallbacks():
    tsv = {"k": ("tsv short", "tsv <PERSON>long")}
    s = _sample(meta={"synthetic_caption": "json long", "short_synthetic_caption": "json short"})
    assert pio.resolve_captions(s, tsv) == ("tsv long", "tsv short", "tsv")
    assert pio.resolve_captions(s, None) == ("json long", "json short", "json")
    assert pio.resolve_captions(s, {"other": ("a", "b")}) == ("json long", "json short", "json")
    only_long = _sample(meta={"synthetic_caption": "json long"})
    assert pio.resolve_captions(only_long, None) == ("json long", "json long", "json")
    none = _sample(caption="the <PERSON> original")
    assert pio.resolve_captions(none, None) == ("the  original", "the  original", "original")


def test_scores_csv_round_trip_and_merge_keeps_other_columns(tmp_path):
    path = tmp_path / "x_scores.csv"
    rows = {"b": {"r1": 0.1, "synthetic_caption": 'a "quoted", caption\twith tab'},
            "a": {"r1": float("nan"), "synthetic_caption": ""}}
    pio.write_scores_csv(path, rows)
    back = pio.read_scores_csv(path)
    assert list(back) == ["a", "b"] and back["b"]["r1"] == 0.1
    assert np.isnan(back["a"]["r1"]) and back["b"]["synthetic_caption"] == rows["b"]["synthetic_caption"]
    pio.merge_scores_csv(path, {"a": {"vqa": 1.0}, "c": {"vqa": 0.0}}, ["vqa"])
    merged = pio.read_scores_csv(path)
    assert merged["b"]["r1"] == 0.1 and merged["b"]["vqa"] is None and merged["a"]["vqa"] == 1.0
    assert merged["c"] == {"r1": None, "synthetic_caption": "", "vqa": 0.0}
    # replacing a stage's columns drops its stale values for keys it no longer scores
    pio.merge_scores_csv(path, {"c": {"vqa": 0.5}}, ["vqa"])
    again = pio.read_scores_csv(path)
    assert again["a"]["vqa"] is None and again["c"]["vqa"] == 0.5 and again["b"]["r1"] == 0.1
    bad = tmp_path / "bad.csv"
    bad.write_text("name,r1\na,1\n")
    with pytest.raises(ValueError, match="first column must be 'key'"):
        pio.read_scores_csv(bad)


def test_sorted_writer_matches_write_shard_bytes(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(image(i)), "txt": f"caption {i}",
                "json": {"x": i}, "vae_embeddings_mean_16.npy": np.full((4, 2, 2), i, np.float16)}
               for i in (3, 1, 2)]
    write_shard(tmp_path / "ref.tar", samples)
    w = pio.SortedShardWriter(tmp_path / "out.tar")
    for s in samples:
        w.write(s)
    assert w.commit() == 3
    assert (tmp_path / "out.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar", "ref.tar"]  # spool removed
    assert pio.tar_sample_count(tmp_path / "out.tar") == 3


def test_sorted_writer_abort_leaves_nothing_and_rejects_duplicates(tmp_path):
    w = pio.SortedShardWriter(tmp_path / "out.tar")
    w.write({"__key__": "a", "txt": "x"})
    with pytest.raises(ValueError, match="written twice"):
        w.write({"__key__": "a", "txt": "y"})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_tar_sample_count_detects_truncation(tmp_path):
    write_shard(tmp_path / "a.tar", [{"__key__": f"k{i}", "txt": "x" * 2000} for i in range(3)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    assert pio.tar_sample_count(tmp_path / "a.tar") == 3
    assert pio.tar_sample_count(tmp_path / "cut.tar") is None


def test_center_crop_and_model_input_closed_form():
    arr = np.zeros((10, 16, 3), np.uint8)
    arr[:, 3:13] = 255  # the centred 10x10 square is white, the 3-px side bands black
    im = Image.fromarray(arr)
    sq = pio.center_crop_square(im)
    assert sq.size == (10, 10) and np.asarray(sq).min() == 255
    x = pio.to_model_input(im, 10)
    assert x.shape == (3, 10, 10) and x.dtype == np.float32 and np.all(x == 1.0)
    tall = Image.fromarray(np.arange(7 * 3 * 3, dtype=np.uint8).reshape(7, 3, 3))
    assert np.array_equal(np.asarray(pio.center_crop_square(tall)), np.asarray(tall)[2:5])
    y = pio.to_model_input(Image.new("RGB", (40, 30), (0, 255, 0)), 8, "bilinear")
    assert y.shape == (3, 8, 8) and np.allclose(y[0], -1) and np.allclose(y[1], 1)
    with pytest.raises(ValueError, match="resize filter must be one of"):
        pio.to_model_input(im, 8, "nearest")


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_iter_decoded_skips_and_counts_damage(tmp_path):
    good = jpeg_bytes(image(1))
    members = {
        "a.jpg": good, "a.txt": b"fine", "a.json": b'{"u": 1}',
        "b.jpg": good[:40], "b.txt": b"cut image",  # truncated JPEG
        "c.jpg": good,  # no caption
        "d.txt": b"no image",
        "e.jpg": good, "e.txt": b"bad json", "e.json": b"{not json",
        "f.jpg": good, "f.txt": b"\xff\xfe bad utf8",
        "g.png": jpeg_bytes(image(2)), "g.txt": b"jpeg bytes under .png still decode",
    }
    (tmp_path / "s.tar").write_bytes(_tar_bytes(members))
    for workers in (0, 2):
        report = pio.ShardReport("t", "s.tar")
        got = [(s.key, s.caption, s.meta) for s, _ in pio.iter_decoded(tmp_path / "s.tar", report, workers=workers)]
        assert got == [("a", "fine", {"u": 1}), ("g", "jpeg bytes under .png still decode", {})]
        assert report.samples_read == 7
        assert report.skipped == {"undecodable image": 1, "no .txt caption": 1, "no image member": 1,
                                  "unreadable .json": 1, "caption is not UTF-8": 1}
        assert len(report.errors) == 5 and report.errors[0].startswith("b: undecodable image")


def test_iter_decoded_keeps_samples_before_truncation(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(image(i, (64, 64))), "txt": f"c{i}"} for i in range(4)]
    write_shard(tmp_path / "full.tar", samples)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: int(len(data) * 0.6)])
    report = pio.ShardReport("t", "cut.tar")
    with pytest.warns(UserWarning, match="truncated"):
        keys = [s.key for s, _ in pio.iter_decoded(tmp_path / "cut.tar", report)]
    assert report.truncated and 1 <= len(keys) < 4 and keys == [f"k{i}" for i in range(len(keys))]
    assert sum(1 for _ in iter_raw_samples(tmp_path / "full.tar")) == 4


def test_sorted_writer_resumes_from_checkpoint(tmp_path):
    samples = [{"__key__": f"k{i}", "txt": f"caption {i}", "json": {"i": i},
                "flan_t5_xl_embeddings.npy": np.full((i + 1, 3), i, np.float16)} for i in (4, 2, 0, 3)]
    write_shard(tmp_path / "ref.tar", samples)
    out = tmp_path / "out" / "x.tar"
    w = pio.SortedShardWriter(out)
    w.write(samples[0])
    w.write(samples[1])
    state = json.loads(json.dumps(w.checkpoint()))  # what the checkpoint file holds
    w.write(samples[2])  # written after the checkpoint: lost in the crash, redone on resume
    w.close()
    assert not out.exists() and (out.parent / ".x.tar.spool").is_file()
    w2 = pio.SortedShardWriter(out, resume=state)
    assert w2.keys == {"k4", "k2"} and w2.n_samples == 2
    w2.write(samples[2])
    w2.write(samples[3])
    assert w2.commit() == 4
    assert out.read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.tar"]
    with pytest.raises(ValueError, match="spool is missing"):
        pio.SortedShardWriter(out, resume=state)


def test_scores_csv_round_trips_a_lone_carriage_return(tmp_path):
    """csv.writer leaves a lone '\\r' unquoted and readers end the row there: such rows are quoted."""
    path = tmp_path / "x_scores.csv"
    rows = {"a": {"r1": 0.5, "synthetic_caption": "a photo\rof a circle", "short_synthetic_caption": "x\r"},
            "b\rkey": {"r1": 1.0, "synthetic_caption": "line\r\nbreak \"quoted\", comma", "short_synthetic_caption": ""},
            "c": {"r1": 0.25, "synthetic_caption": "plain", "short_synthetic_caption": "plain"}}
    pio.write_scores_csv(path, rows)
    assert pio.read_scores_csv(path) == rows
    text = path.read_bytes().decode("utf-8")
    assert text.startswith("key,r1,short_synthetic_caption,synthetic_caption\n")
    assert "\nc,0.25,plain,plain\n" in text  # rows without a '\r' look as before


def test_an_unreadable_scores_csv_is_named_and_rebuilt_only_on_request(tmp_path):
    path = tmp_path / "x_scores.csv"
    path.write_bytes(b"key,r1,synthetic_caption\na,0.5,a photo\rof a circle\nb,1.0,ok\n")  # the old writer's output
    with pytest.raises(ValueError, match=r"x_scores.csv: row 'of a circle' has fewer cells than the header; "
                                         r"rerun stage 'rewards' with --overwrite to rebuild it"):
        pio.check_scores_csv(path, "rewards")
    with pytest.raises(ValueError, match="x_scores.csv: row 'of a circle' has fewer cells"):
        pio.merge_scores_csv(path, {"a": {"r1": 0.1}}, ["r1"])
    pio.merge_scores_csv(path, {"a": {"r1": 0.1}}, ["r1"], rebuild=True)
    assert pio.read_scores_csv(path) == {"a": {"r1": 0.1}}
    assert (tmp_path / "x_scores.csv.unreadable").read_bytes().startswith(b"key,r1,")  # kept, not deleted
    assert pio.check_scores_csv(tmp_path / "none.csv", "rewards") == {}
    # a stray quote makes the rest of the file one field: csv.Error (no ValueError) becomes one
    path.write_text('key,r1\na,"' + "x" * 200_000 + "\n")
    with pytest.raises(ValueError, match="x_scores.csv is not a readable score CSV: field larger than field limit"):
        pio.read_scores_csv(path)


def test_long_sample_keys_fit_the_tar_and_stay_reproducible(tmp_path):
    """ustar holds 100-byte member names; a long key gets a pax record instead of failing the
    shard, the bytes stay the same run after run, and short keys are written exactly as ustar."""
    long_key = "k" * 150
    samples = [{"__key__": k, "txt": f"caption {k[:4]}", "synthetic_minilm_embeddings.npy": np.zeros((2, 3), np.float16)}
               for k in (long_key, "short")]
    for name in ("a", "b"):
        w = pio.SortedShardWriter(tmp_path / name / "out.tar")
        for s in samples:
            w.write(s)
        assert w.commit() == 2
    data = (tmp_path / "a" / "out.tar").read_bytes()
    assert data == (tmp_path / "b" / "out.tar").read_bytes()
    write_shard(tmp_path / "ref.tar", samples)
    assert (tmp_path / "ref.tar").read_bytes() == data
    assert [r["__key__"] for r in iter_raw_samples(tmp_path / "a" / "out.tar")] == [long_key, "short"]
    assert pio.tar_sample_count(tmp_path / "a" / "out.tar") == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out.tar"]  # no spool left
    short = [{"__key__": "k1", "txt": "x"}]
    write_shard(tmp_path / "short.tar", short)
    ustar = io.BytesIO()
    with tarfile.open(fileobj=ustar, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        from miro.data.schema import member_info
        tar.addfile(member_info("k1.txt", 1), io.BytesIO(b"x"))
    assert (tmp_path / "short.tar").read_bytes() == ustar.getvalue()


def test_iter_decoded_skips_a_repeated_key_and_resumes_exactly(tmp_path):
    good = jpeg_bytes(image(1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, cap in (("a", b"first a"), ("b", b"b"), ("a", b"second a"), ("c", b"c")):
            for ext, data in (("jpg", good), ("txt", cap)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    for workers in (0, 2):
        report = pio.ShardReport("t", "s.tar")
        got = [(s.key, s.caption) for s, _ in pio.iter_decoded(tmp_path / "s.tar", report, workers=workers)]
        assert got == [("a", "first a"), ("b", "b"), ("c", "c")]
        assert report.samples_read == 4 and report.skipped == {"duplicate key": 1}
        assert report.errors[0].startswith("a: duplicate key")
    # resumed after 'a' and 'b' (done counts each handled occurrence): the repeat is still counted once
    report = pio.ShardReport("t", "s.tar")
    got = [s.key for s, _ in pio.iter_decoded(tmp_path / "s.tar", report, done=["a", "b"])]
    assert got == ["c"] and report.skipped == {"duplicate key": 1}
    report = pio.ShardReport("t", "s.tar")
    assert [s.key for s, _ in pio.iter_decoded(tmp_path / "s.tar", report, done=["a", "b", "a"])] == ["c"]
    assert report.skipped == {}


@pytest.mark.filterwarnings("ignore:shard .* is truncated or unreadable:UserWarning")
@pytest.mark.parametrize("content", [b"", b"this is not a tar file" * 40])
def test_iter_decoded_refuses_a_source_that_is_not_a_readable_tar(tmp_path, content):
    (tmp_path / "bad.tar").write_bytes(content)
    report = pio.ShardReport("t", "bad.tar")
    with pytest.raises(pio.UnreadableShardError, match="bad.tar is not a readable tar"):
        list(pio.iter_decoded(tmp_path / "bad.tar", report))
    write_shard(tmp_path / "empty.tar", [])  # a whole tar with no sample is not damage
    assert list(pio.iter_decoded(tmp_path / "empty.tar", pio.ShardReport("t", "empty.tar"))) == []
