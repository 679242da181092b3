"""``miro generate``: files written, same pixels as the pipeline, flags, errors, built-ins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from miro import generate_cli
from miro.cli import main as miro_main
from miro.encoders.tiny import tiny_pipeline
from miro.pipeline import MiroPipeline


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny_pipeline(root / "enc", text="bert").save_pretrained(root / "pipe")


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        miro_main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--variant", "--reward", "--negative-reward", "--steps", "--cfg", "--reward-cfg",
                 "--reward-direction", "--n-samples", "--n", "--seed", "--outdir", "--out"):
        assert flag in out


def test_writes_pngs_and_grid_matching_pipeline(pipe_dir, tmp_path):
    out = tmp_path / "out"
    rc = generate_cli.main(["a red circle", "--model", str(pipe_dir), "--n", "3", "--steps", "2",
                            "--seed", "5", "--out", str(out), "--reward", "clip_score=0.5",
                            "--negative-reward", "vqa_score=0.25", "--reward-cfg", "11", "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png", "grid.png"]
    pipe = MiroPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red circle", reward_targets={"clip_score": 0.5},
               negative_reward_targets={"vqa_score": 0.25}, num_inference_steps=2, reward_guidance_scale=11.0,
               num_images_per_prompt=3, generator=torch.Generator().manual_seed(5), output_type="np")
    for j in range(3):
        assert np.array_equal(np.asarray(Image.open(out / f"{j:03d}.png")), ref[j])
    # 8 px images are upscaled x32 (nearest) into a 2x2 grid of 256 px tiles.
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (512, 512, 3)
    assert np.array_equal(grid[:256:32, 256::32], ref[1])
    assert (grid[256:, 256:] == 255).all()  # the empty fourth cell stays white


def test_per_reward_cfg_matches_the_pipeline(pipe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate_cli.main(["a red circle", "--model", str(pipe_dir), "--n", "2", "--steps", "2", "--seed", "5",
                              "--out", str(out), "--reward-cfg", "clip_score=11, vqa_score=0", "--device", "cpu"]) == 0
    pipe = MiroPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red circle", num_inference_steps=2, reward_guidance_scale={"clip_score": 11.0, "vqa_score": 0.0},
               num_images_per_prompt=2, generator=torch.Generator().manual_seed(5), output_type="np")
    for j in range(2):
        assert np.array_equal(np.asarray(Image.open(out / f"{j:03d}.png")), ref[j])
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["a red circle", "--model", str(pipe_dir), "--reward-cfg", "strong"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'strong': expected a number (e.g. 7.5) or KEY=SCALE pairs" in err


def test_negative_prompt_flag_matches_the_pipeline(pipe_dir, tmp_path):
    out = tmp_path / "out"
    assert generate_cli.main(["a red circle", "--model", str(pipe_dir), "--n", "1", "--steps", "2", "--seed", "5",
                              "--out", str(out), "--negative-prompt", "a blue square", "--device", "cpu"]) == 0
    pipe = MiroPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="np")
    ref = pipe("a red circle", negative_prompt="a blue square", **kw)
    assert np.array_equal(np.asarray(Image.open(out / "000.png")), ref[0])


def test_aliases_and_defaults(pipe_dir, tmp_path):
    rc = generate_cli.main(["a red circle", "--model", str(pipe_dir), "--n-samples", "1",
                            "--steps", "1", "--outdir", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 0 and (tmp_path / "o" / "000.png").is_file()
    args = generate_cli.build_parser().parse_args(["p"])
    assert (args.model, args.steps, args.cfg, args.seed) == ("shapes", 50, 7.0, 0)


@pytest.mark.parametrize("argv,match", [
    (["--reward", "nope=1"], r"\['nope'\]"),
    (["--reward", "clip_score=2"], r"clip_score.*2\.0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--n", "0"], "--n-samples must be >= 1"),
    (["--reward-cfg", "-3"], r"reward_guidance_scale.*got -3\.0"),
    (["--reward-cfg", "nope=3"], r"unknown reward keys \['nope'\]"),
    (["--reward-cfg", "clip_score=-1"], r"reward_guidance_scale\['clip_score'\] = -1\.0"),
    (["--variant", "missing"], "'missing' not found"),
])
def test_bad_values_exit_2_with_message(pipe_dir, tmp_path, capsys, argv, match):
    rc = generate_cli.main(["a red circle", "--model", str(pipe_dir), "--steps", "1",
                            "--out", str(tmp_path / "o"), "--device", "cpu", *argv])
    assert rc == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_malformed_reward_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["p", "--reward", "clip_score"])
    assert e.value.code == 2 and "key=value" in capsys.readouterr().err


def test_lightning_checkpoint_is_converted_in_memory(tmp_path, capsys):
    """A checkpoint in the layout ``miro train`` writes (EMA weights under ``ema.ema_<decay>.``,
    the pipeline config in the hyper-parameters) generates like the exported pipeline."""
    pipe = tiny_pipeline(tmp_path / "enc", text="bert", seed=3)
    state = {f"ema.ema_0_9999.{k}": v for k, v in pipe.model.state_dict().items()}
    state["uncond_embedding"] = pipe.uncond_embedding.clone()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": pipe.config, "ema_decays": [0.9999]}}, ckpt)
    rc = generate_cli.main(["a red circle", "--model", str(ckpt), "--n", "2", "--steps", "2",
                            "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 0
    ref = pipe("a red circle", num_inference_steps=2, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    for j in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / f"{j:03d}.png")), ref[j])
    # --dtype reaches the in-memory pipeline by name (a TypeError from torch's parser before)
    rc = generate_cli.main(["a red circle", "--model", str(ckpt), "--n", "1", "--steps", "2",
                            "--out", str(tmp_path / "o32"), "--device", "cpu", "--dtype", "float32"])
    assert rc == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "o32" / "000.png")), ref[0])


def test_unreachable_repo_exits_1_with_message(tmp_path, capsys):
    rc = generate_cli.main(["p", "--model", "nobody/no-such-miro", "--out", str(tmp_path)])
    assert rc == 1 and "could not fetch pipeline 'nobody/no-such-miro'" in capsys.readouterr().err


def test_missing_checkpoint_file(tmp_path, capsys):
    rc = generate_cli.main(["p", "--model", str(tmp_path / "nope.ckpt")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_default_model_falls_back_to_untrained_with_notice(monkeypatch, capsys):
    import miro.hub

    # as on an install without the trained model
    monkeypatch.setattr(miro.hub, "builtin_pipelines", lambda: ["shapes-untrained"])
    pipe = generate_cli.load_pipeline("shapes", device="cpu")
    assert "using 'shapes-untrained'" in capsys.readouterr().err
    assert pipe.source.endswith("shapes-untrained")


def test_untrained_builtin_is_the_seeded_shapes_init():
    from miro.models import MiroModel, get_config

    pipe = MiroPipeline.from_pretrained("shapes-untrained")
    cfg = get_config("shapes")
    assert {k: pipe.config[k] for k in cfg if k in pipe.config} == cfg, (
        "the shapes config changed: rerun benchmarks/make_untrained_shapes.py")
    ref = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(0))
    for k, v in ref.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v), k
    assert pipe.uncond_embedding.shape == (2, 384)  # MiniLM: [CLS] [SEP] of the empty prompt
    torch.testing.assert_close(pipe.uncond_embedding, pipe.text_encoder.uncond_embedding())
