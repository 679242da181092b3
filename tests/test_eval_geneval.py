"""GenEval-like scoring: tiny Mask2Former + tiny CLIP through the real path, and rule integration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _eval_tiny import save_tiny_clip, save_tiny_mask2former
from miro.eval import geneval as GE
from miro.eval import geneval_rules as rules
from miro.eval.folder import read_jsonl

ZERO = rules.GenEvalOptions(threshold=0.0, counting_threshold=0.0)


@pytest.fixture(scope="module")
def tiny_backends(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_geneval")
    return save_tiny_mask2former(root / "m2f"), save_tiny_clip(root / "clip")


def _image(seed, size=64):
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def _folder(root, metas, n=2):
    for i, m in enumerate(metas):
        d = root / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(m) + "\n")
        for j in range(n):
            _image(100 * i + j).save(d / "samples" / f"{j:04d}.png")
    return root


def test_color_crop_pastes_the_mask_on_grey_and_crops_to_the_box():
    img = _image(0, 16)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 2:10] = True
    mask[5, 5] = False
    det = rules.Detection("cat", 0.9, (2, 4, 10, 8), mask=mask)
    crop = np.asarray(GE.color_crop(img, det))
    assert crop.shape == (4, 8, 3)
    ref = np.asarray(img)[4:8, 2:10]
    inside = mask[4:8, 2:10]
    assert np.array_equal(crop[inside], ref[inside])
    assert (crop[~inside] == 0x99).all()  # GenEval's #999 canvas
    orig = np.asarray(GE.color_crop(img, det, bgcolor="original"))
    assert np.array_equal(orig, ref)
    assert np.asarray(GE.color_crop(img, det, crop=False)).shape == (16, 16, 3)


def test_clip_colour_classifier_is_geneval_zero_shot(tiny_backends):
    _, clip_dir = tiny_backends
    cc = GE.CLIPColorClassifier(str(clip_dir), device="cpu", local_files_only=True)
    crops = [_image(s, 20) for s in range(6)]
    got = cc.classify(crops, "dog")
    # manual: per colour, normalise each template embedding, average, renormalise; argmax 100 img.W
    model, tok, proc = cc.model, cc.tokenizer, cc.processor
    with torch.no_grad():
        W = []
        for c in rules.GENEVAL_COLORS:
            t = tok([tpl.format(c=c, cls="dog") for tpl in GE.COLOR_TEMPLATES], padding=True, return_tensors="pt")
            e = model.get_text_features(**t)
            e = e if isinstance(e, torch.Tensor) else e.pooler_output
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            W.append(e / e.norm())
        W = torch.stack(W, 1)
        im = model.get_image_features(pixel_values=proc(images=crops, return_tensors="pt")["pixel_values"])
        im = im if isinstance(im, torch.Tensor) else im.pooler_output
        manual = (100 * (im / im.norm(dim=-1, keepdim=True)) @ W).argmax(-1)
    assert got == [rules.GENEVAL_COLORS[k] for k in manual.tolist()]
    assert set(got) <= set(rules.GENEVAL_COLORS) and cc.classify([], "dog") == []


def test_detector_maps_coco_labels_to_geneval_names(tiny_backends):
    det = GE.Mask2FormerDetector(str(tiny_backends[0]), device="cpu", local_files_only=True)
    names = set(det.labels.values())
    assert {"computer mouse", "tv remote", "computer keyboard"} <= names and "mouse" not in names
    out = det.detect([_image(1), _image(2)], min_score=0.0)
    assert len(out) == 2 and all(len(d) > 0 for d in out)
    for d in out[0]:
        x1, y1, x2, y2 = d.bbox
        ys, xs = np.nonzero(d.mask)
        assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # mmdet mask2bbox
        assert 0.0 <= d.score <= 1.0


def test_real_scoring_path_with_tiny_models(tiny_backends, tmp_path, capsys):
    m2f, clip = tiny_backends
    cfg = GE.GenEvalLikeConfig(detector=str(m2f), clip_model=str(clip), options=ZERO, device="cpu",
                               local_files_only=True)
    ev = GE.GenEvalLike(cfg)
    img = _image(0)  # sample 0000 of prompt 0 below
    dets = rules.filter_detections(ev.detector.detect([img])[0], "single_object", ZERO)
    top_cls = max(dets, key=lambda c: dets[c][0].score)
    top_color = ev.color_classifier.classify([GE.color_crop(img, dets[top_cls][0])], top_cls)[0]
    wrong_color = next(c for c in rules.GENEVAL_COLORS if c != top_color)
    absent = next(c for c in ("toothbrush", "hair drier", "zebra", "giraffe", "kite") if c not in dets)
    metas = [
        {"tag": "single_object", "include": [{"class": top_cls, "count": 1}], "prompt": f"a photo of a {top_cls}"},
        {"tag": "colors", "include": [{"class": top_cls, "count": 1, "color": top_color}], "prompt": "right colour"},
        {"tag": "colors", "include": [{"class": top_cls, "count": 1, "color": wrong_color}], "prompt": "wrong colour"},
        {"tag": "single_object", "include": [{"class": absent, "count": 1}], "prompt": f"a photo of a {absent}"},
    ]
    root = _folder(tmp_path / "imgs", metas, n=1)
    # the same image for every prompt, so the verdicts are known in advance
    for i in range(1, 4):
        img.save(root / f"{i:05d}" / "samples" / "0000.png")
    summary = GE.evaluate_folder(root, root / "results.jsonl", ev, batch_size=4, progress=False)
    recs = {r["prompt"]: r for r in read_jsonl(root / "results.jsonl")}
    assert set(recs[metas[0]["prompt"]]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details",
                                             "settings"}
    assert recs[metas[0]["prompt"]]["settings"] == {"detector": str(m2f), "clip_model": str(clip), "bgcolor": "#999",
                                                    "crop": True, "options": json.loads(json.dumps(vars(ZERO)))}
    assert recs[metas[0]["prompt"]]["correct"] is True
    assert recs["right colour"]["correct"] is True
    assert recs["wrong colour"]["correct"] is False and f"expected {wrong_color} {top_cls}>=1" in recs["wrong colour"]["reason"]
    assert recs[metas[3]["prompt"]]["correct"] is False
    assert recs[metas[3]["prompt"]]["reason"] == f"expected {absent}>=1, found 0"
    assert json.loads(recs["right colour"]["metadata"]) == metas[1]
    details = json.loads(recs[metas[0]["prompt"]]["details"])
    assert details[top_cls][0][4] == pytest.approx(dets[top_cls][0].score)
    assert summary["tags"]["single_object"]["accuracy"] == 0.5 and summary["tags"]["colors"]["accuracy"] == 0.5
    assert summary["overall"] == 0.5 and summary["benchmark"] == "GenEval-like"
    # resume: a rerun scores nothing new; the CLI path prints the same overall last
    GE.evaluate_folder(root, root / "results.jsonl", ev, progress=False)
    assert len(read_jsonl(root / "results.jsonl")) == 4
    from miro.eval.cli import main

    (root / "results.jsonl").unlink()
    assert main(["geneval", str(root), "--detector", str(m2f), "--clip-model", str(clip), "--device", "cpu",
                 "--options", "threshold=0", "counting_threshold=0", "--local-files-only"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "overall: 0.50000"
    # with GenEval's default thresholds a random detector finds nothing: every verdict fails
    (root / "results.jsonl").unlink()
    strict = GE.GenEvalLike(GE.GenEvalLikeConfig(detector=str(m2f)), detector=ev.detector)
    assert GE.evaluate_folder(root, root / "results.jsonl", strict, progress=False)["overall"] == 0.0


class ScriptedDetector:
    """Returns fixed detections (with colours) for every image."""

    name = "scripted"

    def __init__(self, dets):
        self.dets = dets

    def detect(self, images, min_score=0.0):
        return [list(self.dets) for _ in images]


def test_rules_integration_on_synthetic_detections(tmp_path):
    D = rules.Detection
    dets = [D("dog", 0.95, (40, 10, 60, 30), color="red"), D("cat", 0.5, (0, 10, 20, 30), color="blue"),
            D("cat", 0.35, (0, 40, 20, 60), color="blue"), D("clock", 0.2, (30, 30, 40, 40), color="white")]
    metas = [
        {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
         "prompt": "a dog right of a cat"},
        {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
         "prompt": "a dog left of a cat"},
        # counting uses the 0.9 threshold: the cats (0.5, 0.35) do not count there
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
         "prompt": "two cats"},
        {"tag": "two_object", "include": [{"class": "cat", "count": 2}, {"class": "dog", "count": 1}], "prompt": "cats and dog"},
        {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 1, "color": "blue"}],
         "prompt": "red dog blue cat"},
        {"tag": "single_object", "include": [{"class": "clock", "count": 1}], "prompt": "a clock"},  # 0.2 < 0.3
    ]
    root = _folder(tmp_path / "imgs", metas, n=1)
    ev = GE.GenEvalLike(GE.GenEvalLikeConfig(), detector=ScriptedDetector(dets))
    s = GE.evaluate_folder(root, root / "results.jsonl", ev, progress=False)
    got = {r["prompt"]: r["correct"] for r in read_jsonl(root / "results.jsonl")}
    assert got == {"a dog right of a cat": True, "a dog left of a cat": False, "two cats": False,
                   "cats and dog": True, "red dog blue cat": True, "a clock": False}
    assert s["tags"]["position"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert s["overall"] == pytest.approx(np.mean([0.5, 0.0, 1.0, 1.0, 0.0]))
    assert s["backends"]["detector"] == "scripted"
    # an image removed from the folder no longer counts, though its verdict stays in the file
    import shutil

    shutil.rmtree(root / "00005")  # "a clock", the one single_object image
    s = GE.evaluate_folder(root, root / "results.jsonl", ev, progress=False)
    assert "single_object" not in s["tags"] and s["overall"] == pytest.approx(np.mean([0.5, 0.0, 1.0, 1.0]))


def test_another_detector_colour_model_or_canvas_rescores(tmp_path, capsys):
    """Verdicts depend on the detector, --options, --clip-model and --bgcolor: a change of any of them
    rescores every image; the same settings resume."""
    D = rules.Detection
    metas = [{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"}]
    root = _folder(tmp_path / "imgs", metas, n=2)
    red, blue = [D("dog", 0.95, (0, 0, 9, 9), color="red")], [D("dog", 0.95, (0, 0, 9, 9), color="blue")]

    def score(dets, name="scripted", **cfg):
        det = ScriptedDetector(dets)
        det.name = name
        return GE.evaluate_folder(root, root / "results.jsonl", GE.GenEvalLike(GE.GenEvalLikeConfig(**cfg), detector=det),
                                  progress=False)

    assert score(red)["overall"] == 1.0
    s = score(blue)  # the same settings: resumed, the old verdicts stand
    assert (s["scored"], s["skipped"], s["overall"]) == (0, 2, 1.0)
    for change in ({"name": "other"}, {"bgcolor": "original"}, {"clip_model": "my/clip"}):
        s = score(red if s["overall"] == 0.0 else blue, **change)
        assert s["scored"] == 2 and s["skipped"] == 0 and len(read_jsonl(root / "results.jsonl")) == 2, change
        assert s["settings"] == read_jsonl(root / "results.jsonl")[0]["settings"]
    assert s["settings"]["clip_model"] == "my/clip" and s["settings"]["bgcolor"] == "#999"
    with pytest.raises(ValueError, match="bgcolor 'nope' is not a colour"):
        GE.GenEvalLikeConfig(bgcolor="nope")
    # the CLI refuses a bad canvas before any model loads or image is generated
    from miro.eval.cli import main

    for argv in (["geneval", str(root)], ["all", "--model", "ground-truth", "--outdir", str(tmp_path / "new")]):
        assert main([*argv, "--bgcolor", "nope"]) == 2
        assert "--bgcolor 'nope' is not a colour; use 'original'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_owlv2_backend_queries_the_80_names(tmp_path):
    from _eval_tiny import save_tiny_owlv2

    path = save_tiny_owlv2(tmp_path / "owl")
    det = GE.make_detector(str(path), device="cpu", local_files_only=True)
    assert isinstance(det, GE.OWLv2Detector) and len(det.class_names) == 80
    img = _image(3, 48)
    found = det.detect([img], min_score=0.0)[0]
    assert found and all(d.mask is None and d.cls in GE.GENEVAL_OBJECTS for d in found)
    assert all(0 <= d.bbox[0] <= d.bbox[2] <= 48 and 0 <= d.bbox[1] <= d.bbox[3] <= 48 for d in found)
    # the best box's class is the argmax query of the raw model output
    queries = [GE.OWL_QUERY.format(n) for n in det.class_names]
    tok = det.tokenizer(queries, padding="max_length", max_length=16, return_tensors="pt")
    px = det.processor(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = det.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px).logits[0]
    best = torch.sigmoid(logits.max(-1).values).argmax()
    top = max(found, key=lambda d: d.score)
    assert top.cls == det.class_names[int(logits[best].argmax())]
    assert top.score == pytest.approx(float(torch.sigmoid(logits.max())), rel=1e-5)
    with pytest.raises(ValueError, match="model_type"):
        GE.make_detector(str(save_tiny_clip(tmp_path / "clip")), local_files_only=True)


def test_missing_detector_offline_names_the_download(tmp_path, capsys):
    from miro.eval.cli import main

    root = _folder(tmp_path / "imgs", [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}], n=1)
    assert main(["geneval", str(root), "--detector", str(tmp_path / "no-such-model"), "--local-files-only"]) == 1
    assert "miro download geneval" in capsys.readouterr().err
