"""Reports: Markdown and HTML with grids and plots; paper numbers only for published checkpoints."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from miro.eval import paper_numbers as P
from miro.eval import report as R
from miro.eval.geneval_rules import GENEVAL_TAGS


def _run(root, model="shapes", variant=None, **settings):
    cfg = {"model": model, "variant": variant, "n_samples": 2, "steps": 50, "cfg": 7.0, "seed": 0,
           "reward_targets": {}, "negative_reward_targets": {}, **settings}
    (root).mkdir(parents=True)
    (root / "generation.json").write_text(json.dumps({"config": cfg, "prompts": "geneval", "n_prompts": 2}))
    res, rew = [], []
    for i in range(2):
        d = root / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        meta = {"tag": GENEVAL_TAGS[i], "include": [{"class": "cat", "count": 1}], "prompt": f"prompt {i}"}
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for j in range(2):
            Image.fromarray(np.full((8, 8, 3), 60 * (i + j), np.uint8)).save(d / "samples" / f"{j:04d}.png")
            fn = f"{i:05d}/samples/{j:04d}.png"
            res.append({"filename": fn, "tag": meta["tag"], "prompt": meta["prompt"], "correct": j == 0, "reason": "",
                        "metadata": json.dumps(meta), "details": "{}"})
            rew.append({"filename": fn, "index": i, "sample": j, "tag": meta["tag"], "prompt": meta["prompt"],
                        "aesthetic_score": 5.0 + i + j, "aesthetic_score_normalized": 0.5})
    from miro.eval.geneval_rules import summarize
    from miro.eval.rewards import summarize as rsum

    s = summarize(res)
    s["benchmark"] = "GenEval-like"
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res))
    (root / "geneval_summary.json").write_text(json.dumps(s))
    (root / "rewards.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rew))
    (root / "rewards_summary.json").write_text(json.dumps(rsum(rew)))
    (root / "best_of_n_curve.json").write_text(json.dumps(
        {"select_by": "aesthetic_score", "mode": "expected", "n": [1, 2], "values": {"aesthetic_score": [6.0, 6.5]}}))
    return root


def test_report_renders_tables_grids_and_plots(tmp_path):
    run = _run(tmp_path / "run")
    md = R.build_report(run)
    text = md.read_text()
    out = md.parent
    for png in ("samples.png", "categories.png", "rewards_hist.png", "best_of_n.png"):
        assert (out / png).is_file() and Image.open(out / png).size[0] > 50, png
        assert f"({png})" in text
    assert "| single_object | 50.00 | 1 / 2 |" in text and "| overall | 50.00 |" in text
    assert "| aesthetic_score | 4 | 6.0000 |" in text
    assert "paper" not in text.split("## GenEval-like")[1].split("##")[0].lower().replace("paper row", "")
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<img src='samples.png'" in html and "<table>" in html
    assert Image.open(out / "samples.png").size == (2 * 128 + 2, 2 * 128 + 2)  # 2 prompts x 2 samples, 2 px gaps


def test_a_report_killed_while_writing_leaves_whole_files(tmp_path, monkeypatch):
    from pathlib import Path

    import pytest

    run = _run(tmp_path / "run")
    out = R.build_report(run).parent
    before = (out / "samples.png").read_bytes()
    real_save = Image.Image.save

    def killed(self, fp, format=None, **kw):  # half the PNG reaches the disk, then the process dies
        real_save(self, fp, format=format, **kw)
        Path(fp).write_bytes(Path(fp).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        R.build_report(run)
    monkeypatch.undo()
    assert (out / "samples.png").read_bytes() == before
    (out / ".rewards_hist.png.k1ll3d.tmp").write_bytes(b"cut")  # a SIGKILL skips the temp's cleanup
    R.build_report(run)
    assert not list(out.glob(".*"))


def test_published_checkpoint_gets_paper_columns(tmp_path):
    run = _run(tmp_path / "run", model="nicolas-dufour/miro")
    text = R.build_report(run).read_text()
    row = P.paper_row("nicolas-dufour/miro", None)
    assert row == "Synthetic-caption MIRO"
    assert f"paper: {row} (%)" in text and "| single_object | 50.00 | 1 / 2 | 97.19 |" in text
    assert "| aesthetic_score | 4 | 6.0000 | 0.7071 | 0.5000 | 6.0000 | 6.2780 | 5.1770 |" in text
    assert P.paper_row("nicolas-dufour/miro-ablations", "miro-only-aesthetic") == "only-Aesthetic"
    assert P.paper_row("shapes") is None
    # the paper's overall equals the mean of its six categories (to the printed integer)
    for name, overall in P.GENEVAL_OVERALL.items():
        assert round(np.mean(list(P.GENEVAL[name].values()))) == overall


def test_paper_columns_only_beside_the_papers_settings(tmp_path):
    """The paper's numbers are one image per prompt at 50 steps, CFG 7 and the default targets."""
    for k, (settings, why) in enumerate((
            (dict(steps=25), "sampled with 25 steps and CFG 7.0, not the published 50 and 7"),
            (dict(reward_targets={"aesthetic_score": 0.5}), "reward targets or scales other than the defaults"),
            (dict(best_of_n={"select_by": "aesthetic_score"}), "a best-of-N selection"))):
        text = R.build_report(_run(tmp_path / f"r{k}", model="nicolas-dufour/miro", **settings)).read_text()
        assert f"| paper row | n/a ({why}) |" in text and "paper: " not in text and "97.19" not in text
    text = R.build_report(_run(tmp_path / "same", model="nicolas-dufour/miro",
                               reward_targets={"aesthetic_score": 1.0})).read_text()  # the default, spelt out
    assert "| paper row | Synthetic-caption MIRO |" in text and "97.19" in text


