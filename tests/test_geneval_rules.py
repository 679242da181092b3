"""GenEval's rules on hand-made detections: every tag, exclude clauses, thresholds, relations, colours."""

from __future__ import annotations

import json

import pytest

from miro.eval.geneval_rules import (
    Detection,
    GenEvalOptions,
    box_iou,
    evaluate,
    evaluate_detections,
    filter_detections,
    format_summary,
    relative_position,
    result_record,
    summarize,
    validate_metadata,
)


def det(cls, x, y, s=10, score=0.95, color=None):
    return Detection(cls, score, (x, y, x + s, y + s), color)


def verdict(md, dets, **opts):
    return evaluate_detections(md, dets, GenEvalOptions(**opts))[0]


def test_relative_position_closed_forms():
    b = (40, 40, 50, 50)
    assert relative_position((10, 40, 20, 50), b) == {"left of"}
    assert relative_position((70, 40, 80, 50), b) == {"right of"}
    assert relative_position((40, 10, 50, 20), b) == {"above"}  # y points down
    assert relative_position((40, 70, 50, 80), b) == {"below"}
    # 45 degrees: both components are 1/sqrt(2) > 0.5 after a small shrink
    assert relative_position((10, 10, 20, 20), b) == {"left of", "above"}
    # offset 3 < 0.1 * (10 + 10) * ... per axis: shrunk to zero -> no relation
    assert relative_position((43, 40, 53, 50), b) == set()
    # offset 5 along x: revised = 5 - 0.1*20 = 3, normalised 3/5 = 0.6 > 0.5 -> right of
    assert relative_position((45, 40, 55, 50), b) == {"right of"}
    # offset 4: revised 2, 2/4 = 0.5 is not > 0.5 -> nothing
    assert relative_position((44, 40, 54, 50), b) == set()
    # a larger tolerance removes the relation
    assert relative_position((45, 40, 55, 50), b, position_threshold=0.25) == set()


def test_single_object_and_threshold():
    md = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert verdict(md, [det("cat", 0, 0)]).correct
    assert not verdict(md, [det("cat", 0, 0, score=0.3)]).correct  # score must be > threshold
    assert verdict(md, [det("cat", 0, 0, score=0.31)]).correct
    v = verdict(md, [det("dog", 0, 0)])
    assert not v.correct and v.reason == "expected cat>=1, found 0"
    # extra objects do not matter without an exclude clause
    assert verdict(md, [det("cat", 0, 0), det("cat", 30, 0), det("dog", 60, 0)]).correct


def test_two_object():
    md = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert verdict(md, [det("cat", 0, 0), det("dog", 30, 0)]).correct
    assert not verdict(md, [det("cat", 0, 0)]).correct


def test_counting_uses_counting_threshold_and_exclude():
    md = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    two = [det("clock", 0, 0), det("clock", 30, 0)]
    assert verdict(md, two).correct
    # a third detection means "not exactly two"
    v = verdict(md, two + [det("clock", 60, 0)])
    assert not v.correct and "expected clock<3, found 3" in v.reason
    # ...unless it is below the counting threshold (0.9 by default)
    assert verdict(md, two + [det("clock", 60, 0, score=0.8)]).correct
    # the counting threshold also applies to the include clause
    assert not verdict(md, [det("clock", 0, 0), det("clock", 30, 0, score=0.85)]).correct
    assert verdict(md, [det("clock", 0, 0), det("clock", 30, 0, score=0.85)], counting_threshold=0.5).correct


def test_colors_and_color_attr():
    md = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert verdict(md, [det("car", 0, 0, color="red")]).correct
    v = verdict(md, [det("car", 0, 0, color="blue")])
    assert not v.correct and v.reason.startswith("expected red car>=1, found 0 red; and 1 blue")
    # only the most confident object is checked (GenEval: colour on the found objects)
    assert not verdict(md, [det("car", 0, 0, 0.99, color="blue"), det("car", 30, 0, 0.9, color="red")]).correct
    md2 = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 1, "color": "green"}]}
    assert verdict(md2, [det("car", 0, 0, color="red"), det("cup", 30, 0, color="green")]).correct
    assert not verdict(md2, [det("car", 0, 0, color="green"), det("cup", 30, 0, color="red")]).correct


