"""`miro train` pre-flight: bad values, the checkpoint folder and resume refused in one line
(exit 2) before any data indexing, bin fitting or model building; nothing is written or lost."""

from __future__ import annotations

import os
import re

import pytest
import torch
from omegaconf import OmegaConf

from miro.train import cli
from miro.train import preflight as pf
from tests._train_helpers import tiny_overrides, write_tiny_shards


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), n_shards=1, per=16)


def _ckpt_dir(root):
    return root / "miro" / "checkpoints" / "shapes_miro"


def _err_line(capsys) -> str:
    """The one stderr line of a refused run."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("miro train: error: ")
    return lines[0].removeprefix("miro train: error: ")


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _fake_ckpt(path, step):
    """A small file that loads like a Lightning checkpoint (the pre-flight reads only its step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": step}, path)


def _nothing_written(root, data_dir):
    assert not (root / "miro").exists()  # no checkpoint folder, reward_bins.json or logs
    assert not [p for p in data_dir.iterdir() if p.name.endswith(".npz")]  # no shard index


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr=-1 must be >= 0"),
    ("optimizer.lr=abc", "optimizer.lr=abc is not a number; expected a number >= 0"),
    ("optimizer.name=sgdx", "optimizer.name=sgdx must be one of ['lamb', 'adamw']"),
    ("data.global_batch_size=0", "data.global_batch_size=0 must be >= 1"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0; got -1"),
    ("data.synthetic_caption_rate=2", "data.synthetic_caption_rate must be in [0, 1]; got 2"),
    ("data.mode=foo", "data.mode must be one of indexed, resampled; got 'foo'"),
    ("data.image_size=abc", "data.image_size must be a positive integer or null; got 'abc'"),
    ("data.image_source=x", "data.image_source must be one of latents, pixels; got 'x'"),
    ("rewards.ties=foo", "rewards.ties=foo is not one of midrank, spread"),
    ("rewards.ties={shapes_counting:foo}", "rewards.ties={shapes_counting:foo}: unknown tie rule 'foo'"),
    ("ema_decays=abc", "ema_decays=abc must be a list of distinct decays in [0, 1)"),
    ("logger=x", "logger=x is not one of csv, tensorboard, none"),
    ("computer.threads=abc", "computer.threads='abc' is not an integer"),
    ("computer.devices=3", "data.global_batch_size=8 is not divisible by devices x nodes x accumulation "
                           "= 3 x 1 x 1 = 3"),
])
def test_bad_value_is_one_line_before_any_work(override, message, data_dir, tmp_path, capsys):
    for dry in ([], ["--dry-run"]):
        assert cli.main(tiny_overrides(data_dir, tmp_path, extra=[override]) + dry) == 2
        assert _err_line(capsys).startswith(message), override
    _nothing_written(tmp_path, data_dir)


