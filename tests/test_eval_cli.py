"""End to end through `miro eval ...` with a tiny real MiroPipeline saved in the published layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miro.eval import cli
from miro.eval.folder import read_jsonl


@pytest.fixture(scope="module")
def shapes_pipeline_dir(tmp_path_factory):
    """The `shapes` config (32 px pixels, shapes_* rewards) shrunk, with a tiny BERT text encoder."""
    import torch

    from miro.encoders.text import load_text_encoder
    from miro.encoders.tiny import save_tiny_bert
    from miro.models import MiroModel, get_config
    from miro.pipeline import MiroPipeline

    root = tmp_path_factory.mktemp("pipe")
    cfg = get_config("shapes")
    small = dict(data_dim=32, latents_dim=32, num_latents=8, num_blocks=1, num_processing_layers=1,
                 read_write_heads=2, compute_heads=2, latent_mlp_multiplier=2, data_mlp_multiplier=2,
                 num_text_registers=2, label_dim=24)
    cfg["network"].update(small)
    cfg["preconditioning"].update(num_latents=8, latents_dim=32, logvar_channels=16)
    cfg["text_encoder"] = str(save_tiny_bert(root / "text"))
    model = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(0))
    enc = load_text_encoder(cfg["text_encoder"], max_length=int(cfg["max_text_len"]))
    MiroPipeline(model, enc, cfg["autoencoder"], cfg, enc.uncond_embedding()).save_pretrained(root / "shapes-tiny")
    return root / "shapes-tiny"


def _last(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_every_subcommand_has_help(capsys):
    for sub in ("generate", "geneval", "rewards", "summary", "best-of-n", "sweep", "judge", "report", "all"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert "usage: miro eval " + sub in capsys.readouterr().out


def test_default_outdir_for_checkpoints():
    assert cli.default_outdir("/runs/exp/checkpoints/last.ckpt", None) == Path("/runs/exp/checkpoints/geneval_images/last")
    assert cli.default_outdir("nicolas-dufour/miro-ablations", "miro-no-clip") == Path(
        "eval-runs/nicolas-dufour--miro-ablations--miro-no-clip")


def test_all_then_best_of_n_on_a_tiny_shapes_pipeline(shapes_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["all", "--model", str(shapes_pipeline_dir), "--prompts", "shapes", "--limit", "3", "--n-samples", "2",
            "--steps", "2", "--batch-size", "4", "--outdir", str(out), "--scorers", "shapes_contrast,shapes_sharpness"]
    assert cli.main(argv) == 0
    last = _last(capsys)
    assert last.startswith("overall: ") and 0.0 <= float(last.split()[1]) <= 1.0
    assert len(list(out.glob("0000[0-2]/samples/000[01].png"))) == 6
    res = read_jsonl(out / "results.jsonl")
    assert len(res) == 6
    summ = json.loads((out / "geneval_summary.json").read_text())
    assert summ["benchmark"] == "ShapesEval" and summ["overall"] == pytest.approx(float(last.split()[1]), abs=1e-5)
    assert set(json.loads((out / "rewards_summary.json").read_text())["rewards"]) == {"shapes_contrast", "shapes_sharpness"}
    assert (out / "report" / "report.md").is_file() and (out / "report" / "samples.png").is_file()
    # rerun: everything is resumed, nothing regenerated or rescored
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "report" not in p.parts}
    assert cli.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(read_jsonl(out / "rewards.jsonl")) == 6
    # best-of-N over the 2 candidates, and the best-candidate folder scored again
    assert cli.main(["best-of-n", str(out), "--select-by", "shapes_contrast", "--metrics", "shapes_contrast,shapes_sharpness",
                     "--outdir", str(tmp_path / "best")]) == 0
    curve = json.loads((out / "best_of_n_curve.json").read_text())
    assert curve["n"] == [1, 2] and curve["values"]["shapes_contrast"][1] >= curve["values"]["shapes_contrast"][0]
    assert cli.main(["geneval", str(tmp_path / "best"), "--detector", "shapes"]) == 0
    assert _last(capsys).startswith("overall: ")
    assert len(read_jsonl(tmp_path / "best" / "results.jsonl")) == 3
    # a second result file (other options, another scorer set) keeps its summary beside it: the
    # default files' summaries, which the report shows, stay as they were
    before = {f: (out / f).read_bytes() for f in ("geneval_summary.json", "rewards_summary.json")}
    assert cli.main(["geneval", str(out), "--outfile", str(out / "strict.jsonl"), "--options", "threshold=0.99"]) == 0
    assert json.loads((out / "strict_summary.json").read_text())["settings"]["options"]["threshold"] == 0.99
    assert cli.main(["rewards", str(out), "--outfile", str(out / "contrast.jsonl"), "--scorers", "shapes_contrast"]) == 0
    assert set(json.loads((out / "contrast_summary.json").read_text())["rewards"]) == {"shapes_contrast"}
    assert {f: (out / f).read_bytes() for f in before} == before


def test_sweep_command(shapes_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", str(shapes_pipeline_dir), "--prompts", "shapes", "--limit", "2", "--n", "1",
                     "--steps", "2", "--reward-key", "shapes_contrast", "--targets", "0,1", "--scorers", "shapes_contrast",
                     "--outdir", str(out), "--geneval"]) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert res["targets"] == [0.0, 1.0] and len(res["per_target"]) == 2
    # GenEval-style per target with the Shapes detector (auto for shapes prompts)
    per = [json.loads((out / f"target_{t:.4f}" / "geneval_summary.json").read_text()) for t in (0.0, 1.0)]
    assert [r["geneval_overall"] for r in res["per_target"]] == [p["overall"] for p in per]
    assert per[0]["benchmark"] == "ShapesEval" and "spearman_geneval" in res
    assert (out / "target_0.0000" / "00001" / "samples" / "0000.png").is_file() and (out / "sweep.png").is_file()
    assert "spearman=" in capsys.readouterr().out
    assert cli.main(["sweep", "--model", str(shapes_pipeline_dir), "--prompts", "shapes", "--reward-key", "shapes_contrast",
                     "--targets", "0,2", "--outdir", str(out)]) == 2


def test_sweep_targets_from_the_model_bins(shapes_pipeline_dir, tmp_path):
    import shutil

    from miro.eval.sweep import score_spaced_targets
    from miro.rewards.binning import RewardBins

    args = ["sweep", "--prompts", "shapes", "--limit", "1", "--n", "1", "--steps", "1", "--reward-key",
            "shapes_contrast", "--scorers", "shapes_contrast", "--targets", "score"]
    # Without reward_bins.json: a clear error, nothing generated.
    assert cli.main(args + ["--model", str(shapes_pipeline_dir), "--outdir", str(tmp_path / "none")]) == 2
    model = tmp_path / "binned"
    shutil.copytree(shapes_pipeline_dir, model)
    bins = RewardBins(4, {"shapes_contrast": [0.0, 0.9, 0.95, 0.99, 1.0]})
    (model / "reward_bins.json").write_text(json.dumps(bins.to_dict()))
    assert cli.main(args + ["--model", str(model), "--outdir", str(tmp_path / "s")]) == 0
    res = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert res["targets"] == score_spaced_targets(bins, "shapes_contrast") == [0.0, 1.0]
    # filled: the same two, topped up to nine by halving the widest gaps
    filled = args[:-1] + ["filled", "--model", str(model), "--outdir", str(tmp_path / "f")]
    assert cli.main(filled) == 0
    assert json.loads((tmp_path / "f" / "sweep.json").read_text())["targets"] == pytest.approx([i / 8 for i in range(9)])


def test_all_on_cure_prompts_reports_mia_deltas(shapes_pipeline_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "cure"
    assert cli.main(["all", "--model", str(shapes_pipeline_dir), "--prompts", "cure", "--cure-dir", str(shared_data / "cure"),
                     "--limit", "6", "--n", "1", "--steps", "1", "--outdir", str(out),
                     "--scorers", "shapes_contrast"]) == 0
    assert "GenEval-style scoring skipped" in capsys.readouterr().out
    metas = [json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) for i in range(6)]
    assert [m["mia_variant"] for m in metas[:3]] == ["item", "item+category", "item+category+region"]
    assert metas[2]["prompt"] == f"An image of {metas[2]['item']}. {metas[2]['category'].replace('_', ' ')}, {metas[2]['region']}"
    summ = json.loads((out / "rewards_summary.json").read_text())
    assert set(summ["mia_deltas"]["shapes_contrast"]) == {"item+category", "item+category+region"}
    assert summ["mia_deltas"]["shapes_contrast"]["item+category"]["n"] == 2
    assert "item+category - item" in (out / "report" / "report.md").read_text()


def test_ground_truth_renders_score_at_the_shapes_eval_ceiling(tmp_path, capsys):
    out = tmp_path / "gt"
    assert cli.main(["all", "--model", "ground-truth", "--prompts", "shapes", "--limit", "12", "--n", "1",
                     "--outdir", str(out)]) == 0
    assert float(_last(capsys).split()[1]) >= 0.98
    rewards = json.loads((out / "rewards_summary.json").read_text())["rewards"]
    assert rewards and all(k.startswith("shapes_") for k in rewards)  # auto scorers: the Shapes rewards


def test_generate_command_with_a_prompt_file(shapes_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    argv = ["generate", "--model", str(shapes_pipeline_dir), "--prompts", str(prompts), "--n", "2", "--steps", "1",
            "--reward", "shapes_contrast=0.5", "--out", str(tmp_path / "g")]
    assert cli.main(argv) == 0
    assert "4 images generated, 0 already present" in capsys.readouterr().out
    run = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert run["config"]["reward_targets"] == {"shapes_contrast": 0.5} and run["prompts"] == str(prompts)
    assert cli.main(argv) == 0 and "0 images generated, 4 already present" in capsys.readouterr().out
    assert cli.main(argv[:-2] + ["--reward", "shapes_nope=0.5", "--out", str(tmp_path / "h")]) == 2
    assert "shapes_nope" in capsys.readouterr().err


def test_all_on_geneval_prompts_with_tiny_detector_and_clip(shapes_pipeline_dir, shared_data, tmp_path, monkeypatch, capsys):
    from _eval_tiny import save_tiny_clip, save_tiny_mask2former

    monkeypatch.setenv("MIRO_DATA_DIR", str(shared_data))
    m2f, clip = save_tiny_mask2former(tmp_path / "m2f"), save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "ge"
    assert cli.main(["all", "--model", str(shapes_pipeline_dir), "--prompts", "geneval", "--limit", "4", "--n", "1",
                     "--steps", "1", "--outdir", str(out), "--detector", str(m2f), "--clip-model", str(clip),
                     "--options", "threshold=0", "counting_threshold=0", "--local-files-only",
                     "--scorers", "shapes_contrast"]) == 0
    summ = json.loads((out / "geneval_summary.json").read_text())
    assert summ["benchmark"] == "GenEval-like" and summ["backends"]["detector"] == str(m2f)
    assert summ["images"] == 4 and _last(capsys) == f"overall: {summ['overall']:.5f}"
    assert "GenEval-like" in (out / "report" / "report.md").read_text()


def test_all_ends_with_overall_without_geneval_scoring_and_survives_an_unreadable_image(tmp_path, capsys):
    """Prompts without GenEval metadata (a .txt file) or --skip-geneval: the last line is the rewards'
    overall. An unreadable image is skipped and counted by every step, the report included."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    for name, extra in (("txt", ["--prompts", str(prompts)]), ("skip", ["--prompts", "shapes", "--limit", "2",
                                                                        "--skip-geneval"])):
        out = tmp_path / name
        argv = ["all", "--model", "ground-truth", "--n", "2", "--outdir", str(out), *extra]
        assert cli.main(argv) == 0
        text = capsys.readouterr().out
        assert ("--skip-geneval" in text) == (name == "skip") and not (out / "results.jsonl").exists()
        overall = json.loads((out / "rewards_summary.json").read_text())["overall"]
        assert 0.0 <= overall <= 1.0 and text.strip().splitlines()[-1] == f"overall: {overall:.5f}"
    # damage inside the file: a cut or empty PNG would be generated again by the generate step
    png = out / "00001" / "samples" / "0001.png"
    data = png.read_bytes()
    png.write_bytes(data[:40] + bytes(len(data) - 80) + data[-40:])
    (out / "rewards.jsonl").unlink()
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "3 images scored, 0 already scored, 1 unreadable" in lines and lines[-1].startswith("overall: ")
    assert "1 unreadable image(s) shown as crossed grey cells" in (out / "report" / "report.md").read_text()


def test_local_files_only_keeps_the_whole_command_offline(tmp_path, monkeypatch, capsys):
    """Not only the GenEval models: the prompt file is not downloaded, the reward models are loaded
    from the cache, and the hub libraries (imported later) see HF_HUB_OFFLINE."""
    import os
    import urllib.request

    from miro import rewards

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test (the command sets it)
    monkeypatch.setenv("MIRO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MIRO_DATA_DIR", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("the network was used"))
    argv = ["all", "--model", "ground-truth", "--prompts", "geneval", "--outdir", str(tmp_path / "o"), "--local-files-only"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "geneval/evaluation_metadata.jsonl is not in $MIRO_DATA_DIR" in err and "this run is offline" in err
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    seen = {}
    monkeypatch.setattr(rewards, "load_scorer", lambda n, **kw: seen.setdefault(n, kw))
    args = cli.build_parser().parse_args(["rewards", str(tmp_path), "--scorers", "shapes_contrast"])
    args.local_files_only, args.device = True, None
    cli._load_scorers(["shapes_contrast"], args)
    assert seen == {"shapes_contrast": {"local_files_only": True}}
