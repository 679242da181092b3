"""VQAScore with a tiny CLIP-FlanT5 saved in the published format (CLIPT5ForConditionalGeneration names)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _rewards_support import make_t5_tokenizer, read_keys, tiny_state_dict

PROMPTS = ["a photo of a dog", "two red cats", "a blue image"]
EXTRA_VOCAB = 5  # the model's embedding is larger than the tokenizer (FLAN-T5: 32128 vs 32100)


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                            patch_size=14, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def vqa_repos(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    root = tmp_path_factory.mktemp("clipflant5")
    tok_dir = root / "flan-t5"
    tok_dir.mkdir()
    vocab = make_t5_tokenizer(tok_dir)
    full = read_keys("clip_flant5_xxl_keys.tsv")
    groups = {
        "t5": ({k: v for k, v in full.items() if not k.startswith(("vision_tower.", "mm_projector."))},
               {4096: 32, 10240: 64, 32128: vocab + EXTRA_VOCAB, 64: 4}, {r"block\.(\d+)\.": 2}),
        "proj": ({k: v for k, v in full.items() if k.startswith("mm_projector.")}, {4096: 32, 1024: 16}, {}),
        "vision": ({k: v for k, v in full.items() if k.startswith("vision_tower.")}, {1024: 16, 4096: 64, 577: 5},
                   {r"layers\.(\d+)\.": 3}),
    }
    sd = {}
    for i, (table, dims, layers) in enumerate(groups.values()):
        sd.update(tiny_state_dict(table, dims, layers, seed=20 + i, std=0.3))
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embed_tokens.weight"):
        sd[k] = sd["shared.weight"]  # one tied tensor
    # the vision tower as its own CLIPVisionModel folder (what config.mm_vision_tower names)
    tower = CLIPVisionModel(_vision_config())
    prefix = "vision_tower.vision_tower.vision_model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=False)
    tower_dir = root / "clip-vit-336"
    tower.save_pretrained(str(tower_dir))
    config = {
        "model_type": "clip_t5", "architectures": ["CLIPT5ForConditionalGeneration"], "vocab_size": vocab + EXTRA_VOCAB,
        "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
        "mm_vision_tower": str(tower_dir), "mm_hidden_size": 16, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "use_mm_proj": True,
    }
    # (a) everything in one pytorch_model.bin, vision tower included
    full_dir = root / "with-tower"
    full_dir.mkdir()
    (full_dir / "config.json").write_text(json.dumps(config))
    torch.save(sd, str(full_dir / "pytorch_model.bin"))
    # (b) safetensors without the tower (loaded from mm_vision_tower) and with deduplicated tied embeddings
    lean_dir = root / "without-tower"
    lean_dir.mkdir()
    (lean_dir / "config.json").write_text(json.dumps(config))
    lean = {k: v.contiguous() for k, v in sd.items() if not k.startswith("vision_tower.")
            and k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embed_tokens.weight")}
    save_file(lean, str(lean_dir / "model.safetensors"))
    return full_dir, lean_dir, tok_dir, tower_dir, sd, config


def _images():
    g = np.random.default_rng(3)
    return [Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in [(28, 28), (40, 28), (28, 36)]]


def _scorer(model_dir, tok_dir, **kw):
    from miro.rewards import load_scorer

    return load_scorer("vqa_score", model=str(model_dir), tokenizer=str(tok_dir), device="cpu", **kw)


@pytest.fixture(scope="module")
def vqa(vqa_repos):
    full_dir, _, tok_dir, *_ = vqa_repos
    s = _scorer(full_dir, tok_dir)
    assert s.model is None and s.load() is s and s.model is not None  # lazy until load() / first use
    return s


def _reference(sd, config, tok_dir, tower_dir, pixel_values, prompts):
    """t2v_metrics' CLIPT5Model.forward, step by step, on transformers' own T5 + CLIPVisionModel."""
    from transformers import AutoTokenizer, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    from miro.rewards.vqascore import SYSTEM_MSG

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    t5 = T5ForConditionalGeneration(T5Config.from_dict({k: v for k, v in config.items() if k != "model_type"})).eval()
    # FLAN-T5 has its own LM head (tie_word_embeddings=False); transformers 5 ties it at construction
    t5.lm_head.weight = torch.nn.Parameter(torch.empty_like(t5.lm_head.weight))
    t5.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("vision_tower.", "mm_projector.", "embed_tokens."))})
    tower = CLIPVisionModel.from_pretrained(str(tower_dir)).eval()
    with torch.no_grad():
        feats = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = F.linear(F.gelu(F.linear(feats, sd["mm_projector.0.weight"], sd["mm_projector.0.bias"])),
                         sd["mm_projector.2.weight"], sd["mm_projector.2.bias"])
        ids, labels = [], []
        for p in prompts:
            q = SYSTEM_MSG + " USER: <image>\n" + f'Does this figure show "{p}"? Please answer yes or no.' + " ASSISTANT: "
            a, b = q.split("<image>")
            ids.append(torch.tensor(tok(a).input_ids + [-200] + tok(b).input_ids))
            labels.append(torch.tensor(tok("Yes").input_ids))
        ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tok.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
        mask = ids.ne(tok.pad_token_id)
        embeds = []
        for r, row in enumerate(ids):
            at = int((row == -200).nonzero()[0])
            embeds.append(torch.cat([t5.shared(row[:at]), feats[r], t5.shared(row[at + 1:])]))
        embeds = torch.stack(embeds)
        mask = torch.cat([torch.ones(len(prompts), feats.shape[1] - 1, dtype=torch.bool), mask], 1)
        logits = t5(inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_attention_mask=labels.ne(-100)).logits
        logits = logits[..., : len(tok)]  # resize_token_embeddings(len(tokenizer))
        ce = torch.nn.CrossEntropyLoss(reduction="mean")
        return torch.stack([(-ce(logits[k], labels[k])).exp() for k in range(len(prompts))]), labels


def test_vqascore_is_probability_of_yes(vqa_repos, vqa):
    full_dir, lean_dir, tok_dir, tower_dir, sd, config = vqa_repos
    s = vqa
    imgs = _images()
    from miro.rewards.vqascore import jpeg_roundtrip

    score = s.score(imgs, PROMPTS)
    # as MIRO hands t2v_metrics JPEG files: PIL images are scored after a quality-75 round trip
    ref, labels = _reference(sd, config, tok_dir, tower_dir, s.transform(jpeg_roundtrip(imgs, 75)), PROMPTS)
    torch.testing.assert_close(score, ref, rtol=1e-4, atol=1e-6)
    s.jpeg_quality = None
    try:
        plain = s.score(imgs, PROMPTS)
    finally:
        s.jpeg_quality = 75
    torch.testing.assert_close(plain, _reference(sd, config, tok_dir, tower_dir, s.transform(imgs), PROMPTS)[0],
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(plain, score)
    assert ((score > 0) & (score < 1)).all() and score.std() > 0
    assert labels[0].tolist() == [s.tokenizer.convert_tokens_to_ids("▁Yes"), 1]  # [▁Yes, </s>]
    torch.testing.assert_close(s.normalize(score), score)


def test_checkpoint_without_vision_tower_loads_it_from_config(vqa_repos, vqa):
    full_dir, lean_dir, tok_dir, *_ = vqa_repos
    imgs = _images()
    torch.testing.assert_close(_scorer(lean_dir, tok_dir).score(imgs, PROMPTS), vqa.score(imgs, PROMPTS))


def test_score_is_geometric_mean_of_label_token_probabilities(vqa):
    from miro.rewards.vqascore import jpeg_roundtrip

    s = vqa
    imgs = _images()
    chunks, labels = s.encode_text(PROMPTS)
    logp = s.model.answer_log_probs(s.transform(jpeg_roundtrip(imgs, 75)), chunks, labels, vocab_size=len(s.tokenizer))
    yes = s.score(imgs, PROMPTS)
    torch.testing.assert_close(yes, logp.mean(-1).exp())
    # the answer template changes the label and therefore the score
    s.answer_template = "No"
    try:
        no = s.score(imgs, PROMPTS)
    finally:
        s.answer_template = "Yes"
    assert not torch.allclose(no, yes)


def test_batching_and_padding_do_not_change_scores(vqa):
    imgs = _images()
    prompts = ["a dog", "two red cats on the left of the green dog", "blue"]  # different lengths → padded rows
    vqa.batch_size = 1
    try:
        a = vqa.score(imgs, prompts)
    finally:
        vqa.batch_size = 8
    torch.testing.assert_close(a, vqa.score(imgs, prompts), rtol=1e-4, atol=1e-6)


def test_tensor_path_pads_to_square_and_keeps_gradients(vqa):
    s = vqa
    pil = _images()[1:2]  # 40 x 28: expand2square pads with the CLIP mean colour
    x = torch.from_numpy(np.asarray(pil[0], dtype=np.float32) / 255).permute(2, 0, 1)[None].requires_grad_(True)
    r = s.score(x, PROMPTS[:1])
    s.jpeg_quality = None  # the tensor path never goes through JPEG
    try:
        torch.testing.assert_close(r, s.score(pil, PROMPTS[:1]), rtol=2e-3, atol=1e-4)
    finally:
        s.jpeg_quality = 75
    r.sum().backward()
    assert x.grad.abs().sum() > 0


def test_text_cleaning_as_miro():
    from miro.rewards.vqascore import clean_text

    # MIRO's utils/rewards/vqa_scores.py: fenced blocks go with their content, an unclosed fence
    # takes the rest, tags become spaces, stray backticks go, 2+ whitespace runs become one space
    assert clean_text("```json\n<caption>a red dog</caption>\n```") == ""
    assert clean_text("a cat ```python\nprint(1)\n``` on a mat") == "a cat on a mat"
    assert clean_text("a dog ```json\n{") == "a dog"
    assert clean_text("a `red` dog") == "a red dog"
    assert clean_text("two  cats <PERSON> on a mat") == "two cats on a mat"
    assert clean_text("a\nb") == "a\nb"  # a single newline is not a run
    with pytest.raises(ValueError, match="question_template"):
        from miro.rewards.vqascore import VQAScore

        VQAScore(question_template="no placeholder")
    for bad in (0, 96, 7.5, True):
        with pytest.raises(ValueError, match=rf"jpeg_quality must be None .*; got {bad!r}"):
            VQAScore(jpeg_quality=bad)
