"""benchmarks/shapes_training_study.py: its statistics against closed forms."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes_training_study import (  # noqa: E402
    SHAPES_KEYS,
    data_reward_rows,
    joint_room,
    overall_se,
    samples_to_reach,
    speedup,
    speedup_interval,
    speedup_markdown,
    table_markdown,
    tag_counts,
)


def test_tag_counts_and_overall_se():
    items = [SimpleNamespace(metadata={"tag": t}) for t in ("a", "a", "b")]
    counts = tag_counts(items, 4)
    assert counts == {"a": 8, "b": 4}
    row = {"cat_a": 0.5, "cat_b": 0.25}
    # sqrt(0.5*0.5/8 + 0.25*0.75/4) / 2
    assert overall_se(row, counts) == pytest.approx(math.sqrt(0.25 / 8 + 0.1875 / 4) / 2)


def test_samples_to_reach_interpolates_and_speedup():
    curve = [(100, 0.1), (200, 0.3), (300, 0.2)]
    assert samples_to_reach(curve, 0.2) == pytest.approx(150.0)
    assert samples_to_reach(curve, 0.05) == 100.0
    assert samples_to_reach(curve, 0.5) is None
    base = [(100, 0.0), (400, 0.2)]
    s = speedup(curve, base)
    assert s["baseline_samples"] == pytest.approx(400.0)
    assert s["miro_samples"] == pytest.approx(150.0)
    assert s["speedup"] == pytest.approx(400 / 150)


def test_a_baseline_rise_within_its_noise_is_flagged():
    """The first crossing of a final value that noise put above the first point times nothing: the
    row says so, with the rise in combined standard errors; a rise well above the noise is not flagged."""
    miro = [(100, 0.08), (200, 0.07)]
    base = [(100, 0.05), (200, 0.065)]
    noisy = speedup(miro, base, [(100, 0.01), (200, 0.02)])
    assert noisy["speedup"] == pytest.approx(2.0)  # MIRO "reaches" 0.065 at once
    assert noisy["baseline_rise_z"] == pytest.approx(0.015 / math.hypot(0.01, 0.02))
    clear = speedup(miro, base, [(100, 0.002), (200, 0.002)])
    assert clear["baseline_rise_z"] == pytest.approx(0.015 / math.hypot(0.002, 0.002))
    assert "baseline_rise_z" not in speedup(miro, base)
    assert speedup(miro, base, [(100, 0.0), (200, 0.0)])["baseline_rise_z"] is None  # no errors: no verdict
    interval = {"low": 1.0, "high": 2.0, "p_above_1": 0.5}
    md = speedup_markdown({"speedup": {**noisy, "interval": interval},
                           "rewards": {"r": {"speedup": {**clear, "interval": interval}}}}).splitlines()
    assert md[2].endswith("| rise within noise: the baseline's final is 0.67 standard errors above its first "
                          "point (< 2) |")
    # MIRO is at 0.065 at its first checkpoint: x2 is only what the checkpoint spacing allows
    assert clear["miro_at_first_point"] and md[3].endswith(
        "| 0.50 | a lower bound (>= x2.00): MIRO is at the baseline's final at its first checkpoint, so the ratio "
        "is the checkpoint spacing's |")
    later = speedup([(100, 0.05), (200, 0.07)], base, [(100, 0.002), (200, 0.002)])
    assert not later["miro_at_first_point"] and later["speedup"] == pytest.approx(200 / 175)


def test_speedup_interval_collapses_without_noise_and_widens_with_it():
    base = [(100, 0.05), (200, 0.10), (300, 0.15), (400, 0.20)]
    miro = [(s, v * 2) for s, v in base]  # twice as fast: reaches the baseline's final 0.2 at 200
    zero = [(s, 0.0) for s, _ in base]
    exact = speedup_interval(miro, base, zero, zero, draws=50)
    assert exact["low"] == pytest.approx(2.0) and exact["high"] == pytest.approx(2.0)
    assert exact["p_above_1"] == 1.0
    noisy = [(s, 0.05) for s, _ in base]
    wide = speedup_interval(miro, base, noisy, noisy, draws=400)
    assert wide["low"] < 2.0 < wide["high"] and 0.5 < wide["p_above_1"] < 1.0
    # MIRO never reaching the baseline's final score counts as 0, not as a missing draw
    flat = [(s, 0.01) for s, _ in base]
    assert speedup_interval(flat, base, zero, zero, draws=20)["high"] == 0.0


def test_table_markdown_cells_carry_standard_errors():
    row = {"model": "m", "shapes_eval": 0.25, "se_shapes_eval": 0.0125}
    for i, k in enumerate(SHAPES_KEYS):
        row[k], row[f"se_{k}"] = 0.1 * i, 0.01 * i
    old = {"model": "old", "shapes_eval": 0.5, **{k: 0.5 for k in SHAPES_KEYS}}  # a table.json without errors
    lines = table_markdown([row, old]).splitlines()
    assert lines[0].split("|")[2].strip() == "ShapesEval" and len(lines) == 4
    cells = [c.strip() for c in lines[2].split("|")[2:-1]]
    assert cells[0] == "0.250 ± 0.013"
    assert cells[1 + SHAPES_KEYS.index("shapes_contrast")] == "0.400 ± 0.040"
    assert [c.strip() for c in lines[3].split("|")[2:-1]] == ["0.500"] * 6


def test_joint_room_counts_imperfect_pairs_where_the_others_are_perfect():
    rows = [[1.0, 1.0], [0.5, 1.0], [0.5, 1.0], [1.0, 1.0], [0.0, 0.2]]
    room = joint_room(rows)
    # column 0 given column 1 perfect: rows 0-3, two of them below 1; column 1 given column 0 perfect: rows 0, 3
    assert room[0] == {"n_others_perfect": 4, "frac_below": 0.5}
    assert room[1] == {"n_others_perfect": 2, "frac_below": 0.0}
    assert math.isnan(joint_room([[0.5, 0.5]])[0]["frac_below"])
    # a float32 score one ulp below 1 counts as perfect, on either side of the test
    assert joint_room([[1 - 6e-8, 0.5], [1.0, 1 - 6e-8]]) == [{"n_others_perfect": 1, "frac_below": 0.0},
                                                            {"n_others_perfect": 2, "frac_below": 0.5}]


def test_data_reward_rows_reads_both_captions_and_skips_incomplete_pairs(tmp_path):
    from miro.data import schema

    full = {k: 0.1 * (i + 1) for i, k in enumerate(SHAPES_KEYS)}
    synth = {schema.synthetic_reward_key(k): 1.0 for k in SHAPES_KEYS}
    partial = {k: v for k, v in full.items() if k != "shapes_position"}  # a missing reward: left out
    samples = [{"__key__": "a", "json": {**full, **synth}}, {"__key__": "b", "json": partial},
               {"__key__": "c", "json": {**full, "shapes_contrast": float("nan")}}]
    schema.write_shard(tmp_path / "s-000000.tar", samples)
    rows = data_reward_rows(str(tmp_path))
    assert rows == [[pytest.approx(0.1 * (i + 1)) for i in range(5)], [1.0] * 5]
    assert len(data_reward_rows(str(tmp_path), limit=1)) == 2


@pytest.mark.parametrize("negative", ["zeros", "isolate"])
def test_controllability_negative_branch(tmp_path, monkeypatch, negative):
    """--negative isolate gives every target of a sweep the same s- = the others' targets with the
    swept reward at 0; zeros leaves the pipeline's default (all 0) to the generator."""
    import json

    import miro.eval.sweep as sweep
    import shapes_training_study as study

    keys = ("shapes_counting", "shapes_position")
    seen = {}

    def fake_run_sweep(pipe, items, key, base, outdir, scorers, targets, progress=True):
        seen[key] = (dict(base.reward_targets), dict(base.negative_reward_targets), list(targets))
        seen["reward_cfg"] = base.reward_cfg
        return {"spearman_means": {key: 1.0}, "spearman_images": {key: 0.5},
                "per_target": [{"n": 4, key: {"mean": float(t), "std": 0.5}} for t in targets]}

    monkeypatch.setattr(study, "load", lambda src, weights, device=None: SimpleNamespace(coherence_keys=keys, reward_bins=None))
    monkeypatch.setattr(study, "eval_items", lambda stride: [])
    monkeypatch.setattr(study, "_scorers", lambda: {k: None for k in keys})
    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(sweep, "sweep_grid", lambda *a, **k: SimpleNamespace(save=lambda p: None))
    assert study.main(["controllability", "--model", "m", "--out", str(tmp_path), "--others", "0.75",
                       "--negative", negative, "--reward-cfg", "shapes_counting=12"]) == 0
    assert seen["reward_cfg"] == {"shapes_counting": 12.0}  # one scale per reward reaches the generator
    for key in keys:
        pos, neg, targets = seen[key]
        assert pos == {k: 0.75 for k in keys}
        assert neg == ({} if negative == "zeros" else {**pos, key: 0.0})
        assert targets == [i / 8 for i in range(9)]
    summary = json.loads((tmp_path / "controllability" / "controllability.json").read_text())
    assert study.main(["controllability", "--model", "m", "--out", str(tmp_path / "v"), "--keys", keys[0],
                       "--target-values", "0.3,0.6"]) == 0
    assert seen[keys[0]][2] == [0.3, 0.6]  # explicit targets replace the grid
    assert summary["negative"] == negative and set(summary["rewards"]) == set(keys)
    assert summary["reward_cfg"] == {"shapes_counting": 12.0}
    # 4 images of scores 0 and 1: population std 0.5; the sample std (ddof 1) over sqrt(4) = 0.5 / sqrt(3)
    assert summary["rewards"]["shapes_counting"]["se"] == pytest.approx([0.5 / 3 ** 0.5] * 9)
    assert (tmp_path / "controllability" / "controllability.png").stat().st_size > 0


