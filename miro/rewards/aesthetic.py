"""``aesthetic_score``: the LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

An MLP on the L2-normalised OpenAI CLIP ViT-L/14 image embedding (``simple_inference.py``):
``Linear(768,1024) → Dropout(.2) → Linear(1024,128) → Dropout(.2) → Linear(128,64) → Dropout(.1)
→ Linear(64,16) → Linear(16,1)``, the ReLUs commented out — so in eval mode the predictor is one
affine map ``w·ê + b``. Its state dict (``layers.{0,2,4,6,7}.{weight,bias}``) is published as
``sac+logos+ava1-l14-linearMSE.pth`` in the GitHub repository (Apache-2.0); a ``.safetensors``
with the same names (e.g. the ``ttj/sac-logos-ava1-l14-linearMSE`` mirror) loads as well. The CLIP
backbone is transformers ``CLIPModel("openai/clip-vit-large-patch14")`` with OpenAI's transform
(shortest side 224, bicubic, centre crop). Scores are nominally 1–10 (typically 4–7); MIRO
stores raw / 10.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from miro.rewards.base import Scorer, check_batch_size, check_prompts, register
from miro.rewards.clip_base import ClipBackbone
from miro.rewards.preprocess import batches, num_images
from miro.rewards.weights import is_url, load_state_dict, load_strict, resolve_file, snapshot_dir

OPENAI_CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_MLP_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)
# safetensors mirror on the hub (what `miro download aesthetic_score` fetches); its tensor names are
# assumed to be the published layers.* (any prefix is stripped) and checked strictly on load
AESTHETIC_MLP_MIRROR = "ttj/sac-logos-ava1-l14-linearMSE"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class AestheticMLP(nn.Module):
    """The predictor head; parameter names match the published ``.pth`` (``layers.N.*``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b) with ``forward(x) = x @ w + b`` in eval mode (no nonlinearity between the Linears)."""
        w = torch.eye(self.layers[0].in_features, dtype=self.layers[0].weight.dtype, device=self.layers[0].weight.device)
        b = torch.zeros(1, self.layers[0].in_features, dtype=w.dtype, device=w.device)
        b = self.forward(b)[0]
        return self.forward(w) - b, b


def _single_weight_file(folder: Path) -> Path:
    files = sorted(f for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
    if len(files) > 1:
        files = [f for f in files if f.suffix == ".safetensors"] or files
    if len(files) != 1:
        raise ValueError(f"expected one weight file in {folder}; found {[f.name for f in files]}")
    return files[0]


def _mlp_state_dict(sd: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """The ``layers.*`` tensors without a wrapper prefix (``mlp.layers.0.weight`` →
    ``layers.0.weight``). The file must hold nothing else, under one prefix: a file with other
    tensors (an ImageReward checkpoint, whose head has the same layout) is not this MLP."""
    prefixes = {k[: k.find("layers.")] if k.find("layers.") >= 0 else None for k in sd}
    if None in prefixes or len(prefixes) != 1:
        other = sorted(k for k in sd if "layers." not in k)
        raise ValueError(f"{source} is not an aesthetic MLP: expected only layers.* tensors under one prefix; "
                         f"found " + (f"other tensors ({', '.join(other[:4])}{' ...' if len(other) > 4 else ''})"
                                      if other else f"the prefixes {sorted(prefixes)}"))
    (prefix,) = prefixes
    return {k[len(prefix):]: v for k, v in sd.items()}


class AestheticScorer(Scorer):
    keys = ("aesthetic_score",)
    differentiable = True
    score_range = (None, None)  # nominally 1-10 (an unbounded affine map)

    def __init__(self, backbone: ClipBackbone, mlp_weights: str | None = None, *, mlp_filename: str | None = None,
                 local_files_only: bool = False, batch_size: int = 32):
        batch_size = check_batch_size(batch_size)
        self.backbone = backbone
        self.mlp_weights = None if mlp_weights is None else str(mlp_weights)
        self.mlp_filename = mlp_filename
        self.local_files_only = local_files_only
        self.batch_size = int(batch_size)
        self.mlp: AestheticMLP | None = None

    def load(self):
        """Load the weights now (they otherwise load on first use); returns self."""
        self._load()
        return self

    def _load(self) -> None:
        if self.mlp is None:
            self.backbone.load()
            path = self._weights_path()
            mlp = AestheticMLP(self.backbone.model.config.projection_dim)
            load_strict(mlp, _mlp_state_dict(load_state_dict(path), path), f"aesthetic MLP ({path.name})")
            self.mlp = mlp.eval().requires_grad_(False).to(self.backbone.device)

    def _weights_path(self):
        """The head's weight file: the given source, else the published .pth (URL), else the hub mirror."""
        sources = [self.mlp_weights] if self.mlp_weights else [AESTHETIC_MLP_URL, AESTHETIC_MLP_MIRROR]
        errors = []
        for src in sources:
            try:
                if self.mlp_filename is None and not is_url(src) and not Path(src).expanduser().is_file():
                    # a folder or a hub repository: its single weight file
                    return _single_weight_file(snapshot_dir(src, allow_patterns=[f"*{x}" for x in _WEIGHT_SUFFIXES],
                                                            local_files_only=self.local_files_only))
                return resolve_file(src, self.mlp_filename, local_files_only=self.local_files_only)
            except Exception as e:  # try the next source; report all if none works
                errors.append(f"{src}: {e}")
        raise ValueError("aesthetic MLP weights not found; " + " | ".join(errors))

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def to(self, device=None, dtype=None) -> "AestheticScorer":
        self.backbone.to(device, dtype)
        if self.mlp is not None:
            self.mlp.to(self.backbone.device)  # the head stays float32
        return self

    def embed_image(self, images) -> torch.Tensor:
        """L2-normalised CLIP ViT-L/14 image embeddings (the predictor's input)."""
        return torch.cat([self.backbone.image_features(c) for c in batches(images, self.batch_size)])

    def score(self, images, prompts=None) -> torch.Tensor:
        """Aesthetic score per image; ``prompts`` are accepted for interface symmetry and ignored."""
        n = num_images(images)
        if prompts is not None:
            check_prompts(prompts, n)
        self._load()
        if n == 0:
            return torch.zeros(0, device=self.device)
        return torch.cat([self.mlp(self.backbone.image_features(c)).squeeze(-1) for c in batches(images, self.batch_size)])

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return raw / 10.0  # MIRO stores aesthetic / 10


