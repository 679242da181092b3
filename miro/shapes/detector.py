"""The exact Shapes detector: classical CV that reads objects back from any RGB image.

Steps (per image, numpy + ``scipy.ndimage``):

1. **Background**: the per-channel median of the 1-pixel frame; its noise level from the
   frame's median absolute deviation.
2. **Segmentation**: pixels farther than ``fg_threshold`` (raised with the noise level) from the
   background, on a lightly smoothed copy when the image is noisy; 4-connected components.
   Clean scenes keep a full background pixel between objects (``world.GAP``), so each
   component is one object.
3. **Colour**: every palette colour q defines a line bg→q in RGB; anti-aliased, blurred or
   contrast-reduced pixels of a q-coloured object lie on that line (``p = bg + a·(q − bg)``).
   The colour is the line with the least squared residual over the component's pixels, and
   ``a`` (clipped to [0, 1]) is the pixel's coverage. Additive colour casts move bg and object
   together, so they cancel.
4. **Class**: the renderer's coverage map of each class is fitted to the component's coverage:
   size from the area (``area = k_cls·s²``), box origin from the centroid (``world.SHAPE_MOMENTS``);
   objects touching the frame are fitted from their visible box instead. The class with the
   lowest L1 residual wins; on a clean render the right class fits to within rounding.
5. **Score** = fit quality (1 − residual / area) × min(1, area / smallest object area), so specks
   and shapeless blobs get low confidence and GenEval thresholds apply.

Detections are :class:`miro.eval.geneval_rules.Detection` with class, score, bbox (fitted box,
clipped to the frame), colour, mask, and in ``extra`` the unclipped fitted ``box``, the coverage
``area`` and the ``fit`` quality.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from miro.eval.geneval_rules import Detection
from miro.shapes import world as W
from miro.shapes.render import coverage

_PALETTE = np.asarray([W.COLOR_RGB[c] for c in W.COLORS], dtype=np.float64)


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
    hidden_penalty: float = 0.05  # residual added per px² of a fitted shape lying outside the frame


def min_object_area(resolution: int) -> float:
    """Area in pixels of the smallest clean object (the thinnest class at ``world.MIN_SIZE``)."""
    k = min(m[0] for m in W.SHAPE_MOMENTS.values())
    return k * (W.MIN_SIZE * resolution) ** 2


def to_float_image(image) -> np.ndarray:
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
        image = np.asarray(image.convert("RGB"))
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


def _fit_color(pix: np.ndarray, bg: np.ndarray) -> tuple[int, np.ndarray, float]:
    """Best palette line for pixels (n, 3): (colour index, coverage per pixel, mean residual)."""
    d = pix - bg  # (n, 3)
    dirs = _PALETTE - bg  # (C, 3)
    norms = np.maximum((dirs * dirs).sum(1), 1e-9)
    a = np.clip(d @ dirs.T / norms, 0.0, 1.0)  # (n, C)
    res = ((d[:, None, :] - a[..., None] * dirs[None]) ** 2).sum(-1).sum(0)  # (C,)
    best = int(np.argmin(res))
    return best, a[:, best], float(res[best] / len(pix))


def _candidate_boxes(cls: str, alpha: np.ndarray, r0: int, c0: int, h: int, w: int, touches: bool):
    """Candidate (x, y, size) boxes in pixels for a class.

    Inside the frame: size from the area and origin from the centroid (exact for a clean
    render). At the frame, the hidden part is unknown, so sizes from the visible box's longer
    side up to 2.5× it are tried, anchored at the side away from the frame and, along an axis
    that is not cut, aligned to either end or centred on the visible extent.
    """
    k, cu, cv = W.SHAPE_MOMENTS[cls]
    area = alpha.sum()
    rows, cols = np.nonzero(alpha)
    wts = alpha[rows, cols]
    my = (wts * (rows + r0 + 0.5)).sum() / area
    mx = (wts * (cols + c0 + 0.5)).sum() / area
    s = float(np.sqrt(area / k))
    out = [(mx - cu * s, my - cv * s, s)]
    if touches:
        on = alpha >= 0.5
        if on.any():
            rr, cc = np.nonzero(on)
            x1, x2, y1, y2 = cc.min() + c0, cc.max() + c0 + 1, rr.min() + r0, rr.max() + r0 + 1
            vis = float(max(x2 - x1, y2 - y1))
            for size in np.linspace(vis, 2.5 * vis, 7):
                xs = [x2 - size] if x1 <= 0 and x2 < w else [x1] if x2 >= w and x1 > 0 else [x1, x2 - size, (x1 + x2 - size) / 2]
                ys = [y2 - size] if y1 <= 0 and y2 < h else [y1] if y2 >= h and y1 > 0 else [y1, y2 - size, (y1 + y2 - size) / 2]
                out += [(float(x), float(y), float(size)) for x in xs for y in ys]
    return out


def _refine(resid_of, cls: str, box: tuple[float, float, float], resid: float, step: float = 0.5, min_step: float = 0.125):
    """Pattern search over (x, y, size) from ``box``; returns (residual, cls, box)."""
    box = list(box)
    while step >= min_step:
        improved = False
        for k in range(3):
            for d in (step, -step):
                trial = list(box)
                trial[k] += d
                r = resid_of(cls, tuple(trial))
                if r < resid:
                    resid, box, improved = r, trial, True
        if not improved:
            step /= 2
    return resid, cls, tuple(box)


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


def detect_array(img: np.ndarray, cfg: DetectorConfig | None = None) -> list[Detection]:
    """Detect objects in a (H, W, 3) float image in [0, 1]."""
    from scipy import ndimage

    cfg = cfg or DetectorConfig()
    h, w, _ = img.shape
    if h < 4 or w < 4:
        raise ValueError(f"image too small for detection: {h}x{w}")
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
    slices = ndimage.find_objects(labels)
    dets: list[Detection] = []
    for lab, sl in enumerate(slices, start=1):
        r0, r1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, h)
        c0, c1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, w)
        lab_win = labels[r0:r1, c0:c1]
        core = lab_win == lab
        if core.sum() < cfg.min_area * a_min * 0.5:
            continue
        # the component plus a 1-pixel ring (faint anti-aliased edges), minus other components
        region = ndimage.binary_dilation(core) & ((lab_win == 0) | core)
        win = img[r0:r1, c0:c1]
        ci, a_core, _ = _fit_color(win[core], bg)
        dirv = _PALETTE[ci] - bg
        alpha = np.clip(((win - bg) @ dirv) / max(float(dirv @ dirv), 1e-9), 0.0, 1.0) * region
        # a uniformly faded object (low contrast) has a flat top below 1: rescale it to 1
        top = float(np.quantile(a_core, 0.9))
        if 0.05 < top < 0.95 and np.mean(a_core >= 0.85 * top) >= cfg.plateau:
            alpha = np.clip(alpha / top, 0.0, 1.0)
        area = float(alpha.sum())
        if area < cfg.min_area * a_min:
            continue
        # cut by the frame: the component itself reaches the image border
        touches = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w
        rows, cols = np.arange(r0, r1), np.arange(c0, c1)

        def template(cls, box, ss=cfg.fit_supersample, blur=0.0):
            x, y, s = box
            if not blur:
                return coverage(cls, x, y, s, rows, cols, ss)
            pad = int(np.ceil(3 * blur))  # blur the template on a padded window, then crop
            cov = coverage(cls, x, y, s, np.arange(r0 - pad, r1 + pad), np.arange(c0 - pad, c1 + pad), ss)
            return ndimage.gaussian_filter(cov, blur, mode="constant")[pad:-pad, pad:-pad]

        def resid_of(cls, box, ss=cfg.fit_supersample, blur=0.0):
            x, y, s = box
            if s <= 0.5:
                return np.inf
            cov = template(cls, box, ss, blur)
            # Occam prior: a visible part explained equally well by a small object and by a huge
            # one mostly outside the frame (a strip: a square's edge or a cross's arm) is the small one
            hidden = max(W.SHAPE_MOMENTS[cls][0] * s * s - float(cov.sum()), 0.0)
            return float(np.abs(alpha - cov * region).sum()) + cfg.hidden_penalty * hidden

        # moment fits first; an object that only touches the frame (nothing hidden) fits here
        fits = [(resid_of(cls, b), cls, b) for cls in W.CLASSES for b in _candidate_boxes(cls, alpha, r0, c0, h, w, False)]
        touches = touches and min(fits)[0] > (1.0 - cfg.good_fit) * area
        if touches:  # cut: a coarse grid of sizes and anchors, then refine the two best classes
            fits = []
            for cls in W.CLASSES:
                fits.append(min((resid_of(cls, b, 2), cls, b) for b in _candidate_boxes(cls, alpha, r0, c0, h, w, True)))
            fits.sort()
            fits = [_refine(resid_of, cls, box, resid_of(cls, box)) for _, cls, box in fits[:2]]
        blur = 0.0
        if not touches and min(fits)[0] > (1.0 - cfg.good_fit) * area:
            # a poor sharp fit: the image may be blurred (or generated); fit blurred templates too
            for sigma in cfg.blur_sigmas:
                for cls in W.CLASSES:
                    for b in _candidate_boxes(cls, alpha, r0, c0, h, w, False):
                        r = resid_of(cls, b, blur=sigma)
                        if r < min(fits)[0]:
                            fits.append((r, cls, b))
                            blur = sigma
        _, cls, (x, y, s) = min(fits)
        resid = float(np.abs(alpha - template(cls, (x, y, s), blur=blur) * region).sum())
        fit = max(0.0, 1.0 - resid / area)
        score = fit * min(1.0, area / a_min)
        bbox = (max(x, 0.0), max(y, 0.0), min(x + s, float(w)), min(y + s, float(h)))
        mask = np.zeros((h, w), dtype=bool)
        mask[r0:r1, c0:c1] = alpha >= 0.5
        extra = {"box": (x, y, x + s, y + s), "area": area, "fit": fit, "blur": blur}
        dets.append(Detection(cls, score, bbox, W.COLORS[ci], mask, extra))
    dets.sort(key=lambda d: -d.score)
    return dets


_DEFAULT = ShapesDetector()


def detect(image, config: DetectorConfig | None = None) -> list[Detection]:
    """Detections in one image (PIL, uint8/float array, or (3, H, W) tensor), best first."""
    if config is None:
        return _DEFAULT(image)
    return detect_array(to_float_image(image), config)


def detect_batch(images, config: DetectorConfig | None = None) -> list[list[Detection]]:
    """Detections for a list of images or a (B, 3, H, W) tensor."""
    return [detect(im, config) for im in images]
