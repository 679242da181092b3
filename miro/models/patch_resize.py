"""Warm start across patch sizes: the patch-shaped tensors of a RIN state dict, resized.

Only ``network.patch_extractor`` (tokens from p×p×C patches), ``network.map_tokens_to_patches.1``
(tokens back to patches) and ``network.data_pos_embedding`` (one row per token) depend on the
patch size; every latent, conditioning and read/write weight works on any number of data tokens.
Going from patch P to patch p = P / r (r an integer) the new tensors are chosen so that a token of
the finer model sees its p×p patch the way the coarse model saw a P×P patch of the image upsampled
r times by pixel repetition (the "resize the patch embedding, keep the token" rule of FlexiViT,
Beyer et al. 2023, here for exact integer ratios, where it is a sum over r×r blocks):

* extractor: ``W_p[:, i, j, c] = sum_{a,b < r} W_P[:, r·i + a, r·j + b, c]`` (bias kept);
* head: ``W_p[i, j, c, :] = mean_{a,b < r} W_P[r·i + a, r·j + b, c, :]`` (and the bias), the
  coarse model's output patch box-filtered down by r;
* positions: the (G, G) table bilinearly resampled to (r·G, r·G) (``align_corners=False``, so
  each new token takes the value at its centre in the old grid).

This is a starting point, not an equivalent model: objects span r times more tokens than the
coarse model was trained on, so the run that follows must re-learn scale (docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

PATCH_KEYS = (
    "network.patch_extractor.weight",
    "network.map_tokens_to_patches.1.weight",
    "network.map_tokens_to_patches.1.bias",
    "network.data_pos_embedding",
)


def patch_size_of(state: Mapping[str, Tensor], channels: int) -> int:
    """The patch size a RIN state dict was built with, from its extractor's input width p·p·C."""
    width = int(state["network.patch_extractor.weight"].shape[1])
    p = math.isqrt(width // channels) if width % channels == 0 else 0
    if p < 1 or p * p * channels != width:
        raise ValueError(f"network.patch_extractor.weight has {width} inputs, not p*p*{channels} for any patch p")
    return p


def resize_patch_tensors(state: Mapping[str, Tensor], patch_to: int, channels: int) -> dict[str, Tensor]:
    """A copy of ``state`` with its patch-shaped tensors resized to ``patch_to`` (see the module
    docstring); every other tensor is shared, not copied. The source patch must be an integer
    multiple of ``patch_to`` (finer patches only)."""
    patch_from = patch_size_of(state, channels)
    if patch_to < 1 or patch_from % patch_to:
        raise ValueError(f"can resize patch {patch_from} only to a divisor of it (1 .. {patch_from}); got {patch_to}")
    out = dict(state)
    if patch_to == patch_from:
        return out
    if any(k.startswith("network.pixel_unet.") for k in state):  # its depth follows the patch: no tensor maps
        raise ValueError(f"cannot resize patch {patch_from} to {patch_to}: the source has pixel_unet, whose "
                         "encoder/decoder has one level per factor 2 of the patch; warm-start a finer patch from a "
                         "model without pixel_unet")
    r, p, c = patch_from // patch_to, patch_to, channels

    w = state["network.patch_extractor.weight"].float()  # (D, P*P*C), features (p1, p2, c)
    d = w.shape[0]
    w = w.reshape(d, p, r, p, r, c).sum(dim=(2, 4))
    out["network.patch_extractor.weight"] = w.reshape(d, p * p * c).to(state["network.patch_extractor.weight"].dtype)

    head_w = state["network.map_tokens_to_patches.1.weight"]  # (P*P*C, D)
    head_b = state["network.map_tokens_to_patches.1.bias"]  # (P*P*C,)
    hw = head_w.float().reshape(p, r, p, r, c, -1).mean(dim=(1, 3))
    hb = head_b.float().reshape(p, r, p, r, c).mean(dim=(1, 3))
    out["network.map_tokens_to_patches.1.weight"] = hw.reshape(p * p * c, -1).to(head_w.dtype)
    out["network.map_tokens_to_patches.1.bias"] = hb.reshape(p * p * c).to(head_b.dtype)

    pos = state["network.data_pos_embedding"]  # (G*G, D), tokens row-major
    g = math.isqrt(pos.shape[0])
    if g * g != pos.shape[0]:
        raise ValueError(f"network.data_pos_embedding has {pos.shape[0]} rows, not a square grid")
    table = pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(g * r, g * r), mode="bilinear", align_corners=False)
    out["network.data_pos_embedding"] = table[0].permute(1, 2, 0).reshape(g * g * r * r, -1).to(pos.dtype)
    return out
