"""The exact Shapes detector: classical CV that reads objects back from any RGB image.

Steps (per image, numpy + ``scipy.ndimage``):

1. **Background**: the per-channel median of the 1-pixel frame; the pixel noise from
   differences of neighbouring frame pixels (smooth textures cancel).
2. **Segmentation**: pixels farther than ``fg_threshold`` from the background (lower in a faded
   image, never below the background's texture swing, higher with noise, on a lightly smoothed
   copy when noisy); 4-connected components. Clean scenes keep a full background pixel between
   objects (``world.GAP``), so each component is one object. A poorly fitting component is
   split by raising the threshold when its parts explain the pixels better (touching objects
   after blur, or in generated images).
3. **Fit** (:mod:`miro.shapes.fit`): the colour is the palette line bg → q that explains the
   pixels; coverage is each pixel's position on it; the class is the renderer's coverage map
   that fits best (exact on clean renders). Objects cut by the frame are searched and refined;
   soft objects are also fitted with blurred templates.
4. **Score** = fit quality (1 − residual / area) × min(1, area / smallest object area), so specks
   and shapeless blobs get low confidence and GenEval thresholds apply.

Detections are :class:`miro.eval.geneval_rules.Detection` with class, score, bbox (fitted box,
clipped to the frame), colour, mask, and in ``extra`` the unclipped fitted ``box``, the coverage
``area``, the ``fit`` quality and the template ``blur``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from miro.eval.geneval_rules import Detection
from miro.io import to_rgb
from miro.shapes import world as W
from miro.shapes.fit import ObjectFit, fit_object

@dataclass(frozen=True)
class DetectorConfig:
    """Detector settings (defaults tuned on clean renders; see docs/shapes.md for accuracy)."""

    # RGB distance from the background that marks a foreground pixel: above the largest texture
    # swing (2 × TEXTURE_AMPLITUDE × sqrt(3) = 0.139), below half the closest colour-background
    # distance (0.287), so anti-aliased edges split evenly between object and background.
    fg_threshold: float = 0.16
    faded_fraction: float = 0.5  # in a faded image the threshold drops to this × the largest distance
    min_threshold: float = 0.05  # ...but never below this
    texture_margin: float = 1.25  # ...nor below this × the background swing on the frame
    noise_factor: float = 4.0  # threshold >= noise_factor × per-pixel noise distance
    smooth_above: float = 0.015  # estimated noise sigma above which segmentation smooths first
    min_area: float = 0.3  # components below min_area × smallest object area are ignored
    fit_supersample: int = 4  # sub-samples per pixel side when fitting class templates
    plateau: float = 0.3  # fraction of pixels near the coverage maximum that marks a flat top
    good_fit: float = 0.9  # a moment fit this good (1 - residual/area) skips the search for cut objects
    blur_sigmas: tuple[float, ...] = (0.6, 1.0, 1.5)  # template blurs tried when the sharp fit is poor
    close_call: float = 1.3  # a runner-up class within this factor of the best residual is refined too
    hidden_penalty: float = 0.05  # residual added per px² of a fitted shape lying outside the frame
    margin: int = 3  # pixels around a component read for its fit (blurred tails reach ~2 sigma)


def min_object_area(resolution: int) -> float:
    """Area in pixels of the smallest clean object (the thinnest class at ``world.MIN_SIZE``)."""
    k = min(m[0] for m in W.SHAPE_MOMENTS.values())
    return k * (W.MIN_SIZE * resolution) ** 2


def to_float_image(image, what: str = "image") -> np.ndarray:
    """PIL image, uint8 array (H, W, 3), float array in [0, 1], or a (3, H, W) tensor -> (H, W, 3) float64."""
    try:
        import torch

        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image tensor must be (3, H, W); got {tuple(image.shape)}")
            image = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(image, "convert"):
        image = np.asarray(to_rgb(image, what))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3); got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.size and (arr.min() < -0.01 or arr.max() > 1.01):  # tolerate rounding overshoot only
        raise ValueError(f"float images must lie in [0, 1]; got values in [{arr.min():.3g}, {arr.max():.3g}] (pass uint8 for 0-255)")
    return np.clip(arr, 0.0, 1.0)


def estimate_background(img: np.ndarray) -> tuple[np.ndarray, float]:
    """(background RGB, pixel-noise sigma) of a (H, W, 3) float image, read on its 1-pixel frame."""
    frame = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
    bg = np.median(frame, axis=0)
    # pixel noise from neighbour differences along the frame: smooth textures cancel, white
    # noise of sigma s gives differences of sigma s*sqrt(2); MAD -> sigma via 1.4826
    diffs = np.concatenate([np.diff(img[0], axis=0), np.diff(img[-1], axis=0), np.diff(img[:, 0], axis=0), np.diff(img[:, -1], axis=0)])
    sigma = 1.4826 * float(np.median(np.abs(diffs))) / np.sqrt(2.0)
    return bg, sigma


class ShapesDetector:
    """Callable detector with a small cache keyed on image bytes (rewards share detections)."""

    def __init__(self, config: DetectorConfig | None = None, cache_size: int = 4096):
        self.config = config or DetectorConfig()
        self._cache: OrderedDict[bytes, list[Detection]] = OrderedDict()
        self.cache_size = cache_size

    def __call__(self, image) -> list[Detection]:
        img = to_float_image(image)
        key = hashlib.blake2b(np.ascontiguousarray(img, dtype=np.float32).tobytes(), digest_size=16).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return list(hit)
        dets = detect_array(img, self.config)
        self._cache[key] = dets
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return list(dets)

    def batch(self, images) -> list[list[Detection]]:
        return [self(im) for im in images]

    def cache_clear(self) -> None:
        """Forget every cached detection (a benchmark's repeated runs must each detect)."""
        self._cache.clear()


def detect_array(img: np.ndarray, cfg: DetectorConfig | None = None) -> list[Detection]:
    """Detect objects in a (H, W, 3) float image in [0, 1]."""
    from scipy import ndimage

    cfg = cfg or DetectorConfig()
    h, w, _ = img.shape
    if h < 4 or w < 4:
        raise ValueError(f"image too small for detection: {h}x{w} (at least 4x4)")
    resolution = max(h, w)
    bg, sigma = estimate_background(img)
    seg = ndimage.gaussian_filter(img, sigma=(0.8, 0.8, 0)) if sigma > cfg.smooth_above else img
    eff_sigma = sigma * (0.35 if sigma > cfg.smooth_above else 1.0)
    dist = np.sqrt(((seg - bg) ** 2).sum(-1))
    # half the strongest foreground distance when the whole image is faded (low contrast), never
    # above fg_threshold, never below the noise floor
    faded = cfg.faded_fraction * float(dist.max())
    # ...nor below the background's own swing (texture), read on the frame
    frame = np.concatenate([dist[0], dist[-1], dist[1:-1, 0], dist[1:-1, -1]])
    swing = cfg.texture_margin * float(np.quantile(frame, 0.85))
    thr = max(min(cfg.fg_threshold, max(faded, swing)), cfg.noise_factor * eff_sigma * np.sqrt(3.0), cfg.min_threshold)
    labels, n = ndimage.label(dist > thr)  # 4-connectivity (the default structure)
    if n == 0:
        return []
    a_min = min_object_area(resolution)
    dets: list[Detection] = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        m = cfg.margin
        r0, r1 = max(sl[0].start - m, 0), min(sl[0].stop + m, h)
        c0, c1 = max(sl[1].start - m, 0), min(sl[1].stop + m, w)
        lab_win = labels[r0:r1, c0:c1]
        core = lab_win == lab
        if core.sum() < cfg.min_area * a_min * 0.5:
            continue
        free = (lab_win == 0) | core  # never borrow another object's pixels
        win = img[r0:r1, c0:c1]
        # cut by the frame: the component itself reaches the image border
        cut = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w
        fit = _fit(win, bg, core, free, r0, c0, h, w, cut, cfg)
        if fit is not None and fit.quality < cfg.good_fit and core.sum() >= 2 * cfg.min_area * a_min:
            split = _split(core, dist[r0:r1, c0:c1], free, cfg.min_area * a_min * 0.5)
            if split:  # keep a split only when its parts explain the pixels better
                sub = [_fit(win, bg, p, free & reg, r0, c0, h, w, cut, cfg) for p, reg in split]
                if all(f is not None for f in sub) and sum(f.quality * f.area for f in sub) / sum(f.area for f in sub) > fit.quality + 0.05:
                    fits = sub
                else:
                    fits = [fit]
            else:
                fits = [fit]
        else:
            fits = [fit]
        for f in fits:
            if f is None or f.area < cfg.min_area * a_min:
                continue
            x, y, s = f.box
            score = f.quality * min(1.0, f.area / a_min)
            # the fitted square may overhang the frame (objects cut by it); a fit that lies wholly
            # outside (seen on over-guided images) has no box in the image and is no detection
            bbox = (min(max(x, 0.0), w), min(max(y, 0.0), h), min(max(x + s, 0.0), w), min(max(y + s, 0.0), h))
            if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
                continue
            mask = np.zeros((h, w), dtype=bool)
            mask[r0:r1, c0:c1] = f.alpha >= 0.5
            extra = {"box": (x, y, x + s, y + s), "area": f.area, "fit": f.quality, "blur": f.blur}
            dets.append(Detection(f.cls, score, bbox, f.color, mask, extra))
    dets.sort(key=lambda d: -d.score)
    return dets


def _fit(win, bg, core, free, r0, c0, h, w, cut, cfg) -> ObjectFit | None:
    from scipy import ndimage

    region = ndimage.binary_dilation(core) & free  # the core plus a 1-pixel ring
    wide = ndimage.binary_dilation(core, iterations=cfg.margin) & free
    return fit_object(win, bg, core, region, wide, r0, c0, h, w, cut, cfg)


def _split(core: np.ndarray, dist: np.ndarray, free: np.ndarray, min_px: float):
    """Try to split a component that may hold several touching objects (blur, generated images):
    raise the threshold until >= 2 parts of at least ``min_px`` pixels appear; every free pixel
    then goes to its nearest part. Returns [(part core, part region)] or None."""
    from scipy import ndimage

    peak = float(dist[core].max())
    for frac in (0.4, 0.55, 0.7, 0.85):
        lab, n = ndimage.label((dist > frac * peak) & core)
        if n < 2:
            continue
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        keep = [k + 1 for k in range(n) if sizes[k] >= min_px]
        if len(keep) < 2:
            continue
        seeds = np.isin(lab, keep)
        _, (ri, ci) = ndimage.distance_transform_edt(~seeds, return_indices=True)
        owner = lab[ri, ci]  # nearest kept part of every pixel
        return [((owner == k) & core, owner == k) for k in keep]
    return None


_DEFAULT = ShapesDetector()


def detect(image, config: DetectorConfig | None = None) -> list[Detection]:
    """Detections in one image (PIL, uint8/float array, or (3, H, W) tensor), best first."""
    if config is None:
        return _DEFAULT(image)
    return detect_array(to_float_image(image), config)


def detect_batch(images, config: DetectorConfig | None = None) -> list[list[Detection]]:
    """Detections for a list of images or a (B, 3, H, W) tensor."""
    return [detect(im, config) for im in images]
