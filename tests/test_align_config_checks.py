"""`miro align` config checks: one-line errors naming the key, found by --dry-run before any model loads."""

from __future__ import annotations

import pytest

from miro.align import cli
from miro.align.step import StepConfig
from miro.align.trainer import OptimConfig, TrainConfig


@pytest.mark.parametrize("override, needle", [
    ("target.dtype=float16", "target.dtype"),
    ("target.kind=bogus", "target.kind"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.batch_size=0", "train.batch_size"),
    ("+train.foo=1", "train.foo"),
    ("+optim.foo=1", "optim.foo"),
    ("+schedule.foo=1", "schedule.foo"),
    # Hydra suggests `+` for a misspelt key; the run then ignored it (float32 for `+target.dtyp=bfloat16`)
    ("+target.dtyp=bfloat16", "unknown key target.dtyp; allowed keys of target: kind, model, dtype,"),
    ("+lora.rnak=4", "unknown key lora.rnak; allowed keys of lora: enabled, rank,"),
    ("+data.limt=1", "unknown key data.limt"),
    ("+reward.kwarg.version=v2", "unknown key reward.kwarg"),
    ("+foo=1", "unknown key foo; allowed top-level keys: mode, denoise,"),
    ("loss=bogus", "hinge, maximize"),
    ("optim.name=sgd", "adamw, prodigy"),
    ("optim.lr=abc", "optim.lr"),
    ("discount_inv=[0.3]", "discount_inv"),
    ("schedule.train_timestep=[25,5]", "train_timestep"),
    ("inversion=maybe", "inversion must be true or false"),
    ("rollout_steps=0", "rollout_steps"),
    ("data.limit=0", "data.limit"),
    ("reward.logit_divisor=0", "reward.logit_divisor"),
    ("reward.logit_divisor=inf", "reward.logit_divisor"),
    ("reward.logit_divisor=nan", "reward.logit_divisor"),
    ("reward.similarity=dot", "reward.similarity"),
    # switches read any word as true before; numbers failed only after the model loaded, unnamed
    ("lora.enabled=off", "lora.enabled must be true or false; got 'off'"),
    ("prompts.control_words=off", "prompts.control_words must be true or false"),
    ("prompts.use_mia=maybe", "prompts.use_mia must be true or false"),
    ("target.decoder_checkpointing=no", "target.decoder_checkpointing must be true or false"),
    ("target.quantize_timestep=yes", "target.quantize_timestep must be true or false"),
    ("target.guidance_scale=abc", "target.guidance_scale must be a number; got 'abc'"),
    ("target.height=0", "target.height must be an integer >= 1; got 0"),
    ("schedule.shift=0", "schedule.shift must be > 0.0; got 0"),
    ("schedule.shift=abc", "schedule.shift must be a number"),
    ("schedule.timestep_length=abc", "schedule.timestep_length must be an integer >= 1"),
    ("schedule.groundtruth_ratio=abc", "schedule.groundtruth_ratio must be a number"),
    ("schedule.train_timestep=[5.5,25]", "schedule.train_timestep must be two grid indices"),
])
def test_dry_run_rejects_bad_values_in_one_line(override, needle, no_models, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    assert cli.main([f"data.prompts={tmp_path / 'p.txt'}", f"train.out_dir={out}", override, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("miro align: ") and needle in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("override, needle", [
    ("lora.rank=abc", "lora.rank must be an integer >= 1; got 'abc'"),
    ("lora.dropout=1", "lora.dropout must lie in [0, 1); got 1"),
    ("lora.alpha=0", "lora.alpha must be > 0.0"),
])
def test_lora_values_are_checked_when_lora_is_on(override, needle, no_models, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    argv = [f"data.prompts={tmp_path / 'p.txt'}", f"train.out_dir={tmp_path / 'out'}", "--dry-run"]
    assert cli.main([*argv, "lora.enabled=true", override]) == 2
    assert needle in capsys.readouterr().err
    cli.validate(cli.compose(argv[:2] + [override]))  # lora off: its values are not used


@pytest.mark.parametrize("experiment", cli.experiments())
def test_open_mappings_and_every_experiment_pass_the_key_check(experiment, tmp_path):
    # reward.kwargs and the reward targets hold the user's keys; the experiments set only known ones
    cfg = cli.compose([f"experiment={experiment}", "data.prompts=p.txt", "reward.path=proxy", "+reward.kwargs.anything=1",
                       "+target.reward_targets.hpsv2_score=0.9"])
    cli.check_keys(cfg)


def test_prodigy_without_its_package_is_named_before_any_model(no_models, tmp_path, capsys, monkeypatch):
    import importlib.util

    from miro import extras

    real = importlib.util.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    from miro.cli import main as miro

    (tmp_path / "p.txt").write_text("a red circle\n")
    assert miro(["align", f"data.prompts={tmp_path / 'p.txt'}", f"train.out_dir={tmp_path / 'out'}", "optim.name=prodigy",
                 "--dry-run"]) == 2
    assert "optim.name=prodigy needs the optional package 'prodigyopt': pip install 'miro[align]'" in capsys.readouterr().err


def test_shapes_proxy_with_plain_captions_fails_in_dry_run(no_models, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    argv = ["experiment=shapes_proxy", f"reward.path={tmp_path}", f"data.prompts={tmp_path / 'p.txt'}", f"train.out_dir={out}"]
    assert cli.main([*argv, "--dry-run"]) == 2
    assert "no reward prompts for item 'a red circle'" in capsys.readouterr().err
    assert cli.main(argv) == 2  # the real run fails the same way, before loading anything
    assert not out.exists()


@pytest.mark.parametrize("name", ["image_reward_score", "aesthetic_score", "vqa_score", "shapes_alignment"])
def test_non_embedding_rewards_fail_in_dry_run(name, no_models, tmp_path, capsys):
    # The base Scorer defines raising embed_text/embed_image stubs: these scorers passed a
    # callable() check and crashed at their first SRPO step.
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    assert cli.main([f"data.prompts={tmp_path / 'p.txt'}", f"train.out_dir={out}", f"reward.name={name}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"miro align: reward '{name}'") and "hpsv2_score, pick_a_score_score" in err and "\n" not in err
    assert not out.exists()


def test_embedding_rewards_are_exactly_the_usable_scorers():
    from miro.align.proxy_reward import ProxyRewardModel
    from miro.align.relative_reward import EMBEDDING_REWARDS, SemanticRelativeReward, check_embedding_scorer
    from miro.rewards import available, load_scorer

    kwargs = {"clip_score": {"model": "openai/clip-vit-large-patch14"}}  # built lazily: nothing is downloaded
    usable = {"shapes_proxy"}
    check_embedding_scorer(ProxyRewardModel.__new__(ProxyRewardModel), "shapes_proxy")  # a class check, no weights
    for name in available():
        scorer = load_scorer(name, **kwargs.get(name, {}))
        try:
            check_embedding_scorer(scorer, name)
            usable.add(name)
        except ValueError as e:
            assert name in str(e)
    assert usable == set(EMBEDDING_REWARDS)
    with pytest.raises(ValueError, match="'aesthetic_score' .*no embed_text"):
        SemanticRelativeReward(load_scorer("aesthetic_score"))


def test_offline_mode_without_images_fails_in_dry_run(no_models, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    assert cli.main([f"data.prompts={tmp_path / 'p.txt'}", f"train.out_dir={out}", "mode=offline", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("miro align: mode=offline") and "image_path" in err and "\n" not in err
    assert not out.exists()


def test_cure_without_network_is_one_line_naming_where_the_files_go(no_models, tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("MIRO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MIRO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["data.prompts=cure", f"train.out_dir={out}", "--dry-run"]) == 1  # the environment, not a bad value
    err = capsys.readouterr().err.strip()
    assert err.startswith("miro align: data.prompts=cure: architecture.csv") and "\n" not in err
    assert "https://raw.githubusercontent.com/aniketrege/cure-bench" in err and "$MIRO_DATA_DIR/cure/" in err
    assert "data.prompts=<folder of CuRe CSVs>" in err
    assert not out.exists()


def test_dataclasses_validate_directly():
    with pytest.raises(ValueError, match="train.grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="train.resume must be true or false"):
        TrainConfig(resume="yes")
    with pytest.raises(ValueError, match="optim.betas"):
        OptimConfig(betas=(0.9,))
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        OptimConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="loss="):
        StepConfig(loss="bogus")
    with pytest.raises(ValueError, match="unknown key prompts.bogus"):
        StepConfig(prompts={"bogus": 1})
    assert OptimConfig(lr=1, betas=[0.9, 0.99]).betas == (0.9, 0.99)
    assert TrainConfig(devices="auto").devices == "auto"


@pytest.mark.parametrize("prec", ["bf16-true", "16-true", "transformer-engine"])
def test_precisions_that_cast_the_trained_weights_to_half_are_refused(prec):
    # Fabric's "-true" half precisions cast the whole module in setup, after the trainer made its
    # trained weights float32 masters: every AdamW step would then land on bf16 weights.
    from miro.align.flux_lora_train import FluxLoraTrainConfig

    with pytest.raises(ValueError, match=f"train.precision must be one of .*bf16-mixed.*; got '{prec}'"):
        TrainConfig(precision=prec)
    with pytest.raises(ValueError, match=f"precision must be one of .*; got '{prec}'"):
        FluxLoraTrainConfig(precision=prec)
    for ok in ("auto", "bf16-mixed", "16-mixed", "32-true"):
        assert TrainConfig(precision=ok).precision == ok


def test_bf16_true_would_cast_float32_masters():
    # why the precisions above are refused: the cast happens in Fabric's setup, not in the trainer
    import torch
    from lightning.fabric import Fabric

    from miro.align.precision import TRAINING_PRECISIONS

    for prec, kept in (("bf16-true", False), ("bf16-mixed", True)):
        m = torch.nn.Linear(2, 2)
        Fabric(accelerator="cpu", devices=1, precision=prec).setup(m, torch.optim.AdamW(m.parameters()))
        assert (m.weight.dtype == torch.float32) is kept and (prec in TRAINING_PRECISIONS) is kept


def test_remove_if_empty(tmp_path):
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    cli._remove_if_empty(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_text("x")
    cli._remove_if_empty(tmp_path / "b")
    assert (tmp_path / "b" / "f").is_file()
