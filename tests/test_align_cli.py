"""`miro align` (Hydra config, end-to-end runs with a real CLIP-family scorer and the Shapes proxy) and the proxy model."""

from __future__ import annotations

import json

import pytest
import torch

from miro.align.cli import compose, main
from miro.align.proxy_reward import ProxyConfig, ProxyRewardModel, ProxyTrainConfig, make_pairs, train_proxy


def test_help_lists_the_alignment_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("mode=online|offline", "inversion=", "discount_inv=", "discount_denoise=", "flux-generate", "shapes_proxy",
                "+reward.kwargs.KEY=VALUE"):
        assert key in out


def test_reward_kwargs_take_new_and_existing_keys_with_or_without_plus():
    # Hydra's struct mode refuses a new key without '+' and an existing one with it; both forms work.
    cfg = compose(["data.prompts=x.txt", "reward.kwargs.model=M", "+reward.kwargs.tokenizer=T", "++reward.kwargs.image_size=32"])
    assert cfg["reward"]["kwargs"] == {"model": "M", "tokenizer": "T", "image_size": 32}
    for form in ("reward.kwargs.version=v2.0", "+reward.kwargs.version=v2.0"):  # flux_hps sets version: v2.1
        assert compose(["experiment=flux_hps", "data.prompts=x.txt", form])["reward"]["kwargs"] == {"version": "v2.0"}
    assert main(["data.prompts=x.txt", "reward.kwargs.version=v2.0", "--print-config"]) == 0


def test_config_defaults_are_the_published_hyperparameters():
    cfg = compose(["data.prompts=x.txt"])
    assert cfg["mode"] == "online" and cfg["inversion"] is True
    assert cfg["discount_inv"] == [0.3, 0.01] and cfg["discount_denoise"] == [0.1, 0.25]
    assert cfg["schedule"]["train_timestep"] == [5, 25] and cfg["schedule"]["groundtruth_ratio"] == 0.9
    assert cfg["optim"]["lr"] == 5e-6 and cfg["optim"]["max_grad_norm"] == 0.1 and cfg["hinge_margin"] == 0.7
    assert cfg["rollout_steps"] == 25 and cfg["rollout_shift"] == 3.0
    ps = compose(["experiment=flux_pickscore", "data.prompts=x.txt"])
    assert ps["schedule"]["train_timestep"] == [5, 30] and ps["discount_inv"] == [0.6, 0.01] and ps["target"]["flux_rollout_guidance"] == 2.0


def test_bad_overrides_fail_clearly(capsys, tmp_path):
    assert main(["nonexistent_key=1", "data.prompts=x.txt", "--dry-run"]) == 2
    assert "nonexistent_key" in capsys.readouterr().err
    assert main(["--bogus"]) == 2
    assert main(["--dry-run"]) == 2  # data.prompts is required
    capsys.readouterr()
    assert main(["mode=sideways", "data.prompts=x.txt", "--dry-run"]) == 2  # one line, no traceback
    assert "mode must be one of" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["experiment=shapes_proxy", f"data.prompts={tmp_path / 'p.txt'}", "--dry-run"]) == 2
    assert "needs reward.path=" in capsys.readouterr().err
    for flag in ("-m", "--multirun"):  # a second job in one out_dir would resume the first: one command per value
        assert main([flag, "optim.lr=1e-5,2e-5", "data.prompts=x.txt"]) == 2
        assert "is not supported (a sweep is one command per value" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny MIRO pipeline folder (tiny BERT text encoder) and a prompt file."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_align_miro import make_pipe

    from miro.encoders.tiny import save_tiny_bert

    root = tmp_path_factory.mktemp("alignworld")
    bert = save_tiny_bert(root / "bert", hidden=24)
    pipe = make_pipe(bert)
    pipe.save_pretrained(root / "pipe")
    (root / "prompts.jsonl").write_text(
        '{"caption": "a red circle", "mia_category": "1 object", "mia_region": "red"}\n{"caption": "two blue squares", "region": "blue"}\n')
    return root, bert


def _run(root, out, *extra):
    return main([f"target.model={root / 'pipe'}", f"data.prompts={root / 'prompts.jsonl'}", "rollout_steps=2",
                 "train.max_steps=1", f"train.out_dir={out}", "train.progress=false", "prompts.control_words=false",
                 "optim.lr=1e-3", "optim.max_grad_norm=1.0", *extra])