def test_color_clause_needs_every_found_object_in_colour_and_skips_position_when_it_fails():
    """A colour clause of count N needs N found objects of that colour (one is not enough); when it
    fails, the clause's position is not checked, so the colour is the only reason given."""
    md = {"tag": "counting", "include": [{"class": "car", "count": 2, "color": "red"}]}
    assert verdict(md, [det("car", 0, 0, color="red"), det("car", 30, 0, color="red")]).correct
    v = verdict(md, [det("car", 0, 0, color="red"), det("car", 30, 0, color="blue")])
    assert not v.correct and v.reason == "expected red car>=2, found 1 red; and 1 red, 1 blue"
    md2 = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "color": "red", "position": ["right of", 0]}]}
    v2 = verdict(md2, [det("dog", 40, 40), det("cat", 10, 40, color="blue")])
    assert not v2.correct and v2.reasons == ["expected red cat>=1, found 0 red; and 1 blue"]


def test_color_fn_is_used_when_detections_have_no_colour():
    md = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    calls = []

    def color_fn(found, cls):
        calls.append((len(found), cls))
        return ["red", "red"]

    v, _ = evaluate_detections(md, [det("car", 0, 0), det("car", 30, 0)], None, color_fn)
    assert v.correct and calls == [(2, "car")]
    with pytest.raises(ValueError, match="colour"):
        evaluate_detections(md, [det("car", 0, 0), det("car", 30, 0)])


@pytest.mark.parametrize("rel,x,y", [("left of", 10, 40), ("right of", 70, 40), ("above", 40, 10), ("below", 40, 70)])
def test_position_each_relation(rel, x, y):
    md = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": [rel, 0]}]}
    assert verdict(md, [det("dog", 40, 40), det("cat", x, y)]).correct
    others = [r for r in ("left of", "right of", "above", "below") if r != rel]
    for other in others:
        md_o = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": [other, 0]}]}
        v = verdict(md_o, [det("dog", 40, 40), det("cat", x, y)])
        assert not v.correct and f"expected cat {other} target, found {rel} target" in v.reason


def test_position_needs_matched_target():
    md = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    v = verdict(md, [det("cat", 0, 0)])
    assert not v.correct and "no target for cat to be left of" in v.reason


def test_max_objects_and_nms():
    md = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    dets = [det("cat", 0, 0, score=0.5 + i / 100) for i in range(20)]
    kept = filter_detections(dets, "single_object", GenEvalOptions(max_objects=16))
    assert len(kept["cat"]) == 16 and kept["cat"][0].score == pytest.approx(0.69)
    # identical boxes collapse to one with NMS, survive without it
    assert len(filter_detections(dets, "x", GenEvalOptions(max_overlap=0.5))["cat"]) == 1
    # NMS keeps a box only when its IoU with a kept one is below max_overlap (GenEval: `iou < NMS_THRESHOLD`)
    pair = [Detection("cat", 0.9, (0, 0, 9, 9)), Detection("cat", 0.8, (0, 0, 9, 4))]  # IoU 50/100
    assert box_iou(pair[0].bbox, pair[1].bbox) == 0.5
    assert len(filter_detections(pair, "x", GenEvalOptions(max_overlap=0.5))["cat"]) == 1
    assert len(filter_detections(pair, "x", GenEvalOptions(max_overlap=0.51))["cat"]) == 2
    assert verdict(md, dets).correct
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (10, 0, 19, 9)) == 0.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)