def _fake_guidance_grid(monkeypatch, pipe, record) -> list:
    """Run `guidance` on ``pipe`` without generating: each folder's ``record(pipe, folder, gcfg)``
    is appended to the returned list, and its row has every measure at w / 10."""
    import shapes_training_study as study

    seen = []

    def fake_eval_row(p, items, d, gcfg, scorers, counts):
        seen.append(record(p, d, gcfg))
        return {"shapes_eval": 0.1, "se_shapes_eval": 0.01,
                **{k: gcfg.cfg / 10 for k in SHAPES_KEYS}, **{f"se_{k}": 0.01 for k in SHAPES_KEYS}}

    monkeypatch.setattr(study, "load", lambda src, weights, device=None: pipe)
    monkeypatch.setattr(study, "eval_items", lambda stride: [])
    monkeypatch.setattr(study, "_scorers", lambda: {})
    monkeypatch.setattr(study, "eval_row", fake_eval_row)
    return seen


def test_guidance_grid_sets_each_shift_then_restores_the_model_shift(tmp_path, monkeypatch, capsys):
    """Every (steps, shift, cfg) of the grid is evaluated once with the shift set on the pipeline
    while its folder is generated; the model's own shift is back afterwards; a bad list is refused."""
    import json

    import shapes_training_study as study

    pipe = SimpleNamespace(config={"scheduler": {"shift": 1.0}})
    seen = _fake_guidance_grid(monkeypatch, pipe, lambda p, d, g: (g.steps, p.config["scheduler"]["shift"], g.cfg, d.name))
    assert study.main(["guidance", "--out", str(tmp_path), "--cfgs", "2,5", "--steps-list", "10,20",
                       "--shifts", "1,2"]) == 0
    assert seen == [(n, s, w, f"cfg{w:g}_steps{n}_shift{s:g}") for n in (10, 20) for s in (1.0, 2.0) for w in (2.0, 5.0)]
    assert pipe.config["scheduler"]["shift"] == 1.0
    rows = json.loads((tmp_path / "guidance" / "guidance.json").read_text())
    assert [(r["steps"], r["shift"], r["cfg"]) for r in rows] == [s[:3] for s in seen]
    assert (tmp_path / "guidance" / "guidance.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:  # refused by argparse, before the model is loaded
        study.main(["guidance", "--out", str(tmp_path), "--cfgs", "2,x"])
    assert e.value.code == 2
    # a shift below 1 is read as 1 by the scheduler: its rows would be mislabelled
    capsys.readouterr()
    assert study.main(["guidance", "--out", str(tmp_path), "--shifts", "0.5,2"]) == 2
    assert "--shifts must be >= 1" in capsys.readouterr().err


def test_guidance_grid_crosses_reward_scales_with_text_scales(tmp_path, monkeypatch):
    """--reward-cfgs: every (w_r, w) pair reaches the generator once, in its own folder; without it
    the folders keep their single-scale names and w_r stays None (the published combination)."""
    import json

    import shapes_training_study as study

    seen = _fake_guidance_grid(monkeypatch, SimpleNamespace(config={}), lambda p, d, g: (g.cfg, g.reward_cfg, d.name))
    assert study.main(["guidance", "--out", str(tmp_path), "--cfgs", "2,5", "--steps-list", "25",
                       "--reward-cfgs", "0,10"]) == 0
    assert seen == [(w, wr, f"cfg{w:g}_rcfg{wr:g}_steps25_shift1") for wr in (0.0, 10.0) for w in (2.0, 5.0)]
    rows = json.loads((tmp_path / "guidance" / "guidance.json").read_text())
    assert [r["reward_cfg"] for r in rows] == [0.0, 0.0, 10.0, 10.0]
    seen.clear()
    assert study.main(["guidance", "--out", str(tmp_path / "b"), "--cfgs", "3", "--steps-list", "25"]) == 0
    assert seen == [(3.0, None, "cfg3_steps25_shift1")]
    seen.clear()
    assert study.main(["guidance", "--out", str(tmp_path / "c"), "--cfgs", "3", "--steps-list", "25",
                       "--reward-cfgs", "8", "--reward-direction", "null"]) == 0
    assert seen == [(3.0, 8.0, "cfg3_rcfg8_null_steps25_shift1")]
    seen.clear()  # both factorisations over w_r at one w; w_r = w is one combination, run once
    assert study.main(["guidance", "--out", str(tmp_path / "d"), "--cfgs", "5", "--steps-list", "25",
                       "--reward-cfgs", "0,5", "--reward-directions", "prompt,null"]) == 0
    assert [s[2] for s in seen] == ["cfg5_rcfg0_steps25_shift1", "cfg5_rcfg0_null_steps25_shift1",
                                    "cfg5_rcfg5_steps25_shift1"]
    assert (tmp_path / "d" / "guidance" / "guidance.png").stat().st_size > 0
    assert study.main(["guidance", "--out", str(tmp_path), "--cfgs", "3", "--reward-cfgs", "1",
                       "--reward-directions", "prompt,text"]) == 2
    with pytest.raises(SystemExit) as e:  # refused by argparse
        study.main(["guidance", "--out", str(tmp_path), "--cfgs", "3", "--reward-cfgs", "1,y"])
    assert e.value.code == 2
    assert study.main(["guidance", "--out", str(tmp_path), "--cfgs", "3", "--reward-cfg", "shapes_counting=9"]) == 2


def test_shape_confusion_counts_one_object_images_only(tmp_path):
    import json

    from shapes_training_study import main, shape_confusion, shape_outcome

    assert shape_outcome({}) == "none" and shape_outcome({"circle": []}) == "none"
    assert shape_outcome({"square": [[0, 0, 1, 1, 0.9], [2, 2, 3, 3, 0.8]]}) == "square"
    assert shape_outcome({"square": [[0, 0, 1, 1, 0.9]], "circle": [[2, 2, 3, 3, 0.8]]}) == "several"

    def rec(tag, include, details):
        return {"tag": tag, "metadata": json.dumps({"tag": tag, "include": include}), "details": json.dumps(details)}

    box = [[0, 0, 4, 4, 0.9]]
    records = [rec("single_object", [{"class": "circle", "count": 1}], {"circle": box}),
               rec("single_object", [{"class": "square", "count": 1}], {"circle": box}),
               rec("colors", [{"class": "square", "count": 1, "color": "red"}], {"square": box}),
               rec("colors", [{"class": "cross", "count": 1, "color": "red"}], {}),
               rec("two_object", [{"class": "cross", "count": 1}, {"class": "circle", "count": 1}], {"cross": box})]
    conf = shape_confusion(records)
    assert conf["n"] == 4 and conf["accuracy"] == 0.5  # the two-object record is left out
    assert conf["counts"]["square"] == {**dict.fromkeys(conf["columns"], 0), "circle": 1, "square": 1}
    assert conf["counts"]["cross"]["none"] == 1 and sum(conf["counts"]["triangle"].values()) == 0
    d = tmp_path / "folder"
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["confusion", "--folder", f"m={d}", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "confusion" / "confusion.json").read_text())["m"]["accuracy"] == 0.5
    assert "| square | 50 | 50 |" in (tmp_path / "confusion" / "confusion.md").read_text()
    assert main(["confusion", "--folder", f"m={tmp_path / 'nothing'}", "--out", str(tmp_path)]) == 2


