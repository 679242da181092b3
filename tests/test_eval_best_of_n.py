"""Best-of-N: exact subset expectation, prefix curves, best-candidate folders; sweep statistics."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from miro.eval import best_of_n as B
from miro.eval import sweep as S
from miro.eval.folder import read_folder


def brute_force(select, value, n):
    """Mean over all n-subsets of the value of the argmax-select candidate (ties: higher index)."""
    picks = []
    for sub in itertools.combinations(range(len(select)), n):
        best = max(sub, key=lambda k: (select[k], k))
        picks.append(value[best])
    return float(np.mean(picks))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_best_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    N = 7
    select = rng.integers(0, 4, N).astype(float)  # ties on purpose
    value = rng.normal(size=N)
    for n in range(1, N + 1):
        assert B.expected_best(select, value, n) == pytest.approx(brute_force(select, value, n), abs=1e-12)
    assert B.expected_best(value, value, 1) == pytest.approx(value.mean())
    assert B.expected_best(value, value, N) == pytest.approx(value.max())
    # closed form: 4 values, n = 2 -> (0*1 + 1*2 + 2*3 + 3*4) / C(4, 2)
    assert B.expected_best([1, 2, 3, 4], [1, 2, 3, 4], 2) == pytest.approx(20 / 6)
    with pytest.raises(ValueError, match="n must be in"):
        B.expected_best(select, value, N + 1)


def test_prefix_best_and_curve_arithmetic():
    assert B.prefix_best([3, 1, 5, 2], [30, 10, 50, 20], 2) == 30
    assert B.prefix_best([3, 1, 5, 2], [30, 10, 50, 20], 4) == 50
    assert B.prefix_best([1, 3, 5, 2], [10, 30, 50, 20], 2) == 30  # the first n, scores and values alike
    assert B.prefix_best([2, 2, 1], [10, 20, 30], 3) == 20  # a tie goes to the higher sample index
    assert B.default_ns(128) == [1, 2, 4, 8, 16, 32, 64, 128] and B.default_ns(6) == [1, 2, 4, 6]
    recs = []
    for i, (sel, val) in enumerate([([1, 3, 2, 0], [0.1, 0.3, 0.2, 0.0]), ([4, 4, 1, 2], [1.0, 2.0, 3.0, 4.0])]):
        for j in range(4):
            recs.append({"filename": f"{i:05d}/samples/{j:04d}.png", "index": i, "sample": j, "tag": "t",
                         "prompt": "p", "sel": float(sel[j]), "val": float(val[j])})
    c = B.curve(recs, "sel", ["val", "sel"], mode="expected")
    assert c["n"] == [1, 2, 4] and c["candidates"] == 4 and c["n_prompts"] == 2
    for k, n in enumerate(c["n"]):
        expect = np.mean([brute_force([1, 3, 2, 0], [0.1, 0.3, 0.2, 0.0], n), brute_force([4, 4, 1, 2], [1, 2, 3, 4], n)])
        assert c["values"]["val"][k] == pytest.approx(expect)
    # selecting by a reward never lowers that reward's curve
    assert np.all(np.diff(c["values"]["sel"]) >= -1e-12)
    p = B.curve(recs, "sel", ["val"], ns=[1, 4], mode="prefix")
    assert p["values"]["val"] == [pytest.approx((0.1 + 1.0) / 2), pytest.approx((0.3 + 2.0) / 2)]
    with pytest.raises(ValueError, match="only 4 scored candidates"):
        B.curve(recs, "sel", ns=[8])
    with pytest.raises(ValueError, match="mode"):
        B.curve(recs, "sel", mode="max")


def test_curve_with_uneven_prompts_uses_the_smallest_candidate_count():
    """When prompts have different numbers of scored candidates, every prompt's curve uses its first
    N candidates, N the smallest count; larger n is refused."""
    recs = []
    for i, (sel, val) in enumerate([([1, 3, 2], [0.1, 0.3, 0.2]), ([2, 1, 0, 9], [2.0, 1.0, 0.0, 9.0])]):
        for j in range(len(sel)):
            recs.append({"filename": f"{i:05d}/samples/{j:04d}.png", "index": i, "sample": j, "tag": "t",
                         "prompt": "p", "sel": float(sel[j]), "val": float(val[j])})
    c = B.curve(recs, "sel", ["val"], ns=[1, 3], mode="expected")
    assert c["candidates"] == 3 and c["candidates_per_prompt"] == [3, 4]
    assert c["values"]["val"] == [pytest.approx((0.2 + 1.0) / 2), pytest.approx((0.3 + 2.0) / 2)]
    with pytest.raises(ValueError, match="only 3 scored candidates"):
        B.curve(recs, "sel", ns=[4])


def test_write_best_folder_copies_the_argmax(tmp_path):
    src = tmp_path / "cands"
    recs = []
    for i in range(2):
        d = src / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps({"prompt": f"p{i}", "tag": "t"}) + "\n")
        for j in range(3):
            Image.fromarray(np.full((2, 2, 3), 10 * (i * 3 + j), np.uint8)).save(d / "samples" / f"{j:04d}.png")
            recs.append({"filename": f"{i:05d}/samples/{j:04d}.png", "index": i, "sample": j, "tag": "t",
                         "prompt": f"p{i}", "r": float((j + i) % 3)})
    chosen = B.write_best_folder(src, recs, "r", tmp_path / "best")
    assert chosen[0]["filename"] == "00000/samples/0002.png" and chosen[1]["filename"] == "00001/samples/0001.png"
    entries = read_folder(tmp_path / "best")
    assert [len(e.samples) for e in entries] == [1, 1] and entries[1].prompt == "p1"
    assert np.asarray(Image.open(entries[1].samples[0]))[0, 0, 0] == 10 * (3 + 1)
    with pytest.raises(ValueError, match="must differ"):
        B.write_best_folder(src, recs, "r", src)


def _ground_truth_candidates(root, capsys):
    """Ground-truth ShapesEval renders, 3 prompts x 2 candidates, scored with two Shapes rewards."""
    from miro.eval.cli import main

    assert main(["generate", "--model", "ground-truth", "--prompts", "shapes", "--limit", "3", "--n", "2",
                 "--outdir", str(root)]) == 0
    assert main(["rewards", str(root), "--scorers", "shapes_contrast,shapes_sharpness"]) == 0
    capsys.readouterr()
    return main


def test_best_of_n_refuses_a_non_empty_outdir_and_overwrite_leaves_no_stale_scores(tmp_path, capsys):
    main = _ground_truth_candidates(tmp_path / "cands", capsys)
    best = tmp_path / "best"
    select = ["best-of-n", str(tmp_path / "cands"), "--outdir", str(best), "--select-by"]
    assert main([*select, "shapes_contrast"]) == 0
    assert main(["geneval", str(best)]) == 0 and main(["rewards", str(best)]) == 0
    extra = best / "00007"  # a prompt folder the new selection does not have
    (extra / "samples").mkdir(parents=True)
    (extra / "metadata.jsonl").write_text((best / "00000" / "metadata.jsonl").read_text())
    (extra / "samples" / "0000.png").write_bytes((best / "00000" / "samples" / "0000.png").read_bytes())
    (best / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in best.rglob("*") if p.is_file()}
    capsys.readouterr()
    # another selection into the same folder: refused, nothing touched
    assert main([*select, "shapes_sharpness"]) == 2
    assert f"--outdir {best} is not empty; pass --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in best.rglob("*") if p.is_file()} == before
    # --overwrite: the old images and every score made from them go, the user's own file stays
    assert main([*select, "shapes_sharpness", "--overwrite"]) == 0
    left = sorted(str(p.relative_to(best)) for p in best.rglob("*") if p.is_file())
    assert left == ["00000/metadata.jsonl", "00000/samples/0000.png", "00001/metadata.jsonl", "00001/samples/0000.png",
                    "00002/metadata.jsonl", "00002/samples/0000.png", "best_of_n.json", "generation.json", "notes.txt"]
    assert json.loads((best / "best_of_n.json").read_text())["select_by"] == "shapes_sharpness"
    # --overwrite replaces only a best-of-N folder, never another run's images
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.png").write_bytes(b"x")
    assert main(["best-of-n", str(tmp_path / "cands"), "--outdir", str(other), "--select-by", "shapes_contrast",
                 "--overwrite"]) == 2
    assert "holds no best_of_n.json" in capsys.readouterr().err and (other / "keep.png").is_file()


def test_best_folder_records_its_run_so_auto_detection_works(tmp_path, capsys):
    from miro.eval import cli
    from miro.eval.rewards import default_scorers

    main = _ground_truth_candidates(tmp_path / "cands", capsys)
    best = tmp_path / "best"
    assert main(["best-of-n", str(tmp_path / "cands"), "--select-by", "shapes_contrast", "--outdir", str(best)]) == 0
    run = json.loads((best / "generation.json").read_text())
    src = json.loads((tmp_path / "cands" / "generation.json").read_text())
    assert run["config"] == {**src["config"], "n_samples": 1,
                             "best_of_n": {"select_by": "shapes_contrast", "source": str(tmp_path / "cands")}}
    assert run["prompts"] == "shapes" and run["n_prompts"] == 3
    # --detector auto and --scorers auto pick the Shapes world's, as for the candidates
    assert cli._detector_name(cli.build_parser().parse_args(["geneval", str(best)]), best) == "shapes"
    assert default_scorers(best) == default_scorers(tmp_path / "cands") and all(
        n.startswith("shapes_") for n in default_scorers(best))
    assert main(["geneval", str(best)]) == 0
    assert json.loads((best / "geneval_summary.json").read_text())["benchmark"] == "ShapesEval"
    # the record also keeps `miro eval generate` from adding candidates to the best-of-N folder
    assert main(["generate", "--model", "ground-truth", "--prompts", "shapes", "--limit", "3", "--n", "2",
                 "--outdir", str(best)]) == 2
    assert "best_of_n" in capsys.readouterr().err


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 5, 12).astype(float)
        y = rng.normal(size=12) + x
        assert S.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert S.rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert S.spearman([0, 1, 2], [5, 7, 9]) == pytest.approx(1.0)
    assert np.isnan(S.spearman([0, 1, 2], [1, 1, 1]))


def test_summarize_sweep_reads_scored_target_folders(tmp_path):
    targets = [0.0, 0.5, 1.0]
    for t in targets:
        d = S.target_dir(tmp_path, t)
        d.mkdir(parents=True)
        with open(d / "rewards.jsonl", "w") as f:
            for i in range(3):
                f.write(json.dumps({"filename": f"{i:05d}/samples/0000.png", "index": i, "sample": 0, "tag": "t",
                                    "prompt": "p", "up": t + 0.1 * i, "down": -t}) + "\n")
    res = S.summarize_sweep(tmp_path, "up", targets)
    assert res["spearman_means"] == {"down": pytest.approx(-1.0), "up": pytest.approx(1.0)}
    assert [r["up"]["mean"] for r in res["per_target"]] == [pytest.approx(t + 0.1) for t in targets]
    assert json.loads((tmp_path / "sweep.json").read_text())["swept"] == "up" and "spearman_geneval" not in res
    for t, o in zip(targets, [0.2, 0.6, 0.4]):
        (S.target_dir(tmp_path, t) / "geneval_summary.json").write_text(json.dumps({"overall": o}))
    res = S.summarize_sweep(tmp_path, "up", targets)
    assert [r["geneval_overall"] for r in res["per_target"]] == [0.2, 0.6, 0.4]
    assert res["spearman_geneval"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="targets"):
        S.summarize_sweep(tmp_path, "up", [0.5])


def test_trained_targets_are_the_bin_values_seen_in_training():
    from miro.rewards.binning import RewardBins

    # A discrete reward {0: 1/4, 0.5: 1/4, 1: 1/2} over 8 bins trains on exactly 0, 2/7 and 1.
    bins = RewardBins(8, {"d": [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0], "c": list(np.linspace(0, 1, 9))})
    assert S.trained_targets(bins, "d") == pytest.approx([0.0, 2 / 7, 1.0])
    # Spread ties train it on every value.
    assert S.trained_targets(RewardBins(8, bins.edges, ties="spread"), "d") == pytest.approx([i / 7 for i in range(8)])
    # A continuous reward has all 8 values i/7: capped to max_n, spread by rank, ends kept.
    assert S.trained_targets(bins, "c") == pytest.approx([i / 7 for i in range(8)])
    assert S.trained_targets(bins, "c", max_n=3) == pytest.approx([0.0, 4 / 7, 1.0])
    with pytest.raises(ValueError, match="no bin edges for reward 'zz'"):
        S.trained_targets(bins, "zz")
    with pytest.raises(ValueError, match="max_n must be >= 2"):
        S.trained_targets(bins, "d", max_n=1)


def test_score_spaced_targets_follow_the_score_not_the_quantiles():
    from miro.rewards.binning import RewardBins

    # A skewed reward: 7 of 8 bins in the top 10 % of the score range.
    skew = [0.0, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]
    bins = RewardBins(8, {"s": skew, "c": list(np.linspace(0, 1, 9))})
    # Scores 0, 0.25, 0.5, 0.75 all sit in bin 0; only 1.0 reaches the top: two targets, 0 and 1.
    assert S.score_spaced_targets(bins, "s", n=5) == pytest.approx([0.0, 1.0])
    # 9 scores i/8 on linear edges: score i/8 is edge i, which maps to bin i (i <= 7), and 1.0 to 7.
    assert S.score_spaced_targets(bins, "c") == pytest.approx([i / 7 for i in range(8)])
    with pytest.raises(ValueError, match="no bin edges for reward 'zz'"):
        S.score_spaced_targets(bins, "zz")
    with pytest.raises(ValueError, match="n must be >= 2"):
        S.score_spaced_targets(bins, "c", n=1)


def test_filled_targets_top_up_the_score_targets_by_halving_the_widest_gap():
    from miro.rewards.binning import RewardBins

    skew = [0.0, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]
    bins = RewardBins(8, {"s": skew, "c": list(np.linspace(0, 1, 9))})
    # [0, 1] -> 0.5 -> two equal gaps, the lower halved first -> 0.75 fills the widest one left.
    assert S.filled_targets(bins, "s", n=5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # Eight distinct score targets i/7: one more, in the first of the equal gaps (up to rounding).
    assert S.filled_targets(bins, "c") == pytest.approx([0.0, 1 / 14] + [i / 7 for i in range(1, 8)], abs=1e-6)
    for key in ("s", "c"):  # every score target kept, n distinct sorted values
        ts = S.filled_targets(bins, key)
        assert len(set(ts)) == 9 and ts == sorted(ts) and set(S.score_spaced_targets(bins, key)) <= set(ts)
    assert S.targets_from_bins("filled", bins, "s") == S.filled_targets(bins, "s")
    flat = RewardBins(8, {"f": [0.5] * 9})  # one training value: the sweep still spans 0 -> 1
    assert S.filled_targets(flat, "f", n=3) == pytest.approx([0.0, 0.5, 1.0])
    # Spread ties: the expected values of the three scores (binning tests) plus the ends 0 and 1.
    spread = RewardBins(8, {"d": [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]}, ties="spread")
    assert S.filled_targets(spread, "d", n=3) == pytest.approx([0.0, 1 / 21, 2 / 7, 23.5 / 31.5, 1.0], abs=1e-6)


def test_targets_from_bins_names_the_grid_and_needs_bins():
    from miro.rewards.binning import RewardBins

    # A skewed reward, where the two grids differ: by score only 0 and 1, trained all 8 values i/7.
    bins = RewardBins(8, {"c": [0.0, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]})
    assert S.targets_from_bins("score", bins, "c") == pytest.approx([0.0, 1.0])
    assert S.targets_from_bins("trained", bins, "c") == pytest.approx([i / 7 for i in range(8)])
    with pytest.raises(ValueError, match="unknown target grid 'grid'; choose from"):
        S.targets_from_bins("grid", bins, "c")
    with pytest.raises(ValueError, match="need the model's reward_bins.json"):
        S.targets_from_bins("score", None, "c")
