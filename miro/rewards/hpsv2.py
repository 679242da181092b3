"""``hpsv2_score``: Human Preference Score v2 / v2.1 (Wu et al., 2023) on transformers ``CLIPModel``.

HPS v2.0 and v2.1 are open_clip ``ViT-H-14`` fine-tunes published as ``xswu/HPSv2`` /
``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt`` (``ckpt['state_dict']``, loaded strictly
into open_clip by ``hpsv2/img_score.py``). They are read with ``torch.load(weights_only=True)``
and key-remapped into a transformers ``CLIPModel`` (:mod:`.clip_remap`); open_clip is not used.
A folder holding an already converted ``CLIPModel`` (``config.json`` + weights) also loads.

The score is the plain cosine of the normalised image and text features (hpsv2 ``img_score.py``:
``image_features @ text_features.T``, no logit scale; leaderboards print ×100). MIRO trains on
v2.1 and stores the raw cosine. v2.0 and v2.1 values are not comparable.

Two preprocessings (hpsv2 ``src/open_clip/transform.py``), selectable with ``preprocess``:

* ``"crop"`` (default, as MIRO's training and eval scorers: ``light_augmentation=False``):
  resize the short side to 224 (bicubic), centre-crop 224;
* ``"pad"`` (the official ``hpsv2.score()``, ``light_augmentation=True``): resize the long side
  to 224 and zero-pad (black) to a centred square. They coincide for square images.
"""

from __future__ import annotations

import json
from pathlib import Path

from miro.rewards.base import register
from miro.rewards.clip_base import ClipBackbone, ClipLikeScorer
from miro.rewards.clip_remap import OPEN_CLIP_VIT_H14, clip_config_from_open_clip, open_clip_to_transformers
from miro.rewards.pickscore import LAION_CLIP_H14
from miro.rewards.preprocess import ImageTransform
from miro.rewards.weights import build_and_load, from_pretrained_strict, load_state_dict, resolve_file

HPSV2_REPO = "xswu/HPSv2"
# hpsv2 1.2.0 hpsv2/utils.py hps_version_map
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_PREPROCESS = ("crop", "pad")


class HPSv2(ClipLikeScorer):
    keys = ("hpsv2_score",)
    use_logit_scale = False  # HPS is the plain cosine
    divisor = 1.0  # MIRO stores the raw cosine
    score_range = (-1.0, 1.0)


def load_hps_model(model: str, version: str, *, checkpoint=None, open_clip_config=None, tokenizer=LAION_CLIP_H14,
                   revision=None, local_files_only=False):
    """(CLIPModel, tokenizer) for an HPS checkpoint or a converted CLIPModel folder."""
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(str(model)).expanduser()
    if checkpoint is None and folder.is_dir() and (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") == "clip":
            m = from_pretrained_strict(CLIPModel, str(folder), f"HPS {version}", local_files_only=local_files_only)
            tok = AutoTokenizer.from_pretrained(tokenizer or str(folder), local_files_only=local_files_only)
            return m, tok
    path = resolve_file(checkpoint or model, None if checkpoint else HPS_CHECKPOINTS[version], revision=revision,
                        local_files_only=local_files_only)
    sd = open_clip_to_transformers(load_state_dict(path))
    config = clip_config_from_open_clip(open_clip_config or OPEN_CLIP_VIT_H14)
    m = build_and_load(lambda: CLIPModel(config), sd, f"HPS {version} ({path.name})")
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=local_files_only)
    return m, tok


@register("hpsv2_score")
def hpsv2(
    version: str = "v2.1",
    *,
    model: str = HPSV2_REPO,
    checkpoint: str | None = None,
    preprocess: str = "crop",
    tokenizer: str = LAION_CLIP_H14,
    open_clip_config: dict | None = None,
    device=None,
    dtype=None,
    revision: str | None = None,
    local_files_only: bool = False,
    batch_size: int = 32,
) -> HPSv2:
    """HPS scorer.

    ``version``: ``"v2.1"`` (MIRO training) or ``"v2.0"`` (MIRO's eval script). ``model``: the hub
    repo (or a local folder) holding ``HPS_v2*_compressed.pt``, or a folder with a converted
    ``CLIPModel``; ``checkpoint`` names the ``.pt`` file directly. ``tokenizer``: open_clip's BPE as
    a transformers tokenizer. ``open_clip_config``: the open_clip model config (ViT-H-14 default).
    """
    if version not in HPS_CHECKPOINTS:
        raise ValueError(f"version={version!r} is not one of {sorted(HPS_CHECKPOINTS)}")
    if preprocess not in _PREPROCESS:
        raise ValueError(f"preprocess={preprocess!r} is not one of {_PREPROCESS} ('crop': MIRO, 'pad': official hpsv2.score)")
    size = int((open_clip_config or OPEN_CLIP_VIT_H14)["vision_cfg"]["image_size"])
    # torchvision transforms (CenterCrop rounds its offset), as open_clip's image_transform
    transform = ImageTransform(size=size, resize="shortest" if preprocess == "crop" else "longest_pad", crop_rounding="round")
    bb = ClipBackbone(
        model, transform=transform, max_length=77, device=device, dtype=dtype, revision=revision,
        local_files_only=local_files_only,
        loader=lambda: load_hps_model(model, version, checkpoint=checkpoint, open_clip_config=open_clip_config,
                                      tokenizer=tokenizer, revision=revision, local_files_only=local_files_only),
        # open_clip's tokenize() pads every prompt to the 77-token context
        text_kwargs=dict(padding="max_length", truncation=True),
    )
    scorer = HPSv2(bb, batch_size=batch_size)
    scorer.version = version
    return scorer