def test_table_passes_both_branches_targets_to_the_generator(tmp_path, monkeypatch, capsys):
    """--reward sets the positive branch, --negative-reward the negative one (default: empty, the
    pipeline's zeros); a malformed pair is refused with its text."""
    import json

    import shapes_training_study as study

    seen = []

    def fake_eval_row(p, items, d, gcfg, scorers, counts):
        seen.append((d.name, dict(gcfg.reward_targets), dict(gcfg.negative_reward_targets)))
        return {"shapes_eval": 0.1, "se_shapes_eval": 0.01,
                **{k: 0.5 for k in SHAPES_KEYS}, **{f"se_{k}": 0.01 for k in SHAPES_KEYS}}

    monkeypatch.setattr(study, "load", lambda src, weights, device=None: SimpleNamespace())
    monkeypatch.setattr(study, "eval_items", lambda stride: [])
    monkeypatch.setattr(study, "_scorers", lambda: {})
    monkeypatch.setattr(study, "eval_row", fake_eval_row)
    assert study.main(["table", "--out", str(tmp_path), "--model", "a=x"]) == 0
    assert study.main(["table", "--out", str(tmp_path), "--model", "b=x", "--reward", "shapes_contrast=0.5",
                       "--negative-reward", "shapes_contrast=1", "shapes_position=0.25"]) == 0
    assert seen == [("a", {}, {}), ("b", {"shapes_contrast": 0.5}, {"shapes_contrast": 1.0, "shapes_position": 0.25})]
    assert json.loads((tmp_path / "table" / "table.json").read_text())[0]["model"] == "b"
    assert study.main(["table", "--out", str(tmp_path), "--model", "c=x", "--negative-reward", "shapes_contrast"]) == 2
    assert "--negative-reward 'shapes_contrast': expected KEY=VALUE" in capsys.readouterr().err


