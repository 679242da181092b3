"""ShapesEval: the prompt set, eval-generate through the pipeline call API, eval-score."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from miro.eval.geneval_rules import GENEVAL_TAGS
from miro.shapes import world as W
from miro.shapes.captions import parse_caption
from miro.shapes.cli import main as shapes_main
from miro.shapes.eval import (
    CATEGORY_SIZES,
    GroundTruthPipeline,
    build_prompt_set,
    eval_generate,
    evaluation_metadata,
    render_prompt,
    score_folder,
)


def test_prompt_set():
    lines = evaluation_metadata()
    assert lines == build_prompt_set()  # the shipped file is the generator's output
    assert len(lines) >= 300
    assert Counter(m["tag"] for m in lines) == CATEGORY_SIZES and set(CATEGORY_SIZES) == set(GENEVAL_TAGS)
    for m in lines:
        got = parse_caption(m["prompt"])
        assert got["include"] == m["include"] and got.get("exclude") == m.get("exclude") and got["tag"] == m["tag"]
    assert {m["include"][1]["position"][0] for m in lines if m["tag"] == "position"} == set(W.RELATIONS)


class ColorSwapPipeline(GroundTruthPipeline):
    """Renders the truth with every colour replaced: counting/objects right, colours wrong."""

    def __call__(self, prompt, **kw):
        swap = {c: W.COLORS[(i + 1) % len(W.COLORS)] for i, c in enumerate(W.COLORS)}
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = []
        for p in prompts:
            for c, d in swap.items():
                p = p.replace(f" {c} ", f" {d.upper()} ")
            out.append(p.lower())
        return super().__call__(out, **kw)


class SwapRelationPipeline(GroundTruthPipeline):
    def __call__(self, prompt, **kw):
        pairs = {" left of ": " right of ", " right of ": " left of ", " above ": " below ", " below ": " above "}
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        fixed = []
        for p in prompts:
            for a, b in pairs.items():
                if a in p:
                    p = p.replace(a, b)
                    break
            fixed.append(p)
        return super().__call__(fixed, **kw)


def _subset(tmp_path, pipe, name, per_tag=3, n=2):
    """Generate the first `per_tag` prompts of every category through a stand-in pipeline."""
    lines = evaluation_metadata()
    picks = []
    for tag in GENEVAL_TAGS:
        picks += [m for m in lines if m["tag"] == tag][:per_tag]
    from miro.eval.generate import GenerateConfig, generate_folder
    from miro.eval.prompts import PromptItem

    out = tmp_path / name
    generate_folder(pipe, [PromptItem(m["prompt"], m) for m in picks], out, GenerateConfig(model=name, n_samples=n), progress=False)
    return out


def test_ground_truth_scores_one_and_mismatches_fail_where_expected(tmp_path, capsys):
    gt = _subset(tmp_path, GroundTruthPipeline(), "gt")
    assert (gt / "00000" / "metadata.jsonl").is_file() and (gt / "00017" / "samples" / "0001.png").is_file()
    s = score_folder(gt, progress=False)
    assert s["overall"] == 1.0 and s["images"] == 36
    results = [json.loads(ln) for ln in (gt / "results.jsonl").read_text().splitlines()]
    assert len(results) == 36 and set(results[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details",
                                                      "settings"}
    assert results[0]["settings"]["detector"] == "shapes" and results[0]["settings"]["options"]["threshold"] == 0.5
    assert results[0]["filename"] == "00000/samples/0000.png"

    col = score_folder(_subset(tmp_path, ColorSwapPipeline(), "col"), progress=False)["tags"]
    assert col["colors"]["accuracy"] == 0.0 and col["color_attr"]["accuracy"] == 0.0
    assert all(col[t]["accuracy"] == 1.0 for t in ("single_object", "two_object", "counting", "position"))

    rel = score_folder(_subset(tmp_path, SwapRelationPipeline(), "rel"), progress=False)["tags"]
    assert rel["position"]["accuracy"] == 0.0
    assert all(rel[t]["accuracy"] == 1.0 for t in GENEVAL_TAGS if t != "position")

    # the CLI prints GenEval's summary and ends with the overall score
    rc = shapes_main(["eval-score", str(gt), "--options", "threshold=0.5", "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip().splitlines()[-1] == "overall: 1.00000"


def test_eval_generate_resumes_and_uses_seed_rule(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    res = eval_generate(GroundTruthPipeline(), out, n_samples=2, limit=5, progress=False)
    assert res["generated"] == 10
    first = (out / "00003" / "samples" / "0001.png").read_bytes()
    (out / "00003" / "samples" / "0001.png").unlink()
    res = eval_generate(GroundTruthPipeline(), out, n_samples=2, limit=5, progress=False)
    assert res["generated"] == 1 and (out / "00003" / "samples" / "0001.png").read_bytes() == first
    # sample j of prompt i is the render of seed 0 + 1000*i + j (one draw from that generator)
    import torch

    seed = int(GroundTruthPipeline().prepare_noise(1, torch.Generator().manual_seed(3001))[0])
    from PIL import Image

    md = evaluation_metadata()[3]
    assert Image.open(out / "00003" / "samples" / "0001.png").tobytes() == render_prompt(md["prompt"], seed).tobytes()
    # the CLI: ground-truth model, then score
    rc = shapes_main(["eval-generate", "--model", "ground-truth", "--outdir", str(tmp_path / "cli"), "--n-samples", "1", "--limit", "4"])
    assert rc == 0
    assert shapes_main(["eval-score", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("overall: 1.0")
    # reward targets: the flag repeats, and several may follow one flag (contracts: --reward k=v)
    import miro.shapes.eval as shapes_eval

    for flags in (["--reward", "shapes_counting=0.5", "--reward", "shapes_position=0.25"],
                  ["--reward", "shapes_counting=0.5", "shapes_position=0.25"]):
        seen = {}
        monkeypatch.setattr(shapes_eval, "eval_generate", lambda *a, **kw: seen.update(kw) or dict.fromkeys(("images", "prompts", "generated", "skipped"), 0))
        assert shapes_main(["eval-generate", "--outdir", str(tmp_path / "r"), "--limit", "1", *flags]) == 0
        assert seen["reward_targets"] == {"shapes_counting": 0.5, "shapes_position": 0.25}


def test_ground_truth_records_no_sampler_settings(tmp_path):
    """The renderer takes steps, guidance and reward targets and ignores them: its run record leaves
    them out, so a rerun with other values reuses its images (the same pixels) instead of being refused,
    and a folder recorded with them (before they were left out) is still taken."""
    import json

    out = tmp_path / "gt"
    eval_generate("ground-truth", out, n_samples=1, limit=2, steps=25, cfg=5.0, progress=False)
    record = json.loads((out / "generation.json").read_text())["config"]
    assert record == {"model": "ground-truth", "variant": None, "n_samples": 1, "seed": 0}
    first = (out / "00001" / "samples" / "0000.png").read_bytes()
    res = eval_generate("ground-truth", out, n_samples=1, limit=2, steps=50, cfg=7.0,
                        reward_targets={"shapes_counting": 0.2}, progress=False)
    assert res["generated"] == 0 and (out / "00001" / "samples" / "0000.png").read_bytes() == first
    old = {"config": {**record, "steps": 25, "cfg": 5.0, "reward_targets": {}, "negative_reward_targets": {}},
           "prompts": "shapes", "n_prompts": 2}
    (out / "generation.json").write_text(json.dumps(old))
    assert eval_generate("ground-truth", out, n_samples=1, limit=2, steps=50, progress=False)["generated"] == 0
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\)"):  # what does shape them still counts
        eval_generate("ground-truth", out, n_samples=1, limit=2, seed=1, progress=False)


def test_cli_render_detect_and_errors(tmp_path, capsys):
    png = tmp_path / "r.png"
    assert shapes_main(["render", "two red circles above a blue square", "--out", str(png)]) == 0
    capsys.readouterr()
    assert shapes_main(["detect", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("red circle") == 2 and out.count("blue square") == 1
    assert shapes_main(["render", "a photo of a cat", "--out", str(png)]) == 2
    assert shapes_main(["eval-score", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        shapes_main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(c in out for c in ("render", "detect", "eval-generate", "eval-score"))


def test_eval_generate_passes_settings_to_the_pipeline(tmp_path):
    calls = []

    class Recording(GroundTruthPipeline):
        def __call__(self, prompt, **kw):
            calls.append({k: kw[k] for k in ("reward_targets", "num_inference_steps", "guidance_scale", "output_type")})
            calls[-1]["seeds"] = [g.initial_seed() for g in kw["generator"]]
            return super().__call__(prompt, **kw)

    eval_generate(Recording(), tmp_path, n_samples=2, steps=7, cfg=3.5, seed=10, limit=2, batch_size=3,
                  reward_targets={"shapes_alignment": 0.25}, progress=False)
    assert all(c["reward_targets"] == {"shapes_alignment": 0.25} and c["num_inference_steps"] == 7
               and c["guidance_scale"] == 3.5 and c["output_type"] == "pil" for c in calls)
    assert sorted(s for c in calls for s in c["seeds"]) == [10, 11, 1010, 1011]  # seed + 1000 i + j
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        eval_generate(Recording(), tmp_path / "x", reward_targets={"shapes_alignment": 2.0}, limit=1, progress=False)


def _overall_and_counts(capsys) -> tuple[str, str]:
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[-1], next(ln for ln in lines if " already scored, " in ln)


def test_other_settings_rescore_and_both_scoring_commands_share_the_record(tmp_path, capsys):
    """A rerun with other --options (or detector, colour model, canvas) rescores instead of reusing
    verdicts made another way, and the summary holds only the current settings' verdicts."""
    from miro.eval.cli import main as eval_main

    out = tmp_path / "gt"
    assert shapes_main(["eval-generate", "--model", "ground-truth", "--outdir", str(out), "--n-samples", "1",
                        "--limit", "12"]) == 0
    strict = ["--options", "threshold=0.99", "counting_threshold=0.99"]
    assert eval_main(["geneval", str(out)]) == 0
    assert _overall_and_counts(capsys) == ("overall: 1.00000", "12 images scored, 0 already scored, 0 unreadable "
                                           "(skipped, retried on the next run)")
    assert eval_main(["geneval", str(out), *strict]) == 0
    last, counts = _overall_and_counts(capsys)
    assert counts.startswith("12 images scored, 0 already scored") and float(last.split()[1]) < 0.5
    res = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(res) == 12 and all(r["settings"]["options"]["threshold"] == 0.99 for r in res)  # one line per image
    # `miro shapes eval-score` goes through the same record: the same options resume, others rescore
    assert shapes_main(["eval-score", str(out), "--no-progress", *strict]) == 0
    assert _overall_and_counts(capsys) == (last, "0 images scored, 12 already scored, 0 unreadable "
                                           "(skipped, retried on the next run)")
    assert shapes_main(["eval-score", str(out), "--no-progress"]) == 0
    assert _overall_and_counts(capsys)[0] == "overall: 1.00000"
    assert json.loads((out / "geneval_summary.json").read_text())["settings"]["options"]["threshold"] == 0.5
    # lines written before settings were recorded are rescored, not trusted
    (out / "results.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "settings"}) + "\n"
                                               for r in res))
    assert eval_main(["geneval", str(out)]) == 0
    assert _overall_and_counts(capsys) == ("overall: 1.00000", "12 images scored, 0 already scored, 0 unreadable "
                                           "(skipped, retried on the next run)")


