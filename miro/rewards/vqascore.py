"""``vqa_score``: VQAScore (Lin et al., 2024) with CLIP-FlanT5, on plain transformers classes.

CLIP-FlanT5 (t2v_metrics 3.0, ``models/vqascore_models/clip_t5*``) is a LLaVA-style model:

* vision: ``CLIPVisionModel`` (``openai/clip-vit-large-patch14-336``); the hidden state of the
  second-to-last layer without the CLS token (576 × 1024 patch features);
* projector ``mlp2x_gelu``: ``Linear(1024, d) → GELU → Linear(d, d)`` (d = T5 ``d_model``);
* ``T5ForConditionalGeneration`` (FLAN-T5); the projected patches replace the ``<image>``
  placeholder inside the encoder's input embeddings.

The prompt is ``SYSTEM + " USER: <image>\\n" + 'Does this figure show "{text}"? Please answer yes
or no.' + " ASSISTANT: "``; the text on each side of ``<image>`` is tokenised separately (T5
appends ``</s>`` to each). The answer ``"Yes"`` is tokenised the same way (``[▁Yes, </s>]``) and
used as decoder labels; the score is ``exp(−mean CE)``, the geometric mean of the label-token
probabilities — P("Yes") in [0, 1]. As in t2v_metrics, logits cover the tokenizer's vocabulary
(``resize_token_embeddings(len(tokenizer))``: 32100 for FLAN-T5). Images are first padded to a
square with the CLIP mean colour (``expand2square``), then resized (336, bicubic) and centre-cropped.

Checkpoint names follow ``CLIPT5ForConditionalGeneration`` (see tests/fixtures/rewards): T5 names,
``mm_projector.{0,2}.*``, and, when saved, ``vision_tower.vision_tower[.vision_model].*``; when the
vision tower is not in the checkpoint it is loaded from ``config.mm_vision_tower``, as the
reference loader does. MIRO cleans the text first (fenced code blocks with their content, ``<…>``
tags and backticks removed) and scores PIL images after a round trip through JPEG files (PIL's
default quality, 75), as its ``utils/rewards/vqa_scores.py`` hands t2v_metrics file paths.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
from torch import nn

from miro.io import to_rgb
from miro.rewards.base import Scorer, check_batch_size, check_prompts, forwards, register
from miro.rewards.preprocess import OPENAI_CLIP_MEAN, ImageTransform, num_images, paired_batches
from miro.rewards.weights import (build_and_load, from_pretrained_strict, load_state_dict, resolve_device, resolve_dtype,
                                  snapshot_dir)

CLIP_FLANT5_XXL = "zhiqiulin/clip-flant5-xxl"
CLIP_FLANT5_XL = "zhiqiulin/clip-flant5-xl"
FLAN_T5_XXL = "google/flan-t5-xxl"
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
# t2v_metrics/constants.py
SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
# clip_t5_model.py default_question_template / default_answer_template
QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER_TEMPLATE = "Yes"


def format_question(question: str) -> str:
    """The ``t5_chat`` conversation format of clip_t5_model.py."""
    return SYSTEM_MSG + " USER: " + IMAGE_TOKEN + "\n" + question + " ASSISTANT: "


def clean_text(text: str) -> str:
    """MIRO's cleaning before VQAScore (``utils/rewards/vqa_scores.py``): fenced code blocks are
    dropped with their content (an unclosed fence drops the rest of the text), ``<…>`` tags become
    spaces, remaining backticks go, runs of two or more whitespace characters become one space."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"```.*", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text).replace("`", "")
    return re.sub(r"\s{2,}", " ", text).strip()


def jpeg_roundtrip(images, quality: int) -> list:
    """PIL images saved as JPEG at ``quality`` and read back, as MIRO's scorer does through files."""
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        to_rgb(im).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as j:
            out.append(j.convert("RGB"))
    return out


