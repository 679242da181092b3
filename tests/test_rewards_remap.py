"""Full-size checkpoint names (fixtures read from the reference packages) remap onto our transformers modules.

Everything is built on the meta device: names and shapes are checked for the real architectures
without allocating weights.
"""

from __future__ import annotations

import pytest
import torch

from _rewards_support import read_keys


def _meta(table):
    return {k: torch.empty(shape, device="meta") for k, shape in table.items()}


def _assert_same(ours: dict, module_sd: dict):
    missing = sorted(set(module_sd) - set(ours))
    unexpected = sorted(set(ours) - set(module_sd))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    bad = [k for k in ours if tuple(ours[k].shape) != tuple(module_sd[k].shape)]
    assert not bad, [(k, tuple(ours[k].shape), tuple(module_sd[k].shape)) for k in bad[:5]]


def test_hpsv2_open_clip_names_map_onto_clipmodel_vit_h14():
    from transformers import CLIPModel

    from miro.rewards.clip_remap import OPEN_CLIP_VIT_H14, clip_config_from_open_clip, open_clip_to_transformers

    table = read_keys("hpsv2_open_clip_vit_h14_keys.tsv")
    assert len(table) == 686
    ours = open_clip_to_transformers(_meta(table))
    with torch.device("meta"):
        model = CLIPModel(clip_config_from_open_clip(OPEN_CLIP_VIT_H14))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    _assert_same(ours, sd)
    cfg = model.config
    assert cfg.vision_config.num_attention_heads == 16 and cfg.vision_config.hidden_act == "gelu"
    assert cfg.text_config.eos_token_id == 49407


def test_open_clip_remap_splits_qkv_and_transposes_projections():
    from miro.rewards.clip_remap import open_clip_to_transformers

    w = torch.arange(12.0).view(6, 2)
    b = torch.arange(6.0)
    proj = torch.arange(6.0).view(2, 3)
    out = open_clip_to_transformers({
        "transformer.resblocks.0.attn.in_proj_weight": w, "transformer.resblocks.0.attn.in_proj_bias": b,
        "visual.proj": proj, "module.logit_scale": torch.tensor([4.6]),
    })
    torch.testing.assert_close(out["text_model.encoder.layers.0.self_attn.q_proj.weight"], w[:2])
    torch.testing.assert_close(out["text_model.encoder.layers.0.self_attn.k_proj.weight"], w[2:4])
    torch.testing.assert_close(out["text_model.encoder.layers.0.self_attn.v_proj.bias"], b[4:])
    torch.testing.assert_close(out["visual_projection.weight"], proj.t())
    assert out["logit_scale"].shape == ()


def test_open_clip_remap_rejects_unknown_tensors():
    from miro.rewards.clip_remap import open_clip_to_transformers

    with pytest.raises(ValueError, match="visual.trunk.stem"):
        open_clip_to_transformers({"visual.trunk.stem.weight": torch.zeros(1)})


def test_image_reward_names_map_onto_blip_classes():
    from miro.rewards.image_reward import ImageRewardModel, build_configs, remap_image_reward

    table = read_keys("image_reward_v1_keys.tsv")
    # BLIP med_config.json values (hidden 768, 12 layers / heads, FFN 3072, vocab 30524)
    med = dict(vocab_size=table["blip.text_encoder.embeddings.word_embeddings.weight"][0], hidden_size=768,
               intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512)
    ours = remap_image_reward(_meta(table))
    vcfg, tcfg = build_configs(med)
    with torch.device("meta"):
        model = ImageRewardModel(vcfg, tcfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    _assert_same(ours, sd)
    assert vcfg.layer_norm_eps == 1e-6 and tcfg.encoder_hidden_size == 1024
    # every checkpoint tensor is used except the contrastive projections (4) and the position-id buffer
    assert len(ours) == len(table) - 5


def test_image_reward_remap_rejects_unknown_tensors():
    from miro.rewards.image_reward import remap_image_reward

    with pytest.raises(ValueError, match="blip.text_decoder"):
        remap_image_reward({"blip.text_decoder.cls.predictions.bias": torch.zeros(1)})


def test_clip_flant5_names_map_onto_clip_vision_t5():
    from transformers import CLIPVisionConfig, T5Config

    from miro.rewards.vqascore import ClipFlanT5, split_checkpoint

    table = read_keys("clip_flant5_xxl_keys.tsv")
    vision, proj, t5 = split_checkpoint(_meta(table))
    vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu")
    tcfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = ClipFlanT5(vcfg, tcfg)
    _assert_same(vision, {k: v for k, v in model.vision_tower.state_dict().items() if not k.endswith("position_ids")})
    _assert_same(proj, model.mm_projector.state_dict())
    _assert_same(t5, model.lm.state_dict())


def test_clip_flant5_split_fills_tied_embeddings_from_any_saved_name():
    from miro.rewards.vqascore import split_checkpoint

    emb = torch.randn(5, 3)
    _, _, t5 = split_checkpoint({"embed_tokens.weight": emb, "lm_head.weight": torch.zeros(5, 3)})
    for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        assert t5[k] is emb
    assert "embed_tokens.weight" not in t5


def test_aesthetic_mlp_names_match_published_state_dict():
    from miro.rewards.aesthetic import AestheticMLP

    table = read_keys("aesthetic_mlp_keys.tsv")
    assert {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()} == table
