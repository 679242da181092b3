"""ImageReward v1.0 on transformers BLIP classes: a tiny ImageReward.pt with the published tensor names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _rewards_support import blip_image_reward_reference, make_bert_tokenizer, read_keys, tiny_state_dict

PROMPTS = ["a photo of a dog", "two red cats on the left", "a blue image"]
VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16)


@pytest.fixture(scope="module")
def ir_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    tok = root / "bert"
    tok.mkdir()
    vocab = make_bert_tokenizer(tok) + 2  # + [DEC], [ENC] as init_tokenizer adds them
    full = read_keys("image_reward_v1_keys.tsv")
    # BLIP ViT-L/16 → width 32 (qkv 3072→96, mlp 4096→128), 197 tokens → 5 (32 px / 16); MED BERT hidden 768→24,
    # FFN 3072→96, vocab 30524 → tokenizer's; contrastive projections 256→8
    blip = {k: v for k, v in full.items() if k.startswith("blip.")}
    sd = tiny_state_dict(blip, {1024: 32, 3072: 96, 4096: 128, 197: 5, 768: 24, 30524: vocab, 256: 8},
                         {r"blocks\.(\d+)\.": 2, r"encoder\.layer\.(\d+)\.": 2}, seed=3)
    # the MLP head keeps its published 1024/128/64/16 widths; only its input follows the text width
    sd.update(tiny_state_dict({k: v for k, v in full.items() if k.startswith("mlp.")}, {768: 24}, {}, seed=4, std=0.1))
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(512).view(1, -1)
    torch.save(sd, str(root / "ImageReward.pt"))
    med = {"architectures": ["BertModel"], "hidden_size": 24, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 512, "vocab_size": vocab, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "add_cross_attention": True, "encoder_width": 24, "pad_token_id": 0}
    (root / "med_config.json").write_text(json.dumps(med))
    return root, tok, sd


def _images():
    g = np.random.default_rng(2)
    return [Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in [(32, 32), (48, 32), (32, 40)]]


def _scorer(ir_repo, **kw):
    from miro.rewards import load_scorer

    root, tok, _ = ir_repo
    return load_scorer("image_reward_score", model=str(root), tokenizer=str(tok), vision=VISION, device="cpu", **kw)


def test_image_reward_matches_reference_forward_and_standardisation(ir_repo):
    from miro.rewards.image_reward import IR_MEAN, IR_STD

    root, tok_dir, sd = ir_repo
    s = _scorer(ir_repo)
    imgs = _images()
    raw = s.score(imgs, PROMPTS)
    enc = s.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc["input_ids"].shape == (3, 35) and (enc["input_ids"][:, 0] == 2).all()  # [CLS] stays first
    ref = blip_image_reward_reference(sd, s.transform(imgs), enc["input_ids"], enc["attention_mask"], v_heads=4, t_heads=4)
    torch.testing.assert_close(s.mlp_output(imgs, PROMPTS), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw, (ref - IR_MEAN) / IR_STD, rtol=1e-4, atol=1e-5)
    assert raw.std() > 0


def test_image_reward_normalisation_and_constants():
    from miro.rewards.image_reward import IR_MEAN, IR_STD, ImageReward

    assert (IR_MEAN, IR_STD) == (0.16717362830052426, 1.0333394966054072)
    s = ImageReward.__new__(ImageReward)
    torch.testing.assert_close(s.normalize(torch.tensor([-2.0, 0.0, 2.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_tokenizer_gets_blip_special_tokens(ir_repo):
    s = _scorer(ir_repo).load()
    assert len(s.tokenizer) == s.model.text_encoder.config.vocab_size
    assert s.tokenizer.convert_tokens_to_ids("[ENC]") == len(s.tokenizer) - 1


def test_image_reward_tensor_path_is_differentiable_and_matches_pil(ir_repo):
    s = _scorer(ir_repo)
    pil = [im.resize((32, 32)) for im in _images()]
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in pil])
    x.requires_grad_(True)
    r = s.score(x, PROMPTS)
    torch.testing.assert_close(r, s.score(pil, PROMPTS), rtol=1e-4, atol=1e-4)
    r.sum().backward()
    assert x.grad.abs().sum() > 0


def test_prompt_changes_the_reward(ir_repo):
    s = _scorer(ir_repo)
    im = _images()[:1] * 2
    r = s.score(im, ["a photo of a dog", "three blue cats"])
    assert not torch.isclose(r[0], r[1])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from miro.rewards import load_scorer

    s = load_scorer("image_reward_score", model=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="ImageReward.pt"):
        s.score([Image.new("RGB", (32, 32))], ["x"])
