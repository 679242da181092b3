"""Scenes: objects with class, colour, box; sampled from GenEval-style metadata.

A :class:`Scene` is resolution independent (box coordinates are fractions of the image side).
:func:`scene_from_metadata` places objects so that the metadata holds with a margin: counts
are exact, colours as asked, relations hold under GenEval's rule at ``position_threshold``
0.1 and still at 0.25 (robust to a pixel of box error) and no other relation holds. Clean
scenes obey the no-overlap rule of :mod:`miro.shapes.world`.

Randomness comes only from the ``numpy.random.Generator`` passed in; callers derive it from a
seed (:func:`rng_for`), so the same seed gives the same scene.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from miro.eval.geneval_rules import relative_position, validate_metadata
from miro.shapes import world as W


def rng_for(*seed_parts: int) -> np.random.Generator:
    """A numpy Generator keyed on integers (e.g. (dataset seed, sample index))."""
    return np.random.default_rng([int(s) for s in seed_parts])


@dataclass(frozen=True)
class ShapeObject:
    """One object; its box is [x, x+size] × [y, y+size] in fractions of the side."""

    cls: str  # one of world.CLASSES
    color: str  # one of world.COLORS
    x: float  # left edge
    y: float  # top edge (y points down)
    size: float  # box side
    role: str = "caption"  # "caption" (from the generating metadata) or "clutter"

    def box(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.x + self.size, self.y + self.size)

    def bbox(self, resolution: int) -> tuple[float, float, float, float]:
        """Box in pixels at ``resolution`` (x1, y1, x2, y2)."""
        return tuple(v * resolution for v in self.box())

    def visible_fraction(self) -> float:
        """Fraction of the box area inside the frame."""
        x1, y1, x2, y2 = self.box()
        w = max(0.0, min(x2, 1.0) - max(x1, 0.0))
        h = max(0.0, min(y2, 1.0) - max(y1, 0.0))
        return w * h / (self.size * self.size)


@dataclass
class Scene:
    """Objects (drawn in order) on a background colour with an optional texture."""

    objects: list[ShapeObject] = field(default_factory=list)
    background: str = W.DEFAULT_BACKGROUND  # one of world.BACKGROUNDS
    texture: str = "flat"  # one of world.TEXTURES
    texture_seed: int = 0  # seeds the texture's orientation/phase

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background,
                "texture": self.texture, "texture_seed": self.texture_seed}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls([ShapeObject(**o) for o in d["objects"]], d.get("background", W.DEFAULT_BACKGROUND),
                   d.get("texture", "flat"), int(d.get("texture_seed", 0)))


@dataclass
class SceneConfig:
    """How scenes are sampled."""

    min_size: float = W.MIN_SIZE  # smallest box side (fraction of the image side)
    max_size: float = W.MAX_SIZE  # largest box side
    gap: float = W.GAP  # minimum box-to-box distance
    backgrounds: tuple[str, ...] = (W.DEFAULT_BACKGROUND,)  # drawn uniformly per scene
    textures: tuple[str, ...] = ("flat",)  # drawn uniformly per scene
    tries: int = 60  # placement attempts per object before a restart
    restarts: int = 40  # full restarts before giving up

    def __post_init__(self):
        if not 0 < self.min_size <= self.max_size <= 1:
            raise ValueError(f"need 0 < min_size <= max_size <= 1; got {self.min_size}, {self.max_size}")
        for b in self.backgrounds:
            if b not in W.BACKGROUNDS:
                raise ValueError(f"unknown background {b!r}; allowed: {', '.join(W.BACKGROUNDS)}")
        for t in self.textures:
            if t not in W.TEXTURES:
                raise ValueError(f"unknown texture {t!r}; allowed: {', '.join(W.TEXTURES)}")

    @classmethod
    def varied(cls) -> "SceneConfig":
        """Every background and texture (web-like variety; the dataset default)."""
        return cls(backgrounds=tuple(W.BACKGROUNDS), textures=W.TEXTURES)


def size_limit(n_objects: int, cfg: SceneConfig) -> float:
    """Largest box side when n objects must fit: ~0.62/sqrt(n) keeps placement cheap."""
    return float(min(cfg.max_size, max(cfg.min_size, 0.62 / math.sqrt(max(n_objects, 1)))))


def boxes_clear(box, others, gap: float) -> bool:
    """True when ``box`` is at least ``gap`` away from every box in ``others`` (per axis)."""
    for o in others:
        if box[0] < o[2] + gap and o[0] < box[2] + gap and box[1] < o[3] + gap and o[1] < box[3] + gap:
            return False
    return True


def relation_holds(box_a, box_b, rel: str) -> bool:
    """``rel`` is the only GenEval relation of A to B, with margin (also at threshold 0.25)."""
    return relative_position(box_a, box_b, 0.1) == {rel} and rel in relative_position(box_a, box_b, 0.25)


def place_groups(groups: list[dict], relations: list[tuple[int, str, int]], rng: np.random.Generator,
                 cfg: SceneConfig, extra: int = 0) -> list[list[tuple[float, float, float]]]:
    """Boxes (x, y, size) for each group (``count`` objects), honouring ``relations``
    ``(group a, relation, group b)``; ``extra`` reserves room in the size limit. Raises
    ValueError when no placement is found."""
    n_total = sum(g["count"] for g in groups) + extra
    smax = size_limit(n_total, cfg)
    order = [(gi, k) for gi, g in enumerate(groups) for k in range(g["count"])]
    for _ in range(cfg.restarts):
        placed: list[list[tuple[float, float, float]]] = [[] for _ in groups]
        boxes: list[tuple[float, float, float, float]] = []
        ok = True
        for gi, _k in order:
            for _t in range(cfg.tries):
                s = float(rng.uniform(cfg.min_size, smax))
                x, y = float(rng.uniform(0, 1 - s)), float(rng.uniform(0, 1 - s))
                box = (x, y, x + s, y + s)
                if not boxes_clear(box, boxes, cfg.gap):
                    continue
                good = True
                for a, rel, b in relations:
                    if a == gi:
                        good &= all(relation_holds(box, (px, py, px + ps, py + ps), rel) for px, py, ps in placed[b])
                    if b == gi:
                        good &= all(relation_holds((px, py, px + ps, py + ps), box, rel) for px, py, ps in placed[a])
                if good:
                    placed[gi].append((x, y, s))
                    boxes.append(box)
                    break
            else:
                ok = False
                break
        if ok:
            return placed
    rel = f" with relations {relations}" if relations else ""
    raise ValueError(f"could not place {n_total} objects{rel} in {cfg.restarts} attempts: the scene is too crowded; "
                     f"ask for fewer objects (the dataset's scenes hold at most {W.MAX_COUNT} of a kind)")


def scene_from_metadata(metadata: dict, rng: np.random.Generator, cfg: SceneConfig | None = None,
                        extra_room: int = 0) -> Scene:
    """Sample a clean scene that satisfies GenEval metadata (include/exclude, colour, position).

    Each include clause becomes a group of ``count`` objects sharing one colour (the clause's,
    or a random one). ``extra_room`` objects' worth of space is kept free for clutter.
    """
    cfg = cfg or SceneConfig()
    validate_metadata(metadata)
    groups, relations = [], []
    for i, clause in enumerate(metadata["include"]):
        W.check_class(clause["class"])
        if clause["count"] > W.MAX_COUNT:
            raise ValueError(f"include[{i}].count {clause['count']} exceeds the Shapes world's maximum {W.MAX_COUNT}")
        color = W.check_color(clause["color"]) if "color" in clause else W.COLORS[int(rng.integers(len(W.COLORS)))]
        groups.append({"cls": clause["class"], "count": clause["count"], "color": color})
        if "position" in clause:
            relations.append((i, clause["position"][0], clause["position"][1]))
    for ex in metadata.get("exclude", []) or []:
        have = sum(g["count"] for g in groups if g["cls"] == ex["class"])
        if have >= ex["count"]:
            raise ValueError(f"metadata is contradictory: it includes {have} {ex['class']} but excludes >= {ex['count']}")
    placed = place_groups(groups, relations, rng, cfg, extra=extra_room)
    objects = [ShapeObject(g["cls"], g["color"], x, y, s) for g, boxes in zip(groups, placed) for x, y, s in boxes]
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    texture = cfg.textures[int(rng.integers(len(cfg.textures)))]
    return Scene(objects, background, texture, int(rng.integers(2**31)))


def add_clutter(scene: Scene, n: int, rng: np.random.Generator, cfg: SceneConfig, avoid_classes: set[str]) -> int:
    """Add up to ``n`` objects whose class is not in ``avoid_classes`` (objects of one class share
    a colour); returns how many fit."""
    classes = [c for c in W.CLASSES if c not in avoid_classes]
    if not classes:
        return 0
    added = 0
    boxes = [o.box() for o in scene.objects]
    smax = size_limit(len(scene.objects) + n, cfg)
    colors: dict[str, str] = {}  # one colour per class, as in captioned groups
    for _ in range(n):
        cls = classes[int(rng.integers(len(classes)))]
        color = colors.setdefault(cls, W.COLORS[int(rng.integers(len(W.COLORS)))])
        for _t in range(cfg.tries):
            s = float(rng.uniform(cfg.min_size, smax))
            x, y = float(rng.uniform(0, 1 - s)), float(rng.uniform(0, 1 - s))
            if boxes_clear((x, y, x + s, y + s), boxes, cfg.gap):
                scene.objects.append(ShapeObject(cls, color, x, y, s, role="clutter"))
                boxes.append((x, y, x + s, y + s))
                added += 1
                break
    return added


def cut_by_frame(scene: Scene, rng: np.random.Generator, cfg: SceneConfig, visible=(0.35, 0.7)) -> int | None:
    """Move one object so that only a ``visible`` fraction of its box is inside the frame.

    Returns the index of the moved object, or None when no free border position was found.
    """
    if not scene.objects:
        return None
    idx = int(rng.integers(len(scene.objects)))
    obj = scene.objects[idx]
    others = [o.box() for k, o in enumerate(scene.objects) if k != idx]
    s = obj.size
    for _ in range(cfg.tries):
        f = float(rng.uniform(*visible))
        side = int(rng.integers(4))
        along = float(rng.uniform(0, 1 - s))
        # the object sticks out by (1 - f) of its size past one edge of the frame
        x, y = {0: (-(1 - f) * s, along), 1: (1 - f * s, along), 2: (along, -(1 - f) * s), 3: (along, 1 - f * s)}[side]
        if boxes_clear((x, y, x + s, y + s), others, cfg.gap):
            scene.objects[idx] = ShapeObject(obj.cls, obj.color, x, y, s, obj.role)
            return idx
    return None


def sample_metadata(rng: np.random.Generator, tag: str | None = None) -> dict:
    """A random GenEval-style metadata line (without ``prompt``) of one of the six tags."""
    from miro.eval.geneval_rules import GENEVAL_TAGS

    tag = tag or GENEVAL_TAGS[int(rng.integers(len(GENEVAL_TAGS)))]
    cls = [str(c) for c in rng.permutation(W.CLASSES)[:2]]
    col = [str(c) for c in rng.permutation(W.COLORS)[:2]]
    if tag == "single_object":
        inc = [{"class": cls[0], "count": 1}]
    elif tag == "two_object":
        inc = [{"class": cls[0], "count": 1}, {"class": cls[1], "count": 1}]
    elif tag == "counting":
        n = int(rng.integers(2, W.MAX_COUNT + 1))
        return {"tag": tag, "include": [{"class": cls[0], "count": n}], "exclude": [{"class": cls[0], "count": n + 1}]}
    elif tag == "colors":
        inc = [{"class": cls[0], "count": 1, "color": col[0]}]
    elif tag == "position":
        rel = W.RELATIONS[int(rng.integers(len(W.RELATIONS)))]
        inc = [{"class": cls[1], "count": 1}, {"class": cls[0], "count": 1, "position": [rel, 0]}]
    elif tag == "color_attr":
        inc = [{"class": cls[0], "count": 1, "color": col[0]}, {"class": cls[1], "count": 1, "color": col[1]}]
    else:
        raise ValueError(f"unknown tag {tag!r}; allowed: {', '.join(GENEVAL_TAGS)}")
    return {"tag": tag, "include": inc}