def _fake_sweep(d: Path, key: str, per_target: list[tuple[float, int, float, float]], gen: dict) -> None:
    """A controllability run's files for one reward: sweep.json (target, n, mean, std) and the first
    target's generation.json."""
    import json

    k = d / "controllability" / key
    k.mkdir(parents=True, exist_ok=True)
    rows = [{"target": t, "n": n, key: {"mean": m, "std": s}} for t, n, m, s in per_target]
    (k / "sweep.json").write_text(json.dumps({"swept": key, "targets": [r[0] for r in per_target], "per_target": rows}))
    first = k / f"target_{per_target[0][0]:.4f}"
    first.mkdir(exist_ok=True)
    (first / "generation.json").write_text(json.dumps({"config": gen}))


def test_pool_targets_equals_the_statistics_of_all_images():
    import numpy as np

    import shapes_training_study as study

    rng = np.random.default_rng(0)
    a, b, c = rng.random(5), rng.random(7), rng.random(3)
    rows = [{"target": 0.5, "n": len(a), "k": {"mean": a.mean(), "std": a.std()}},
            {"target": 1.0, "n": len(c), "k": {"mean": c.mean(), "std": c.std()}},
            {"target": 0.50001, "n": len(b), "k": {"mean": b.mean(), "std": b.std()}}]  # same folder name
    pooled = study.pool_targets(rows, "k")
    ab = np.concatenate([a, b])
    assert [p["target"] for p in pooled] == [0.5, 1.0] and [p["n"] for p in pooled] == [12, 3]
    assert pooled[0]["mean"] == pytest.approx(ab.mean()) and pooled[0]["std"] == pytest.approx(ab.std())
    assert pooled[1]["mean"] == pytest.approx(c.mean()) and pooled[1]["std"] == pytest.approx(c.std())


