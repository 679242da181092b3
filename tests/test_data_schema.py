import numpy as np
import pytest
from PIL import Image

from miro.data import schema


def _sample(key, seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    return {"__key__": key, "png": img, "txt": f"caption {key}", "json": {"clip_score": float(seed)},
            "minilm_embeddings.npy": rng.standard_normal((3, 4)).astype(np.float16)}


def test_shard_round_trip_and_reproducible(tmp_path):
    samples = [_sample(f"s{i:03d}", i) for i in range(4)]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert schema.write_shard(a, samples) == 4
    schema.write_shard(b, list(reversed(samples)))
    assert a.read_bytes() == b.read_bytes()  # sorted members, fixed headers
    out = [schema.decode_sample(r) for r in schema.iter_raw_samples(a)]
    assert [o["__key__"] for o in out] == [s["__key__"] for s in samples]
    for o, s in zip(out, samples):
        assert o["txt"] == s["txt"] and o["json"] == s["json"]
        np.testing.assert_array_equal(np.asarray(o["png"]), np.asarray(s["png"]))
        assert o["minilm_embeddings.npy"].dtype == np.float16
        np.testing.assert_array_equal(o["minilm_embeddings.npy"], s["minilm_embeddings.npy"])


def test_truncated_shard_keeps_earlier_samples(tmp_path):
    p = tmp_path / "t.tar"
    schema.write_shard(p, [_sample(f"s{i}", i) for i in range(5)])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    stats = schema.ReadStats()
    with pytest.warns(UserWarning, match="truncated"):
        got = list(schema.iter_raw_samples(p, stats))
    assert 0 < len(got) < 5 and stats.truncated_shards == 1


def test_split_member_and_key_rules():
    assert schema.split_member("d/abc.vae_embeddings_mean_256.npy") == ("d/abc", "vae_embeddings_mean_256.npy")
    assert schema.text_embedding_name("minilm", synthetic=True) == "synthetic_minilm_embeddings.npy"
    assert schema.latent_name("std", 512) == "vae_embeddings_std_512.npy"
    with pytest.raises(ValueError, match="no '.'"):
        schema.check_key("a.b")


def test_shard_selection(tmp_path):
    shards = [tmp_path / f"{i:05d}.tar" for i in range(6)]
    assert schema.select_shards(shards, shard_id=2) == [shards[2]]
    assert schema.select_shards(shards, shard_ids="0,5") == [shards[0], shards[5]]
    assert schema.select_shards(shards, shard_range="1-3") == shards[1:4]
    assert schema.select_shards(shards) == shards
    with pytest.raises(ValueError, match="out of range"):
        schema.select_shards(shards, shard_id=6)
    with pytest.raises(ValueError, match="at most one"):
        schema.select_shards(shards, shard_id=1, shard_range="1-2")
    with pytest.raises(ValueError, match="a-b"):
        schema.select_shards(shards, shard_range="3")


def _tiny_tar_bytes(members):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_members_that_expand_beyond_the_file_are_not_read_into_memory(tmp_path, monkeypatch):
    import gzip
    import tarfile

    from miro.data import preprocess_io, shard_files

    reads = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: reads.append(m) or real(self, m))
    # a sparse member (pax GNU.sparse.*): one stored byte that reads back as 400 MB of zeros
    sparse = tmp_path / "sparse.tar"
    sparse.write_bytes(_tiny_tar_bytes([("a.png", b"x", {"GNU.sparse.map": "0,1", "GNU.sparse.size": str(400 << 20)}),
                                        ("a.txt", b"y", {})]))
    # a gzip stream named .tar: 1 MB of zeros in a member, a few kB on disk
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(_tiny_tar_bytes([("b.png", bytes(1 << 20), {}), ("b.txt", b"z", {})])))
    assert packed.stat().st_size < 10_000
    for path in (sparse, packed):
        stats = schema.ReadStats()
        with pytest.warns(UserWarning, match="truncated or unreadable"):
            assert list(schema.iter_raw_samples(path, stats)) == []
        assert stats.truncated_shards == 1
        if path == sparse:
            assert "a.png is a sparse file of 419430400 bytes" in stats.errors[0]
    assert reads == []
    # the header-only readers take plain tars only, as the sample reader does
    assert shard_files.tar_sample_count(packed) is None and preprocess_io.shard_keys(packed) == []
