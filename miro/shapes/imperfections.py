"""Web-like imperfections and the web-like sample generator.

Web image-caption pairs are noisy: captions miss objects, name wrong colours or counts, images
are blurred, noisy, washed out, colour-cast, cluttered or cropped. Each imperfection is applied
independently with its rate (:class:`ImperfectionRates`), and what was applied is recorded per
sample, so rewards vary over the data the way they do on real web data, and a study can ask
which defects a reward sees.

Caption defects change the caption's metadata (the image stays true to the original):
``wrong_color``, ``wrong_count``, ``wrong_relation`` (only on captions with a relation),
``missing_object`` (a clause is dropped; needs >= 2 clauses), ``extra_object`` (a clause for an
absent class is added). Scene defects: ``clutter`` (1-2 objects of classes the caption does not
mention), ``cut_by_frame`` (one object 35-70 % visible). Image defects, applied in float before
quantisation: ``blur`` (Gaussian, sigma 0.5-1.3 px at 32 px, scaled with resolution), ``noise``
(Gaussian, sigma 0.02-0.07), ``low_contrast`` (pulled 35-65 % of the way to the mean),
``color_cast`` (per-channel gains 0.8-1.2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from miro.shapes import world as W
from miro.shapes.captions import canonical, caption_from_metadata, describe_scene
from miro.shapes.render import render_float, to_uint8
from miro.shapes.scene import SceneConfig, add_clutter, cut_by_frame, rng_for, sample_metadata, scene_from_metadata

CAPTION_DEFECTS = ("wrong_color", "wrong_count", "wrong_relation", "missing_object", "extra_object")
SCENE_DEFECTS = ("clutter", "cut_by_frame")
IMAGE_DEFECTS = ("blur", "noise", "low_contrast", "color_cast")


@dataclass
class ImperfectionRates:
    """Probability of each imperfection per sample (independent draws)."""

    wrong_color: float = 0.1  # a clause's colour is replaced (or a wrong colour added)
    wrong_count: float = 0.1  # a clause's count is changed
    wrong_relation: float = 0.2  # the relation is replaced (captions with a relation only)
    missing_object: float = 0.1  # a clause is dropped (captions with >= 2 clauses only)
    extra_object: float = 0.05  # a clause for an absent class is added
    clutter: float = 0.15  # unmentioned objects are added to the scene
    cut_by_frame: float = 0.1  # one object is pushed partly out of the frame
    blur: float = 0.15  # Gaussian blur
    noise: float = 0.15  # Gaussian pixel noise
    low_contrast: float = 0.1  # contrast reduced towards the mean
    color_cast: float = 0.1  # per-channel gains

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"imperfection rate {f.name}={v!r} must be a number in [0, 1]")

    @classmethod
    def none(cls) -> "ImperfectionRates":
        """Clean data: every rate 0."""
        return cls(**{f.name: 0.0 for f in fields(cls)})

    @classmethod
    def only(cls, name: str, rate: float = 1.0) -> "ImperfectionRates":
        """One imperfection at ``rate``, all others off."""
        out = cls.none()
        if name not in {f.name for f in fields(cls)}:
            raise ValueError(f"unknown imperfection {name!r}; allowed: {', '.join(f.name for f in fields(cls))}")
        setattr(out, name, rate)
        out.__post_init__()
        return out

    @classmethod
    def from_strings(cls, pairs: list[str] | None, base: "ImperfectionRates | None" = None) -> "ImperfectionRates":
        """``["blur=0.3", "noise=0"]`` over ``base`` (default rates); ``all=0`` sets every rate."""
        out = asdict(base or cls())
        names = [f.name for f in fields(cls)]
        for p in pairs or []:
            k, sep, v = p.partition("=")
            if not sep:
                raise ValueError(f"imperfection rate {p!r}: expected NAME=RATE, e.g. blur=0.2")
            try:
                val = float(v)
            except ValueError:
                raise ValueError(f"imperfection rate {p!r}: {v!r} is not a number") from None
            if k == "all":
                out = {n: val for n in names}
            elif k in names:
                out[k] = val
            else:
                raise ValueError(f"unknown imperfection {k!r}; allowed: all, {', '.join(names)}")
        return cls(**out)


def corrupt_caption(md: dict, defect: str, rng: np.random.Generator, scene) -> dict | None:
    """Metadata with one caption defect applied, or None where the defect does not apply."""
    inc = [dict(c) for c in md["include"]]
    i = int(rng.integers(len(inc)))
    if defect == "wrong_color":
        true = inc[i].get("color") or next((o.color for o in scene.objects if o.cls == inc[i]["class"]), None)
        inc[i]["color"] = str(rng.choice([c for c in W.COLORS if c != true]))
    elif defect == "wrong_count":
        inc[i]["count"] = int(rng.choice([n for n in range(1, W.MAX_COUNT + 1) if n != inc[i]["count"]]))
    elif defect == "wrong_relation":
        pos = [k for k, c in enumerate(inc) if "position" in c]
        if not pos:
            return None
        rel, t = inc[pos[0]]["position"]
        inc[pos[0]]["position"] = [str(rng.choice([r for r in W.RELATIONS if r != rel])), t]
    elif defect == "missing_object":
        if len(inc) < 2:
            return None
        kept = []
        for k, c in enumerate(inc):
            if k == i:
                continue
            if "position" in c:  # re-point relations; a relation to the dropped clause goes
                rel, t = c["position"]
                if t == i:
                    c.pop("position")
                else:
                    c["position"] = [rel, t - (t > i)]
            kept.append(c)
        inc = kept
    elif defect == "extra_object":
        present = {o.cls for o in scene.objects}
        absent = [c for c in W.CLASSES if c not in present]
        if not absent:
            return None
        clause = {"class": str(rng.choice(absent)), "count": 1}
        if any("color" in c for c in inc):
            clause["color"] = str(rng.choice(W.COLORS))
        if any("position" in c for c in inc) and len(inc) != 2:
            return None
        inc.append(clause)
    else:
        raise ValueError(f"unknown caption defect {defect!r}; allowed: {', '.join(CAPTION_DEFECTS)}")
    return canonical({"include": inc})


def degrade_image(img: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Apply one image defect to a float (H, W, 3) image; returns (image, parameters)."""
    from scipy import ndimage

    res = img.shape[0]
    if defect == "blur":
        sigma = float(rng.uniform(0.5, 1.3)) * res / W.DEFAULT_RESOLUTION
        return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest"), {"sigma": sigma}
    if defect == "noise":
        sigma = float(rng.uniform(0.02, 0.07))
        return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 1), {"sigma": sigma}
    if defect == "low_contrast":
        k = float(rng.uniform(0.35, 0.65))
        mean = img.mean(axis=(0, 1), keepdims=True)
        return mean + k * (img - mean), {"factor": k}
    if defect == "color_cast":
        gains = rng.uniform(0.8, 1.2, size=3)
        return np.clip(img * gains, 0, 1), {"gains": [float(g) for g in gains]}
    raise ValueError(f"unknown image defect {defect!r}; allowed: {', '.join(IMAGE_DEFECTS)}")