class ClipFlanT5(nn.Module):
    """CLIP vision tower + projector + T5 encoder-decoder."""

    def __init__(self, vision_config, t5_config, *, projector_type: str = "mlp2x_gelu", select_layer: int = -2):
        super().__init__()
        from transformers import CLIPVisionModel, T5ForConditionalGeneration

        self.vision_tower = CLIPVisionModel(vision_config)
        d_in, d = vision_config.hidden_size, t5_config.d_model
        m = re.match(r"^mlp(\d+)x_gelu$", projector_type)
        if projector_type == "linear":
            self.mm_projector = nn.Sequential(nn.Linear(d_in, d))
        elif m:
            layers: list[nn.Module] = [nn.Linear(d_in, d)]
            for _ in range(1, int(m.group(1))):
                layers += [nn.GELU(), nn.Linear(d, d)]
            self.mm_projector = nn.Sequential(*layers)
        else:
            raise ValueError(f"mm_projector_type={projector_type!r} is not 'linear' or 'mlp<N>x_gelu'")
        self.lm = T5ForConditionalGeneration(t5_config)
        self.select_layer = int(select_layer)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, patches, d_model) projected patch features of the selected layer (CLS dropped)."""
        hs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return self.mm_projector(hs[self.select_layer][:, 1:])

    def build_inputs(self, chunks: list[list[list[int]]], image_features: torch.Tensor):
        """Encoder input embeddings with each ``<image>`` replaced by that row's patch features.

        ``chunks[b]`` are the token ids of the text around the placeholder(s) of row b. Rows are
        right-padded with zeros and masked, as t2v_metrics pads ``input_ids``.
        """
        embed = self.lm.get_input_embeddings()
        dev = image_features.device
        rows = []
        for b, parts in enumerate(chunks):
            pieces = []
            for j, ids in enumerate(parts):
                if j > 0:
                    pieces.append(image_features[b])
                if ids:
                    pieces.append(embed(torch.tensor(ids, device=dev)).to(image_features.dtype))
            rows.append(torch.cat(pieces))
        n = max(r.shape[0] for r in rows)
        embeds = torch.stack([nn.functional.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])
        mask = torch.stack([torch.arange(n, device=dev) < r.shape[0] for r in rows]).long()
        return embeds, mask

    def answer_log_probs(self, pixel_values, chunks, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """(B, T) log-probabilities of the label tokens (−inf-free; padded labels are −100)."""
        embeds, mask = self.build_inputs(chunks, self.encode_images(pixel_values))
        dec_mask = (labels != -100).long()
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask)
        logits = out.logits.float()
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits = logits[..., :vocab_size]  # = resize_token_embeddings(len(tokenizer))
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors / PyTorch checkpoint folder."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()][:1]
    if not files:
        raise ValueError(f"no model.safetensors / pytorch_model.bin (or index) in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_state_dict(folder / f, unwrap=()))
    return sd


def split_checkpoint(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(vision, projector, t5) state dicts from CLIPT5ForConditionalGeneration names."""
    vision, proj, t5 = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("vision_tower.vision_tower."):
            s = k[len("vision_tower.vision_tower."):]
            vision[s[len("vision_model."):] if s.startswith("vision_model.") else s] = v
        elif k.startswith("mm_projector."):
            proj[k[len("mm_projector."):]] = v
        elif k == "embed_tokens.weight":
            continue  # alias of shared.weight (CLIPT5ForConditionalGeneration.embed_tokens)
        else:
            t5[k] = v
    # the three tied embedding names of T5 may be saved as any subset
    tied = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    src = next((t5[k] for k in tied if k in t5), sd.get("embed_tokens.weight"))
    if src is None:
        raise ValueError("checkpoint has no token embedding (shared.weight)")
    for k in tied:
        t5.setdefault(k, src)
    vision.pop("embeddings.position_ids", None)
    return vision, proj, t5


def load_clip_flant5(model: str, *, tokenizer: str = FLAN_T5_XXL, vision_tower: str | None = None,
                     revision=None, local_files_only=False):
    """(ClipFlanT5, tokenizer, image size) from a clip-flant5 hub repo or folder."""
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, T5Config

    folder = snapshot_dir(model, allow_patterns=["*.json", "*.safetensors", "*.bin"], revision=revision,
                          local_files_only=local_files_only)
    cfg = json.loads((folder / "config.json").read_text())
    t5_cfg = T5Config.from_dict({k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "auto_map")})
    vision, proj, t5 = split_checkpoint(_read_weights(folder))
    tower = vision_tower or cfg.get("mm_vision_tower") or CLIP_L14_336
    vcfg = CLIPVisionConfig.from_pretrained(str(tower), local_files_only=local_files_only)
    if not vision:  # not saved with the checkpoint: the reference loads the tower by name
        tower_model = from_pretrained_strict(CLIPVisionModel, str(tower), "VQAScore vision tower",
                                             local_files_only=local_files_only)
        vision = {k: v for k, v in tower_model.state_dict().items() if not k.endswith("position_ids")}
    full = {f"vision_tower.{k}": v for k, v in vision.items()}
    full.update({f"mm_projector.{k}": v for k, v in proj.items()})
    full.update({f"lm.{k}": v for k, v in t5.items()})
    if getattr(t5_cfg, "tie_word_embeddings", False):
        full.setdefault("lm.lm_head.weight", full["lm.shared.weight"])  # original T5 ties the LM head
    net = build_and_load(
        lambda: ClipFlanT5(vcfg, t5_cfg, projector_type=cfg.get("mm_projector_type", "mlp2x_gelu"),
                           select_layer=cfg.get("mm_vision_select_layer", -2)),
        full, f"CLIP-FlanT5 ({model})",
    )
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=local_files_only)
    return net, tok, int(vcfg.image_size)


