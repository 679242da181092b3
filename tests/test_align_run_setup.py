"""`miro align` run setup: Fabric before the models, its settings checked before they load, atomic exports."""

from __future__ import annotations

import pytest
import torch

from miro.align import cli


@pytest.fixture
def prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    return tmp_path / "p.txt"


def test_the_models_are_built_on_the_launched_fabrics_device(prompts, tmp_path, monkeypatch):
    # The target and reward were built on target.device (default cuda, i.e. cuda:0 in every rank)
    # before Fabric was launched; fabric.setup then moved only the trained module to cuda:<rank>.
    from miro.align import trainer

    events = []

    class Launched:  # what rank 1 of a 2-GPU run sees (no GPU here: a device nothing else uses)
        device, global_rank = torch.device("meta"), 1

    class Stop(Exception):
        pass

    def make_fabric(kwargs):
        events.append(("fabric", kwargs["accelerator"]))
        return Launched()

    def build_target(cfg, device, items=None):
        events.append(("target", device))
        raise Stop

    monkeypatch.setattr(trainer, "make_fabric", make_fabric)
    monkeypatch.setattr(cli, "build_target", build_target)
    cfg = cli.compose([f"data.prompts={prompts}", f"train.out_dir={tmp_path / 'out'}", "reward.name=shapes_proxy",
                       f"reward.path={tmp_path}"])
    with pytest.raises(Stop):
        cli.run(cfg)
    assert events == [("fabric", "auto"), ("target", torch.device("meta"))]


@pytest.mark.parametrize("override, needle", [
    ("train.accelerator=bogus", "train.accelerator='bogus' cannot run here: You selected an invalid accelerator name"),
    ("train.strategy=bogus", "train.strategy='bogus' cannot run here: You selected an invalid strategy name"),
    ("train.devices=abc", "train.devices='abc' cannot run here"),
    ("target.device=mps", "target.device='mps' but Fabric runs this process on cpu (train.accelerator=cpu, train.devices=1)"),
    ("target.device=cpux", "target.device='cpux' is not a device"),
])
def test_fabric_settings_are_checked_before_any_model(override, needle, prompts, tmp_path, no_models, capsys):
    # train.accelerator=gpu on a CPU box passed --dry-run, then died in a traceback after every model loaded
    out = tmp_path / "out"
    assert cli.main([f"data.prompts={prompts}", f"train.out_dir={out}", "train.accelerator=cpu", override, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("miro align: ") and needle in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_named_in_a_dry_run(prompts, tmp_path, no_models, capsys):
    assert cli.main([f"data.prompts={prompts}", f"train.out_dir={tmp_path / 'out'}", "train.accelerator=gpu", "--dry-run"]) == 2
    assert "miro align: train.accelerator='gpu' cannot run here: " in capsys.readouterr().err


def test_the_flux_transformer_export_is_atomic(tmp_path, request):
    class Target:
        transformer = torch.nn.Linear(2, 2)

    cfg = {"target": {"kind": "flux"}, "lora": {"enabled": False}}
    path = cli.export(cfg, Target(), tmp_path) / "diffusion_pytorch_model.safetensors"
    good = path.read_bytes()
    request.getfixturevalue("save_file_killed_midway")
    with pytest.raises(OSError, match="disk full"):
        cli.export(cfg, Target(), tmp_path)
    assert path.read_bytes() == good and [p.name for p in path.parent.iterdir()] == [path.name]