def test_a_reward_model_neither_cached_nor_reachable_is_one_line_naming_it(tiny_world, tmp_path, capsys, monkeypatch):
    # HPSv2 neither cached nor reachable, as the hub reports it: the environment (exit 1), before training
    from huggingface_hub.utils import LocalEntryNotFoundError

    import miro.rewards as R
    from miro.rewards.base import Scorer

    class Uncached(Scorer):
        keys, differentiable = ("hpsv2_score",), True

        def load(self):
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub\nand we "
                                          "cannot find the requested files in the local cache.")

        def embed_image(self, images):
            return self.load()

        def embed_text(self, prompts):
            return self.load()

    R.available()  # the registry is filled before one entry is replaced
    monkeypatch.setitem(R.REGISTRY, "hpsv2_score", lambda **kw: Uncached())
    root, _ = tiny_world
    out = tmp_path / "run"
    assert _run(root, out, "reward.name=hpsv2_score") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("miro align: could not load the model of reward 'hpsv2_score' (") and "\n" not in err, err
    assert "`miro download hpsv2_score`" in err
    assert not out.exists()
    assert _run(root, out, "reward.name=hpsv2_score", "--dry-run") == 0  # a dry run loads no weights


def test_end_to_end_with_a_clip_family_scorer(tiny_world, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _rewards_support import save_tiny_clip

    from miro.pipeline import MiroPipeline

    root, _ = tiny_world
    clip = save_tiny_clip(tmp_path / "clip", seed=3)
    out = tmp_path / "run"
    # PickScore on a tiny CLIPModel: the "logit" relative similarity exp(logit_scale)·cos/20
    assert _run(root, out, "reward.name=pick_a_score_score", f"+reward.kwargs.model={clip}", f"+reward.kwargs.tokenizer={clip}",
                "+reward.kwargs.image_size=32") == 0
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["grad_norm"] > 0
    tuned = MiroPipeline.from_pretrained(out / "pipeline")
    base = MiroPipeline.from_pretrained(root / "pipe")
    diff = [not torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(), base.model.state_dict().values())]
    assert any(diff)


def test_proxy_train_save_load_and_gradients(tiny_world, tmp_path):
    root, bert = tiny_world
    from miro.encoders.text import load_text_encoder

    te = load_text_encoder(str(bert), max_length=16)
    pairs = make_pairs(12, seed=0)
    assert pairs["images"].shape == (36, 32, 32, 3) and pairs["targets"].min() >= 0 and pairs["targets"].max() <= 1
    cfg = ProxyConfig(width=8, dim=16, text_encoder=str(bert), text_dim=24, max_text_len=16)
    untrained, m0 = train_proxy(pairs, cfg, ProxyTrainConfig(epochs=0, batch_size=16, val_fraction=0.25), text_encoder=te)
    model, m = train_proxy(pairs, cfg, ProxyTrainConfig(epochs=6, batch_size=16, lr=3e-3, val_fraction=0.25), text_encoder=te)
    assert m["train_mse"] < m0["train_mse"]
    model.save(tmp_path / "proxy")
    back = ProxyRewardModel.load(tmp_path / "proxy", text_encoder=te)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    caps = ["a red circle", "two blue squares"]
    torch.testing.assert_close(back.score(x, caps), model.score(x, caps))
    back.score(x, caps).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in back.parameters())
    with pytest.raises(ValueError, match="not a proxy reward folder"):
        ProxyRewardModel.load(tmp_path)


def test_end_to_end_with_the_shapes_proxy_and_lora(tiny_world, tmp_path):
    from miro.align.lora import load_miro_lora
    from miro.pipeline import MiroPipeline

    root, bert = tiny_world
    proxy = ProxyRewardModel(ProxyConfig(width=8, dim=16, text_encoder=str(bert), text_dim=24, max_text_len=16))
    proxy.save(tmp_path / "proxy")
    out = tmp_path / "run"
    assert _run(root, out, "reward.name=shapes_proxy", f"reward.path={tmp_path / 'proxy'}", "lora.enabled=true", "lora.rank=2") == 0
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    merged = MiroPipeline.from_pretrained(out / "pipeline")
    base = MiroPipeline.from_pretrained(root / "pipe")
    load_miro_lora(base.model, out / "lora")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    emb, mask = base.text_encoder.encode(["a red circle"])
    coh = {k: torch.ones(1) for k in base.coherence_keys}
    g = torch.tensor([0.5])
    torch.testing.assert_close(merged.model(x, g, emb, mask, coh)[0], base.model(x, g, emb, mask, coh)[0], rtol=1e-4, atol=1e-5)
    # and the adapter moved something: the untouched base model differs (a no-op merge would not)
    plain = MiroPipeline.from_pretrained(root / "pipe")
    assert (merged.model(x, g, emb, mask, coh)[0] - plain.model(x, g, emb, mask, coh)[0]).abs().max() > 1e-4


