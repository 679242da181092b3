"""HPSv2 / v2.1: a tiny open_clip-format checkpoint (published tensor names) remapped into CLIPModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _rewards_support import make_clip_tokenizer, open_clip_reference, read_keys, tiny_state_dict

PROMPTS = ["a photo of a dog", "two red cats", "a blue image"]


def _tiny_hps(vocab, seed):
    full = read_keys("hpsv2_open_clip_vit_h14_keys.tsv")
    # ViT-H-14 sizes → tiny: vision width 1280→32 (qkv 3840→96, mlp 5120→128), text width = embed 1024→24
    # (qkv 3072→72, mlp 4096→96), 257 positions → 17 (32 px / patch 8), patch 14→8, vocab → tokenizer's
    dims = {1280: 32, 3840: 96, 5120: 128, 1024: 24, 3072: 72, 4096: 96, 257: 17, 14: 8, 49408: vocab}
    sd = tiny_state_dict(full, dims, {r"^visual\.transformer\.resblocks\.(\d+)\.": 2, r"^transformer\.resblocks\.(\d+)\.": 2},
                         seed=seed)
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


TINY_OPEN_CLIP = lambda vocab: {  # noqa: E731
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": vocab, "width": 24, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def hps_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    tok = root / "tokenizer"
    tok.mkdir()
    vocab = make_clip_tokenizer(tok)
    sds = {}
    for i, (version, name) in enumerate([("v2.0", "HPS_v2_compressed.pt"), ("v2.1", "HPS_v2.1_compressed.pt")]):
        sds[version] = _tiny_hps(vocab, seed=10 + i)
        torch.save({"state_dict": sds[version], "epoch": 3}, str(root / name))  # hpsv2 checkpoints: ckpt['state_dict']
    return root, tok, vocab, sds


def _images():
    g = np.random.default_rng(1)
    return [Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in [(32, 32), (40, 32), (32, 48)]]


def _scorer(hps_repo, **kw):
    from miro.rewards import load_scorer

    root, tok, vocab, _ = hps_repo
    return load_scorer("hpsv2_score", model=str(root), tokenizer=str(tok), open_clip_config=TINY_OPEN_CLIP(vocab),
                       device="cpu", **kw)


def _tokens(tok_dir, prompts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_hps_matches_open_clip_reference_forward(hps_repo, version):
    root, tok, vocab, sds = hps_repo
    s = _scorer(hps_repo, version=version)
    imgs = _images()
    px = s.backbone.pixel_values(imgs)
    ref_img, ref_txt = open_clip_reference(sds[version], px, _tokens(tok, PROMPTS), v_heads=4, t_heads=4)
    torch.testing.assert_close(s.embed_image(imgs), ref_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.embed_text(PROMPTS), ref_txt, rtol=1e-4, atol=1e-5)
    raw = s.score(imgs, PROMPTS)
    torch.testing.assert_close(raw, (ref_img * ref_txt).sum(-1), rtol=1e-4, atol=1e-5)  # plain cosine, no scale
    torch.testing.assert_close(s.normalize(raw), raw)  # MIRO stores the raw cosine
    assert raw.abs().max() <= 1.0


def test_versions_load_their_own_checkpoint(hps_repo):
    imgs = _images()
    a = _scorer(hps_repo, version="v2.0").score(imgs, PROMPTS)
    b = _scorer(hps_repo, version="v2.1").score(imgs, PROMPTS)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="version="):
        _scorer(hps_repo, version="v3")


def test_pad_preprocessing_is_official_resize_max_size(hps_repo):
    root, tok, vocab, sds = hps_repo
    s = _scorer(hps_repo, preprocess="pad")
    im = _images()[1]  # 40 wide, 32 high: long side 40 → 32, height round(32 · 0.8) = 26, padded 3 + 3 rows
    px = s.backbone.pixel_values([im])
    raw = px * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) + torch.tensor(
        [0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    assert torch.allclose(raw[..., :3, :], torch.zeros(1), atol=1e-6) and torch.allclose(raw[..., 29:, :], torch.zeros(1), atol=1e-6)
    crop = _scorer(hps_repo, preprocess="crop")
    square = _images()[0]
    torch.testing.assert_close(s.score([square], PROMPTS[:1]), crop.score([square], PROMPTS[:1]))  # coincide on squares
    assert not torch.allclose(s.score([im], PROMPTS[:1]), crop.score([im], PROMPTS[:1]))
    with pytest.raises(ValueError, match="preprocess="):
        _scorer(hps_repo, preprocess="stretch")


def test_hps_tensor_path_is_differentiable(hps_repo):
    s = _scorer(hps_repo)
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    r = s.score(x, PROMPTS[:2])
    r.sum().backward()
    assert s.differentiable and x.grad.abs().sum() > 0
    # SRPO's relative reward: r(x, p+) - r(x, p-) from cached embeddings
    e = s.embed_image(x.detach())
    diff = s.similarity(e, s.embed_text(["a dog", "a dog"])) - s.similarity(e, s.embed_text(["a cat", "a cat"]))
    torch.testing.assert_close(diff, s.score(x.detach(), "a dog") - s.score(x.detach(), "a cat"), rtol=1e-5, atol=1e-6)


def test_converted_clipmodel_folder_loads_the_same(hps_repo, tmp_path):
    s = _scorer(hps_repo)
    imgs = _images()
    expected = s.score(imgs, PROMPTS)
    s.backbone.model.save_pretrained(str(tmp_path))
    root, tok, vocab, _ = hps_repo
    from miro.rewards import load_scorer

    conv = load_scorer("hpsv2_score", model=str(tmp_path), tokenizer=str(tok), open_clip_config=TINY_OPEN_CLIP(vocab), device="cpu")
    torch.testing.assert_close(conv.score(imgs, PROMPTS), expected)


def test_checkpoint_with_foreign_tensors_is_rejected(hps_repo, tmp_path):
    root, tok, vocab, sds = hps_repo
    bad = dict(sds["v2.1"])
    bad["score_predictor.layers.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": bad}, str(tmp_path / "HPS_v2.1_compressed.pt"))
    from miro.rewards import load_scorer

    s = load_scorer("hpsv2_score", model=str(tmp_path), tokenizer=str(tok), open_clip_config=TINY_OPEN_CLIP(vocab), device="cpu")
    with pytest.raises(ValueError, match="score_predictor"):
        s.score(_images()[:1], PROMPTS[:1])