@register("aesthetic_score")
def aesthetic(
    model: str = OPENAI_CLIP_L14,
    *,
    mlp_weights: str | None = None,
    mlp_filename: str | None = None,
    device=None,
    dtype=None,
    revision: str | None = None,
    local_files_only: bool = False,
    batch_size: int = 32,
) -> AestheticScorer:
    """Aesthetic scorer. ``mlp_weights``: a ``.pth`` / ``.safetensors`` path, a URL, or a hub repo
    (``mlp_filename`` names the file in it; without it the repo's single weight file is used).
    Default: the published ``.pth`` from GitHub (cached after the first download), falling back
    to the ``ttj/sac-logos-ava1-l14-linearMSE`` hub mirror (e.g. fetched by ``miro download``)."""
    def loader():
        from transformers import CLIPModel  # image tower only: no tokenizer needed

        from miro.rewards.weights import from_pretrained_strict

        return from_pretrained_strict(CLIPModel, model, "aesthetic CLIP", revision=revision,
                                      local_files_only=local_files_only), None

    # OpenAI clip._transform: Resize(n_px, bicubic) → CenterCrop(n_px) with torchvision's rounding;
    # n_px = the tower's image_size (224 for ViT-L/14)
    bb = ClipBackbone(model, transform=None, crop_rounding="round", device=device, dtype=dtype, revision=revision,
                      local_files_only=local_files_only, loader=loader)
    return AestheticScorer(bb, mlp_weights, mlp_filename=mlp_filename, local_files_only=local_files_only, batch_size=batch_size)