def test_real_geneval_metadata_validates(shared_data):
    lines = [json.loads(ln) for ln in (shared_data / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines() if ln]
    assert len(lines) == 553
    for md in lines:
        validate_metadata(md)
    # every GenEval counting prompt is satisfied by exactly `count` confident detections
    for md in (m for m in lines if m["tag"] == "counting"):
        c = md["include"][0]
        ok = [det(c["class"], 30 * k, 0) for k in range(c["count"])]
        assert verdict(md, ok).correct
        assert not verdict(md, ok + [det(c["class"], 200, 0)]).correct


@pytest.mark.parametrize("bad,msg", [
    ({"include": []}, "non-empty"),
    ({"include": [{"class": "cat", "count": 0}]}, "count"),
    ({"include": [{"class": "cat", "count": 1, "color": "teal"}]}, "teal"),
    ({"include": [{"class": "cat", "count": 1, "position": ["near", 0]}]}, "near"),
    ({"include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}, "earlier"),
])
def test_validate_metadata_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        validate_metadata(bad)


def test_options_from_strings():
    o = GenEvalOptions.from_strings(["threshold=0.5", "max_objects=3"])
    assert o.threshold == 0.5 and o.max_objects == 3 and o.counting_threshold == 0.9
    with pytest.raises(ValueError, match="unknown option"):
        GenEvalOptions.from_strings(["bogus=1"])
    with pytest.raises(ValueError, match="not a number"):
        GenEvalOptions.from_strings(["threshold=x"])


def test_records_and_summary():
    mds = [{"tag": "a", "include": [{"class": "cat", "count": 1}], "prompt": "p1"},
           {"tag": "b", "include": [{"class": "dog", "count": 1}], "prompt": "p2"}]
    recs = []
    for md, dets in ((mds[0], [det("cat", 0, 0)]), (mds[0], []), (mds[1], [det("dog", 0, 0)]), (mds[1], [det("dog", 0, 0)])):
        v, kept = evaluate_detections(md, dets)
        recs.append(result_record("x.png", md, v, kept))
    assert set(recs[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(recs[0]["details"])["cat"][0] == [0.0, 0.0, 10.0, 10.0, 0.95]
    s = summarize(recs)
    # tag a: 1/2, tag b: 2/2 -> overall is the mean over tags (0.75), not over images (0.75 here too)
    assert s["tags"]["a"]["accuracy"] == 0.5 and s["tags"]["b"]["accuracy"] == 1.0
    assert s["overall"] == 0.75 and s["prompts"] == 2 and s["correct_prompts"] == 1.0
    recs.append(recs[2])  # unbalanced tags: the overall stays the mean over tags
    assert summarize(recs)["overall"] == 0.75 and summarize(recs)["correct_images"] == 0.8
    assert format_summary(s).splitlines()[-1] == "overall: 0.75000"


def test_a_prompt_is_its_folder_even_when_two_folders_repeat_a_line():
    """ShapesEval repeats metadata lines in other folders (other seeds): each folder is a prompt."""
    md = {"tag": "a", "include": [{"class": "cat", "count": 1}], "prompt": "p"}
    hit, _ = evaluate_detections(md, [det("cat", 0, 0)])
    miss, _ = evaluate_detections(md, [])
    recs = [result_record(f"{i:05d}/samples/0000.png", md, hit if i % 2 == 0 else miss, {}) for i in range(4)]
    s = summarize(recs)
    assert s["prompts"] == 4 and s["correct_prompts"] == 0.5 and s["overall"] == 0.5
    # files without a folder (not this layout) group by their metadata line, as GenEval does
    s = summarize([{**r, "filename": f"{i}.png"} for i, r in enumerate(recs)])
    assert s["prompts"] == 1 and s["correct_prompts"] == 1.0


def test_bad_bbox():
    with pytest.raises(ValueError, match="bbox"):
        Detection("cat", 0.9, (10, 0, 0, 10))
    assert not evaluate({"tag": "x", "include": [{"class": "cat", "count": 1}]}, {}).correct