def test_best_of_n_reference_in_our_units():
    ref = P.best_of_n_reference(["pick_a_score_score", "image_reward_score", "clip_score"])
    assert set(ref) == {"pick_a_score_score", "image_reward_score"}  # no best-of-N curve for CLIP in the paper
    assert ref["pick_a_score_score"]["MIRO"][128] == np.float64(.2286 * 100)
    assert ref["image_reward_score"]["Baseline"] == {1: 0.522, 128: 1.405}
    # the paper's HPS numbers are v2.0: a v2.1 (or unrecorded) curve gets no paper points
    hps = ["hpsv2_score"]
    assert set(P.best_of_n_reference(hps, {"hpsv2_score": "v2.0"})) == {"hpsv2_score"}
    assert P.best_of_n_reference(hps, {"hpsv2_score": "v2.1"}) == {} == P.best_of_n_reference(hps)


def test_hps_v21_is_not_set_beside_the_papers_v20(tmp_path):
    from miro.eval.rewards import summarize as rsum

    run = _run(tmp_path / "run", model="nicolas-dufour/miro")
    rew = [json.loads(line) for line in (run / "rewards.jsonl").read_text().splitlines()]
    for version, shown in (("v2.1", False), ("v2.0", True)):
        for r in rew:
            r.update(hpsv2_score=0.3, hpsv2_score_normalized=0.3, hpsv2_score_version=version)
        (run / "rewards_summary.json").write_text(json.dumps(rsum(rew)))
        text = R.build_report(run).read_text()
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| hpsv2_score ({version})"))
        assert ("0.2935" in line) == shown, line  # the paper's Synthetic-caption MIRO HPSv2
        assert ("the paper's numbers use v2.0" in text) != shown


def test_sweep_section_with_geneval_and_the_papers_aesthetic_sweep(tmp_path):
    run = _run(tmp_path / "run", model="nicolas-dufour/miro")
    (run / "sweep").mkdir()
    per = [{"target": t, "n": 4, "aesthetic_score": {"mean": m, "std": 0.1}, "geneval_overall": g}
           for t, m, g in [(0.0, 4.0, 0.70), (0.625, 5.0, 0.75), (1.0, 6.0, 0.68)]]
    (run / "sweep" / "sweep.json").write_text(json.dumps({
        "swept": "aesthetic_score", "targets": [0.0, 0.625, 1.0], "per_target": per,
        "spearman_means": {"aesthetic_score": 1.0}, "spearman_images": {"aesthetic_score": 0.9},
        "spearman_geneval": 0.5}))
    text = R.build_report(run).read_text()
    assert "| target | aesthetic_score | GenEval-style overall (%) | paper: GenEval (%) | paper: Aesthetic |" in text
    assert "| 0.6250 | 5.0000 | 75.0000 | 74.8700 | 5.2400 |" in text and "| 0.0000 | 4.0000 | 70.0000 | 71.3000 | 3.6900 |" in text
    assert "GenEval-style overall 0.500" in text and (run / "report" / "sweep.png").is_file()