@pytest.mark.parametrize("extra, message", [
    # switches read with bool() turned "no" into True
    (["ema_warmup=no"], "ema_warmup=no is not a boolean; expected true or false"),
    (["compile=yes"], "compile=yes is not a boolean"),
    (["init_strict=maybe"], "init_strict=maybe is not a boolean"),
    (["image_logger.enabled=no"], "image_logger.enabled=no is not a boolean"),
    # values that failed only after indexing and bin fitting, or inside the first step
    (["position_init=foo"], "position_init=foo is not one of published, sincos"),
    (["init_weights=x"], "init_weights=x is not one of ema, raw"),
    (["init_from=nope.ckpt"], "init_from=nope.ckpt does not exist"),
    (["init_from=./nope"], "init_from=./nope: './nope' is not a built-in pipeline"),
    (["image_logger.enabled=true", "image_logger.every_n_steps=0"], "image_logger.every_n_steps=0 must be >= 1"),
    (["image_logger.enabled=true", "image_logger.guidance_scale=abc"],
     "image_logger.guidance_scale=abc is not a number; expected a number >= 0"),
    (["image_logger.enabled=true", "image_logger.weights=rawx"], "image_logger.weights=rawx is not one of ema, raw"),
    (["image_logger.enabled=true", "image_logger.testbed=nope"], "image_logger.testbed 'nope' is neither a built-in"),
    (["image_logger.enabled=true", "image_logger.score_rewards=[shapes_countin]"],
     "image_logger.score_rewards: [shapes_countin] not among the rewards"),
    # keys config.yaml does not know: Hydra's own error suggests the '+' for any typo
    (["+trainer.max_stepz=3"], "unknown trainer key(s) ['max_stepz']; allowed: ["),
    (["+checkpoint.every_n_step=5"], "unknown checkpoint key(s) ['every_n_step']"),
    (["+image_logger.every_n_step=5"], "unknown image_logger key(s) ['every_n_step']"),
    (["+ema_warmupp=true"], "unknown config key(s) ['ema_warmupp']"),
    (["optimizer.name=adamw", "optimizer.decouple=true"], "optimizer.decouple=true applies to lamb only"),
])
def test_run_options_are_checked_before_any_work(extra, message, data_dir, tmp_path, capsys):
    assert cli.main(tiny_overrides(data_dir, tmp_path, extra=extra) + ["--dry-run"]) == 2
    assert _err_line(capsys).startswith(message), extra
    _nothing_written(tmp_path, data_dir)


