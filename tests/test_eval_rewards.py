"""`miro eval rewards` / `summary`: resumable scoring, corrupt images, summary arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from miro.eval import rewards as R
from miro.eval.folder import JsonlAppender, read_jsonl
from miro.rewards.base import Scorer, images_to_tensor


class MeanScorer(Scorer):
    """Raw score = 10 x mean pixel value (closed form); normalised = raw / 10."""

    keys = ("mean_score",)

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        return 10 * images_to_tensor(images).mean(dim=(1, 2, 3))

    def normalize(self, raw):
        return raw / 10


class LenScorer(Scorer):
    keys = ("len_score",)

    def score(self, images, prompts):
        return torch.tensor([float(len(p)) for p in prompts])


def make_folder(root, values, tags=("a", "b"), prompt=None):
    """values[i][j]: grey level of sample j of prompt i."""
    for i, row in enumerate(values):
        d = root / f"{i:05d}"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps({"prompt": prompt or "p" * (i + 1), "tag": tags[i % len(tags)]}) + "\n")
        for j, v in enumerate(row):
            Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(d / "samples" / f"{j:04d}.png")
    return root


def test_scores_summary_arithmetic_and_resume(tmp_path):
    vals = [[0, 51], [102, 153], [204, 255]]
    root = make_folder(tmp_path / "imgs", vals)
    out = root / "rewards.jsonl"
    sc = MeanScorer()
    counts = R.score_folder(root, {"mean": sc}, out, batch_size=4, progress=False)
    assert counts["scored"] == 6 and counts["corrupt"] == 0
    recs = read_jsonl(out)
    assert {r["filename"] for r in recs} == {f"{i:05d}/samples/{j:04d}.png" for i in range(3) for j in range(2)}
    for r in recs:
        assert r["mean"] == pytest.approx(10 * vals[r["index"]][r["sample"]] / 255, abs=1e-5)
        assert r["mean_normalized"] == pytest.approx(r["mean"] / 10, abs=1e-6)
    s = R.summarize_file(out)
    flat = np.array([10 * v / 255 for row in vals for v in row])
    st = s["rewards"]["mean"]
    assert st["n"] == 6 and st["mean"] == pytest.approx(flat.mean()) and st["std"] == pytest.approx(flat.std())
    assert st["sem"] == pytest.approx(flat.std(ddof=1) / np.sqrt(6))
    a = np.array([10 * v / 255 for v in vals[0] + vals[2]])
    assert st["by_tag"]["a"]["mean"] == pytest.approx(a.mean()) and st["by_tag"]["b"]["n"] == 2
    assert s["overall"] == pytest.approx(flat.mean() / 10)
    assert json.loads((root / "rewards_summary.json").read_text())["rewards"]["mean"]["n"] == 6
    # rerun: nothing to do; adding a scorer appends only its column
    sc2 = MeanScorer()
    assert R.score_folder(root, {"mean": sc2}, out, progress=False)["scored"] == 0 and sc2.calls == 0
    R.score_folder(root, {"mean": sc2, "len": LenScorer()}, out, progress=False)
    assert sc2.calls == 0
    merged = R.merge_records(read_jsonl(out))
    assert all(r["len"] == r["index"] + 1 and "mean" in r for r in merged.values())
    assert R.summarize(read_jsonl(out))["n_images"] == 6


def test_corrupt_images_are_skipped_and_counted_and_torn_lines_dropped(tmp_path):
    root = make_folder(tmp_path / "imgs", [[10, 20], [30]])
    (root / "00000" / "samples" / "0001.png").write_bytes(b"\x89PNG not really")
    out = root / "rewards.jsonl"
    counts = R.score_folder(root, {"mean": MeanScorer()}, out, progress=False)
    assert counts["corrupt"] == 1 and counts["scored"] == 2
    assert counts["corrupt_files"] == ["00000/samples/0001.png"]
    # a killed writer leaves a torn last line: it is ignored and then overwritten cleanly
    with open(out, "a") as f:
        f.write('{"filename": "00001/samp')
    with pytest.warns(UserWarning, match=r"rewards.jsonl:3: the last line is cut .* scored again"):
        assert len(read_jsonl(out)) == 2  # said, not silent: a summary read now lacks that image
    with pytest.warns(UserWarning, match="the last line is cut"), JsonlAppender(out) as w:  # dropped from the file
        w.write({"filename": "x", "mean": 1.0})
    assert [r["filename"] for r in read_jsonl(out)][-1] == "x" and len(read_jsonl(out)) == 3
    # a corrupt line in the middle is an error, not silently skipped
    out.write_text('{"filename": "a"}\n{broken\n{"filename": "b"}\n')
    with pytest.raises(ValueError, match="corrupt JSON line"):
        read_jsonl(out)


def test_summary_command_prints_overall_last(tmp_path, capsys):
    from miro.eval.cli import main

    root = make_folder(tmp_path / "imgs", [[0, 255]])
    R.score_folder(root, {"mean": MeanScorer()}, root / "rewards.jsonl", progress=False)
    assert main(["summary", str(root / "rewards.jsonl")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "overall: 0.50000"
    assert main(["summary", str(tmp_path / "missing.jsonl")]) == 2


def test_a_jsonl_without_filenames_is_one_line_naming_the_file_and_field(tmp_path, capsys):
    from miro.eval.cli import main

    bad = tmp_path / "scores.jsonl"
    bad.write_text('{"mean": 0.5}\n')
    for argv in (["summary", str(bad)], ["best-of-n", str(tmp_path), "--rewards", str(bad), "--select-by", "mean"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{bad}: JSON line 1 has no 'filename' field" in err, err


def test_real_shapes_scorers_through_the_cli(tmp_path, capsys):
    from miro.eval.cli import main
    from miro.rewards import available

    names = [n for n in available() if n.startswith("shapes_")]
    assert names == ["shapes_alignment", "shapes_contrast", "shapes_counting", "shapes_position", "shapes_sharpness"]
    root = make_folder(tmp_path / "imgs", [[120, 130]], prompt="a red circle")
    assert main(["rewards", str(root), "--scorers", ",".join(names[:2])]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("overall: ") and 0.0 <= float(out[-1].split()[1]) <= 1.0
    recs = R.merge_records(read_jsonl(root / "rewards.jsonl"))
    assert all(n in r for r in recs.values() for n in names[:2])


def test_auto_scorers_follow_the_models_reward_keys(tmp_path):
    from miro import REWARD_KEYS
    from miro.rewards import available

    def run(keys, model, prompts="geneval"):
        (tmp_path / "generation.json").write_text(json.dumps({"config": {"model": model}, "reward_keys": keys,
                                                              "prompts": prompts}))
        return R.default_scorers(tmp_path)

    shapes = [n for n in available() if n.startswith("shapes_")]
    assert run(["shapes_alignment", "shapes_contrast"], "/ckpts/run3/last.ckpt") == shapes
    assert set(run(list(REWARD_KEYS), "nicolas-dufour/miro")) <= set(REWARD_KEYS)
    assert run(None, "shapes") == shapes  # older folders: the name decides
    assert run(None, "ground-truth", "shapes") == shapes
    assert set(run(None, "my/model")) <= set(REWARD_KEYS)


def test_cure_mia_deltas_are_paired_by_item_and_sample(tmp_path):
    recs = []
    for k, (item, base) in enumerate([("Panta Bhat", 1.0), ("Bredele", 3.0)]):
        for v, add in (("item", 0.0), ("item+category", 0.5), ("item+category+region", -1.0)):
            for j in range(2):
                recs.append({"filename": f"{k}{v}{j}", "index": k, "sample": j, "tag": v, "prompt": "p", "item": item,
                             "r": base + add + 0.1 * j})
    s = R.summarize(recs)
    d = s["mia_deltas"]["r"]
    assert d["item+category"]["mean"] == pytest.approx(0.5) and d["item+category"]["std"] == pytest.approx(0.0)
    assert d["item+category+region"]["mean"] == pytest.approx(-1.0) and d["item+category+region"]["n"] == 4
    assert "mia_deltas" not in R.summarize([{**r, "item": None} for r in recs if r["tag"] != "item"])


def test_a_shapes_model_is_known_by_its_reward_keys_not_its_name(tmp_path):
    import shutil
    from types import SimpleNamespace

    from miro.eval.cli import _detector_name, _items
    from miro.eval.generate import model_reward_keys
    from miro.hub import BUILTIN_DIR

    folder = tmp_path / "mymodel"  # a converted Shapes pipeline whose path does not say so
    shutil.copytree(BUILTIN_DIR / "shapes", folder)
    keys = model_reward_keys(str(folder))
    assert keys and all(k.startswith("shapes_") for k in keys)
    assert all(n.startswith("shapes_") for n in R.default_scorers(None, str(folder)))
    args = SimpleNamespace(model=str(folder), variant=None, prompts=None, cure_dir=None, cure_variants="", limit=2,
                           detector="auto")
    assert _items(args)[0] == "shapes" and _detector_name(args, None) == "shapes"
    run = tmp_path / "run3"  # a training run's checkpoint: the reward bins beside it say which world
    run.mkdir()
    (run / "reward_bins.json").write_text(json.dumps({"num_bins": 4, "edges": {"shapes_counting": [0, 1]}}))
    (run / "last.ckpt").write_bytes(b"")  # only its bins are read here (a missing one is refused by name)
    assert model_reward_keys(str(run / "last.ckpt")) == ["shapes_counting"]
    assert _items(SimpleNamespace(**{**vars(args), "model": str(run / "last.ckpt")}))[0] == "shapes"
    # unknown keys (a hub id, no bins) fall back to the name; a bad path is left to the loader
    assert model_reward_keys("owner/model") is None and model_reward_keys(str(tmp_path / "none.ckpt")) is None
    assert _detector_name(SimpleNamespace(**{**vars(args), "model": "owner/model"}), None) != "shapes"


def test_scorer_kwargs_and_the_remote_code_opt_in(tmp_path, capsys):
    from miro.eval.cli import main
    from miro.rewards import scorer_kwargs_from_cli

    names = ["clip_score", "shapes_counting"]
    assert scorer_kwargs_from_cli("{}", names) == {}  # remote code stays off unless asked for
    # the flag reaches only the factories that take it, beside what --scorer-kwargs says
    got = scorer_kwargs_from_cli('{"clip_score": {"model": "/w/jina"}}', names, trust_remote_code=True)
    assert got == {"clip_score": {"model": "/w/jina", "trust_remote_code": True}}
    with pytest.raises(ValueError, match="not valid JSON"):
        scorer_kwargs_from_cli("{clip", names)
    with pytest.raises(ValueError, match=r"names \['hpsv2_score'\], which are not among"):
        scorer_kwargs_from_cli('{"hpsv2_score": {}}', names)
    with pytest.raises(ValueError, match="must map reward names to objects"):
        scorer_kwargs_from_cli('{"clip_score": 1}', names)
    # the CLI: without the flag, jina-clip-v2 is refused with the flag to use, before any download
    root = make_folder(tmp_path / "imgs", [[120, 130]], prompt="a red circle")
    assert main(["rewards", str(root), "--scorers", "clip_score"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    # a misspelt scorer is named, with the list, and `all` says so before generating anything
    assert main(["rewards", str(root), "--scorers", "shapes_countin"]) == 2
    assert "shapes_countin: not a registered reward" in capsys.readouterr().err
    out = tmp_path / "all"
    assert main(["all", "--model", "ground-truth", "--prompts", "shapes", "--limit", "1", "--n", "1",
                 "--scorers", "nosuch", "--outdir", str(out)]) == 2
    assert "nosuch" in capsys.readouterr().err and not any(out.rglob("*.png"))


def test_missing_folders_and_prompts_without_geneval_metadata_are_named(tmp_path, capsys):
    from miro.eval.cli import main

    for argv in (["geneval", str(tmp_path / "nowhere")], ["rewards", str(tmp_path / "nowhere")],
                 ["summary", str(tmp_path / "nowhere.jsonl")]):
        assert main(argv) == 2  # before any detector or reward model loads
        assert "nowhere" in capsys.readouterr().err
    root = make_folder(tmp_path / "parti", [[120]], prompt="a castle at dusk")  # PartiPrompts-like: no objects
    assert main(["geneval", str(root), "--detector", "shapes"]) == 2
    assert "GenEval-format prompts" in capsys.readouterr().err


class VersionedScorer(MeanScorer):
    """A scorer that comes in versions (as HPS v2.0 / v2.1): the version scales the score."""

    def __init__(self, version):
        super().__init__()
        self.version = version

    def score(self, images, prompts):
        return super().score(images, prompts) * (2.0 if self.version == "v2.0" else 1.0)


def test_scorer_versions_are_recorded_and_another_version_rescores(tmp_path):
    root = make_folder(tmp_path / "imgs", [[0, 255]])
    out = root / "rewards.jsonl"
    R.score_folder(root, {"hps": VersionedScorer("v2.1"), "mean": MeanScorer()}, out, progress=False)
    assert {r["hps_version"] for r in read_jsonl(out)} == {"v2.1"}
    assert read_jsonl(out)[0]["mean_version"] is None  # the default scorer: no label
    s = R.summarize(read_jsonl(out))
    assert s["rewards"]["hps"]["version"] == "v2.1" and "version" not in s["rewards"]["mean"]
    assert s["rewards"]["hps"]["mean"] == pytest.approx(5.0)
    # the same version resumes (nothing to do); another version rescores that scorer only
    v20 = VersionedScorer("v2.0")
    assert R.score_folder(root, {"hps": VersionedScorer("v2.1")}, out, progress=False)["scored"] == 0
    counts = R.score_folder(root, {"hps": v20, "mean": MeanScorer()}, out, progress=False)
    assert counts["scored"] == 2 and v20.calls == 1
    s = R.summarize(read_jsonl(out))
    assert s["rewards"]["hps"]["version"] == "v2.0" and s["rewards"]["hps"]["mean"] == pytest.approx(10.0)
    assert "hps (v2.0)" in R.format_summary(s)


class ScaledScorer(MeanScorer):
    """A model-backed scorer stand-in: ``scale`` plays the part of another model or checkpoint."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def score(self, images, prompts):
        return super().score(images, prompts) * self.scale


