"""``image_reward_score``: ImageReward v1.0 (Xu et al., 2023) rebuilt on transformers BLIP classes.

The published ``THUDM/ImageReward`` ``ImageReward.pt`` is a plain state dict of the
``image-reward`` package's module tree (``ImageReward/ImageReward.py``, ``models/BLIP/*``): a BLIP
ViT-L/16 at 224 px (``blip.visual_encoder.*``), BLIP's "MED" BERT text encoder with
cross-attention to every image token (``blip.text_encoder.*``, ``med_config.json``, vocab 30524),
and an MLP head (``mlp.layers.*``). It is read with ``torch.load(weights_only=True)`` and
key-remapped into ``BlipVisionModel`` (fused qkv, LayerNorm eps 1e-6) + ``BlipTextModel``
(``encoder_hidden_size`` = 1024); the unused ``vision_proj`` / ``text_proj`` are dropped.

Score (``ImageReward.score``): the prompt is tokenised with ``bert-base-uncased`` (+ ``[DEC]``,
``[ENC]``; ``padding="max_length"``, ``max_length=35``), the text cross-attends to the image, the
``[CLS]`` feature goes through the (affine) MLP, and ``r = (mlp(h) − 0.16717…) / 1.03333…``.
MIRO stores ``(r + 2) / 4``. Preprocessing: shortest side 224 (bicubic), centre crop, OpenAI
mean/std.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from miro.rewards.aesthetic import AestheticMLP
from miro.rewards.base import Scorer, check_batch_size, check_prompts, forwards, register
from miro.rewards.preprocess import ImageTransform, num_images, paired_batches
from miro.rewards.weights import build_and_load, load_state_dict, resolve_device, resolve_dtype, resolve_file

IMAGE_REWARD_REPO = "THUDM/ImageReward"
BERT_BASE_UNCASED = "google-bert/bert-base-uncased"  # the canonical id of bert-base-uncased
# ImageReward/ImageReward.py: self.mean, self.std (reward standardisation on the training set)
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35  # ImageReward.score: padding="max_length", max_length=35
# models/BLIP/blip.py create_vit('large', 224): ViT-L/16, width 1024, depth 24, 16 heads
BLIP_VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=16)

_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def remap_image_reward(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt names → :class:`ImageRewardModel` names (see tests/fixtures/rewards)."""
    out, unknown = {}, []
    for k, t in state_dict.items():
        if k.startswith("blip.visual_encoder."):
            s = k[len("blip.visual_encoder."):]
            if s == "cls_token":
                out["visual_encoder.embeddings.class_embedding"] = t
            elif s == "pos_embed":
                out["visual_encoder.embeddings.position_embedding"] = t
            elif s.startswith("patch_embed.proj."):
                out["visual_encoder.embeddings.patch_embedding." + s[len("patch_embed.proj."):]] = t
            elif s.startswith("norm."):
                out["visual_encoder.post_layernorm." + s[len("norm."):]] = t
            else:
                m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", s)
                if m and m.group(2) in _VIT_BLOCK:
                    out[f"visual_encoder.encoder.layers.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}.{m.group(3)}"] = t
                else:
                    unknown.append(k)
        elif k.startswith("blip.text_encoder."):
            s = k[len("blip.text_encoder."):]
            if s != "embeddings.position_ids":  # arange buffer, rebuilt
                out["text_encoder." + s] = t
        elif k.startswith(("blip.vision_proj.", "blip.text_proj.")):
            continue  # contrastive projections, unused by the reward
        elif k.startswith("mlp.layers."):
            out[k] = t
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"not an ImageReward checkpoint; unknown tensors: {', '.join(unknown[:8])}")
    return out


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)  # ImageReward's MLP has the same layout

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """Unstandardised MLP output per (image, prompt) pair, shape (B,), float32."""
        img = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        img_mask = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                                encoder_attention_mask=img_mask, is_decoder=False)  # bidirectional, as med.py mode="multimodal"
        h = out.last_hidden_state[:, 0].float()
        return self.mlp(h.to(self.mlp.layers[0].weight.dtype)).float().squeeze(-1)


