"""GenEval's rules: detections in, verdicts out.

A detector-agnostic re-implementation of the decision rules of GenEval (Ghosh et al. 2023,
djghosh13/geneval ``evaluation/evaluate_images.py`` and ``summary_scores.py``). Any detector can
feed it: the Shapes world's exact detector, a Mask2Former / OWLv2 back-end, or hand-made
detections in tests. A detection is a :class:`Detection` (class name, confidence, box, and an
optional colour name and mask).

Rules, as in GenEval:

* Per class, detections are sorted by confidence, kept if ``score > threshold``
  (``counting_threshold`` for the ``counting`` tag), capped at ``max_objects``, then greedily
  de-duplicated when ``max_overlap < 1`` (box IoU, pixel-inclusive areas).
* ``include`` clauses are ANDed. For each clause the ``count`` most confident detections of
  its class are "found"; fewer than ``count`` fails. With a ``color`` every found object must
  have that colour (GenEval asks CLIP; here the detection's ``color`` or a ``color_fn``).
  With ``position: [relation, i]`` every found object must stand in ``relation`` to every
  found object of include clause ``i``, which must itself have matched.
* ``exclude`` clauses are ORed: a clause fails when the class has ``>= count`` detections
  (so a counting prompt means *exactly* N).
* ``relative_position(A, B)``: offset of box centres, shrunk per axis by
  ``position_threshold`` × (sum of the two box sizes on that axis), normalised by the
  unshrunk offset length; left/right when ``|dx| > 0.5``, above/below when ``|dy| > 0.5``
  (y points down). No relation when the shrunk offset vanishes.
* Summary: accuracy per tag; overall = unweighted mean of the tag accuracies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Sequence

import numpy as np

# GenEval's colour names (evaluate_images.py COLORS) and relations (evaluation_metadata.jsonl).
GENEVAL_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Detection:
    """One detected object. ``bbox`` is (x1, y1, x2, y2) in pixels, y down."""

    cls: str  # class name, as written in the metadata's `class`
    score: float  # detector confidence in [0, 1]
    bbox: tuple[float, float, float, float]  # box corners in pixels
    color: str | None = None  # colour name, if the detector classifies colour itself
    mask: np.ndarray | None = None  # optional (H, W) bool mask (for colour back-ends)
    extra: dict = field(default_factory=dict)  # detector-specific details (not used by the rules)

    def __post_init__(self):
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        if not (x2 >= x1 and y2 >= y1):
            raise ValueError(f"bbox must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; got {self.bbox}")
        self.bbox = (x1, y1, x2, y2)
        self.score = float(self.score)


@dataclass
class GenEvalOptions:
    """GenEval's ``--options`` (defaults as in evaluate_images.py)."""

    threshold: float = 0.3  # keep detections with score > threshold
    counting_threshold: float = 0.9  # the same for the `counting` tag
    max_objects: int = 16  # per class, after thresholding
    max_overlap: float = 1.0  # NMS IoU; 1.0 disables NMS
    position_threshold: float = 0.1  # per-axis shrink of the centre offset (fraction of box sizes)

    @classmethod
    def from_strings(cls, options: dict[str, str] | Sequence[str] | None, base: "GenEvalOptions | None" = None) -> "GenEvalOptions":
        """Build from ``k=v`` strings (or a dict), overriding ``base`` (default: GenEval's)."""
        out = GenEvalOptions(**{f.name: getattr(base or cls(), f.name) for f in fields(cls)})
        if options is None:
            return out
        if not isinstance(options, dict):
            pairs = {}
            for opt in options:
                k, sep, v = str(opt).partition("=")
                if not sep:
                    raise ValueError(f"option {opt!r}: expected KEY=VALUE")
                pairs[k] = v
            options = pairs
        known = {f.name: f.type for f in fields(cls)}
        for k, v in options.items():
            if k not in known:
                raise ValueError(f"unknown option {k!r}; allowed: {', '.join(known)}")
            try:
                setattr(out, k, int(v) if k == "max_objects" else float(v))
            except ValueError:
                raise ValueError(f"option {k}={v!r} is not a number") from None
        out.check()
        return out

    def check(self) -> None:
        """Refuse values no evaluation can mean (a threshold of 2 scores every image 0, silently)."""
        for k in ("threshold", "counting_threshold", "max_overlap", "position_threshold"):
            v = getattr(self, k)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"option {k}={v!r} must be a number in [0, 1]")
        if self.max_objects < 1:
            raise ValueError(f"option max_objects={self.max_objects!r} must be an integer >= 1")


@dataclass
class Verdict:
    """The result of evaluating one image against one metadata line."""

    correct: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "\n".join(self.reasons)


ColorFn = Callable[[list[Detection], str], list[str]]


