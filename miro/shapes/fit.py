"""Fitting one segmented object: its colour, coverage, class and box (used by the detector).

Colour: every palette colour q defines a line bg → q in RGB; anti-aliased, blurred or
contrast-reduced pixels of a q-coloured object lie on that line (``p = bg + a·(q − bg)``). The
colour is the line with the least squared residual over the object's pixels, and ``a`` (clipped
to [0, 1]) is each pixel's coverage.

Class and box: the renderer's coverage map of every class (:func:`miro.shapes.render.coverage`)
is fitted to the object's coverage. Size comes from the area (``area = k_cls·s²``) and the box
origin from the centroid (``world.SHAPE_MOMENTS``), which is exact for a clean render. Objects
cut by the frame are searched over sizes and anchors, then refined. When the sharp fit is poor,
Gaussian-blurred templates are fitted on a wider ring (blur conserves area and centroid).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from miro.shapes import world as W
from miro.shapes.render import coverage

PALETTE = np.asarray([W.COLOR_RGB[c] for c in W.COLORS], dtype=np.float64)


@dataclass
class ObjectFit:
    """The best explanation of one object's pixels."""

    cls: str  # shape class
    color: str  # palette colour name
    box: tuple[float, float, float]  # (x, y, size) in pixels, unclipped
    quality: float  # 1 - L1 residual / coverage area, in [0, 1]
    area: float  # coverage area in pixels
    blur: float  # Gaussian sigma of the template that fitted (0 = sharp)
    alpha: np.ndarray  # coverage on the window (rows, cols)