def build_configs(med_config: dict, vision: dict | None = None):
    """(BlipVisionConfig, BlipTextConfig) from ``med_config.json`` and the BLIP ViT size."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v = dict(BLIP_VIT_LARGE if vision is None else vision)
    vcfg = BlipVisionConfig(**v, hidden_act="gelu", layer_norm_eps=1e-6)  # vit.py: nn.GELU, LayerNorm(eps=1e-6)
    tcfg = BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=v["hidden_size"],  # blip_pretrain.py: encoder_config.encoder_width = vision_width
        intermediate_size=med_config["intermediate_size"], num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config.get("max_position_embeddings", 512),
        hidden_act=med_config.get("hidden_act", "gelu"), layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        # [DEC] / [SEP] ids of bert-base-uncased + BLIP's tokens; unused by the encoder forward
        bos_token_id=30522 if med_config["vocab_size"] > 30522 else None,
        sep_token_id=102 if med_config["vocab_size"] > 102 else None,
        is_decoder=True,  # builds the cross-attention layers (med.py add_cross_attention); forward runs bidirectionally
    )
    return vcfg, tcfg


def load_image_reward(model: str, *, med_config=None, tokenizer: str = BERT_BASE_UNCASED, vision: dict | None = None,
                      revision=None, local_files_only=False):
    """(ImageRewardModel, tokenizer) from a hub repo / folder holding ImageReward.pt and med_config.json."""
    from transformers import AutoTokenizer

    ckpt = resolve_file(model, "ImageReward.pt", revision=revision, local_files_only=local_files_only)
    if isinstance(med_config, dict):
        med = med_config
    else:
        src = med_config or model
        path = resolve_file(src, None if med_config else "med_config.json", revision=revision, local_files_only=local_files_only)
        med = json.loads(path.read_text())
    vcfg, tcfg = build_configs(med, vision)
    sd = remap_image_reward(load_state_dict(ckpt))
    net = build_and_load(lambda: ImageRewardModel(vcfg, tcfg), sd, f"ImageReward ({ckpt.name})")
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=local_files_only)
    # models/BLIP/blip.py init_tokenizer: [DEC] as bos, [ENC] as an extra special token (ids 30522, 30523)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_tokens(["[ENC]"], special_tokens=True)
    return net, tok


class ImageReward(Scorer):
    keys = ("image_reward_score",)
    differentiable = True
    score_range = (None, None)  # standardised; roughly -2..2

    def __init__(self, model: str = IMAGE_REWARD_REPO, *, med_config=None, tokenizer: str = BERT_BASE_UNCASED,
                 vision: dict | None = None, device=None, dtype=None, revision=None, local_files_only=False,
                 batch_size: int = 32):
        batch_size = check_batch_size(batch_size)
        self.model_name, self.med_config, self.tokenizer_name, self.vision = str(model), med_config, tokenizer, vision
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.revision, self.local_files_only, self.batch_size = revision, local_files_only, int(batch_size)
        self.model = self.tokenizer = None
        size = int((vision or BLIP_VIT_LARGE)["image_size"])
        # ImageReward._transform(224): Resize(224, bicubic) → CenterCrop(224) (torchvision rounding)
        self.transform = ImageTransform(size=size, crop_rounding="round")

    def load(self):
        """Load the weights now (they otherwise load on first use); returns self."""
        self._load()
        return self

    def _load(self) -> None:
        if self.model is None:
            net, tok = load_image_reward(self.model_name, med_config=self.med_config, tokenizer=self.tokenizer_name,
                                         vision=self.vision, revision=self.revision, local_files_only=self.local_files_only)
            self.model = net.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
            self.model.mlp.float()  # the head runs in float32 on the float32 [CLS] feature, as ImageReward.py
            self.tokenizer = tok

    def to(self, device=None, dtype=None) -> "ImageReward":
        self.device = resolve_device(device) if device is not None else self.device
        self.dtype = resolve_dtype(dtype) if dtype is not None else self.dtype
        if self.model is not None:
            self.model.to(device=self.device, dtype=self.dtype)
            self.model.mlp.float()
        return self

    def mlp_output(self, images, prompts) -> torch.Tensor:
        """The head's output before standardisation, (B,) float32."""
        n = num_images(images)
        prompts = check_prompts(prompts, n, scorer=self.key)
        self._load()
        out = []
        for chunk, ps in paired_batches(images, prompts, self.batch_size):
            enc = self.tokenizer(ps, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt")
            px = self.transform(chunk, device=self.device, dtype=self.dtype)
            out.append(self.model(px, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)))
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def score(self, images, prompts) -> torch.Tensor:
        return (self.mlp_output(images, prompts) - IR_MEAN) / IR_STD

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw + 2.0) / 4.0  # MIRO stores (r + 2) / 4


@register("image_reward_score")
@forwards(ImageReward)
def image_reward(model: str = IMAGE_REWARD_REPO, **kwargs) -> ImageReward:
    """ImageReward v1.0 scorer; ``model``: hub repo or folder with ``ImageReward.pt`` + ``med_config.json``."""
    return ImageReward(model, **kwargs)