def test_a_scorer_built_with_other_weights_rescores_instead_of_mixing_columns(tmp_path, monkeypatch):
    # clip_score on model A, then on model B: B's scores must not join A's in one column
    from miro import rewards

    rewards._populate()

    def scaled(scale: float = 1.0, *, device=None, batch_size: int = 32):
        return ScaledScorer(scale)

    monkeypatch.setitem(rewards.REGISTRY, "scaled", scaled)
    assert getattr(rewards.load_scorer("scaled"), "version", None) is None  # the default keeps no label
    assert getattr(rewards.load_scorer("scaled", scale=1.0, batch_size=4, device="cpu"), "version", None) is None
    assert rewards.load_scorer("scaled", scale=2.0).version == "scale=2.0"
    root = make_folder(tmp_path / "imgs", [[0, 255]])
    out = root / "rewards.jsonl"
    R.score_folder(root, {"s": rewards.load_scorer("scaled")}, out, progress=False)
    other = rewards.load_scorer("scaled", scale=2.0)
    assert R.score_folder(root, {"s": other}, out, progress=False)["scored"] == 2 and other.calls == 1
    assert sorted(R.merge_records(read_jsonl(out))[f]["s"] for f in ("00000/samples/0000.png",
                                                                     "00000/samples/0001.png")) == [0.0, 20.0]
    assert R.summarize(read_jsonl(out))["rewards"]["s"]["version"] == "scale=2.0"
    again = rewards.load_scorer("scaled", scale=2.0, batch_size=8)  # run-only settings: nothing to redo
    assert R.score_folder(root, {"s": again}, out, progress=False)["scored"] == 0
    # back to the default: rescored once, then resumed, and the summary drops the other model's label
    default = rewards.load_scorer("scaled")
    assert R.score_folder(root, {"s": default}, out, progress=False)["scored"] == 2
    assert R.score_folder(root, {"s": default}, out, progress=False)["scored"] == 0
    assert "version" not in R.summarize(read_jsonl(out))["rewards"]["s"]
    lines = read_jsonl(out)  # one image back on the other model: the column is labelled mixed
    (out).write_text("".join(json.dumps(r) + "\n" for r in lines + [{**lines[-1], "s_version": "scale=2.0"}]))
    assert R.summarize(read_jsonl(out))["rewards"]["s"]["version"] == "mixed"


