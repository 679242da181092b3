"""`miro align flux-lora` end to end on a tiny FLUX: resume checks, the writer of the LoRA, its atomicity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from miro.align.testing import save_tiny_flux_pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("flux_lora_cli")
    flux = save_tiny_flux_pipeline(root / "flux")
    for i, c in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), c).save(root / f"{i}.png")
    (root / "data.jsonl").write_text("".join(json.dumps({"caption": n, "image_path": f"{i}.png"}) + "\n"
                                             for i, n in enumerate(["red", "blue"])))
    return root, flux


def _argv(root, model, out, *extra):
    return ["flux-lora", "--model", str(model), "--data", str(root / "data.jsonl"), "--out", str(out), "--resolution", "16",
            "--steps", "2", "--grad-accum", "1", "--optimizer", "adamw", "--lr", "1e-3", "--rank", "2", "--checkpoint-every", "1",
            *extra]


def test_flux_lora_resume_refuses_other_data_model_dtype_or_an_earlier_end(world, tmp_path, capsys, monkeypatch):
    # --data, --model and --dtype were not recorded: a rerun on other data spliced two runs; a rerun
    # with fewer --steps exported the later weights as if they were the run's end.
    from miro.align import flux_cli

    root, flux = world
    out = tmp_path / "out"
    assert flux_cli.main(_argv(root, flux, out)) == 0, capsys.readouterr().err
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert saved["model"] == str(flux.resolve()) and saved["dtype"] == "float32"
    assert saved["data"]["path"] == str((root / "data.jsonl").resolve()) and len(saved["data"]["sha256"]) == 16
    capsys.readouterr()
    before = (out / "checkpoints" / "last.pt").read_bytes()

    from diffusers import FluxPipeline

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", no_model)
    other_model = tmp_path / "flux_copy"
    shutil.copytree(flux, other_model)
    for argv, needle in ((_argv(root, other_model, out), f"model: {str(flux.resolve())!r} -> {str(other_model)!r}"),
                         (_argv(root, flux, out, "--dtype", "bfloat16"), "dtype: 'float32' -> 'bfloat16'"),
                         (_argv(root, flux, out, "--steps", "1"), "last.pt is at step 2, past --steps=1: resume with --steps >= 2"),
                         (_argv(root, flux, out, "--steps", "3", "--devices", "0"), "--devices=0 cannot run here")):
        assert flux_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "\n" not in err.strip(), err
    data = root / "data.jsonl"
    text = data.read_text()
    data.write_text(text + json.dumps({"caption": "green", "image_path": "0.png"}) + "\n")  # same name, other rows
    try:
        assert flux_cli.main(_argv(root, flux, out)) == 2
        assert "data.sha256: " in capsys.readouterr().err
    finally:
        data.write_text(text)
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_flux_lora_writes_its_lora_on_rank_zero_only_and_atomically(world, tmp_path, monkeypatch, request):
    from diffusers import FluxPipeline
    from lightning.fabric import Fabric

    from miro.align.flux_lora_train import FluxLoraTrainConfig, finetune_flux_lora
    from miro.align.lora import FLUX_LORA_FILE, LoraSettings
    from miro.align.trainer import OptimConfig

    root, flux = world
    items = [{"caption": "red", "image_path": str(root / "0.png")}]
    cfg = FluxLoraTrainConfig(resolution=16, max_train_steps=1, grad_accum=1, max_sequence_length=8, out_dir=str(tmp_path / "lora"),
                              lora=LoraSettings(rank=2, alpha=2), optim=OptimConfig(name="adamw", lr=1e-3))
    barriers = []

    class SecondRank(Fabric):  # what rank 1 of two sees (one process here)
        global_rank = property(lambda self: 1)

        def barrier(self, name=None):
            barriers.append(name)

    path = finetune_flux_lora(FluxPipeline.from_pretrained(flux), items, cfg, fabric=SecondRank(accelerator="cpu", devices=1))
    assert path == tmp_path / "lora" / FLUX_LORA_FILE and not path.exists() and len(barriers) == 2  # checkpoint, LoRA
    path = finetune_flux_lora(FluxPipeline.from_pretrained(flux), items, cfg)  # rank 0 (resumes at the end: writes it)
    good = path.read_bytes()
    request.getfixturevalue("save_file_killed_midway")
    with pytest.raises(OSError, match="disk full"):
        finetune_flux_lora(FluxPipeline.from_pretrained(flux), items, cfg)
    assert path.read_bytes() == good and [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
