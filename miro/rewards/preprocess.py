"""Image preprocessing for the reward models: one spec, two paths (PIL and differentiable tensor).

Every reward model here expects a fixed-size, mean/std-normalised RGB tensor, and they differ
only in how an image of arbitrary size gets there:

* ``"shortest"`` — resize the short side to ``size`` (bicubic), centre-crop ``size``×``size``.
  This is torchvision's ``Resize(size) → CenterCrop(size)`` used by OpenAI CLIP, the LAION
  aesthetic predictor, ImageReward and open_clip's default eval transform, and the same as
  transformers' ``CLIPImageProcessor`` (``shortest_edge`` + ``crop_size``).
* ``"longest_pad"`` — resize the long side to ``size`` and zero-pad (black, before
  normalisation) to a centred square: open_clip's ``ResizeMaxSize`` used by the official
  ``hpsv2.score()`` (``light_augmentation=True``, hpsv2/src/open_clip/transform.py). There, an
  image whose long side already equals ``size`` is left unpadded, and so non-square, which the
  ViT cannot take; here it is padded like any other.
* ``pad_to_square`` — LLaVA's ``expand2square`` (t2v_metrics ``mm_utils.py``): pad to a square
  with a fill colour before the shortest-side resize (VQAScore uses the CLIP mean colour).

The PIL path (:meth:`ImageTransform.from_pil`) resizes with PIL's bicubic filter on uint8 images,
as the reference pipelines do. The tensor path (:meth:`ImageTransform.from_tensor`) takes a
float (B, 3, H, W) batch in [0, 1] and keeps gradients: it resizes with the same separable filter
as PIL (``Resample.c``: bicubic a = −0.5, support scaled by the downscale factor, weights
normalised per output pixel) — PyTorch's antialiased bicubic when downsampling, two explicit
interpolation matrices when upsampling — so both agree with the PIL path to within PIL's uint8
rounding (tested); exactly when no resize is needed. (torchvision's tensor ``Resize``, which the official HPS transform applies after
``ToTensor``, differs from PIL by about as much when upsampling.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from miro.io import to_rgb

# OpenAI CLIP normalisation (openai/CLIP clip.py `_transform`), shared by every reward model here.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESIZE_MODES = ("shortest", "longest_pad", "none")
_CROP_ROUNDING = ("round", "floor")


@dataclass(frozen=True)
class ImageTransform:
    """Resize / crop / pad / normalise spec shared by the PIL and tensor paths."""

    size: int = 224  # output height and width
    resize: str = "shortest"  # "shortest" (resize + centre crop), "longest_pad" (HPS), "none" (size must match)
    # centre-crop offset: "round" = torchvision CenterCrop int(round(d / 2)); "floor" = transformers d // 2
    crop_rounding: str = "round"
    # expand2square fill colour as RGB in [0, 1], applied first; None disables (VQAScore sets it)
    pad_to_square: tuple[float, float, float] | None = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN  # per-channel normalisation mean
    std: tuple[float, float, float] = OPENAI_CLIP_STD  # per-channel normalisation std

    def __post_init__(self):
        if self.resize not in _RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r} is not one of {_RESIZE_MODES}")
        if self.crop_rounding not in _CROP_ROUNDING:
            raise ValueError(f"crop_rounding={self.crop_rounding!r} is not one of {_CROP_ROUNDING}")
        if int(self.size) <= 0:
            raise ValueError(f"size must be a positive integer; got {self.size!r}")

    # ----------------------------------------------------------------------------- geometry
    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """Size after the resize step (before crop / pad), as the reference transforms compute it."""
        s = self.size
        if self.resize == "shortest":
            if min(h, w) == s:
                return h, w
            # torchvision Resize(int) and CLIPImageProcessor both truncate the long side.
            return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if self.resize == "longest_pad":
            scale = s / float(max(h, w))
            if scale == 1.0:
                return h, w
            return round(h * scale), round(w * scale)  # ResizeMaxSize rounds
        return h, w

    def _crop_offsets(self, h: int, w: int) -> tuple[int, int]:
        s = self.size
        if self.crop_rounding == "round":
            return int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return (h - s) // 2, (w - s) // 2

    @staticmethod
    def _pad_offsets(h: int, w: int, s: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding of ResizeMaxSize (pad_w // 2 on the left)."""
        ph, pw = max(s - h, 0), max(s - w, 0)
        return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2

    @staticmethod
    def _square_offsets(h: int, w: int) -> tuple[int, int, int]:
        """expand2square: side and where the image is pasted ((side - h) // 2, (side - w) // 2)."""
        side = max(h, w)
        return side, (side - h) // 2, (side - w) // 2

    # ----------------------------------------------------------------------------- PIL path
    def from_pil(self, images, device=None, dtype=torch.float32) -> torch.Tensor:
        """Preprocess a list of PIL images into a normalised (B, 3, size, size) tensor."""
        from PIL import Image

        out = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise ValueError(f"images[{i}] must be a PIL image; got {type(im).__name__}")
            out.append(self._pil_one(to_rgb(im, f"images[{i}]")))
        if not out:
            return torch.zeros(0, 3, self.size, self.size, device=device, dtype=dtype)
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        return self._normalize(x.to(device=device, dtype=torch.float32)).to(dtype)

    def _pil_one(self, im) -> np.ndarray:
        from PIL import Image

        if self.pad_to_square is not None:
            w, h = im.size
            side, top, left = self._square_offsets(h, w)
            if side != h or side != w:
                fill = tuple(int(c * 255) for c in self.pad_to_square)  # t2v_metrics: int(x*255)
                canvas = Image.new("RGB", (side, side), fill)
                canvas.paste(im, (left, top))
                im = canvas
        w, h = im.size
        nh, nw = self.resized_hw(h, w)
        if (nh, nw) != (h, w):
            im = im.resize((nw, nh), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        return self._crop_or_pad_np(arr)

    def _crop_or_pad_np(self, arr: np.ndarray) -> np.ndarray:
        s = self.size
        h, w = arr.shape[:2]
        if self.resize == "longest_pad":
            if max(h, w) == s and (h, w) != (s, s):
                t, b, l, r = self._pad_offsets(h, w, s)
                arr = np.pad(arr, ((t, b), (l, r), (0, 0)))
            elif (h, w) != (s, s):
                return self._center_crop_np(arr)
            return arr
        if self.resize == "none" and (h, w) != (s, s):
            raise ValueError(f"resize='none' needs {s}x{s} images; got {w}x{h}")
        return self._center_crop_np(arr)

    def _center_crop_np(self, arr: np.ndarray) -> np.ndarray:
        s = self.size
        h, w = arr.shape[:2]
        if h < s or w < s:  # torchvision pads before cropping; only reachable with resize="none"
            raise ValueError(f"image {w}x{h} is smaller than the crop size {s}")
        top, left = self._crop_offsets(h, w)
        return arr[top : top + s, left : left + s]

    # ----------------------------------------------------------------------------- tensor path
    def from_tensor(self, x: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
        """Preprocess a float (B, 3, H, W) batch in [0, 1]; differentiable w.r.t. ``x``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"image tensor must have shape (B, 3, H, W); got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"image tensor must be floating point with values in [0, 1]; got dtype {x.dtype}")
        if x.numel():
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            # 1 % slack for rounding; a [-1, 1] or 0-255 batch would otherwise be scored silently wrong
            if not (lo >= -0.01 and hi <= 1.01):
                raise ValueError(f"image tensor values must be in [0, 1]; got [{lo:.4g}, {hi:.4g}] "
                                 "(map [-1, 1] images with x / 2 + 0.5, 0-255 ones with x / 255)")
        x = x.to(device=device if device is not None else x.device, dtype=torch.float32)
        s = self.size
        if self.pad_to_square is not None:
            h, w = x.shape[-2:]
            side, top, left = self._square_offsets(h, w)
            if side != h or side != w:
                # PIL fills with the uint8 colour int(c * 255); use the same value.
                fill = torch.tensor([int(c * 255) / 255.0 for c in self.pad_to_square], device=x.device)
                canvas = fill.view(1, 3, 1, 1).expand(x.shape[0], 3, side, side).clone()
                canvas[..., top : top + h, left : left + w] = x  # slice assignment keeps the graph
                x = canvas
        h, w = x.shape[-2:]
        nh, nw = self.resized_hw(h, w)
        if (nh, nw) != (h, w):
            x = pil_bicubic_resize(x, nh, nw)
        if self.resize == "longest_pad" and max(nh, nw) == s and (nh, nw) != (s, s):
            t, b, l, r = self._pad_offsets(nh, nw, s)
            x = F.pad(x, (l, r, t, b))
        elif (nh, nw) != (s, s):
            if self.resize == "none":
                raise ValueError(f"resize='none' needs {s}x{s} images; got {nw}x{nh}")
            if nh < s or nw < s:
                raise ValueError(f"image {nw}x{nh} is smaller than the crop size {s}")
            top, left = self._crop_offsets(nh, nw)
            x = x[..., top : top + s, left : left + s]
        x = self._normalize(x)
        return x if dtype is None else x.to(dtype)

    def __call__(self, images, device=None, dtype=torch.float32) -> torch.Tensor:
        """PIL list or (B, 3, H, W) tensor in [0, 1] → normalised (B, 3, size, size)."""
        if isinstance(images, torch.Tensor):
            return self.from_tensor(images, device=device, dtype=dtype)
        if isinstance(images, (list, tuple)):
            return self.from_pil(images, device=device, dtype=dtype)
        raise ValueError(
            f"images must be a list of PIL images or a (B, 3, H, W) float tensor in [0, 1]; got {type(images).__name__}"
        )

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's bicubic kernel (Resample.c ``bicubic_filter``, a = -0.5)."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def pil_resample_matrix(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of PIL's 1-D bicubic resampling (``precompute_coeffs`` in Resample.c)."""
    return _resample_matrix(int(n_in), int(n_out)).to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support 2, widened when downsampling (antialiasing)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C int() truncates toward zero, as Python's int()
        hi = min(int(center + support + 0.5), n_in)
        j = torch.arange(lo, hi, dtype=torch.float64)
        k = _bicubic((j - center + 0.5) / filterscale)
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0 else k
    return w


def pil_bicubic_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Differentiable resize of (B, C, H, W) to (h, w) with PIL's bicubic filter, clamped to [0, 1].

    Pure downsampling uses PyTorch's antialiased bicubic kernel, a port of PIL's (same a = -0.5
    filter and widened support) and much faster; any upsampled axis goes through the explicit
    PIL weight matrices, because PyTorch's bicubic upsampling uses a = -0.75.
    """
    if h <= x.shape[-2] and w <= x.shape[-1]:
        y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return y.clamp(0.0, 1.0)
    # PIL resamples horizontally first, then vertically, saturating the uint8 intermediate in between
    # (bicubic overshoots at edges); clamping after each pass reproduces that.
    ww = pil_resample_matrix(x.shape[-1], w, x.device).to(x.dtype)
    wh = pil_resample_matrix(x.shape[-2], h, x.device).to(x.dtype)
    y = torch.matmul(x, ww.t()).clamp(0.0, 1.0)
    return torch.matmul(wh, y).clamp(0.0, 1.0)


def num_images(images) -> int:
    """Batch size of a PIL list or a (B, 3, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must have shape (B, 3, H, W); got {tuple(images.shape)}")
        return int(images.shape[0])
    if isinstance(images, (list, tuple)):
        return len(images)
    raise ValueError(
        f"images must be a list of PIL images or a (B, 3, H, W) float tensor in [0, 1]; got {type(images).__name__}"
    )


def batches(images, batch_size: int):
    """Yield consecutive chunks of a PIL list or a tensor batch."""
    n = num_images(images)
    for start in range(0, n, batch_size):
        yield images[start : start + batch_size]


def paired_batches(images, prompts, batch_size: int):
    """Yield ``(images chunk, its prompts)`` for consecutive chunks of ``batch_size`` images."""
    n = num_images(images)
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        yield chunk, prompts[start : start + num_images(chunk)]
