"""The Shapes world's analytic rewards, each in [0, 1] with 1 = best.

==================  ==============================================================================
key                 meaning
==================  ==============================================================================
shapes_alignment    prompt alignment, GenEval-style but graded: the mean of the clause checks
                    (presence ``found/count``, colour ``right colour/count``, relation ``pairs in
                    relation/pairs``, exclude ``0/1``), times ``1 − 0.5·(unexplained detections /
                    detections)``. 1 exactly when GenEval's verdict is correct and every detection
                    is explained by a clause (one colour per class; tested).
shapes_counting     counting fidelity: mean over clauses of ``min(k, n)/max(k, n)`` (k detected
                    objects of the class, n asked), plus the same ratio for the total object count.
shapes_position     spatial fidelity: mean of the fraction of (object, target) pairs in the asked
                    relation for each relational clause, and of the framing term (fraction of
                    detected objects not cut by the frame).
shapes_sharpness    edge sharpness: at edge pixels (local maxima of the gradient where the 5×5
                    colour range exceeds 0.2), the ratio gradient / local range, range-weighted,
                    divided by ``SHARP_REF`` (a box-filtered step edge) and clipped to 1.
shapes_contrast     contrast and colour quality: 0.5·(object-background contrast relative to the
                    clean palette) + 0.5·(colour fidelity of objects and background to the palette,
                    ``exp(−(d/0.15)²)``).
==================  ==============================================================================

Prompts are parsed with :func:`miro.shapes.captions.parse_caption`. The image-only rewards,
sharpness and contrast, ignore them: ``prompts`` may be None there, and prompts that are given are
still checked to be one per image. Alignment, counting and position raise a ValueError naming
themselves without prompts. Detection runs once per image and is cached, so scoring all five keys
costs one detection.
"""

from __future__ import annotations


import numpy as np
import torch

from miro.eval.geneval_rules import Detection, relative_position
from miro.rewards.base import Scorer, check_batch_size, check_prompts, register
from miro.rewards.weights import resolve_dtype
from miro.shapes import world as W
from miro.shapes.captions import parse_caption
from miro.shapes.detector import ShapesDetector, estimate_background, to_float_image

REWARD_KEYS: tuple[str, ...] = ("shapes_alignment", "shapes_counting", "shapes_position", "shapes_sharpness", "shapes_contrast")
PROMPT_KEYS: tuple[str, ...] = ("shapes_alignment", "shapes_counting", "shapes_position")  # the rest ignore the prompt
DET_THRESHOLD = 0.3  # detections at or below this confidence are ignored (GenEval's `threshold`)
EXTRA_PENALTY = 0.5  # alignment lost when every detection is unexplained by the caption
SHARP_REF = 0.7  # mean gradient/range ratio of a box-filtered step at a random sub-pixel phase is
# 0.75 for axis-aligned edges and lower on slants; 0.7 is what clean renders reach (docs/shapes.md)
EDGE_RANGE = 0.2  # a pixel is on an edge when its 5x5 colour range (RGB distance) exceeds this: above
# the largest background texture swing (0.139), below the closest colour-background distance (0.287)
FIDELITY_SIGMA = 0.15  # colour drift (RGB distance) at which fidelity falls to exp(-1)
_LUMA = np.array([0.299, 0.587, 0.114])

_DETECTOR = ShapesDetector()


def _kept(dets: list[Detection]) -> list[Detection]:
    return [d for d in dets if d.score > DET_THRESHOLD]


def _match(md: dict, dets: list[Detection]) -> list[list[Detection]]:
    """Found objects per include clause: best-scoring of the class, right colour first."""
    groups = []
    for clause in md["include"]:
        cands = [d for d in dets if d.cls == clause["class"]]
        if "color" in clause:
            cands.sort(key=lambda d: (d.color != clause["color"], -d.score))
        groups.append(cands[: clause["count"]])
    return groups


