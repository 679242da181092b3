"""Tiny reward models for tests: offline tokenizers, random weights in the published on-disk formats,
and independent reference forwards written against the *original* tensor names.

Checkpoint names come from tests/fixtures/rewards/*.tsv (read from the reference packages; see the
README there); tiny shapes are derived from them by :func:`tiny_state_dict`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

FIXTURES = Path(__file__).parent / "fixtures" / "rewards"
WORDS = ("a photo of the dog cat red blue green two three on left right above below is and with an image "
         "does this figure show please answer yes no chat between curious user artificial intelligence "
         "assistant gives helpful detailed polite answers to questions assistant: user: s").split()


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    """name → shape from a fixture TSV (comment lines start with #)."""
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        k, shape = line.split("\t")
        out[k] = tuple(json.loads(shape))
    return out


# ----------------------------------------------------------------------------- tokenizers
def _save_fast(tok, folder: Path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(folder))


def make_clip_tokenizer(folder: Path) -> int:
    """CLIP-like word-level tokenizer; <|startoftext|>, <|endoftext|> are the two largest ids. Returns vocab size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"!": 0, "<unk>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    sot, eot = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = sot, eot
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", sot), ("<|endoftext|>", eot)])
    _save_fast(tok, folder, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="!")
    return len(vocab)


def make_bert_tokenizer(folder: Path) -> int:
    """BERT-like tokenizer ([PAD]=0, [CLS] ... [SEP]). Returns vocab size (before [DEC]/[ENC])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    _save_fast(tok, folder, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return len(vocab)


def make_t5_tokenizer(folder: Path) -> int:
    """T5-like unigram tokenizer (<pad>=0, </s>=1, <unk>=2, ▁-prefixed pieces, </s> appended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = set()
    for w in WORDS + ["yes", "Yes", '"', "?", ".", ",", "'", "\n", ":"]:
        for p in ("▁" + w, w):
            if p not in seen:
                seen.add(p)
                pieces.append((p, -1.0 - len(pieces) * 0.01))
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'\"?.,:▁":
        if ch not in seen:
            seen.add(ch)
            pieces.append((ch, -8.0))
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    _save_fast(tok, folder, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return len(pieces)


# ----------------------------------------------------------------------------- tiny CLIP (transformers format)
def tiny_clip_config(vocab: int, image_size: int = 32, patch: int = 8, proj: int = 16):
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab,
                max_position_embeddings=77, hidden_act="gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
                  patch_size=patch, hidden_act="gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj, logit_scale_init_value=math.log(1 / 0.07))


def save_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32, logit_scale: float | None = None) -> Path:
    """Random tiny CLIPModel + tokenizer saved with save_pretrained (the hub layout)."""
    from transformers import CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_clip_tokenizer(folder)
    torch.manual_seed(seed)
    m = CLIPModel(tiny_clip_config(vocab, image_size=image_size))
    with torch.no_grad():
        for p in m.parameters():  # larger random weights so that scores differ clearly between inputs
            p.add_(torch.randn_like(p) * 0.05)
        if logit_scale is not None:
            m.logit_scale.fill_(logit_scale)
    m.save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------- tiny checkpoints from fixture names
def tiny_state_dict(full: dict[str, tuple[int, ...]], dims: dict[int, int], layers: dict[str, int], seed: int = 0,
                    std: float = 0.2) -> dict[str, torch.Tensor]:
    """Scale a full-size name → shape table down: keep layer indices < ``layers[prefix]``, map sizes via ``dims``.

    ``layers`` maps a regex with one group (the layer index) to the number of layers to keep.
    Sizes not in ``dims`` are kept. LayerNorm weights start at 1.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in full.items():
        skip = False
        for pat, n in layers.items():
            m = re.search(pat, k)
            if m and int(m.group(1)) >= n:
                skip = True
        if skip:
            continue
        tiny = tuple(dims.get(s, s) for s in shape)
        t = torch.randn(tiny, generator=g) * std
        if re.search(r"(ln|norm|LayerNorm|layer_norm)[^.]*\.weight$", k) or k.endswith(("norm1.weight", "norm2.weight")):
            t = 1.0 + 0.1 * torch.randn(tiny, generator=g)
        out[k] = t
    return out


def ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def attention(x, kv, wq, bq, wk, bk, wv, bv, wo, bo, heads, mask=None):
    """Plain multi-head attention (scale 1/sqrt(head_dim)); ``mask`` is additive."""
    q, k, v = F.linear(x, wq, bq), F.linear(kv, wk, bk), F.linear(kv, wv, bv)
    B, Lq, _ = q.shape
    Lk = k.shape[1]
    q = q.view(B, Lq, heads, -1).transpose(1, 2)
    k = k.view(B, Lk, heads, -1).transpose(1, 2)
    v = v.view(B, Lk, heads, -1).transpose(1, 2)
    att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, Lq, -1)
    return F.linear(o, wo, bo)


def packed_attention(x, w_qkv, b_qkv, wo, bo, heads, mask=None):
    """Self-attention with packed (3d, d) q/k/v weights (nn.MultiheadAttention / timm layout)."""
    wq, wk, wv = w_qkv.chunk(3)
    bq, bk, bv = b_qkv.chunk(3)
    return attention(x, x, wq, bq, wk, bk, wv, bv, wo, bo, heads, mask)


def open_clip_reference(sd, pixel_values, tokens, v_heads: int, t_heads: int):
    """Normalised (image, text) features of an open_clip ViT CLIP, from open_clip tensor names."""
    def block(x, p, heads, mask=None):
        h = ln(x, sd, p + "ln_1", 1e-5)
        x = x + packed_attention(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], sd[p + "attn.out_proj.weight"],
                                 sd[p + "attn.out_proj.bias"], heads, mask)
        h = ln(x, sd, p + "ln_2", 1e-5)
        return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])), sd[p + "mlp.c_proj.weight"],
                            sd[p + "mlp.c_proj.bias"])

    # image: conv1 (no bias) → [cls; patches] + pos → ln_pre → blocks → ln_post → x[:, 0] @ proj
    x = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = ln(x, sd, "visual.ln_pre", 1e-5)
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        x = block(x, f"visual.transformer.resblocks.{i}.", v_heads)
        i += 1
    img = ln(x, sd, "visual.ln_post", 1e-5)[:, 0] @ sd["visual.proj"]
    # text: token + pos → causal blocks → ln_final → token at argmax id → @ text_projection
    L = tokens.shape[1]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:L]
    mask = torch.full((L, L), float("-inf")).triu(1)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        t = block(t, f"transformer.resblocks.{i}.", t_heads, mask)
        i += 1
    t = ln(t, sd, "ln_final", 1e-5)
    txt = t[torch.arange(t.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def blip_image_reward_reference(sd, pixel_values, input_ids, attention_mask, v_heads: int, t_heads: int):
    """ImageReward's unstandardised MLP output, from ImageReward.pt tensor names (vit.py + med.py + MLP)."""
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixel_values, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[p + "pos_embed"][:, : x.shape[1] + 1]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = ln(x, sd, b + "norm1", 1e-6)
        x = x + packed_attention(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"], sd[b + "attn.proj.weight"],
                                 sd[b + "attn.proj.bias"], v_heads)
        h = ln(x, sd, b + "norm2", 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"],
                         sd[b + "mlp.fc2.bias"])
        i += 1
    img = ln(x, sd, p + "norm", 1e-6)

    t = "blip.text_encoder."
    L = input_ids.shape[1]
    h = sd[t + "embeddings.word_embeddings.weight"][input_ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    h = ln(h, sd, t + "embeddings.LayerNorm", 1e-12)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def attn_block(h, kv, prefix, m):
        a = attention(h, kv, sd[prefix + "self.query.weight"], sd[prefix + "self.query.bias"], sd[prefix + "self.key.weight"],
                      sd[prefix + "self.key.bias"], sd[prefix + "self.value.weight"], sd[prefix + "self.value.bias"],
                      sd[prefix + "output.dense.weight"], sd[prefix + "output.dense.bias"], t_heads, m)
        return ln(a + h, sd, prefix + "output.LayerNorm", 1e-12)

    i = 0
    while f"{t}encoder.layer.{i}.attention.self.query.weight" in sd:
        b = f"{t}encoder.layer.{i}."
        h = attn_block(h, h, b + "attention.", mask)
        h = attn_block(h, img, b + "crossattention.", None)  # every image token is attended
        f = F.gelu(F.linear(h, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
        h = ln(F.linear(f, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"]) + h, sd, b + "output.LayerNorm", 1e-12)
        i += 1
    y = h[:, 0]
    for j in (0, 2, 4, 6, 7):  # Linear layers of the head (dropouts in between are inactive)
        y = F.linear(y, sd[f"mlp.layers.{j}.weight"], sd[f"mlp.layers.{j}.bias"])
    return y.squeeze(-1)
