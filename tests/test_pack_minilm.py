"""benchmarks/pack_minilm.py: a packed MiniLM, unpacked and selected with MIRO_MINILM_DIR, encodes
Shapes captions as the embedded encoder does (to float16 rounding), and refuses data it cannot encode."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pack_minilm  # noqa: E402

from miro.encoders.text import MINILM_DIR_ENV, embedded_minilm_path, load_text_encoder  # noqa: E402


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    info = pack_minilm.pack(root / "pack", samples=40, data=[])
    return root, info


def test_pack_is_small_and_unpacked_encoder_matches(packed, tmp_path, monkeypatch):
    root, info = packed
    assert info["bytes"] < 25e6 and 30 < info["kept_tokens"] < 200  # vs 91 MB, 30,522 tokens
    pack_minilm.unpack(root / "pack", tmp_path / "full")
    caps = ["two red circles above a blue square", "a photo of a green triangle left of a yellow cross",
            "an image of three purple diamonds on a plain light gray background"]
    ref = load_text_encoder("minilm", max_length=32)
    e_ref, m_ref = ref.encode(caps)
    monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path / "full"))
    assert embedded_minilm_path() == tmp_path / "full"
    e, m = load_text_encoder("minilm", max_length=32).encode(caps)
    assert torch.equal(m, m_ref)
    torch.testing.assert_close(e[m], e_ref[m_ref], rtol=0, atol=5e-3)
    assert (e[m] - e_ref[m_ref]).abs().max() > 0  # it is the half-precision copy that ran


def test_unpack_refuses_captions_with_dropped_tokens(packed, tmp_path, monkeypatch):
    root, _ = packed
    monkeypatch.setattr(pack_minilm, "shard_captions", lambda d: ["a red circle", "a zebra on a skateboard"])
    with pytest.raises(ValueError, match="zebra"):
        pack_minilm.unpack(root / "pack", tmp_path / "full", check_data=[tmp_path])
    monkeypatch.setattr(pack_minilm, "shard_captions", lambda d: ["a red circle"])
    pack_minilm.unpack(root / "pack", tmp_path / "full", check_data=[tmp_path])


def test_minilm_dir_must_be_a_model_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=MINILM_DIR_ENV):
        embedded_minilm_path()