def test_tensorboard_logger_without_the_package_is_named(data_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    assert cli.main(tiny_overrides(data_dir, tmp_path, extra=["logger=tensorboard"]) + ["--dry-run"]) == 2
    assert _err_line(capsys) == "logger=tensorboard needs the tensorboard package: pip install tensorboard (or use logger=csv)"


def test_init_from_is_checked_only_for_a_fresh_run(data_dir, tmp_path):
    # a resumed run keeps its own weights: a warm-start source since moved away does not block it
    ov = tiny_overrides(data_dir, tmp_path, extra=["init_from=gone.ckpt"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    with pytest.raises(ValueError, match="init_from=gone.ckpt does not exist"):
        pf.preflight(cfg)
    _fake_ckpt(_ckpt_dir(tmp_path) / "last.ckpt", 3)
    assert pf.preflight(cfg)["resume_step"] == 3


def test_good_values_pass_the_checks(data_dir, tmp_path):
    ov = tiny_overrides(data_dir, tmp_path, extra=["optimizer.name=AdamW", "optimizer.lr=0", "ema_decays=0.999",
                                                   "rewards.ties={shapes_counting:spread}", "data.mode=resampled"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    assert pf.preflight(cfg) == {"resume": None, "resume_step": None, "replace": []}


def test_missing_data_dir_names_the_key(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(tiny_overrides(missing, tmp_path)) == 2
    assert _err_line(capsys) == f"data_dir={missing} does not exist (set data_dir= or MIRO_DATA_DIR)"


def test_unknown_config_choice_lists_names_without_search_path(capsys):
    assert cli.main(["experiment=nope"]) == 2
    line = _err_line(capsys)
    assert line.startswith("experiment=nope: no such config; choose from ") and "shapes_miro" in line
    assert cli.main(["experiment=shapes_miro", "computer=tpu"]) == 2
    assert _err_line(capsys) == "computer=tpu: no such config; choose from cpu, gpu1, gpu8, slurm_2x8"


def test_unquoted_equals_in_a_value_says_how_to_quote(capsys):
    assert cli.main(["experiment=shapes_miro", "resume=/runs/step=4.ckpt"]) == 2
    assert "must be quoted: \"resume='path/step=4.ckpt'\"" in _err_line(capsys)


def test_no_experiment_is_announced(capsys):
    assert cli.main(["optimizer.lr=-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("miro train: no experiment= given: using the root config")
    assert "experiment_name=default" in lines[0]
    assert lines[1] == "miro train: error: optimizer.lr=-1 must be >= 0 (e.g. optimizer.lr=5e-4)"


def test_missing_reward_names_the_config_key(data_dir, tmp_path, capsys):
    assert cli.main(tiny_overrides(data_dir, tmp_path, extra=["rewards.keys=[clip_score]"]) + ["--dry-run"]) == 2
    line = _err_line(capsys)
    assert "rewards ['clip_score'] have no finite value" in line and "`rewards.keys`" in line
    assert "reward_keys" not in line


def _finished_run(root):
    d = _ckpt_dir(root)
    for k in (2, 4, 6):
        _fake_ckpt(d / f"step={k}.ckpt", k)
    _fake_ckpt(d / "last.ckpt", 6)
    return d


def test_resume_null_refuses_to_overwrite_a_run(data_dir, tmp_path, capsys):
    d = _finished_run(tmp_path)
    before = _snapshot(d)
    ov = tiny_overrides(data_dir, tmp_path, steps=2, every=2, extra=["resume=null", "scheduler.warmup_steps=1"])
    assert cli.main(ov) == 2
    line = _err_line(capsys)
    assert line.startswith(f"resume=null would start a fresh run in {d}, which already holds last.ckpt at step 6 "
                           "and step=2/4/6.ckpt")
    assert "resume=auto" in line and "experiment_name=" in line and "checkpoint.overwrite=true" in line
    assert _snapshot(d) == before  # bytes and mtimes untouched, nothing added
    assert cli.main(ov + ["--dry-run"]) == 2 and _snapshot(d) == before
    capsys.readouterr()


def test_auto_without_last_ckpt_refuses_and_names_the_newest_snapshot(data_dir, tmp_path, capsys):
    d = _finished_run(tmp_path)
    (d / "last.ckpt").unlink()
    before = _snapshot(d)
    assert cli.main(tiny_overrides(data_dir, tmp_path)) == 2
    line = _err_line(capsys)
    assert "which already holds step=2/4/6.ckpt" in line
    assert f"continue it with \"resume='{d / 'step=6.ckpt'}'\"" in line
    # resume=null there names the same snapshot, not resume=auto (which the line above refuses)
    assert cli.main(tiny_overrides(data_dir, tmp_path, extra=["resume=null"])) == 2
    line = _err_line(capsys)
    assert f"continue it with \"resume='{d / 'step=6.ckpt'}'\"" in line and "resume=auto" not in line
    assert _snapshot(d) == before


def test_truncated_last_ckpt_is_one_line_with_the_snapshots(data_dir, tmp_path, capsys):
    d = _finished_run(tmp_path)
    last = d / "last.ckpt"
    last.write_bytes(last.read_bytes()[:300])  # killed mid-copy
    before = _snapshot(d)
    assert cli.main(tiny_overrides(data_dir, tmp_path)) == 2
    line = _err_line(capsys)
    assert line.startswith(f"resume=auto: {last} is not a readable checkpoint (truncated or damaged: ")
    assert f"resume from a step checkpoint instead: \"resume='{d / 'step=6.ckpt'}'\"" in line
    assert "(step checkpoints here: step=2.ckpt, step=4.ckpt, step=6.ckpt)" in line
    assert _snapshot(d) == before
    # the suggested override composes and passes the check
    ov = tiny_overrides(data_dir, tmp_path, extra=[f"resume='{d / 'step=6.ckpt'}'"])
    plan = pf.check_checkpoint_dir(OmegaConf.to_container(cli.compose(ov), resolve=True))
    assert plan == {"resume": str(d / "step=6.ckpt"), "resume_step": 6, "replace": []}


def test_truncated_explicit_resume_without_snapshots(data_dir, tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really")
    assert cli.main(tiny_overrides(data_dir, tmp_path, extra=[f"resume={bad}"])) == 2
    line = _err_line(capsys)
    assert line.startswith(f"resume={bad}: {bad} is not a readable checkpoint")
    assert "holds no step=<k>.ckpt to fall back on" in line


def test_resume_plan_reads_the_step(data_dir, tmp_path):
    d = _finished_run(tmp_path)
    cfg = OmegaConf.to_container(cli.compose(tiny_overrides(data_dir, tmp_path)), resolve=True)
    assert pf.check_checkpoint_dir(cfg) == {"resume": str(d / "last.ckpt"), "resume_step": 6, "replace": []}


def test_resume_with_other_optimizer_settings_is_refused(data_dir, tmp_path, capsys):
    # Lightning restores the optimizer's groups with its state: a new optimizer.lr would be ignored
    cfg = OmegaConf.to_container(cli.compose(tiny_overrides(data_dir, tmp_path)), resolve=True)
    d = _ckpt_dir(tmp_path)
    d.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 6,
                "hyper_parameters": {"optimizer": dict(cfg["optimizer"])}}, d / "last.ckpt")
    assert pf.check_checkpoint_dir(cfg)["resume_step"] == 6  # the same settings resume
    lr = cfg["optimizer"]["lr"]
    assert cli.main(tiny_overrides(data_dir, tmp_path, extra=["optimizer.lr=0.5"]) + ["--dry-run"]) == 2
    assert _err_line(capsys).startswith(f"resume=auto: {d / 'last.ckpt'} was trained with optimizer.lr={lr!r}, not 0.5 ")


def test_compile_with_seeded_dropout_is_refused(data_dir, tmp_path, capsys):
    # torch.compile(fullgraph=True) cannot trace the generator these draws take
    extra = ["compile=true", "++model.overrides.network.coherence_dropout=0.2"]
    assert cli.main(tiny_overrides(data_dir, tmp_path, extra=extra) + ["--dry-run"]) == 2
    assert _err_line(capsys) == ("compile=true cannot trace the seeded random draws of network.coherence_dropout=0.2; "
                                 "set compile=false, or those to 0")
    assert not (tmp_path / "miro").exists()


def test_remove_stale_temps_only_removes_atomic_temp_names(tmp_path):
    from miro.io import atomic_path

    d = tmp_path / "ck"
    (d / "images").mkdir(parents=True)
    stale = [d / ".last.ckpt.abcd1234.tmp", d / ".step=8.ckpt.x_yz1234.tmp", d / ".reward_bins.json.q1w2e3r4.tmp",
             d / "images" / ".step_00000100.png.a1b2c3d4.tmp"]
    kept = [d / ".other.tmp", d / "notes.tmp", d / "last.ckpt", d / "images" / "step_00000100.png"]
    for p in stale + kept:
        p.write_bytes(b"x")
    with atomic_path(d / "last.ckpt") as tmp:  # the real pattern, as atomic_path names it
        assert re.fullmatch(r"\.last\.ckpt\.[a-z0-9_]+\.tmp", tmp.name)
        tmp.write_bytes(b"y")
        assert pf.remove_stale_temps(d) == len(stale) + 1
        tmp.write_bytes(b"y")  # recreated: a live writer (cannot happen before fit) must still finish
    assert sorted(p for p in d.rglob("*") if p.is_file()) == sorted(kept)
    assert pf.remove_stale_temps(tmp_path / "absent") == 0


def test_overwrite_replaces_old_checkpoints_and_start_line(data_dir, tmp_path, capsys, monkeypatch):
    """checkpoint.overwrite=true: old checkpoints deleted and stale temps removed right before fit
    (fit itself is stubbed: this checks what main does around it)."""
    from lightning.pytorch import Trainer

    d = _finished_run(tmp_path)
    (d / ".last.ckpt.abcd1234.tmp").write_bytes(b"partial")
    calls = []
    monkeypatch.setattr(Trainer, "fit", lambda self, module, datamodule=None, ckpt_path=None: calls.append(ckpt_path))
    n = torch.get_num_threads()
    ov = tiny_overrides(data_dir, tmp_path, steps=2, every=2,
                        extra=["resume=null", "checkpoint.overwrite=true", "scheduler.warmup_steps=1"])
    (d / "reward_bins.json").write_text('{"num_bins": 2, "edges": {}}')  # the old run's (other data, other bins)
    assert cli.main(ov + ["--dry-run"]) == 0  # a dry run deletes nothing, and rewrites nothing
    assert (d / "reward_bins.json").read_text() == '{"num_bins": 2, "edges": {}}'
    assert {"last.ckpt", "step=6.ckpt", ".last.ckpt.abcd1234.tmp"} <= set(os.listdir(d))
    capsys.readouterr()
    assert cli.main(ov) == 0
    torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "starting fresh, replacing 4 checkpoint(s) of the previous run (checkpoint.overwrite=true)" in out
    assert f"removed 1 stale temp file(s) (.*.tmp) that an interrupted save left in {d}" in out
    assert calls == [None]
    assert sorted(p.name for p in d.iterdir() if p.is_file()) == ["reward_bins.json"]
    assert '"num_bins": 64' in (d / "reward_bins.json").read_text()  # the new run's own, not the old run's
    # another rank of a multi-process launch leaves the folder to rank 0 (which writes in it)
    (d / ".reward_bins.json.abcd1234.tmp").write_bytes(b"rank 0 writing")
    (d / "step=2.ckpt").write_bytes(b"old")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert cli.main(ov) == 0 and calls == [None, None]
    assert {".reward_bins.json.abcd1234.tmp", "step=2.ckpt"} <= set(os.listdir(d))


def test_bins_of_other_settings_are_refit_for_a_fresh_run_and_refused_on_resume(data_dir, tmp_path, capsys):
    """A dry run leaves reward_bins.json beside the run; a run with another rewards.num_bins fits its
    own instead of training on the cached ones; a resumed run refuses bins of other settings."""
    import json

    n = torch.get_num_threads()
    ov = tiny_overrides(data_dir, tmp_path)
    bins = _ckpt_dir(tmp_path) / "reward_bins.json"
    assert cli.main(ov + ["--dry-run"]) == 0
    assert json.loads(bins.read_text())["num_bins"] == 64
    with pytest.warns(UserWarning, match="64 bins where the run asks num_bins=4: fitting the run's own bins"):
        assert cli.main(ov + ["rewards.num_bins=4", "--dry-run"]) == 0
    assert json.loads(bins.read_text())["num_bins"] == 4
    _finished_run(tmp_path)
    capsys.readouterr()
    assert cli.main(ov + ["--dry-run"]) == 2  # resumes from last.ckpt, trained on 4 bins
    torch.set_num_threads(n)
    assert "holds 4 bins where the run asks num_bins=64; a resumed run keeps the bins it was trained with" in _err_line(capsys)
    assert json.loads(bins.read_text())["num_bins"] == 4  # left as it was


def test_resume_start_line_names_the_step(data_dir, tmp_path, capsys):
    d = _finished_run(tmp_path)
    n = torch.get_num_threads()
    assert cli.main(tiny_overrides(data_dir, tmp_path, steps=8) + ["--dry-run"]) == 0
    torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert f"resuming from {d / 'last.ckpt'} at step 6" in out and "(step 6)" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_a_gpu_config_is_refused_before_any_work_but_dry_runs_with_a_note(tmp_path, capsys):
    data_dir = write_tiny_shards(tmp_path / "data", n_shards=1, per=16)  # unindexed: nothing may touch it
    ov = tiny_overrides(data_dir, tmp_path / "run", extra=["computer=gpu1", "computer.threads=1"])
    assert cli.main(ov) == 2
    assert _err_line(capsys) == ("computer.accelerator=gpu (1 GPU(s) x 1 node(s)) but this machine has no CUDA "
                                 "device; use computer=cpu here")
    _nothing_written(tmp_path / "run", data_dir)
    # a login node may still check the config: no trainer is built, the problem is a note
    assert cli.main(ov + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: note: computer.accelerator=gpu" in out and "Traceback" not in out