class VQAScore(Scorer):
    keys = ("vqa_score",)
    differentiable = True
    score_range = (0.0, 1.0)

    def __init__(self, model: str = CLIP_FLANT5_XXL, *, tokenizer: str = FLAN_T5_XXL, vision_tower: str | None = None,
                 question_template: str = QUESTION_TEMPLATE, answer_template: str = ANSWER_TEMPLATE,
                 clean_prompts: bool = True, jpeg_quality: int | None = 75, device=None, dtype=None, revision=None,
                 local_files_only=False, batch_size: int = 8):
        batch_size = check_batch_size(batch_size)
        if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int)
                                         or not 1 <= jpeg_quality <= 95):
            raise ValueError(f"jpeg_quality must be None (no JPEG round trip) or an integer in [1, 95]; "
                             f"got {jpeg_quality!r}")
        self.jpeg_quality = jpeg_quality
        if "{}" not in question_template:
            raise ValueError(f"question_template must contain '{{}}' for the prompt; got {question_template!r}")
        self.model_name, self.tokenizer_name, self.vision_tower = str(model), tokenizer, vision_tower
        self.question_template, self.answer_template, self.clean_prompts = question_template, answer_template, clean_prompts
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.revision, self.local_files_only, self.batch_size = revision, local_files_only, int(batch_size)
        self.model = self.tokenizer = self.transform = None

    def load(self):
        """Load the weights now (they otherwise load on first use); returns self."""
        self._load()
        return self

    def _load(self) -> None:
        if self.model is None:
            net, tok, size = load_clip_flant5(self.model_name, tokenizer=self.tokenizer_name, vision_tower=self.vision_tower,
                                              revision=self.revision, local_files_only=self.local_files_only)
            self.model = net.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
            self.tokenizer = tok
            # expand2square with tuple(int(x*255) for x in image_mean), then CLIPImageProcessor (d // 2 crop)
            self.transform = ImageTransform(size=size, crop_rounding="floor", pad_to_square=OPENAI_CLIP_MEAN)

    def to(self, device=None, dtype=None) -> "VQAScore":
        self.device = resolve_device(device) if device is not None else self.device
        self.dtype = resolve_dtype(dtype) if dtype is not None else self.dtype
        if self.model is not None:
            self.model.to(device=self.device, dtype=self.dtype)
        return self

    def encode_text(self, prompts: list[str]) -> tuple[list[list[list[int]]], torch.Tensor]:
        """(chunks around <image> per prompt, right-padded labels with −100) for a batch."""
        chunks, labels = [], []
        for p in prompts:
            text = clean_text(p) if self.clean_prompts else p
            q = format_question(self.question_template.format(text))
            chunks.append([self.tokenizer(c).input_ids for c in q.split(IMAGE_TOKEN)])
            labels.append(self.tokenizer(self.answer_template.format(text)).input_ids)
        n = max(len(x) for x in labels)
        lab = torch.full((len(labels), n), -100, dtype=torch.long)
        for i, x in enumerate(labels):
            lab[i, : len(x)] = torch.tensor(x)
        return chunks, lab

    def score(self, images, prompts) -> torch.Tensor:
        n = num_images(images)
        prompts = check_prompts(prompts, n, scorer=self.key)
        self._load()
        out = []
        for chunk, ps in paired_batches(images, prompts, self.batch_size):
            chunks, labels = self.encode_text(ps)
            labels = labels.to(self.device)
            if self.jpeg_quality is not None and not isinstance(chunk, torch.Tensor):
                chunk = jpeg_roundtrip(chunk, self.jpeg_quality)  # a tensor keeps its gradients instead
            px = self.transform(chunk, device=self.device, dtype=self.dtype)
            logp = self.model.answer_log_probs(px, chunks, labels, vocab_size=len(self.tokenizer))
            valid = labels != -100
            out.append(((logp * valid).sum(-1) / valid.sum(-1)).exp())  # exp(−mean CE)
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return raw  # MIRO stores the probability as is


@register("vqa_score")
@forwards(VQAScore)
def vqa_score(model: str = CLIP_FLANT5_XXL, **kwargs) -> VQAScore:
    """VQAScore scorer (CLIP-FlanT5); ``model``: ``zhiqiulin/clip-flant5-xxl`` (MIRO) or ``-xl``, or a folder."""
    return VQAScore(model, **kwargs)