@lru_cache(maxsize=256)
def _gaussian_weights(sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter``'s 1-D kernel for ``sigma`` (truncate 4), read off its
    response to an impulse, so :func:`gaussian_blur` matches it bit for bit."""
    from scipy import ndimage

    radius = int(4.0 * float(sigma) + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    return ndimage.gaussian_filter1d(impulse, sigma, mode="constant")


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """``ndimage.gaussian_filter(a, sigma, mode="constant")`` of a 2-D array, the same values at a
    third of the cost on small windows (the kernel is built once per sigma)."""
    correlate1d = _correlate1d()
    w = _gaussian_weights(float(sigma))
    out = correlate1d(a, w, axis=0, mode="constant")
    return correlate1d(out, w, axis=1, mode="constant", output=out)


@lru_cache(maxsize=1)
def _correlate1d():
    """scipy, imported once on first use (an import statement per blur costs as much as the blur)."""
    from scipy.ndimage import correlate1d

    return correlate1d


def fit_color(pix: np.ndarray, bg: np.ndarray) -> tuple[int, np.ndarray]:
    """Best palette line for pixels (n, 3): (colour index, coverage per pixel)."""
    d = pix - bg  # (n, 3)
    dirs = PALETTE - bg  # (C, 3)
    norms = np.maximum((dirs * dirs).sum(1), 1e-9)
    a = np.clip(d @ dirs.T / norms, 0.0, 1.0)  # (n, C)
    res = ((d[:, None, :] - a[..., None] * dirs[None]) ** 2).sum(-1).sum(0)  # (C,)
    best = int(np.argmin(res))
    return best, a[:, best]


def candidate_boxes(cls: str, alpha: np.ndarray, r0: int, c0: int, h: int, w: int, cut: bool):
    """Candidate (x, y, size) boxes in pixels for a class.

    Not cut: size from the area, origin from the centroid. Cut by the frame: the hidden part is
    unknown, so sizes from the visible box's longer side up to 2.5× it, anchored at the side
    away from the frame and, along an axis that is not cut, aligned to either end or centred.
    """
    k, cu, cv = W.SHAPE_MOMENTS[cls]
    area = alpha.sum()
    if area <= 0:
        return []
    rows, cols = np.nonzero(alpha)
    wts = alpha[rows, cols]
    my = (wts * (rows + r0 + 0.5)).sum() / area
    mx = (wts * (cols + c0 + 0.5)).sum() / area
    s = float(np.sqrt(area / k))
    if not cut:
        return [(mx - cu * s, my - cv * s, s)]
    out = []
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


def refine(resid_of, cls: str, params: tuple[float, ...], resid: float, step: float = 0.5, min_step: float = 0.125):
    """Pattern search over ``params`` ((x, y, size[, blur]) in pixels) for one class;
    returns (residual, cls, params)."""
    params = list(params)
    while step >= min_step:
        improved = False
        for k in range(len(params)):
            for d in (step, -step):
                trial = list(params)
                trial[k] += d
                r = resid_of(cls, tuple(trial))
                if r < resid:
                    resid, params, improved = r, trial, True
        if not improved:
            step /= 2
    return resid, cls, tuple(params)


def fit_object(win: np.ndarray, bg: np.ndarray, core: np.ndarray, region: np.ndarray, wide: np.ndarray,
               r0: int, c0: int, h: int, w: int, cut: bool, cfg) -> ObjectFit | None:
    """Fit one object. ``win`` is the image window (rows r0.., cols c0..), ``core`` its segmented
    pixels, ``region`` the core plus a 1-pixel ring, ``wide`` a wider ring for blurred fits (all
    minus other objects). ``cut``: the core reaches the image border."""
    ci, a_core = fit_color(win[core], bg)
    dirv = PALETTE[ci] - bg
    raw = np.clip(((win - bg) @ dirv) / max(float(dirv @ dirv), 1e-9), 0.0, 1.0)
    # a uniformly faded object (low contrast) has a flat top below 1: rescale it to 1
    top = float(np.quantile(a_core, 0.9))
    if 0.05 < top < 0.95 and np.mean(a_core >= 0.85 * top) >= cfg.plateau:
        raw = np.clip(raw / top, 0.0, 1.0)
    alpha = raw * region
    area = float(alpha.sum())
    if area <= 0:
        return None
    hh, ww = core.shape

    # The searches below revisit points (a pattern-search step and its reverse) and change only
    # sigma at a fixed box, so coverage maps and templates are memoised per object: same values,
    # a quarter fewer coverage renders on generated images (docs/benchmarks.md, "A faster detector").
    covs: dict = {}
    templates: dict = {}

    def template(cls, box, ss=cfg.fit_supersample, blur=0.0):
        key = (cls, *box, ss, blur)
        hit = templates.get(key)
        if hit is not None:
            return hit
        x, y, s = box
        pad = int(np.ceil(3 * blur))  # blur the template on a padded window, then crop
        ckey = (cls, x, y, s, ss, pad)
        cov = covs.get(ckey)
        if cov is None:
            cov = covs[ckey] = coverage(cls, x, y, s, np.arange(r0 - pad, r0 + hh + pad),
                                        np.arange(c0 - pad, c0 + ww + pad), ss)
        out = templates[key] = gaussian_blur(cov, blur)[pad:-pad, pad:-pad] if blur else cov
        return out

    def resid_of(cls, box, ss=cfg.fit_supersample):
        x, y, s = box
        if s <= 0.5:
            return np.inf
        cov = template(cls, box, ss)
        # Occam prior: a visible part explained equally well by a small object and by a huge one
        # mostly outside the frame (a strip: a square's edge or a cross's arm) is the small one
        hidden = max(W.SHAPE_MOMENTS[cls][0] * s * s - float(cov.sum()), 0.0)
        return float(np.abs(alpha - cov * region).sum()) + cfg.hidden_penalty * hidden

    # moment fits first; an object that only touches the frame (nothing hidden) fits here
    fits = [(resid_of(cls, b), cls, b) for cls in W.CLASSES for b in candidate_boxes(cls, alpha, r0, c0, h, w, False)]
    if not fits:  # no class admits a box for this blob: it is not an object
        return None
    poor = min(fits)[0] > (1.0 - cfg.good_fit) * area
    if cut and poor:  # cut: a coarse grid of sizes and anchors, then refine the two best classes
        boxes = {cls: candidate_boxes(cls, alpha, r0, c0, h, w, True) for cls in W.CLASSES}
        grid = sorted(min((resid_of(cls, b, 2), cls, b) for b in bs) for cls, bs in boxes.items() if bs)
        if grid:  # else keep the moment fits
            fits = [refine(resid_of, cls, box, resid_of(cls, box)) for _, cls, box in grid[:2]]
    _, cls, box = min(fits)
    resid = float(np.abs(alpha - template(cls, box) * region).sum())
    best = ObjectFit(cls, W.COLORS[ci], box, max(0.0, 1.0 - resid / area), area, 0.0, alpha)
    if poor:
        # a poor sharp fit: the image may be blurred (or generated); blurred templates on the
        # wide ring, where the blurred tails are (blur keeps area and centroid, so moments hold).
        # A grid over blur, then (x, y, size, blur) refined for the two best classes.
        alpha_w = raw * wide
        area_w = float(alpha_w.sum())

        def resid_blur(cls, p):
            x, y, s, sigma = p
            if s <= 0.5 or not 0.3 <= sigma <= 3.0:
                return np.inf
            return float(np.abs(alpha_w - template(cls, (x, y, s), cfg.fit_supersample, blur=sigma) * wide).sum())

        grid = sorted(min((resid_blur(cls, (*b, sigma)), cls, (*b, sigma)) for sigma in cfg.blur_sigmas
                          for b in candidate_boxes(cls, alpha_w, r0, c0, h, w, False)) for cls in W.CLASSES)
        # refine the runner-up too only when it is close (its class may win after refinement)
        contenders = grid[:2] if grid[1][0] < cfg.close_call * grid[0][0] else grid[:1]
        for r, cls, p in (refine(resid_blur, cls, p, r, step=0.25) for r, cls, p in contenders):
            q = 1.0 - r / area_w
            if q > best.quality:
                best = ObjectFit(cls, W.COLORS[ci], p[:3], q, area_w, p[3], alpha_w)
    return best