def test_an_unreadable_image_is_a_placeholder_cell_not_a_failed_report(tmp_path):
    run = _run(tmp_path / "run")
    (run / "00001" / "samples" / "0000.png").write_bytes(b"\x89PNG truncated")
    text = R.build_report(run).read_text()
    assert "1 unreadable image(s) shown as crossed grey cells (first: " in text
    grid = Image.open(run / "report" / "samples.png")
    assert grid.size == (2 * 128 + 2, 2 * 128 + 2)
    assert grid.getpixel((64, 130 + 10)) == (0xDD, 0xDD, 0xDD)  # row 1, column 0: the placeholder grey, off its cross


def _sweep_folder(root, targets=(0.0, 1.0)):
    """What `miro eval sweep --outdir root` leaves: sweep.json beside the target_<t>/ folders."""
    from miro.eval.sweep import target_dir

    per = []
    for k, t in enumerate(targets):
        for i in range(2):
            d = target_dir(root, t) / f"{i:05d}" / "samples"
            d.mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 100 * k + 50 * i, np.uint8)).save(d / "0000.png")
        per.append({"target": t, "n": 2, "shapes_contrast": {"mean": 0.5 + 0.4 * k, "std": 0.1}})
    (root / "sweep.json").write_text(json.dumps({
        "swept": "shapes_contrast", "targets": list(targets), "per_target": per,
        "spearman_means": {"shapes_contrast": 1.0}, "spearman_images": {"shapes_contrast": 0.9}}))
    return root


def test_a_sweeps_own_folder_is_reported(tmp_path):
    from miro.eval.cli import main

    sweep = _sweep_folder(tmp_path / "sweep")
    (sweep / "target_1.0000" / "00001" / "samples" / "0000.png").write_bytes(b"\x89PNG truncated")
    assert main(["report", str(sweep)]) == 0
    text = (sweep / "report" / "report.md").read_text()
    assert "## Reward sweep: shapes_contrast" in text and "(sweep_grid.png)" in text
    assert "1 unreadable image(s) shown as crossed grey cells" in text
    assert Image.open(sweep / "report" / "sweep_grid.png").size == (2 * 96, 2 * 96)


def test_reward_histogram_counts_each_image_once(tmp_path, monkeypatch):
    """A rescored image has two rewards.jsonl lines; the histogram, like the summary, holds its latest score once."""
    run = _run(tmp_path / "run")
    with open(run / "rewards.jsonl", "a") as f:  # image 0/0 rescored by another scorer version
        f.write(json.dumps({"filename": "00000/samples/0000.png", "aesthetic_score": 9.5}) + "\n")
    seen = {}
    real = R.plots.plot_reward_hist
    monkeypatch.setattr(R.plots, "plot_reward_hist", lambda vals, path: (seen.update(vals), real(vals, path))[1])
    R.build_report(run)
    assert sorted(seen["aesthetic_score"]) == [6.0, 6.0, 7.0, 9.5]


def test_a_short_row_of_the_sample_grid_stays_short(tmp_path):
    """A prompt with fewer images (damaged ones removed) leaves blank cells, not copies of its last
    image that would pass for other samples; a folder with no image has no row."""
    run = _run(tmp_path / "run")
    (run / "00001" / "samples" / "0001.png").unlink()
    d = run / "00002"
    (d / "samples").mkdir(parents=True)
    (d / "metadata.jsonl").write_text(json.dumps({"tag": "colors", "prompt": "no image yet"}) + "\n")
    out = R.build_report(run).parent
    grid = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    assert grid.shape == (2 * 128 + 2, 2 * 128 + 2, 3)
    assert (grid[130:, 130:] == 255).all()  # row 1, column 1: blank
    assert (grid[130:, :128] == 60).all()  # row 1, column 0: prompt 1's sample 0 (grey 60)
