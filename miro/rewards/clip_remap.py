"""open_clip checkpoints → transformers ``CLIPModel``: config and tensor-name remapping.

open_clip's ``CLIP`` (as vendored in ``hpsv2`` 1.2.0, ``src/open_clip/{model,transformer}.py``)
and transformers' ``CLIPModel`` compute the same function for a standard ViT CLIP:

* attention: open_clip's fused ``attn.in_proj_{weight,bias}`` (3W, W) is split row-wise into
  ``q_proj``, ``k_proj``, ``v_proj`` (``nn.MultiheadAttention`` order q, k, v);
* projections: open_clip stores ``visual.proj`` and ``text_projection`` as (width, embed) and
  multiplies ``x @ proj``; transformers' ``nn.Linear`` weights are their transposes;
* text pooling: open_clip takes the token at ``text.argmax(-1)`` (the end-of-text id 49407 is the
  largest id); transformers takes the first ``eos_token_id`` — the same token;
* GELU: open_clip's ViT-H-14 uses exact ``nn.GELU`` (not QuickGELU), LayerNorm eps 1e-5.

The non-persistent ``attn_mask`` buffer is rebuilt by transformers' causal mask.
"""

from __future__ import annotations

import re

import torch

# hpsv2 1.2.0 src/open_clip/model_configs/ViT-H-14.json
OPEN_CLIP_VIT_H14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# OpenAI CLIP BPE special tokens (<|startoftext|>, <|endoftext|>).
SOT_ID, EOT_ID = 49406, 49407


def clip_config_from_open_clip(cfg: dict, *, quick_gelu: bool = False):
    """transformers ``CLIPConfig`` equivalent to an open_clip model config dict."""
    from transformers import CLIPConfig

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if quick_gelu else "gelu"
    v_width, t_width = int(v["width"]), int(t["width"])
    vocab = int(t.get("vocab_size", 49408))
    vision = dict(
        hidden_size=v_width, intermediate_size=int(v_width * v.get("mlp_ratio", 4.0)), num_hidden_layers=int(v["layers"]),
        num_attention_heads=v_width // int(v.get("head_width", 64)), image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]), hidden_act=act, layer_norm_eps=1e-5,
    )
    text = dict(
        hidden_size=t_width, intermediate_size=int(t_width * t.get("mlp_ratio", 4.0)), num_hidden_layers=int(t["layers"]),
        num_attention_heads=int(t["heads"]), max_position_embeddings=int(t["context_length"]), vocab_size=vocab,
        hidden_act=act, layer_norm_eps=1e-5,
        # special ids only matter for pooling: the first end-of-text token (open_clip: argmax id)
        bos_token_id=min(SOT_ID, vocab - 2), eos_token_id=min(EOT_ID, vocab - 1), pad_token_id=0,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(cfg["embed_dim"]))


_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _block(rest: str, prefix: str, tensor: torch.Tensor, out: dict) -> None:
    m = re.match(r"(\d+)\.(.+)$", rest)
    if m is None:
        raise KeyError(rest)
    i, sub = m.groups()
    base = f"{prefix}.encoder.layers.{i}."
    if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if sub.endswith("weight") else "bias"
        q, k, v = tensor.chunk(3, dim=0)
        out[base + f"self_attn.q_proj.{kind}"] = q
        out[base + f"self_attn.k_proj.{kind}"] = k
        out[base + f"self_attn.v_proj.{kind}"] = v
        return
    for src, dst in _BLOCK.items():
        if sub.startswith(src + "."):
            out[base + dst + sub[len(src):]] = tensor
            return
    raise KeyError(sub)


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split / transpose) an open_clip ViT CLIP state dict into ``CLIPModel`` names.

    A ``module.`` prefix (DistributedDataParallel) is stripped. Unknown tensors raise ``ValueError``
    so that a checkpoint of a different architecture is never half-loaded.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        try:
            if k == "logit_scale":
                out["logit_scale"] = t.reshape(())
            elif k == "positional_embedding":
                out["text_model.embeddings.position_embedding.weight"] = t
            elif k == "token_embedding.weight":
                out["text_model.embeddings.token_embedding.weight"] = t
            elif k == "text_projection":
                out["text_projection.weight"] = t.t().contiguous()
            elif k.startswith("ln_final."):
                out["text_model.final_layer_norm." + k[len("ln_final."):]] = t
            elif k.startswith("transformer.resblocks."):
                _block(k[len("transformer.resblocks."):], "text_model", t, out)
            elif k == "visual.class_embedding":
                out["vision_model.embeddings.class_embedding"] = t
            elif k == "visual.positional_embedding":
                out["vision_model.embeddings.position_embedding.weight"] = t
            elif k == "visual.conv1.weight":
                out["vision_model.embeddings.patch_embedding.weight"] = t
            elif k == "visual.proj":
                out["visual_projection.weight"] = t.t().contiguous()
            elif k.startswith("visual.ln_pre."):
                out["vision_model.pre_layrnorm." + k[len("visual.ln_pre."):]] = t
            elif k.startswith("visual.ln_post."):
                out["vision_model.post_layernorm." + k[len("visual.ln_post."):]] = t
            elif k.startswith("visual.transformer.resblocks."):
                _block(k[len("visual.transformer.resblocks."):], "vision_model", t, out)
            elif k == "attn_mask":
                continue  # causal mask buffer; transformers builds its own
            else:
                unknown.append(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP checkpoint; unknown tensors: {', '.join(unknown[:8])}")
    return out