def test_unreadable_images_are_counted_on_screen_by_both_scoring_commands(tmp_path, capsys):
    from miro.eval.cli import main as eval_main

    out = tmp_path / "gt"
    eval_generate(GroundTruthPipeline(), out, n_samples=2, limit=2, progress=False)
    (out / "00001" / "samples" / "0001.png").write_bytes(b"\x89PNG truncated")
    runs = [(lambda: shapes_main(["eval-score", str(out), "--no-progress"]), "3 images scored, 0 already scored"),
            (lambda: eval_main(["geneval", str(out)]), "0 images scored, 3 already scored")]  # resumed; retried
    for run, scored in runs:
        assert run() == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[-1] == "overall: 1.00000"
        assert f"{scored}, 1 unreadable (skipped, retried on the next run)" in lines
    assert json.loads((out / "shapes_eval_summary.json").read_text())["corrupt_images"] == 1


def test_ground_truth_pipeline_keeps_copies_of_a_prompt_adjacent():
    """Image k of a call renders prompt k // num_images_per_prompt (copies of a prompt adjacent, as
    the pipeline's repeat_interleave) from the k-th seed drawn from the generator."""
    import numpy as np
    import torch

    gt = GroundTruthPipeline(resolution=W.MIN_RESOLUTION)
    prompts = ["a red circle", "two blue squares"]
    imgs = gt(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))
    seeds = gt.prepare_noise(4, torch.Generator().manual_seed(0)).tolist()
    for k, (img, seed) in enumerate(zip(imgs, seeds)):
        ref = render_prompt(prompts[k // 2], int(seed), W.MIN_RESOLUTION)
        assert np.array_equal(np.asarray(img), np.asarray(ref)), k


def test_a_smaller_limit_into_a_fuller_folder_is_refused(tmp_path):
    """Scoring reads every prompt folder: a --limit 2 run into a folder of 3 prompts would score 3
    and record 2."""
    out = tmp_path / "gt"
    eval_generate("ground-truth", out, n_samples=1, limit=3, progress=False)
    with pytest.raises(ValueError, match=r"holds images of 1 prompt\(s\) past the 2 asked for \(e.g. 00002/\)"):
        eval_generate("ground-truth", out, n_samples=1, limit=2, progress=False)
    assert eval_generate("ground-truth", out, n_samples=1, limit=4, progress=False)["generated"] == 1  # growing is fine