def alignment(md: dict, dets: list[Detection]) -> float:
    dets = _kept(dets)
    groups = _match(md, dets)
    checks = []
    for clause, found in zip(md["include"], groups):
        n = clause["count"]
        checks.append(len(found) / n)
        if "color" in clause:
            checks.append(sum(d.color == clause["color"] for d in found) / n)
        if "position" in clause:
            checks.append(_relation_fraction(found, groups[clause["position"][1]], clause["position"][0]))
    for ex in md.get("exclude", []) or []:
        checks.append(float(sum(d.cls == ex["class"] for d in dets) < ex["count"]))
    explained = {id(d) for g in groups for d in g}
    extra = sum(id(d) not in explained for d in dets) / len(dets) if dets else 0.0
    return float(np.mean(checks)) * (1.0 - EXTRA_PENALTY * extra)


def _relation_fraction(found: list[Detection], targets: list[Detection], rel: str) -> float:
    pairs = [(a, b) for a in found for b in targets]
    if not pairs:
        return 0.0
    return sum(rel in relative_position(a.bbox, b.bbox) for a, b in pairs) / len(pairs)


def counting(md: dict, dets: list[Detection]) -> float:
    dets = _kept(dets)

    def ratio(k: int, n: int) -> float:
        return min(k, n) / max(k, n) if max(k, n) else 1.0

    # One term per class, its clauses' counts summed: "a red circle left of a blue circle" asks for
    # two circles (per clause, each found both and the ground truth scored 0.67). Colours are
    # alignment's to check.
    wanted: dict[str, int] = {}
    for c in md["include"]:
        wanted[c["class"]] = wanted.get(c["class"], 0) + c["count"]
    terms = [ratio(sum(d.cls == cls for d in dets), n) for cls, n in wanted.items()]
    terms.append(ratio(len(dets), sum(wanted.values())))
    return float(np.mean(terms))


def position(md: dict, dets: list[Detection], height: int, width: int) -> float:
    dets = _kept(dets)
    groups = _match(md, dets)
    terms = [_relation_fraction(f, groups[c["position"][1]], c["position"][0]) for c, f in zip(md["include"], groups) if "position" in c]
    if dets:
        inside = [not _cut(d, height, width) for d in dets]
        terms.append(float(np.mean(inside)))
    else:
        terms.append(0.0)
    return float(np.mean(terms))


def _cut(d: Detection, height: int, width: int, tol: float = 1.0) -> bool:
    """The object's full (fitted) box reaches more than ``tol`` pixels past the frame."""
    x1, y1, x2, y2 = d.extra.get("box", d.bbox)
    return x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol


def sharpness(img: np.ndarray) -> float:
    from scipy import ndimage

    # colour gradients and ranges (not luminance: orange on gray has almost no luminance edge)
    gx = np.zeros_like(img)
    gy = np.zeros_like(img)
    gx[:, :-1] = img[:, 1:] - img[:, :-1]
    gy[:-1, :] = img[1:, :] - img[:-1, :]
    grad = np.sqrt((gx * gx + gy * gy).sum(-1))
    size = (5, 5, 1)
    rng = np.sqrt(((ndimage.maximum_filter(img, size=size) - ndimage.minimum_filter(img, size=size)) ** 2).sum(-1))
    edge = (rng > EDGE_RANGE) & (grad >= ndimage.maximum_filter(grad, size=3)) & (grad > 0)
    if not edge.any():
        return 0.0
    ratio = np.clip(grad[edge] / rng[edge], 0.0, 1.0)
    return float(min(1.0, (ratio * rng[edge]).sum() / rng[edge].sum() / SHARP_REF))


def contrast(img: np.ndarray, dets: list[Detection]) -> float:
    dets = _kept(dets)
    bg, _ = estimate_background(img)
    bg_names = list(W.BACKGROUNDS)
    bg_ref = np.asarray(W.BACKGROUNDS[bg_names[int(np.argmin([np.linalg.norm(bg - np.asarray(W.BACKGROUNDS[b])) for b in bg_names]))]])
    fidelity = [np.exp(-(np.linalg.norm(bg - bg_ref) / FIDELITY_SIGMA) ** 2)]
    contrasts = []
    for d in dets:
        if d.mask is None or not d.mask.any() or d.color is None:
            continue
        col = np.median(img[d.mask], axis=0)
        ref = np.asarray(W.COLOR_RGB[d.color])
        contrasts.append(min(1.0, np.linalg.norm(col - bg) / max(np.linalg.norm(ref - bg_ref), 1e-6)))
        fidelity.append(np.exp(-(np.linalg.norm(col - ref) / FIDELITY_SIGMA) ** 2))
    c = float(np.mean(contrasts)) if contrasts else 0.0
    return 0.5 * c + 0.5 * float(np.mean(fidelity))


