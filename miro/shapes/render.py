"""Anti-aliased rendering of scenes with numpy.

Each object's coverage of a pixel is the fraction of ``supersample``² sub-pixel sample points
inside the shape (supersample, then box-filter down), evaluated only in a window around the
object. Objects are composited in order over the background: ``img = (1 - a)·img + a·colour``.
The result is quantised once to uint8, so the same scene gives the same bytes.

The detector fits these same coverage maps (:func:`coverage`) to the image, which is what makes
it exact on clean renders.
"""

from __future__ import annotations

import numpy as np

from miro.shapes import world as W
from miro.shapes.scene import Scene

DEFAULT_SUPERSAMPLE = 8  # 64 samples per pixel: coverage quantised to 1/64


def coverage(cls: str, x: float, y: float, size: float, rows: np.ndarray, cols: np.ndarray,
             supersample: int = DEFAULT_SUPERSAMPLE) -> np.ndarray:
    """Coverage (len(rows), len(cols)) in [0, 1] of a shape whose box is [x, x+size]×[y, y+size]
    in pixel units, on the pixels ``rows`` × ``cols`` (integer pixel indices)."""
    off = (np.arange(supersample) + 0.5) / supersample
    us = ((cols[:, None] + off[None, :]).reshape(-1) - x) / size
    vs = ((rows[:, None] + off[None, :]).reshape(-1) - y) / size
    inside = W.shape_mask(cls, us[None, :], vs[:, None])
    h, w = len(rows), len(cols)
    if supersample > 11:  # counts up to 121 fit a byte; past that, the float mean
        return inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3))
    # the same values as that mean (integer counts / ss²), several times faster on the detector's
    # small windows: byte adds of sub-sample rows, then of sub-sample columns
    sub = inside.view(np.uint8).reshape(h, supersample, w, supersample)
    rows_sum = sub[:, 0].copy()
    for k in range(1, supersample):
        rows_sum += sub[:, k]
    counts = rows_sum[..., 0].copy()
    for k in range(1, supersample):
        counts += rows_sum[..., k]
    return counts / (supersample * supersample)


def object_window(x: float, y: float, size: float, resolution: int, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows and columns touched by a box (plus ``margin``), clipped to the image."""
    c0, c1 = max(int(np.floor(x)) - margin, 0), min(int(np.ceil(x + size)) + margin, resolution)
    r0, r1 = max(int(np.floor(y)) - margin, 0), min(int(np.ceil(y + size)) + margin, resolution)
    return np.arange(r0, max(r0, r1)), np.arange(c0, max(c0, c1))


def background(scene: Scene, resolution: int) -> np.ndarray:
    """The background (H, W, 3) float64: flat colour plus the scene's low-amplitude texture."""
    base = np.asarray(W.BACKGROUNDS[scene.background], dtype=np.float64)
    img = np.broadcast_to(base, (resolution, resolution, 3)).copy()
    if scene.texture == "flat":
        return img
    if scene.texture not in W.TEXTURES:
        raise ValueError(f"unknown texture {scene.texture!r}; allowed: {', '.join(W.TEXTURES)}")
    rng = np.random.default_rng(scene.texture_seed)
    t = (np.arange(resolution) + 0.5) / resolution
    yy, xx = np.meshgrid(t, t, indexing="ij")
    if scene.texture == "stripes":
        ang, period, phase = rng.uniform(0, np.pi), rng.uniform(0.12, 0.3), rng.uniform(0, 2 * np.pi)
        pattern = np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period + phase)
    elif scene.texture == "checker":
        cells = int(rng.integers(4, 9))
        pattern = np.where(((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 == 0, 1.0, -1.0)
    elif scene.texture == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        pattern = 2 * ((xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang))
        pattern = np.clip(pattern / max(np.abs(pattern).max(), 1e-9), -1, 1)
    else:  # grain: smooth value noise from a coarse random grid, bilinearly upsampled
        g = rng.uniform(-1, 1, size=(5, 5))
        pos = t * 4
        i0 = np.minimum(pos.astype(int), 3)
        f = pos - i0
        rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]
        pattern = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return img + W.TEXTURE_AMPLITUDE * pattern[..., None]


def render_float(scene: Scene, resolution: int = W.DEFAULT_RESOLUTION, supersample: int = DEFAULT_SUPERSAMPLE) -> np.ndarray:
    """Render to (H, W, 3) float64 in [0, 1] (before quantisation)."""
    resolution = W.check_resolution(resolution)
    if not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be a positive integer; got {supersample!r}")
    img = background(scene, resolution)
    for obj in scene.objects:
        x, y, s = obj.x * resolution, obj.y * resolution, obj.size * resolution
        rows, cols = object_window(x, y, s, resolution)
        if len(rows) == 0 or len(cols) == 0:
            continue
        a = coverage(obj.cls, x, y, s, rows, cols, supersample)[..., None]
        color = np.asarray(W.COLOR_RGB[W.check_color(obj.color)])
        patch = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = (1 - a) * patch + a * color
    return np.clip(img, 0.0, 1.0)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 with round-half-even (numpy's rint), the one quantisation step."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def render(scene: Scene, resolution: int = W.DEFAULT_RESOLUTION, supersample: int = DEFAULT_SUPERSAMPLE) -> np.ndarray:
    """Render to (H, W, 3) uint8."""
    return to_uint8(render_float(scene, resolution, supersample))


def render_pil(scene: Scene, resolution: int = W.DEFAULT_RESOLUTION, supersample: int = DEFAULT_SUPERSAMPLE):
    """Render to an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(render(scene, resolution, supersample))
