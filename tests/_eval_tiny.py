"""Tiny randomly initialised GenEval-like back-ends saved in their real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import torch


WORDS = ("a photo of colored object red orange yellow green blue purple pink brown black white "
         "cat dog bench clock cow apple mouse computer tv remote").split()


def coco_labels() -> list[str]:
    """The 80 COCO labels with transformers' spellings (GenEval renames three of them)."""
    from miro.eval.geneval import GENEVAL_OBJECTS, LABEL_ALIASES

    back = {v: k for k, v in LABEL_ALIASES.items() if k in ("mouse", "remote", "keyboard")}
    return [back.get(n, n) for n in GENEVAL_OBJECTS]


def save_tiny_mask2former(path, seed: int = 0, size: int = 64) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers import Mask2FormerImageProcessorPil

    path = Path(path)
    labels = coco_labels()
    swin = SwinConfig(image_size=size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, mask_feature_size=32, feature_size=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, num_queries=6, num_labels=80, common_stride=4,
                            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Mask2FormerForUniversalSegmentation(cfg).save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"height": size, "width": size}).save_pretrained(path)
    return path


def _tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from miro.encoders.tiny import word_level_tokenizer

    # ids: pad 0, unk 1, bos 2, eos 3 (as _text_vision's config), then the words
    tok, n_vocab = word_level_tokenizer(["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"], "<|unk|>",
                                        "<|startoftext|> $A <|endoftext|>", words=WORDS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", unk_token="<|unk|>",
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    return fast, n_vocab


def _text_vision(vocab: int, image_size: int = 32):
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    return text, vision


def save_tiny_clip(path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    path = Path(path)
    fast, vocab = _tiny_tokenizer()
    text, vision = _text_vision(vocab)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_tiny_owlv2(path, seed: int = 0) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil

    path = Path(path)
    fast, vocab = _tiny_tokenizer()
    text, vision = _text_vision(vocab)
    cfg = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)  # class head: text width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Owlv2ForObjectDetection(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    Owlv2ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
