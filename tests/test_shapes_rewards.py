"""The shapes_* rewards on hand-built scenes with known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miro.rewards import available, load_scorer
from miro.shapes.imperfections import degrade_image
from miro.shapes.render import render, render_float, to_uint8
from miro.shapes.rewards import REWARD_KEYS, ShapesScorer, score_all
from miro.shapes.scene import Scene, ShapeObject

RED_CIRCLE = ShapeObject("circle", "red", 0.1, 0.3, 0.35)
BLUE_SQUARE = ShapeObject("square", "blue", 0.6, 0.35, 0.3)


def scores(scene_or_img, prompt):
    img = render(scene_or_img) if isinstance(scene_or_img, Scene) else scene_or_img
    return {k: float(v[0]) for k, v in score_all([img], [prompt]).items()}


def test_registered_and_scorer_api():
    assert set(REWARD_KEYS) <= set(available())
    s = load_scorer("shapes_alignment")
    assert isinstance(s, ShapesScorer) and s.keys == ("shapes_alignment",) and s.score_range == (0.0, 1.0)
    img = render(Scene([RED_CIRCLE]))
    pil = [__import__("PIL.Image", fromlist=["Image"]).fromarray(img)] * 2
    t = torch.from_numpy(np.stack([img, img])).permute(0, 3, 1, 2).float() / 255
    a = s(pil, ["a red circle", "a blue circle"])
    b = s(t, ["a red circle", "a blue circle"])
    assert a.shape == (2,) and a.dtype == torch.float32 and torch.equal(a, b)
    with pytest.raises(ValueError, match="prompts"):
        s(pil, ["a red circle"] * 3)
    with pytest.raises(ValueError, match="cannot parse"):
        s(pil, ["a photo of a cat"] * 2)
    with pytest.raises(ValueError, match="unknown Shapes reward"):
        ShapesScorer("shapes_beauty")


def test_perfect_image_scores_max():
    v = scores(Scene([RED_CIRCLE, BLUE_SQUARE]), "a photo of a red circle left of a blue square")
    assert v["shapes_alignment"] == 1.0 and v["shapes_counting"] == 1.0 and v["shapes_position"] == 1.0
    assert v["shapes_contrast"] == pytest.approx(1.0, abs=3e-3)  # uint8 rounding of the palette
    assert v["shapes_sharpness"] >= 0.95


def test_alignment_known_values():
    scene = Scene([RED_CIRCLE])
    # colour clause: presence 1, colour 0 -> 0.5
    assert scores(scene, "a blue circle")["shapes_alignment"] == pytest.approx(0.5)
    # two clauses, one missing: checks (1, 1, 0, 0) -> 0.5
    assert scores(scene, "a red circle and a blue square")["shapes_alignment"] == pytest.approx(0.5)
    # an unmentioned object: all checks pass, 1 of 2 detections unexplained -> 1 - 0.5 * 0.5
    two = Scene([RED_CIRCLE, BLUE_SQUARE])
    assert scores(two, "a red circle")["shapes_alignment"] == pytest.approx(0.75)
    # wrong relation: presence 1, 1 and relation 0 -> 2/3
    assert scores(two, "a circle right of a square")["shapes_alignment"] == pytest.approx(2 / 3)
    # empty image
    assert scores(Scene([]), "a red circle")["shapes_alignment"] == 0.0


def test_counting_known_values():
    circles = Scene([ShapeObject("circle", "green", x, 0.1, 0.25) for x in (0.05, 0.375, 0.7)])
    assert scores(circles, "three circles")["shapes_counting"] == 1.0
    # asked 2, found 3: clause 2/3, total 2/3
    assert scores(circles, "two circles")["shapes_counting"] == pytest.approx(2 / 3)
    # asked 4 circles and a square: clause terms 3/4 and 0, total 3/5
    assert scores(circles, "four circles and a square")["shapes_counting"] == pytest.approx((0.75 + 0 + 0.6) / 3)
    assert scores(circles, "three circles")["shapes_alignment"] == 1.0
    assert scores(circles, "two circles")["shapes_alignment"] < 1.0  # exclude clause fails
    # one class in two clauses: their counts add up (each clause alone would find both circles)
    pair = Scene([RED_CIRCLE, ShapeObject("circle", "blue", 0.6, 0.35, 0.3)])
    assert scores(pair, "a red circle left of a blue circle")["shapes_counting"] == 1.0
    assert scores(circles, "a red circle and a blue circle")["shapes_counting"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert scores(circles, "two red circles and a green circle")["shapes_counting"] == 1.0


def test_position_relation_and_framing():
    two = Scene([RED_CIRCLE, BLUE_SQUARE])
    assert scores(two, "a circle left of a square")["shapes_position"] == 1.0
    assert scores(two, "a circle above a square")["shapes_position"] == pytest.approx(0.5)  # relation 0, framing 1
    # half of the square pushed out of the frame: framing 1/2
    cut = Scene([RED_CIRCLE, ShapeObject("square", "blue", 0.85, 0.35, 0.3)])
    assert scores(cut, "a red circle and a blue square")["shapes_position"] == pytest.approx(0.5)


def test_sharpness_falls_with_blur():
    img = render_float(Scene([RED_CIRCLE, BLUE_SQUARE]))
    rng = np.random.default_rng(0)
    values = [scores(to_uint8(img), "a circle")["shapes_sharpness"]]
    from scipy import ndimage

    for sigma in (0.7, 1.2, 2.0):
        values.append(scores(to_uint8(ndimage.gaussian_filter(img, (sigma, sigma, 0))), "a circle")["shapes_sharpness"])
    assert values[0] >= 0.95 and all(a > b for a, b in zip(values, values[1:])) and values[-1] < 0.5
    blurred, params = degrade_image(img, "blur", rng)
    assert params["sigma"] > 0 and scores(to_uint8(blurred), "a circle")["shapes_sharpness"] < values[0]
    assert scores(render(Scene([])), "a circle")["shapes_sharpness"] == 0.0  # no edges at all


def test_contrast_falls_with_low_contrast_and_cast():
    img = render_float(Scene([RED_CIRCLE, BLUE_SQUARE]))
    clean = scores(to_uint8(img), "a circle")["shapes_contrast"]
    mean = img.mean(axis=(0, 1), keepdims=True)
    faded = [scores(to_uint8(mean + k * (img - mean)), "a circle")["shapes_contrast"] for k in (0.8, 0.5, 0.3)]
    assert clean == pytest.approx(1.0, abs=3e-3)  # uint8 rounding of the palette
    assert clean > faded[0] > faded[1] > faded[2]
    cast = scores(to_uint8(np.clip(img * np.array([1.2, 0.9, 0.8]), 0, 1)), "a circle")["shapes_contrast"]
    assert cast < 0.9
    # alignment is unaffected by the cast: colours are read relative to the background
    assert scores(to_uint8(np.clip(img * np.array([1.2, 0.9, 0.8]), 0, 1)), "a red circle and a blue square")["shapes_alignment"] == 1.0


def test_every_reward_in_unit_interval_on_noise():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    out = score_all(imgs, ["two red circles above a blue square"] * 4)
    for k, v in out.items():
        assert v.shape == (4,) and bool(((v >= 0) & (v <= 1)).all()), k


def test_alignment_is_one_exactly_when_geneval_agrees_and_nothing_is_unexplained():
    """On web-like samples (one colour per class), alignment == 1 iff GenEval's verdict (same
    confidence threshold) is correct and every detection is mentioned by the caption."""
    from miro.eval.geneval_rules import GenEvalOptions, evaluate_detections
    from miro.shapes.captions import parse_caption
    from miro.shapes.detector import detect
    from miro.shapes.imperfections import make_sample
    from miro.shapes.rewards import DET_THRESHOLD, alignment

    opts = GenEvalOptions(threshold=DET_THRESHOLD, counting_threshold=DET_THRESHOLD)
    seen = set()
    for i in range(60):
        s = make_sample(5, i)
        dets = detect(s.image)
        kept = [d for d in dets if d.score > DET_THRESHOLD]
        for cap in (s.caption, s.synthetic["prompt"]):
            md = parse_caption(cap)
            verdict, _ = evaluate_detections(md, dets, opts)
            mentioned = {c["class"] for c in md["include"]}
            counts_ok = all(sum(d.cls == c["class"] for d in kept) == c["count"] for c in md["include"])
            expect = verdict.correct and all(d.cls in mentioned for d in kept) and counts_ok
            got = alignment(md, dets) == 1.0
            assert got == expect, (i, cap, verdict.reason)
            seen.add(got)
    assert seen == {True, False}


def _det(cls, color, bbox, score=0.9, **extra):
    from miro.eval.geneval_rules import Detection

    return Detection(cls, score, bbox, color, extra=extra)


def test_rules_on_hand_made_detections():
    """Closed forms of the alignment, counting and position rules: only scores above 0.3 count
    (GenEval's ``threshold``); a colour clause takes the right-coloured object before a more
    confident one; an exclude clause fails at ``count`` objects (exactly N)."""
    from miro.shapes.rewards import alignment, counting

    red = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    assert alignment(red, [_det("circle", "red", (0, 0, 10, 10), score=0.3)]) == 0.0  # at the threshold: unseen
    assert alignment(red, [_det("circle", "red", (0, 0, 10, 10), score=0.31)]) == 1.0
    # blue (0.9) and red (0.5): red is matched (presence 1, colour 1), blue unexplained: 1 - 0.5 * 1/2
    mixed = [_det("circle", "blue", (0, 0, 10, 10), 0.9), _det("circle", "red", (20, 0, 30, 10), 0.5)]
    assert alignment(red, mixed) == pytest.approx(0.75)
    two = {"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    circles = [_det("circle", "green", (20 * i, 0, 20 * i + 10, 10)) for i in range(3)]
    assert alignment(two, circles[:2]) == 1.0
    # three circles: presence 1, exclude 0 -> 1/2, one of three unexplained -> 1 - 0.5/3
    assert alignment(two, circles) == pytest.approx(0.5 * (1 - 0.5 / 3))
    assert counting(two, circles) == pytest.approx(2 / 3)


def test_framing_reads_x_against_the_width_and_y_against_the_height():
    """Framing on a 64 x 128 (H x W) image: a fitted box out to x = 100 is inside, down to y = 100
    is cut; an image with no detection gets no framing credit."""
    from miro.shapes.rewards import position

    md = {"include": [{"class": "circle", "count": 1}]}
    wide = _det("circle", "red", (80, 10, 100, 30), box=(80, 10, 100, 30))
    tall = _det("circle", "red", (10, 40, 30, 64), box=(10, 40, 30, 100))
    assert position(md, [wide], 64, 128) == 1.0
    assert position(md, [tall], 64, 128) == 0.0
    assert position(md, [wide, tall], 64, 128) == 0.5
    assert position(md, [], 64, 128) == 0.0


def test_contrast_is_capped_at_the_palette_contrast():
    """An object further from the background than its palette colour scores contrast 1, not more:
    pure black on the gray background gives 0.5 * 1 + 0.5 * mean(background fidelity 1, object
    fidelity exp(-(|black - (0, 0, 0)| / 0.15)^2))."""
    from miro.shapes import world as W
    from miro.shapes.rewards import FIDELITY_SIGMA, contrast

    img = np.tile(np.asarray(W.BACKGROUNDS["gray"]), (32, 32, 1))
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    img[mask] = 0.0
    d = _det("square", "black", (8, 8, 23, 23))
    d.mask = mask
    fid = np.exp(-(np.linalg.norm(np.asarray(W.COLOR_RGB["black"])) / FIDELITY_SIGMA) ** 2)
    assert contrast(img, [d]) == pytest.approx(0.5 + 0.5 * (1 + fid) / 2)