def test_hps_label_names_a_checkpoint_given_instead_of_the_versions_own():
    from miro.rewards import load_scorer

    assert load_scorer("hpsv2_score").version == "v2.1"
    assert load_scorer("hpsv2_score", version="v2.0").version == "v2.0"
    assert load_scorer("hpsv2_score", version="v2.0", checkpoint="HPS_v2.1_compressed.pt").version == \
        "v2.0; checkpoint=HPS_v2.1_compressed.pt"


def test_a_reward_without_finite_values_summarises_as_a_dash(tmp_path, capsys):
    from miro.eval.cli import main

    recs = [{"filename": f"{i}.png", "index": i, "sample": 0, "tag": "t", "prompt": "p",
             "aesthetic_score": float("nan"), "aesthetic_score_normalized": float("nan")} for i in range(3)]
    path = tmp_path / "rewards.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["aesthetic_score", "0", "-", "-", "-"]
    assert out[-1].startswith("overall: - ")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", ', "line 1 is not JSON"),
    ('["a"]', "line 1 must be a JSON object"),
])
def test_a_malformed_metadata_line_names_its_file(tmp_path, capsys, line, message):
    from miro.eval.cli import main

    root = make_folder(tmp_path / "imgs", [[0]])
    (root / "00000" / "metadata.jsonl").write_text(line + "\n")
    assert main(["rewards", str(root), "--scorers", "shapes_sharpness"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and str(root / "00000" / "metadata.jsonl") in err and message in err, err


def test_a_prompt_folder_that_lost_its_metadata_is_named_not_dropped(tmp_path):
    """Its images cannot be scored without their prompt; skipping them would score fewer prompts."""
    from miro.eval.folder import read_folder

    root = make_folder(tmp_path / "imgs", [[0], [255], [9]])
    (root / "00003").mkdir()  # a folder without images or metadata (a run killed before it) is fine
    assert [e.index for e in read_folder(root)] == [0, 1, 2]
    (root / "00001" / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"00001 holds images but an empty metadata.jsonl"):
        read_folder(root)
    (root / "00001" / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match=r"00001 holds images but no metadata.jsonl"):
        R.score_folder(root, {"mean": MeanScorer()}, root / "rewards.jsonl", progress=False)
