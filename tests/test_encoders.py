"""Text encoders and codecs: tiny real-format models saved to disk and loaded back by path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from miro.encoders import (
    FlanT5Encoder,
    IdentityCodec,
    MiniLMEncoder,
    SDXLVAECodec,
    load_autoencoder,
    load_text_encoder,
    to_uint8,
    to_unit,
)
from miro.encoders.tiny import save_tiny_autoencoder_kl, save_tiny_bert, save_tiny_t5


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_encoders")
    return {
        "t5": save_tiny_t5(root / "t5"),
        "bert": save_tiny_bert(root / "bert"),
        "vae": save_tiny_autoencoder_kl(root / "vae"),
    }


PROMPTS = ["two red circles above a blue square", "a purple star"]


@pytest.mark.parametrize("family,cls,dim", [("t5", FlanT5Encoder, 32), ("bert", MiniLMEncoder, 24)])
def test_folder_recognised_by_model_type_and_padded(tiny_dirs, family, cls, dim):
    enc = load_text_encoder(str(tiny_dirs[family]), max_length=10)
    assert isinstance(enc, cls)
    emb, mask = enc.encode(PROMPTS)
    assert emb.shape == (2, 10, dim) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.shape == (2, 10)
    # The mask is the tokenizer's attention mask: one True per real token, then padding.
    ids = enc.tokenizer(PROMPTS, padding="max_length", max_length=10, truncation=True)
    assert mask.tolist() == [[bool(v) for v in row] for row in ids["attention_mask"]]
    n_words = [len(p.split()) for p in PROMPTS]
    extra = 1 if family == "t5" else 2  # </s>  vs  [CLS] [SEP]
    assert mask.sum(1).tolist() == [min(n + extra, 10) for n in n_words]


def test_t5_matches_direct_transformers_call(tiny_dirs):
    from transformers import AutoTokenizer, T5EncoderModel

    enc = load_text_encoder(str(tiny_dirs["t5"]), max_length=12)
    emb, mask = enc.encode(PROMPTS)
    tok = AutoTokenizer.from_pretrained(tiny_dirs["t5"])
    model = T5EncoderModel.from_pretrained(tiny_dirs["t5"]).eval()
    t = tok(PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    torch.testing.assert_close(emb, ref.float(), rtol=0, atol=0)
    assert torch.equal(mask, t["attention_mask"].bool())


def test_truncation_to_max_length(tiny_dirs):
    enc = load_text_encoder(str(tiny_dirs["bert"]), max_length=4)
    emb, mask = enc.encode(["one two three four five six"])
    assert emb.shape[1] == 4 and mask.all()


@pytest.mark.parametrize("family,n_tokens", [("t5", 1), ("bert", 2)])
def test_uncond_is_empty_prompt_trimmed_to_mask(tiny_dirs, family, n_tokens):
    enc = load_text_encoder(str(tiny_dirs[family]), max_length=10)
    u = enc.uncond_embedding()
    assert u.shape == (n_tokens, enc.dim)  # T5: one </s> token, as the published (1, 2048) file
    emb, mask = enc.encode([""])
    assert mask.sum() == n_tokens
    torch.testing.assert_close(u, emb[0, :n_tokens], rtol=0, atol=0)


def test_batching_does_not_change_embeddings(tiny_dirs):
    a = load_text_encoder(str(tiny_dirs["t5"]), max_length=10)
    b = FlanT5Encoder(str(tiny_dirs["t5"]), max_length=10, batch_size=1)
    ea, ma = a.encode(PROMPTS * 2)
    eb, mb = b.encode(PROMPTS * 2)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-6)
    assert torch.equal(ma, mb)


def test_object_passthrough_and_bad_specs(tiny_dirs, tmp_path):
    enc = load_text_encoder(str(tiny_dirs["t5"]), max_length=10)
    assert load_text_encoder(enc, max_length=10) is enc
    with pytest.raises(ValueError, match="max_text_len=7"):
        load_text_encoder(enc, max_length=7)
    with pytest.raises(ValueError, match="got 3"):
        load_text_encoder(3)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2'.*\['bert', 't5'\]"):
        load_text_encoder(str(tmp_path / "gpt"))
    with pytest.raises(ValueError, match="prompts must be strings"):
        enc.encode(["ok", 5])
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        load_text_encoder(str(tiny_dirs["t5"]), max_length=0)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(OSError, match="not-a-user/not-a-model"):
        load_text_encoder("not-a-user/not-a-model")


def test_builtin_names_resolve_without_loading():
    t5 = load_text_encoder("google/flan-t5-xl")
    assert isinstance(t5, FlanT5Encoder) and t5.model is None
    assert t5.schema_name == "flan_t5_xl" and t5.max_length == 77 and t5.spec == "google/flan-t5-xl"
    mini = load_text_encoder("minilm", max_length=16)
    assert isinstance(mini, MiniLMEncoder) and mini.model is None and mini.spec == "minilm"
    # the hub spelling is mixed-case; it names the embedded weights too (it went to the hub before)
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        enc = load_text_encoder(name)
        assert isinstance(enc, MiniLMEncoder) and enc.spec == "minilm", name


def test_embedded_minilm_token_embeddings():
    enc = load_text_encoder("minilm", max_length=12)
    emb, mask = enc.encode(["two red circles"])
    assert emb.shape == (1, 12, 384) and enc.dim == 384 and enc.schema_name == "minilm"
    assert mask[0].tolist() == [True] * 5 + [False] * 7  # [CLS] two red circles [SEP]
    u = enc.uncond_embedding()
    assert u.shape == (2, 384) and torch.isfinite(u).all()
    # Padding does not leak into real tokens (attention is masked): same tokens at length 6.
    short = load_text_encoder("minilm", max_length=6).encode(["two red circles"])[0]
    torch.testing.assert_close(short[0, :5], emb[0, :5], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- codecs
def test_identity_codec_round_trip():
    c = load_autoencoder("identity")
    assert isinstance(c, IdentityCodec) and c.downsample == 1 and c.latent_channels == 3
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, std = c.encode(x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert torch.equal(c.decode(mean), x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        c.encode(torch.zeros(2, 4, 8, 8))


def test_autoencoder_kl_folder_matches_diffusers_and_chunks(tiny_dirs):
    from diffusers import AutoencoderKL

    codec = load_autoencoder(str(tiny_dirs["vae"]))
    assert isinstance(codec, SDXLVAECodec)
    assert codec.downsample == 2 and codec.latent_channels == 4
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = codec.encode(x)
    ref = AutoencoderKL.from_pretrained(tiny_dirs["vae"]).eval()
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        dec = ref.decode(dist.mean).sample
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, dist.std, rtol=1e-5, atol=1e-6)
    # decode the reference's own latents: the encode check above already bounds mean - dist.mean,
    # and the decoder would amplify that difference past the decode tolerance
    torch.testing.assert_close(codec.decode(dist.mean), dec, rtol=1e-5, atol=1e-6)
    chunked = SDXLVAECodec(str(tiny_dirs["vae"]), max_batch_size=2)
    torch.testing.assert_close(chunked.decode(dist.mean), dec, rtol=1e-4, atol=1e-5)


def test_load_autoencoder_specs(tiny_dirs, tmp_path):
    sdxl = load_autoencoder("stabilityai/sdxl-vae")
    assert isinstance(sdxl, SDXLVAECodec) and sdxl.vae is None and sdxl.spec == "stabilityai/sdxl-vae"
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_autoencoder(str(tmp_path / "unet"))
    with pytest.raises(ValueError, match="unknown autoencoder 'nope'"):
        load_autoencoder("nope")
    ident = IdentityCodec()
    assert load_autoencoder(ident) is ident


def test_uint8_conversion_truncates():
    # x = 0.999 -> (0.9995 * 255) = 254.87 -> 254 (truncation, rounding would give 255).
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    u8 = to_uint8(x)
    assert u8.dtype == np.uint8 and u8.shape == (1, 1, 6, 3)
    assert u8[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
    torch.testing.assert_close(to_unit(x)[0, 0, 0], torch.tensor([0, 0, 0.5, 0.9995, 1, 1]))


def test_hub_id_recognised_by_downloaded_config(tmp_path, monkeypatch):
    cfgs = {"someone/t5-thing": {"model_type": "t5"}, "someone/bert-thing": {"model_type": "bert"}}
    seen = []

    def fake_download(repo_id, filename, **kw):
        seen.append((repo_id, filename, kw.get("local_files_only")))
        path = tmp_path / repo_id.replace("/", "_") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfgs[repo_id]))
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    t5 = load_text_encoder("someone/t5-thing", max_length=16)
    bert = load_text_encoder("someone/bert-thing")
    assert isinstance(t5, FlanT5Encoder) and t5.name_or_path == "someone/t5-thing" and t5.model is None
    assert isinstance(bert, MiniLMEncoder) and bert.name_or_path == "someone/bert-thing"
    # Only config.json is fetched, and offline mode (HF_HUB_OFFLINE=1 here) is passed on.
    assert seen == [("someone/t5-thing", "config.json", True), ("someone/bert-thing", "config.json", True)]


def test_pad_token_rows_pads_cuts_and_masks():
    from miro.encoders.text import pad_token_rows

    rows = [torch.ones(2, 3, dtype=torch.float16), np.full((4, 3), 2.0, dtype=np.float16), torch.full((1, 3), 3.0)]
    emb, mask = pad_token_rows(rows)
    assert emb.dtype == torch.float32 and emb.shape == (3, 4, 3)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert emb[0, :2].eq(1).all() and emb[1].eq(2).all() and emb[2, 0].eq(3).all() and emb[~mask].eq(0).all()
    emb, mask = pad_token_rows(rows, length=3)  # a fixed length cuts longer rows
    assert emb.shape == (3, 3, 3) and mask.sum(1).tolist() == [2, 3, 1]


def test_a_missing_encoder_is_one_line():
    # transformers' offline message holds a line break ("... cached files.\nCheck your internet ...")
    for load, name in ((lambda: load_text_encoder("google/flan-t5-xl").load(), "text encoder 'google/flan-t5-xl'"),
                       (lambda: load_autoencoder("stabilityai/sdxl-vae").load(), "autoencoder 'stabilityai/sdxl-vae'")):
        with pytest.raises(OSError, match=f"could not load the {name}") as e:
            load()
        assert "\n" not in str(e.value), str(e.value)


def test_a_float16_vae_that_asks_for_it_runs_in_float32(tiny_dirs, tmp_path):
    """The SDXL VAE overflows float16 into NaN (black images); its config's force_upcast keeps it in
    float32 under a float16 pipeline, as diffusers' SDXL pipelines do. bfloat16 is kept."""
    import json as _json

    x = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = SDXLVAECodec(str(tiny_dirs["vae"])).decode(x)
    codec = SDXLVAECodec(str(tiny_dirs["vae"]))
    codec.load()
    assert codec.vae.config.force_upcast
    codec.to(dtype=torch.float16)
    assert codec.dtype == torch.float16 and codec.vae.dtype == torch.float32
    torch.testing.assert_close(codec.decode(x.half()), ref, rtol=1e-3, atol=1e-3)
    assert SDXLVAECodec(str(tiny_dirs["vae"]), dtype=torch.float16).load().vae.dtype == torch.float32
    assert codec.to(dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    plain = tmp_path / "vae"  # a VAE that does not ask: float16 as told
    shutil.copytree(tiny_dirs["vae"], plain)
    cfg = _json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(_json.dumps({**cfg, "force_upcast": False}))
    assert SDXLVAECodec(str(plain), dtype=torch.float16).load().vae.dtype == torch.float16