def _arrays(images) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor) and (images.ndim != 4 or images.shape[1] != 3):
        raise ValueError(f"image tensor must have shape (B, 3, H, W); got {tuple(images.shape)}")
    return [to_float_image(im, f"images[{i}]") for i, im in enumerate(images)]


def score_all(images, prompts=None, keys=REWARD_KEYS, detector: ShapesDetector | None = None) -> dict[str, torch.Tensor]:
    """Every requested Shapes reward for a batch, sharing one detection per image.

    ``prompts`` may be None when only image-only keys (sharpness, contrast) are asked for.
    """
    for k in keys:
        if k not in REWARD_KEYS:
            raise ValueError(f"unknown Shapes reward {k!r}; allowed: {', '.join(REWARD_KEYS)}")
    arrays = _arrays(images)
    text_keys = [k for k in keys if k in PROMPT_KEYS]
    if prompts is None and not text_keys:
        prompts = [None] * len(arrays)  # never read: the image-only rewards ignore the prompt
    else:
        who = text_keys[0] if len(text_keys) == 1 else f"each of {', '.join(text_keys)}"
        prompts = check_prompts(prompts, len(arrays), scorer=who)
    detector = detector or _DETECTOR
    needs_text = bool(text_keys)
    out = {k: torch.zeros(len(arrays), dtype=torch.float32) for k in keys}
    for i, (img, prompt) in enumerate(zip(arrays, prompts)):
        needs_dets = needs_text or "shapes_contrast" in keys
        dets = detector(img) if needs_dets else []
        md = parse_caption(prompt) if needs_text else None
        vals = {
            "shapes_alignment": lambda: alignment(md, dets),
            "shapes_counting": lambda: counting(md, dets),
            "shapes_position": lambda: position(md, dets, img.shape[0], img.shape[1]),
            "shapes_sharpness": lambda: sharpness(img),
            "shapes_contrast": lambda: contrast(img, dets),
        }
        for k in keys:
            out[k][i] = vals[k]()
    return out


class ShapesScorer(Scorer):
    """One Shapes reward as a :class:`~miro.rewards.base.Scorer` (batched; not differentiable)."""

    differentiable = False
    score_range = (0.0, 1.0)

    def __init__(self, key: str, detector: ShapesDetector | None = None, *, device=None, dtype=None,
                 revision: str | None = None, local_files_only: bool = False, batch_size: int = 32):
        """``device``, ``dtype``, ``revision``, ``local_files_only`` and ``batch_size`` are the
        arguments every reward factory takes (docs/rewards.md). They are checked and kept, but do
        not change the scores: the rewards are exact numpy computations on the CPU (scores come
        back as float32 on the CPU whatever ``device``/``dtype`` say), there are no weights to
        download, and images are scored one at a time, so there is no batch to size."""
        if key not in REWARD_KEYS:
            raise ValueError(f"unknown Shapes reward {key!r}; allowed: {', '.join(REWARD_KEYS)}")
        self.keys = (key,)
        self.detector = detector
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):  # torch's own message does not say which argument
                raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:0')") from None
        self.requested_device = device
        self.requested_dtype = None if dtype is None else resolve_dtype(dtype)  # raises naming bad names
        self.batch_size = check_batch_size(batch_size)
        self.revision = revision
        self.local_files_only = bool(local_files_only)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the scores are computed and returned

    def score(self, images, prompts=None) -> torch.Tensor:
        """Scores, shape (B,). ``prompts`` may be None for sharpness and contrast only."""
        return score_all(images, prompts, self.keys, self.detector)[self.key]


def _factory(key: str):
    def make(*, detector: ShapesDetector | None = None, device=None, dtype=None, revision: str | None = None,
             local_files_only: bool = False, batch_size: int = 32) -> ShapesScorer:
        return ShapesScorer(key, detector, device=device, dtype=dtype, revision=revision,
                            local_files_only=local_files_only, batch_size=batch_size)

    make.__name__ = f"make_{key}"
    return make


for _key in REWARD_KEYS:
    register(_key)(_factory(_key))
