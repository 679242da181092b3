"""The fixed vocabulary and geometry of the Shapes world.

Everything the scene generator, renderer, caption grammar, detector and rewards must agree on
lives here, so that each is a pure function of these constants.

Geometry is resolution independent: positions and sizes are fractions of the image side, so a
scene renders identically (up to sampling) at 32 px (the default) or 64 px.

Clean-scene rules (fixed once, the ``shapes`` model config derives its resolution from them):

* **Resolution**: 32×32 RGB by default, any square side in ``[32, 64]``.
* **Minimum object size**: an object's bounding box side is at least ``MIN_SIZE`` = 1/4 of the
  image side (8 px at 32 px). Below that, a triangle (half its box) covers ~32 px, and the
  shape classes stop being separable after the generative model's blur.
* **No overlap**: the bounding boxes of two objects in a clean scene are separated by at least
  ``GAP`` = 1/16 of the side (2 px at 32 px), so at least one full background pixel lies between
  two anti-aliased objects and 4-connected components never merge.
* Objects lie fully inside the frame (unless the ``cut_by_frame`` imperfection is applied).
"""

from __future__ import annotations

import numpy as np

# Shape classes. Every shape fills a square box of side `size`; see `shape_mask`.
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}

# GenEval's 10 colour names, in its order (djghosh13/geneval evaluation/evaluate_images.py
# COLORS). The Shapes world uses all ten. RGB values are saturated representatives, chosen so that
# every pair is >= 0.35 apart in RGB (unit cube) and every colour >= 0.28 from every background.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (0.98, 0.55, 0.06),
    "yellow": (0.97, 0.90, 0.12),
    "green": (0.13, 0.66, 0.22),
    "blue": (0.13, 0.30, 0.90),
    "purple": (0.55, 0.18, 0.72),
    "pink": (0.98, 0.58, 0.78),
    "brown": (0.50, 0.29, 0.10),
    "black": (0.06, 0.06, 0.06),
    "white": (0.97, 0.97, 0.97),
}

# Background colours: neutral tones that are not GenEval colour names, so a caption never needs
# to name them and the detector never confuses them with an object. "gray" is GenEval's own
# colour-crop canvas (#999, evaluate_images.py `bgcolor`).
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "gray": (0.60, 0.60, 0.60),
    "light gray": (0.76, 0.76, 0.74),
    "dark gray": (0.40, 0.40, 0.42),
    "slate": (0.44, 0.50, 0.58),
    "sand": (0.70, 0.66, 0.56),
}
DEFAULT_BACKGROUND = "gray"
# Background textures: low-amplitude patterns added to the flat colour.
TEXTURES: tuple[str, ...] = ("flat", "stripes", "checker", "gradient", "grain")
TEXTURE_AMPLITUDE = 0.04  # peak deviation; well below half the smallest colour-background distance

# GenEval's four relations (evaluation_metadata.jsonl `position`), and their word in captions.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4

DEFAULT_RESOLUTION = 32
MIN_RESOLUTION, MAX_RESOLUTION = 32, 64
MIN_SIZE = 0.25  # smallest box side, fraction of the image side (8 px at 32 px)
MAX_SIZE = 0.45  # largest box side (14.4 px at 32 px): leaves room for a second object beside it
GAP = 1.0 / 16.0  # minimum box-to-box distance in clean scenes (2 px at 32 px)
CROSS_ARM = 0.36  # width of a cross's arms, fraction of its box side (thick enough at 8 px)


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or not MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}]; got {resolution!r}")
    return int(resolution)


def check_class(name: str) -> str:
    if name not in CLASSES:
        raise ValueError(f"unknown shape class {name!r}; allowed: {', '.join(CLASSES)}")
    return name


def check_color(name: str) -> str:
    if name not in COLORS:
        raise ValueError(f"unknown colour {name!r}; allowed: {', '.join(COLORS)}")
    return name


def shape_mask(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a shape in its unit box: ``u, v`` in box coordinates (0..1, v down).

    circle: inscribed disk; square: the box; triangle: apex at top centre, base on the bottom
    edge; diamond: the square rotated 45° and inscribed; cross: a plus sign whose arms have
    width ``CROSS_ARM``.
    """
    inside_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    du, dv = u - 0.5, v - 0.5
    if cls == "circle":
        return du * du + dv * dv <= 0.25
    if cls == "square":
        return inside_box
    if cls == "triangle":
        return inside_box & (np.abs(du) <= 0.5 * v)
    if cls == "diamond":
        return np.abs(du) + np.abs(dv) <= 0.5
    if cls == "cross":
        half = CROSS_ARM / 2
        return inside_box & ((np.abs(du) <= half) | (np.abs(dv) <= half))
    raise ValueError(f"unknown shape class {cls!r}; allowed: {', '.join(CLASSES)}")


def _shape_moments(n: int = 512) -> dict[str, tuple[float, float, float]]:
    """(area fraction of the box, centroid u, centroid v) of every class, on an n×n grid."""
    t = (np.arange(n) + 0.5) / n
    v, u = np.meshgrid(t, t, indexing="ij")
    out = {}
    for cls in CLASSES:
        m = shape_mask(cls, u, v)
        a = m.mean()
        out[cls] = (float(a), float(u[m].mean()), float(v[m].mean()))
    return out


# Computed once from the definitions above; the detector inverts them to recover a box from an
# object's area and centroid (circle pi/4, square 1, triangle 1/2 with centroid at 2/3 height, ...).
SHAPE_MOMENTS: dict[str, tuple[float, float, float]] = _shape_moments()