def validate_metadata(metadata: dict) -> dict:
    """Check a GenEval metadata line; raises ValueError naming the bad field."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict; got {type(metadata).__name__}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"metadata needs a non-empty 'include' list; got {include!r}")
    for part in ("include", "exclude"):
        for i, clause in enumerate(metadata.get(part, []) or []):
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
                raise ValueError(f"{part}[{i}] needs a string 'class'; got {clause!r}")
            count = clause.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{part}[{i}].count must be an integer >= 1; got {count!r}")
            if "color" in clause and clause["color"] not in GENEVAL_COLORS:
                raise ValueError(f"{part}[{i}].color {clause['color']!r} is not one of {', '.join(GENEVAL_COLORS)}")
            if "position" in clause:
                pos = clause["position"]
                if part != "include" or not (isinstance(pos, (list, tuple)) and len(pos) == 2):
                    raise ValueError(f"{part}[{i}].position must be [relation, target index] in an include clause; got {pos!r}")
                if pos[0] not in RELATIONS:
                    raise ValueError(f"{part}[{i}].position relation {pos[0]!r} is not one of {', '.join(RELATIONS)}")
                if not isinstance(pos[1], int) or not 0 <= pos[1] < i:
                    raise ValueError(f"{part}[{i}].position target {pos[1]!r} must index an earlier include clause")
    return metadata


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's pixel-inclusive areas ((x2 - x1 + 1) * (y2 - y1 + 1))."""

    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B ("left of", "right of", "above", "below"), GenEval's rule."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - position_threshold * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def filter_detections(detections: Iterable[Detection], tag: str, options: GenEvalOptions | None = None) -> dict[str, list[Detection]]:
    """Per class: sort by score, threshold, cap at ``max_objects``, optional NMS."""
    options = options or GenEvalOptions()
    thr = options.counting_threshold if tag == "counting" else options.threshold
    by_cls: dict[str, list[Detection]] = {}
    for d in detections:
        by_cls.setdefault(d.cls, []).append(d)
    out: dict[str, list[Detection]] = {}
    for cls, dets in by_cls.items():
        # stable sort: equal scores keep detector order
        ordered = sorted((d for d in dets if d.score > thr), key=lambda d: -d.score)[: options.max_objects]
        kept: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            kept.append(best)
            if options.max_overlap < 1:
                ordered = [d for d in ordered if box_iou(best.bbox, d.bbox) < options.max_overlap]
        if kept:
            out[cls] = kept
    return out


def _colors(found: list[Detection], cls: str, color_fn: ColorFn | None) -> list[str]:
    if all(d.color is not None for d in found):
        return [d.color for d in found]
    if color_fn is None:
        raise ValueError(f"a colour clause needs detections with a colour or a color_fn; {cls!r} detections have none")
    return list(color_fn(found, cls))


def evaluate(metadata: dict, detected: dict[str, list[Detection]], options: GenEvalOptions | None = None,
             color_fn: ColorFn | None = None) -> Verdict:
    """GenEval's verdict for filtered detections (see :func:`filter_detections`)."""
    options = options or GenEvalOptions()
    validate_metadata(metadata)
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata["include"]:
        cls, count = req["class"], req["count"]
        matched = True
        found = detected.get(cls, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors(found, cls, color_fn)
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    others = ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} {req['color']}; and {others}")
            if "position" in req and matched:
                rel, target = req["position"]
                if matched_groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tobj in matched_groups[target]:
                            true_rels = relative_position(obj.bbox, tobj.bbox, options.position_threshold)
                            if rel not in true_rels:
                                correct = matched = False
                                reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []) or []:
        n = len(detected.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return Verdict(correct, reasons)


def evaluate_detections(metadata: dict, detections: Iterable[Detection], options: GenEvalOptions | None = None,
                        color_fn: ColorFn | None = None) -> tuple[Verdict, dict[str, list[Detection]]]:
    """Filter raw detections with GenEval's rules, then evaluate; returns (verdict, kept)."""
    detected = filter_detections(detections, metadata.get("tag", ""), options)
    return evaluate(metadata, detected, options, color_fn), detected


def result_record(filename: str, metadata: dict, verdict: Verdict, detected: dict[str, list[Detection]]) -> dict:
    """One line of GenEval's ``results.jsonl``."""
    return {
        "filename": filename,
        "tag": metadata.get("tag", ""),
        "prompt": metadata.get("prompt", ""),
        "correct": bool(verdict.correct),
        "reason": verdict.reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({c: [[*d.bbox, d.score] for d in ds] for c, ds in detected.items()}),
    }


def summarize(records: Sequence[dict]) -> dict:
    """GenEval's summary: per-tag accuracy (tags in first-seen order), overall = mean over tags.

    A prompt is its folder (``00012/samples/0000.png``'s ``00012``): GenEval groups by the metadata
    line, the same thing for its 553 distinct prompts, but a prompt set that repeats a line in two
    folders (ShapesEval does, with other seeds) would count them as one prompt.
    """
    if not records:
        raise ValueError("no results to summarise")
    per_tag: dict[str, list[bool]] = {}
    per_prompt: dict[str, bool] = {}
    for r in records:
        per_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        folder, sep, _ = str(r.get("filename", "")).partition("/")
        key = folder if sep else r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"])
        per_prompt[key] = per_prompt.get(key, False) or bool(r["correct"])
    tags = {t: {"accuracy": float(np.mean(v)), "correct": int(sum(v)), "total": len(v)} for t, v in per_tag.items()}
    return {
        "images": len(records),
        "prompts": len(per_prompt),
        "correct_images": float(np.mean([bool(r["correct"]) for r in records])),
        "correct_prompts": float(np.mean(list(per_prompt.values()))),
        "tags": tags,
        "overall": float(np.mean([t["accuracy"] for t in tags.values()])),
    }


def format_summary(summary: dict) -> str:
    """Human-readable table in the order of GenEval's summary_scores.py, ending with ``overall:``."""
    lines = [
        f"Total images: {summary['images']}",
        f"Total prompts: {summary['prompts']}",
        f"% correct images: {summary['correct_images']:.2%}",
        f"% correct prompts: {summary['correct_prompts']:.2%}",
        "",
    ]
    for tag, t in summary["tags"].items():
        lines.append(f"{tag:<16} = {t['accuracy']:.2%} ({t['correct']} / {t['total']})")
    lines += ["", f"overall: {summary['overall']:.5f}"]
    return "\n".join(lines)