@dataclass
class WebSample:
    """One generated image-caption pair and everything known about it."""

    image: np.ndarray  # (H, W, 3) uint8
    caption: str  # the (possibly wrong) web caption
    metadata: dict  # GenEval metadata of the caption
    true_metadata: dict  # metadata of the caption before caption defects
    scene: object  # the Scene actually rendered
    imperfections: dict  # name -> parameters, for each defect applied
    synthetic: dict  # metadata (with prompt) describing the image, long form
    short_synthetic: dict  # the same, short form


def make_sample(seed: int, index: int, rates: ImperfectionRates | None = None, resolution: int = W.DEFAULT_RESOLUTION,
                scene_config: SceneConfig | None = None, tag: str | None = None) -> WebSample:
    """Sample ``index`` of a dataset with ``seed``: same arguments, same bytes."""
    rates = rates or ImperfectionRates()
    cfg = scene_config or SceneConfig.varied()
    rng = rng_for(seed, index)
    draws = {f.name: bool(rng.random() < getattr(rates, f.name)) for f in fields(rates)}
    md = canonical(sample_metadata(rng, tag))
    n_clutter = int(rng.integers(1, 3)) if draws["clutter"] else 0
    scene = scene_from_metadata(md, rng, cfg, extra_room=n_clutter)
    applied: dict[str, dict] = {}
    if n_clutter:
        added = add_clutter(scene, n_clutter, rng, cfg, {c["class"] for c in md["include"]})
        if added:
            applied["clutter"] = {"objects": added}
    if draws["cut_by_frame"]:
        idx = cut_by_frame(scene, rng, cfg)
        if idx is not None:
            applied["cut_by_frame"] = {"object": idx}
    style = "geneval" if rng.random() < 0.5 else "free"
    true_caption = caption_from_metadata(md, style, rng)
    cap_md = md
    for d in CAPTION_DEFECTS:
        if draws[d]:
            new = corrupt_caption(cap_md, d, rng, scene)
            if new is not None:
                cap_md = new
                applied[d] = {}
    caption = true_caption if cap_md is md else caption_from_metadata(cap_md, style, rng)
    img = render_float(scene, resolution)
    for d in IMAGE_DEFECTS:
        if draws[d]:
            img, params = degrade_image(img, d, rng)
            applied[d] = params
    return WebSample(
        image=to_uint8(img),
        caption=caption,
        metadata={**cap_md, "prompt": caption},
        true_metadata={**md, "prompt": true_caption},
        scene=scene,
        imperfections=applied,
        synthetic=describe_scene(scene, long=True),
        short_synthetic=describe_scene(scene, long=False),
    )