def test_bfloat16_target_with_lora_end_to_end(tiny_world, tmp_path):
    # target.dtype=bfloat16 (documented) crashed every MIRO run: fp32 latents met bf16 weights in
    # the rollout. Now the forwards autocast, the adapters train in float32 and the export works.
    from miro.pipeline import MiroPipeline

    root, bert = tiny_world
    ProxyRewardModel(ProxyConfig(width=8, dim=16, text_encoder=str(bert), text_dim=24, max_text_len=16)).save(tmp_path / "proxy")
    out = tmp_path / "run"
    assert _run(root, out, "target.dtype=bfloat16", "reward.name=shapes_proxy", f"reward.path={tmp_path / 'proxy'}",
                "lora.enabled=true", "lora.rank=2") == 0
    metrics = json.loads((out / "metrics.jsonl").read_text())
    assert metrics["grad_norm"] > 0 and all(v == v for v in metrics.values())
    assert MiroPipeline.from_pretrained(out / "pipeline").model is not None


@pytest.mark.slow  # three `miro align` processes (~15 s of imports each on 2 cores)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_world, tmp_path):
    # Every run is its own `python -m miro.cli align` process, as in real use; the reference and
    # the resumed run then share the float environment, so the weights must match bit for bit.
    import os
    import signal
    import subprocess
    import sys
    import time

    from miro.pipeline import MiroPipeline

    root, bert = tiny_world
    proxy = ProxyRewardModel(ProxyConfig(width=8, dim=16, text_encoder=str(bert), text_dim=24, max_text_len=16))
    proxy.save(tmp_path / "proxy")

    def cmd(out, steps):
        return [sys.executable, "-m", "miro.cli", "align", f"target.model={root / 'pipe'}", f"data.prompts={root / 'prompts.jsonl'}",
                "rollout_steps=2", f"train.max_steps={steps}", f"train.out_dir={out}", "train.progress=false",
                "prompts.control_words=false", "optim.lr=1e-3", "optim.max_grad_norm=1.0", "reward.name=shapes_proxy",
                f"reward.path={tmp_path / 'proxy'}", "train.checkpoint_every=1"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out, 1000), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"training process exited early with {proc.returncode}")
            time.sleep(0.1)
        else:
            pytest.fail("no step-2 checkpoint within the time limit")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= killed_at < 1000
    target = max(3, killed_at + 1)
    subprocess.run(cmd(out, target), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = [json.loads(s)["step"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, target + 1))
    # an uninterrupted run to the same step, whatever step the kill landed at
    subprocess.run(cmd(tmp_path / "ref", target), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref = MiroPipeline.from_pretrained(tmp_path / "ref" / "pipeline").model.state_dict()
    got = MiroPipeline.from_pretrained(out / "pipeline").model.state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow  # two DDP ranks on the CPU (gloo), one process each
def test_ddp_two_ranks_with_gradient_accumulation(tiny_world, tmp_path):
    # Full fine-tune through Lightning Fabric's DDP: every trainable parameter must get a gradient
    # on every rank (the pretraining-only log-variance head is frozen, see MiroTarget).
    import os
    import subprocess
    import sys

    from miro.pipeline import MiroPipeline

    root, bert = tiny_world
    ProxyRewardModel(ProxyConfig(width=8, dim=16, text_encoder=str(bert), text_dim=24, max_text_len=16)).save(tmp_path / "proxy")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "miro.cli", "align", f"target.model={root / 'pipe'}", f"data.prompts={root / 'prompts.jsonl'}",
           "rollout_steps=2", "train.max_steps=2", f"train.out_dir={out}", "train.progress=false", "prompts.control_words=false",
           "optim.lr=1e-3", "reward.name=shapes_proxy", f"reward.path={tmp_path / 'proxy'}", "train.accelerator=cpu",
           "train.devices=2", "train.strategy=ddp", "train.grad_accum=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(s)["step"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    tuned = MiroPipeline.from_pretrained(out / "pipeline").model.state_dict()
    base = MiroPipeline.from_pretrained(root / "pipe").model.state_dict()
    changed = {k for k in base if not torch.equal(tuned[k], base[k])}
    assert any(k.startswith("network.") for k in changed)
    assert not any("logvar_proj" in k for k in changed)