def test_summarize_pools_folders_of_one_setting_and_refuses_mixed_ones(tmp_path):
    import json

    import shapes_training_study as study

    gen = {"cfg": 5.0, "steps": 25, "reward_cfg": None, "reward_direction": "prompt", "negative_reward_targets": {},
           "seed": 0, "n_samples": 2}
    key = "shapes_alignment"
    # Run 1: targets 0, 0.5, 1 with 0.5 out of order; run 2 (another seed) pulls 0.5 back into order
    # and adds target 0.75: pooled means 0.2, 0.4, 0.6, 0.8.
    _fake_sweep(tmp_path / "r1", key, [(0.0, 100, 0.2, 0.1), (0.5, 100, 0.1, 0.1), (1.0, 100, 0.8, 0.1)], gen)
    _fake_sweep(tmp_path / "r2", key, [(0.5, 300, 0.5, 0.1), (0.75, 50, 0.6, 0.1)], {**gen, "seed": 2})
    _fake_sweep(tmp_path / "r1", "shapes_counting", [(0.0, 10, 0.9, 0.0), (1.0, 10, 0.1, 0.0)], gen)
    (tmp_path / "r1" / "table").mkdir()
    (tmp_path / "r1" / "table" / "table.json").write_text(json.dumps([{"shapes_eval": 0.37, "se_shapes_eval": 0.015}]))
    one, pooled = study.summarize_settings({"one": [tmp_path / "r1"], "pooled": [tmp_path / "r1", tmp_path / "r2"]})
    assert one["rho"][key] == pytest.approx(0.5) and one["rho"]["shapes_counting"] == pytest.approx(-1.0)
    assert one["passed"] == 0 and one["n"] == {key: 100, "shapes_counting": 10}
    assert pooled["rho"][key] == pytest.approx(1.0) and pooled["passed"] == 1 and pooled["n"][key] == 50
    assert [p["mean"] for p in pooled["curves"][key]] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert pooled["shapes_eval"] == 0.37 and pooled["label"] == "w=5 steps=25"
    assert set(pooled["rho"]) == {key, "shapes_counting"}  # rewards never swept are left out
    md = study.settings_markdown([one, pooled])
    assert "| pooled: w=5 steps=25 | **1.00** | -1.00 | – | – | – | 1/2 | 10/50 | 0.370 ± 0.015 |" in md
    _fake_sweep(tmp_path / "r3", key, [(0.0, 10, 0.2, 0.1), (1.0, 10, 0.3, 0.1)],
                {**gen, "reward_cfg": {"shapes_alignment": 15.0}, "negative_reward_targets": {key: 0.0}})
    assert study.summarize_settings({"x": [tmp_path / "r3"]})[0]["label"] == "w=5 steps=25 w_r=alignment=15 s-=isolate"
    with pytest.raises(ValueError, match="pools folders of different settings"):
        study.summarize_settings({"mixed": [tmp_path / "r1", tmp_path / "r3"]})
    # the targets of the rewards not swept (--others) are part of the setting: never pooled across
    others = {k: 0.5 for k in study.SHAPES_KEYS}
    _fake_sweep(tmp_path / "r4", key, [(0.0, 10, 0.2, 0.1), (1.0, 10, 0.3, 0.1)], {**gen, "reward_targets": {**others, key: 0.0}})
    _fake_sweep(tmp_path / "r5", key, [(0.5, 10, 0.2, 0.1)], {**gen, "reward_targets": {**others, key: 0.5}})
    assert study.summarize_settings({"x": [tmp_path / "r4", tmp_path / "r5"]})[0]["label"] == "w=5 steps=25 others=0.5"
    with pytest.raises(ValueError, match="pools folders of different settings"):
        study.summarize_settings({"mixed": [tmp_path / "r2", tmp_path / "r4"]})
    ones = {k: 1.0 for k in study.SHAPES_KEYS}
    _fake_sweep(tmp_path / "r6", key, [(0.25, 10, 0.2, 0.1), (1.0, 10, 0.3, 0.1)], {**gen, "reward_targets": {**ones, key: 0.25}})
    assert study.summarize_settings({"x": [tmp_path / "r6"]})[0]["label"] == "w=5 steps=25"  # the default
    assert study.main(["summarize", "--setting", f"p={tmp_path / 'r1'}", "--setting", f"p={tmp_path / 'r2'}",
                       "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "settings.json").read_text())[0]["passed"] == 1
    assert (tmp_path / "s" / "p_controllability.png").stat().st_size > 0  # the pooled curves
    assert not (tmp_path / "s" / "settings_controllability.png").exists()  # one setting: nothing to overlay
    assert study.main(["summarize", "--setting", f"a={tmp_path / 'r1'}", "--setting", f"b={tmp_path / 'r2'}",
                       "--out", str(tmp_path / "s2")]) == 0
    assert (tmp_path / "s2" / "settings_controllability.png").stat().st_size > 0  # both settings in one figure
    assert study.main(["summarize", "--setting", "p", "--out", str(tmp_path / "s")]) == 2
    # A model's own targets: the others are dropped, the absent ones listed; rewards without a list keep all.
    (kept,) = study.summarize_settings({"p": [tmp_path / "r1", tmp_path / "r2"]}, only={key: [0.0, 0.75, 0.9]})
    assert [p["target"] for p in kept["curves"][key]] == [0.0, 0.75] and kept["missing"][key] == [0.9]
    assert kept["rho"][key] == pytest.approx(1.0) and len(kept["curves"]["shapes_counting"]) == 2
    assert "p, alignment: no run has targets [0.9]" in study.settings_markdown([kept])
    (none,) = study.summarize_settings({"p": [tmp_path / "r1"]}, only={key: [0.3]})
    assert key not in none["rho"] and none["missing"][key] == [0.3]
    assert study.main(["summarize", "--setting", f"p={tmp_path / 'r1'}", "--targets", "score",
                       "--out", str(tmp_path / "s")]) == 2  # whose targets? --model is required
    assert study.main(["summarize", "--setting", f"p={tmp_path / 'r1'}", "--targets", "score", "--model",
                       "shapes-untrained", "--out", str(tmp_path / "s")]) == 2  # no reward bins: an error, not all kept
    assert study.main(["summarize", "--setting", f"p={tmp_path / 'r1'}", "--targets", "filled", "--model", "shapes",
                       "--out", str(tmp_path / "f")]) == 0
    (row,) = json.loads((tmp_path / "f" / "settings.json").read_text())
    assert 0.0 not in row["missing"][key] and len(row["missing"][key]) == 7  # 9 filled targets, r1 has 0 and 1


def test_paired_differences_match_the_closed_form(tmp_path):
    import json

    from shapes_training_study import main

    # two categories, 2 and 3 images; model b fixes one image of each and gains 0.1 alignment on all
    tags = ["a", "a", "b", "b", "b"]
    ok_a, ok_b = [0, 1, 0, 0, 1], [1, 1, 1, 0, 1]
    for name, ok, extra in (("a", ok_a, 0.0), ("b", ok_b, 0.1)):
        d = tmp_path / name
        d.mkdir()
        names = [f"{i:05d}/samples/0000.png" for i in range(5)]
        (d / "results.jsonl").write_text("".join(json.dumps({"filename": f, "tag": t, "correct": bool(c)}) + "\n"
                                                 for f, t, c in zip(names, tags, ok)))
        (d / "rewards.jsonl").write_text("".join(json.dumps({"filename": f, "shapes_alignment": 0.5 + extra + 0.01 * i})
                                                 + "\n" for i, f in enumerate(names)))
    assert main(["paired", "--folder", f"a={tmp_path / 'a'}", "--folder", f"b={tmp_path / 'b'}",
                 "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "paired" / "paired.json").read_text())["diffs"]["b"]
    from PIL import Image

    with Image.open(tmp_path / "paired" / "paired.png") as im:  # the plot beside the table
        assert im.size[0] > 200 and im.size[1] > 50
    # category a: differences (1, 0), mean 1/2, se sqrt(1/2 / 2); b: (1, 0, 0), mean 1/3, se sqrt(1/3 / 3)
    assert d["categories"]["a"]["diff"] == pytest.approx(0.5) and d["categories"]["b"]["diff"] == pytest.approx(1 / 3)
    assert d["shapes_eval"]["diff"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert d["shapes_eval"]["se"] == pytest.approx(math.sqrt(0.5 / 2 + (1 / 3) / 3) / 2)
    assert d["shapes_alignment"]["diff"] == pytest.approx(0.1) and d["shapes_alignment"]["se"] == pytest.approx(0, abs=1e-9)
    # sweeps' target folders have rewards only; two folders per name pool seeds, pairing folder by folder
    for name in "ab":
        (tmp_path / f"{name}2").mkdir()
        (tmp_path / f"{name}2" / "rewards.jsonl").write_text((tmp_path / name / "rewards.jsonl").read_text())
    assert main(["paired", "--folder", f"a={tmp_path / 'a2'},{tmp_path / 'a'}", "--folder",
                 f"b={tmp_path / 'b2'},{tmp_path / 'b'}", "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "paired" / "paired.json").read_text())["diffs"]["b"]
    assert d["n"] == 10 and "shapes_eval" not in d and d["shapes_alignment"]["diff"] == pytest.approx(0.1)
    assert main(["paired", "--folder", f"a={tmp_path / 'a'}", "--out", str(tmp_path)]) == 2
    assert main(["paired", "--folder", f"a={tmp_path / 'a'}", "--folder", f"a={tmp_path / 'b'}",
                 "--out", str(tmp_path)]) == 2
    assert main(["paired", "--folder", str(tmp_path / "a"), "--folder", str(tmp_path / "b"), "--out", str(tmp_path)]) == 0
    assert main(["paired", "--folder", f"a={tmp_path / 'a'}", "--folder", f"x={tmp_path / 'x'}",
                 "--out", str(tmp_path)]) == 2


def test_trade_reads_one_point_per_model_from_paired_outputs(tmp_path):
    import json

    from PIL import Image
    from shapes_training_study import main

    def scored(d, values):  # a sweep's target folder: rewards only
        d.mkdir(parents=True)
        d.joinpath("rewards.jsonl").write_text("".join(
            json.dumps({"filename": f"{i:05d}/samples/0000.png", "shapes_alignment": v}) + "\n"
            for i, v in enumerate(values)))
        return str(d)

    # x: each model's alignment at a low target minus at 0; y: model b against model a
    t0, lo = [0.2, 0.4, 0.6], [0.3, 0.5, 0.7]  # a: +0.1 on every image
    b0, blo = [0.2, 0.4, 0.6], [0.2, 0.4, 0.9]  # b: 0, 0, +0.3
    assert main(["paired", "--folder", f"t0={scored(tmp_path / 'a0', t0)}", "--folder",
                 f"lo={scored(tmp_path / 'alo', lo)}", "--out", str(tmp_path / 'xa')]) == 0
    assert main(["paired", "--folder", f"t0={scored(tmp_path / 'b0', b0)}", "--folder",
                 f"lo={scored(tmp_path / 'blo', blo)}", "--out", str(tmp_path / 'xb')]) == 0
    assert main(["paired", "--folder", f"a={tmp_path / 'alo'}", "--folder", f"b={tmp_path / 'blo'}",
                 "--folder", f"c={tmp_path / 'a0'}", "--out", str(tmp_path / 'y')]) == 0
    argv = ["trade", "--point", f"a={tmp_path / 'xa'},base", "--y", "shapes_alignment",
            "--point", f"b={tmp_path / 'xb' / 'paired' / 'paired.json'},{tmp_path / 'y'}#b", "--out", str(tmp_path)]
    assert main(argv) == 0
    got = json.loads((tmp_path / "trade" / "trade.json").read_text())["points"]
    assert got["a"]["x"]["diff"] == pytest.approx(0.1) and got["a"]["x"]["se"] == pytest.approx(0, abs=1e-9)
    assert got["a"]["y"] == {"diff": 0.0, "se": 0.0}
    # b's x: differences (0, 0, 0.3), mean 0.1, se = sd / sqrt(3) = sqrt(0.03) / sqrt(3) = 0.1
    assert got["b"]["x"]["diff"] == pytest.approx(0.1) and got["b"]["x"]["se"] == pytest.approx(0.1)
    assert got["b"]["y"]["diff"] == pytest.approx((-0.1 - 0.1 + 0.2) / 3)  # blo - alo: -0.1, -0.1, +0.2
    with Image.open(tmp_path / "trade" / "trade.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200
    # bad input names the bad value: a paired output with several models needs #NAME, a missing measure
    # or name is listed with what there is, a point needs LABEL=X,Y
    for bad in ([f"b={tmp_path / 'xb'},{tmp_path / 'y'}"], [f"b={tmp_path / 'xb'},{tmp_path / 'y'}#z"],
                [f"b={tmp_path / 'xb'}"], [f"b={tmp_path / 'nowhere'},base"], ["a=base,base", "a=base,base"]):
        assert main(["trade", *sum((["--point", p] for p in bad), []), "--out", str(tmp_path)]) == 2
    assert main(["trade", "--point", f"b={tmp_path / 'xb'},base", "--x", "shapes_eval", "--out", str(tmp_path)]) == 2


def _no_generation(monkeypatch, study, items, eval_row):
    """The convergence command on ``items`` with no model loaded: ``eval_row`` gives every point's scores;
    a "pipeline" carries only its checkpoint's metadata, as ``pipeline_from_checkpoint`` gives it."""
    import torch

    def load(src, weights, device=None):
        return SimpleNamespace(checkpoint_meta=torch.load(src, weights_only=True)["miro"])

    monkeypatch.setattr(study, "eval_items", lambda stride: items)
    monkeypatch.setattr(study, "load", load)
    monkeypatch.setattr(study, "_scorers", dict)
    monkeypatch.setattr(study, "eval_row", eval_row)


def test_convergence_gives_a_speedup_per_reward_and_rescores_points_without_rewards(tmp_path, monkeypatch):
    """Every Shapes reward gets its curve and the paper's speed-up beside ShapesEval's; a point in a
    CSV written before rewards were recorded is scored again (its images kept), complete ones are not."""
    import csv
    import json

    import torch

    import shapes_training_study as study

    items = [SimpleNamespace(metadata={"tag": "a"})] * 2
    run_dirs = {}
    for name in ("miro", "baseline"):
        d = run_dirs[name] = tmp_path / name
        d.mkdir()
        for step in (1, 2, 3, 4):
            torch.save({"miro": {"samples_seen": step * 100}}, d / f"step={step}.ckpt")
    # MIRO's contrast climbs twice as fast as the baseline's (reaches its final 0.8 at 200 samples);
    # its alignment never reaches the baseline's final.
    def value(name, step, key):
        if key == "shapes_contrast":
            return min(0.8, 0.2 * step * (2 if name == "miro" else 1))
        if key == "shapes_alignment":
            return 0.1 * step * (0.5 if name == "miro" else 1)
        return 0.5

    evaluated, seen_cfg = [], []

    def fake_eval_row(pipe, its, d, gcfg, scorers, counts):
        name, step = d.parent.name, int(d.name.removeprefix("step_"))
        evaluated.append((name, step))
        seen_cfg.append(gcfg)
        row = {"shapes_eval": 0.1 * step, "se_shapes_eval": 9.9, "cat_a": 0.1 * step}
        for k in SHAPES_KEYS:
            row[k], row[f"se_{k}"] = value(name, step, k), 0.0
        return row

    _no_generation(monkeypatch, study, items, fake_eval_row)
    out = tmp_path / "study"
    out.mkdir()
    # an older CSV: baseline's step 1 scored without rewards
    (out / "convergence.csv").write_text("run,step,samples,overall,cat_a\nbaseline,1,100,0.1,0.1\n")
    args = ["convergence", "--out", str(out), "--every", "1", "--n-samples", "1",
            "--run", f"miro={run_dirs['miro']}", "--run", f"baseline={run_dirs['baseline']}"]
    assert study.main(args) == 0
    assert sorted(evaluated) == sorted((n, s) for n in ("miro", "baseline") for s in (1, 2, 3, 4))
    rows = list(csv.DictReader(open(out / "convergence.csv")))
    assert len(rows) == 8 and all(r["shapes_contrast"] != "" for r in rows)
    result = json.loads((out / "convergence.json").read_text())
    assert result["speedup"]["speedup"] == pytest.approx(1.0)  # ShapesEval: the same curve for both
    contrast = result["rewards"]["shapes_contrast"]["speedup"]
    assert contrast["baseline_samples"] == pytest.approx(400) and contrast["miro_samples"] == pytest.approx(200)
    assert contrast["speedup"] == pytest.approx(2.0) and contrast["interval"]["low"] == pytest.approx(2.0)
    assert result["rewards"]["shapes_alignment"]["speedup"]["speedup"] is None
    assert set(result["rewards"]) == set(SHAPES_KEYS)
    md = (out / "convergence.md").read_text().splitlines()
    assert len(md) == 2 + 1 + len(SHAPES_KEYS)
    assert [c.strip() for c in md[2 + 1 + SHAPES_KEYS.index("shapes_contrast")].split("|")[1:6]] == [
        "shapes_contrast", "0.800", "0.4k", "0.2k", "x2.00"]
    assert "| - |" in md[2 + 1 + SHAPES_KEYS.index("shapes_alignment")]
    assert result["rewards"]["shapes_counting"]["speedup"]["baseline_rises"] is False  # flat: x1 means nothing
    assert "no rise" in md[2 + 1 + SHAPES_KEYS.index("shapes_counting")]
    assert "no rise" not in md[2 + 1 + SHAPES_KEYS.index("shapes_contrast")]
    # ShapesEval rises 0.1 -> 0.4 on 2 images per category: within its binomial noise
    assert md[2].endswith("| rise within noise: the baseline's final is 0.74 standard errors above its first "
                          "point (< 2) |")
    assert (out / "convergence_rewards.png").stat().st_size > 0
    evaluated.clear()
    assert study.main(args) == 0  # complete points are not scored again
    assert evaluated == []
    # text-only guidance (negative targets = positive ones) reaches every generation and the result
    seen_cfg.clear()
    assert study.main([*args[:2], str(tmp_path / "text"), *args[3:], "--negative-reward", "shapes_contrast=1"]) == 0
    assert len(seen_cfg) == 8 and all(c.negative_reward_targets == {"shapes_contrast": 1.0} for c in seen_cfg)
    assert json.loads((tmp_path / "text" / "convergence.json").read_text())["negative_reward_targets"] == {
        "shapes_contrast": 1.0}


def test_speedup_interval_resamples_seeds():
    """Two MIRO seeds, one twice as fast as the baseline and one as fast: the pooled curve is x1.5, and
    a hierarchical bootstrap without scoring noise gives x2, x1.5 or x1 (seeds AA, AB, BB)."""
    base = [(100, 0.05), (200, 0.10), (300, 0.15), (400, 0.20)]
    fast = [(s, v * 2) for s, v in base]
    zero = [(s, 0.0) for s, _ in base]
    pooled = [(s, (a + b) / 2) for (s, a), (_, b) in zip(fast, base)]
    assert speedup(pooled, base)["speedup"] == pytest.approx(1.5)
    got = speedup_interval([fast, base], [base], [zero, zero], [zero], draws=2000)
    assert got["low"] == pytest.approx(1.0) and got["high"] == pytest.approx(2.0)
    assert got["p_above_1"] == pytest.approx(0.75, abs=0.03)  # only BB is not above 1
    # one seed given as a list of one is the single-curve case
    assert speedup_interval([fast], [base], [zero], [zero], draws=20)["low"] == pytest.approx(2.0)
    as_lists = [[s, v] for s, v in fast]  # a curve read back from JSON: pairs as lists
    assert speedup_interval(as_lists, base, zero, zero, draws=20)["low"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="sample grid"):
        speedup_interval([fast, fast[:3]], [base], [zero, zero[:3]], [zero], draws=5)


def test_convergence_pools_training_seeds(tmp_path, monkeypatch, capsys):
    """A recipe given twice (two seeds) is one pooled curve: the seeds' mean at the steps both have, each
    point's error the larger of scoring noise and seed spread; each seed's images in its own folder."""
    import csv
    import json

    import torch

    import shapes_training_study as study

    items = [SimpleNamespace(metadata={"tag": "a"})] * 2
    dirs = {}
    for name, seed, last in (("miro", "m1", 4), ("miro", "m2", 3), ("baseline", "b1", 4), ("baseline", "b2", 4)):
        d = dirs[seed] = tmp_path / "runs" / seed
        d.mkdir(parents=True)
        for step in range(1, last + 1):
            # b2 trained on two ranks: rank 0's own count is half of what the curve counts
            meta = {"samples_seen": step * 50, "samples_seen_global": step * 100} if seed == "b2" else \
                {"samples_seen": step * 100}
            torch.save({"miro": meta}, d / f"step={step}.ckpt")
    # contrast: baseline seeds 0.05/step, MIRO seed m1 twice that, m2 the baseline's
    rate = {"m1": 0.1, "m2": 0.05, "b1": 0.05, "b2": 0.05}
    evaluated = []

    def fake_eval_row(pipe, its, d, gcfg, scorers, counts):
        seed, step = d.parent.name, int(d.name.removeprefix("step_"))
        evaluated.append((d.parent.parent.name, seed, step))
        row = {"shapes_eval": 0.0, "se_shapes_eval": 0.0, "cat_a": 0.1 * step}
        for k in SHAPES_KEYS:
            row[k], row[f"se_{k}"] = (rate[seed] * step, 0.01) if k == "shapes_contrast" else (0.5, 0.0)
        return row

    _no_generation(monkeypatch, study, items, fake_eval_row)
    out = tmp_path / "study"
    args = ["convergence", "--out", str(out), "--every", "1", "--n-samples", "1"]
    for name, seed in (("miro", "m1"), ("miro", "m2"), ("baseline", "b1"), ("baseline", "b2")):
        args += ["--run", f"{name}={dirs[seed]}"]
    assert study.main(args) == 0
    assert len(evaluated) == 15 and ("miro", "m2", 3) in evaluated  # one folder per seed under its recipe
    rows = list(csv.DictReader(open(out / "convergence.csv")))
    assert list(rows[0])[:3] == ["run", "replicate", "step"] and {r["replicate"] for r in rows} == set(rate)
    result = json.loads((out / "convergence.json").read_text())
    assert result["seeds"] == {"miro": ["m1", "m2"], "baseline": ["b1", "b2"]}
    c = result["rewards"]["shapes_contrast"]
    # MIRO pooled only where both seeds have a point (m2 stops at step 3): (0.1 + 0.05) / 2 * step
    assert [s for s, _ in c["curves"]["miro"]] == [100, 200, 300]
    assert [v for _, v in c["curves"]["miro"]] == pytest.approx([0.075, 0.15, 0.225])
    # error: seed spread stdev(0.1 s, 0.05 s) / sqrt 2 = 0.025 s, above the noise sqrt(2 * 0.01^2) / 2
    assert [e for _, e in c["standard_errors"]["miro"]] == pytest.approx([0.025, 0.05, 0.075])
    assert [e for _, e in c["standard_errors"]["baseline"]] == pytest.approx([0.01 / math.sqrt(2)] * 4)
    # the baseline reaches its final 0.2 at 400, the pooled MIRO at 200 + (0.05 / 0.075) * 100
    assert c["speedup"]["miro_samples"] == pytest.approx(200 + 100 * 0.05 / 0.075)
    assert (out / "convergence.md").read_text().startswith("Seeds (means over): miro: m1, m2; baseline: b1, b2")
    # resuming scores nothing; an older row without a replicate belongs to its run's only seed
    evaluated.clear()
    assert study.main(args) == 0 and evaluated == []
    single = tmp_path / "single"
    single.mkdir()
    (single / "convergence.csv").write_text(
        "run,step,samples,overall,cat_a," + ",".join(f"{k},se_{k}" for k in SHAPES_KEYS) + "\n"
        "miro,1,100,0.1,0.1," + ",".join("0.5,0.0" for _ in SHAPES_KEYS) + "\n")
    assert study.main(["convergence", "--out", str(single), "--at-steps", "1", "--n-samples", "1",
                       "--run", f"miro={dirs['m1']}"]) == 0
    assert evaluated == []
    # two seeds of one recipe must be told apart by their folders
    other = tmp_path / "elsewhere" / "m1"
    other.mkdir(parents=True)
    assert study.main([*args, "--run", f"miro={other}"]) == 2
    assert "also named 'm1'" in capsys.readouterr().err


def test_convergence_joins_points_scored_by_other_processes(tmp_path, monkeypatch, capsys):
    """``--rows-from``: points scored in other folders (one process per run) join a study that then
    scores nothing and reads what scoring everything in one process reads; points scored with other
    settings, or a point two sources score differently, are refused."""
    import json

    import torch

    import shapes_training_study as study

    items = [SimpleNamespace(metadata={"tag": "a"})] * 2
    dirs = {}
    for name in ("miro", "baseline"):
        d = dirs[name] = tmp_path / "runs" / name
        d.mkdir(parents=True)
        for step in (1, 2, 3):
            torch.save({"miro": {"samples_seen": step * 100}}, d / f"step={step}.ckpt")
    evaluated = []

    def fake_eval_row(pipe, its, d, gcfg, scorers, counts):
        name, step = d.parent.name, int(d.name.removeprefix("step_"))
        evaluated.append((name, step))
        rate = 0.2 if name == "miro" else 0.1
        row = {"shapes_eval": 0.0, "se_shapes_eval": 0.0, "cat_a": 0.1 * step}
        for k in SHAPES_KEYS:
            row[k], row[f"se_{k}"] = (rate * step, 0.01) if k == "shapes_contrast" else (0.5, 0.0)
        return row

    _no_generation(monkeypatch, study, items, fake_eval_row)
    base = ["convergence", "--every", "1", "--n-samples", "1"]
    runs = ["--run", f"miro={dirs['miro']}", "--run", f"baseline={dirs['baseline']}"]
    assert study.main([*base, "--out", str(tmp_path / "whole"), *runs]) == 0
    whole = json.loads((tmp_path / "whole" / "convergence.json").read_text())
    parts = {}
    for name in ("miro", "baseline"):
        parts[name] = tmp_path / "parts" / name
        assert study.main([*base, "--out", str(parts[name]), "--run", f"{name}={dirs[name]}"]) == 0
    evaluated.clear()
    merged = tmp_path / "merged"
    assert study.main([*base, "--out", str(merged), *runs, "--rows-from", str(parts["miro"]),
                       str(parts["baseline"] / "convergence.csv")]) == 0
    assert evaluated == []
    result = json.loads((merged / "convergence.json").read_text())
    assert result["rewards"]["shapes_contrast"] == whole["rewards"]["shapes_contrast"]
    assert result["speedup"] == whole["speedup"] and result["seed"] == 0 and result["steps"] == 25
    assert len((merged / "convergence.csv").read_text().splitlines()) == 1 + 6  # kept: a resume needs no sources
    # --max-step leaves the held points past it out of the curves, not out of the CSV
    assert study.main([*base, "--out", str(merged), *runs, "--max-step", "2"]) == 0 and evaluated == []
    short = json.loads((merged / "convergence.json").read_text())
    assert [s for s, _ in short["curves"]["miro"]] == [100, 200]
    assert len((merged / "convergence.csv").read_text().splitlines()) == 1 + 6
    # other generation settings: refused, naming the setting
    other = json.loads((parts["miro"] / "convergence.json").read_text())
    (parts["miro"] / "convergence.json").write_text(json.dumps({**other, "steps": 10}))
    assert study.main([*base, "--out", str(tmp_path / "m2"), *runs, "--rows-from", str(parts["miro"])]) == 2
    assert "scored with steps=10; this study uses 25" in capsys.readouterr().err
    # the same for a study's own points on resume: other settings would mix into its curves
    assert study.main([*base, "--out", str(merged), *runs, "--steps", "10"]) == 2
    assert f"--out {merged}" in capsys.readouterr().err and evaluated == []
    # one point, two different scores
    clash = tmp_path / "clash.csv"
    text = (parts["baseline"] / "convergence.csv").read_text().splitlines()
    head, row = text[0].split(","), text[1].split(",")
    row[head.index("overall")] = "0.9"
    clash.write_text("\n".join([text[0], ",".join(row)]) + "\n")
    assert study.main([*base, "--out", str(tmp_path / "m3"), *runs, "--rows-from", str(parts["baseline"]),
                       str(clash)]) == 2
    assert "baseline baseline step 1 is held with ShapesEval" in capsys.readouterr().err
    assert study.main([*base, "--out", str(tmp_path / "m4"), *runs, "--rows-from", str(tmp_path / "nowhere")]) == 2
    assert "no convergence.csv there" in capsys.readouterr().err


def test_scored_folders_merge_the_lines_of_one_image_and_old_rows_are_not_a_seed(tmp_path):
    # a folder scored in two passes has two lines per image: paired must see both rewards
    import json

    from shapes_training_study import load_scored, run_specs, study_rows

    d = tmp_path / "t"
    d.mkdir()
    f = "00000/samples/0000.png"
    (d / "rewards.jsonl").write_text(json.dumps({"filename": f, "shapes_alignment": 0.5}) + "\n"
                                     + json.dumps({"filename": f, "shapes_contrast": 0.7}) + "\n")
    _, rew = load_scored([str(d)])
    assert rew[(0, f)]["shapes_alignment"] == 0.5 and rew[(0, f)]["shapes_contrast"] == 0.7
    # a convergence.csv from before seeds were recorded: its rows are the run's only seed's, and
    # with several seeds for that run they are refused, not pooled as a seed of their own
    old = tmp_path / "old.csv"
    old.write_text("run,step,samples,overall\nmiro,200,12800,0.1\n")
    assert study_rows(old, run_specs(["miro=/x/seed0"]))[0]["replicate"] == "seed0"
    with pytest.raises(ValueError, match="predate recorded seeds .* several seeds"):
        study_rows(old, run_specs(["miro=/x/seed0", "miro=/x/seed1"]))
