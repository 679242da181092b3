"""FLUX as an SRPO target, on a tiny ``FluxPipeline`` saved in the real diffusers layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from miro.align.flux import FluxTarget, FluxTargetConfig, latent_image_ids, pack_latents, unpack_latents
from miro.align.relative_reward import SemanticRelativeReward
from miro.align.testing import HashEmbeddingScorer, save_tiny_flux_pipeline

POS, NEG = "Real. a red circle", "Painting. a red circle"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


def _pipe(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _target(pipe, **kw):
    kw.setdefault("decoder_checkpointing", False)
    return FluxTarget.from_pipeline(pipe, FluxTargetConfig(height=16, width=16, max_sequence_length=8, **kw))


def test_pack_unpack_roundtrip():
    z = torch.randn(2, 4, 6, 8)
    p = pack_latents(z)
    assert p.shape == (2, 12, 16)
    torch.testing.assert_close(unpack_latents(p, 6, 8), z, rtol=0, atol=0)
    ids = latent_image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[-1].tolist() == [0.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 4))


def test_rollout_matches_flux_pipeline(flux_dir):
    # Our Euler rollout over shift(1 - i/N) equals FluxPipeline's own sampler on that grid.
    pipe = _pipe(flux_dir)
    tg = _target(pipe, quantize_timestep=False, rollout_guidance=2.0)
    n = 3
    noise = torch.randn(tg.latent_shape(1), generator=torch.Generator().manual_seed(0))
    ours = tg.rollout(noise, tg.encode_condition(["a red circle"]), num_steps=n, shift=3.0)
    ref = pipe("a red circle", height=16, width=16, num_inference_steps=n, sigmas=np.linspace(1, 1 / n, n).tolist(),
               guidance_scale=2.0, latents=noise, output_type="latent", max_sequence_length=8).images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _eval_reward(tg, rw):
    cond = tg.encode_condition(["a red circle"] * 2)
    noise = torch.randn(tg.latent_shape(2), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        img = tg.decode(tg.rollout(noise, cond, num_steps=2))
        return rw(img, [POS] * 2, [NEG] * 2, 0.0)["reward"].mean().item()


def test_srpo_steps_increase_the_reward_on_tiny_flux(flux_dir, tmp_path):
    from miro.align.prompts import PromptConfig
    from miro.align.step import StepConfig
    from miro.align.trainer import OptimConfig, SRPOTrainer, TrainConfig

    pipe = _pipe(flux_dir)
    tg = _target(pipe)
    rw = SemanticRelativeReward(HashEmbeddingScorer())
    frozen = {n: p.detach().clone() for n, p in pipe.vae.named_parameters()}
    before = _eval_reward(tg, rw)
    step = StepConfig(rollout_steps=2, loss="maximize", prompts=PromptConfig(pos_prompt=POS, neg_prompt=NEG))
    hist = SRPOTrainer(tg, rw, [{"caption": "a red circle"}], step, OptimConfig(lr=5e-3, max_grad_norm=1.0),
                       TrainConfig(max_steps=4, out_dir=str(tmp_path / "run"), progress=False)).fit()
    after = _eval_reward(tg, rw)
    assert len(hist) == 4 and all(np.isfinite(h["denoise/reward"]) for h in hist)
    assert after > before + 0.005, (before, after)
    for n, p in pipe.vae.named_parameters():  # gradients only into the transformer
        torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)


def test_flux_lora_save_load_roundtrip(flux_dir, tmp_path):
    from miro.align.lora import LoraSettings, add_flux_lora, save_flux_lora

    pipe = _pipe(flux_dir)
    add_flux_lora(pipe.transformer, LoraSettings(rank=4, alpha=8))
    trainable = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    tg = _target(pipe)
    cond = tg.encode_condition(["a red circle"])
    x = torch.randn(tg.latent_shape(1), generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.8])
    tuned = tg.velocity(x, s, cond).detach()
    path = save_flux_lora(pipe.transformer, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"

    fresh = _pipe(flux_dir)
    base = _target(fresh).velocity(x, s, cond).detach()
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = _target(fresh).velocity(x, s, cond).detach()
    assert not torch.allclose(base, tuned, atol=1e-4)
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-5)


def test_transformer_state_dict_loading(flux_dir, tmp_path):
    from safetensors.torch import save_file

    from miro.align.flux_tools import load_transformer_weights

    pipe = _pipe(flux_dir)
    sd = {f"module.{k}": v.clone() + 0.01 for k, v in pipe.transformer.state_dict().items()}
    save_file(sd, tmp_path / "srpo.safetensors")
    fresh = _pipe(flux_dir)
    load_transformer_weights(fresh.transformer, tmp_path / "srpo.safetensors")
    for k, v in fresh.transformer.state_dict().items():
        torch.testing.assert_close(v, sd[f"module.{k}"])
    save_file({"bogus.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        load_transformer_weights(fresh.transformer, tmp_path / "bad.safetensors")


def test_precompute_embeddings_roundtrip(flux_dir, tmp_path):
    from miro.align.datasets import load_fork_embeddings, read_fork_json
    from miro.align.flux_tools import precompute_embeddings

    pipe = _pipe(flux_dir)
    items = [{"caption": "a red circle", "category": "Shape", "region": "Peru"}, {"caption": "two blue squares"}]
    path = precompute_embeddings(pipe, items, tmp_path / "emb", max_sequence_length=8, progress=False)
    back = read_fork_json(path)
    assert back[0]["category"] == "Shape" and back[0]["region"] == "Peru" and back[1]["category"] is None
    pe, pooled, tids = pipe.encode_prompt(["two blue squares"], prompt_2=None, max_sequence_length=8)
    e = load_fork_embeddings(back[1])
    torch.testing.assert_close(e[0], pe[0])
    torch.testing.assert_close(e[1], pooled[0])
    assert e[2].shape == (8, 3)
    # precomputed embeddings drive the target exactly like live encoding
    cond = FluxTarget.cond_from_embeddings([e])
    tg = _target(pipe)
    x = torch.randn(tg.latent_shape(1), generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.7])
    torch.testing.assert_close(tg.velocity(x, s, cond), tg.velocity(x, s, tg.encode_condition(["two blue squares"])))
    # SRPO from the precomputed dataset with no text encoders at all
    from miro.align.step import StepConfig
    from miro.align.trainer import OptimConfig, SRPOTrainer, TrainConfig

    bare = FluxTarget(pipe.transformer, pipe.vae, FluxTargetConfig(height=16, width=16, decoder_checkpointing=False))
    hist = SRPOTrainer(bare, SemanticRelativeReward(HashEmbeddingScorer()), back, StepConfig(rollout_steps=1),
                       OptimConfig(lr=1e-3), TrainConfig(max_steps=1, out_dir=str(tmp_path / "run"), progress=False)).fit()
    assert np.isfinite(hist[0]["denoise/reward"])


def test_generate_items_resumes_and_is_seeded(flux_dir, tmp_path):
    from miro.align.flux_tools import generate_items

    pipe = _pipe(flux_dir)
    items = [{"caption": "a red circle", "item": "Red circle"}, {"caption": "two blue squares"}]
    kw = dict(n_per_item=2, steps=1, height=16, width=16, seed=7, max_sequence_length=8, progress=False)
    assert generate_items(pipe, items, tmp_path / "out", **kw) == {"written": 4, "skipped": 0}
    assert generate_items(pipe, items, tmp_path / "out", **kw) == {"written": 0, "skipped": 4}
    from PIL import Image

    got = np.asarray(Image.open(tmp_path / "out" / "00001_two_blue_squares" / "01.png"))
    ref = pipe("two blue squares", num_inference_steps=1, height=16, width=16, generator=torch.Generator().manual_seed(7 + 1000 + 1),
               max_sequence_length=8, output_type="pil").images[0]
    np.testing.assert_array_equal(got, np.asarray(ref))
    assert json.loads((tmp_path / "out" / "00000_Red_circle" / "item.json").read_text())["item"] == "Red circle"


def test_flux_lora_finetune_runs_and_saves(flux_dir, tmp_path):
    from PIL import Image

    from miro.align.flux_lora_train import FluxLoraTrainConfig, finetune_flux_lora
    from miro.align.lora import LoraSettings
    from miro.align.trainer import OptimConfig

    for i, c in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), c).save(tmp_path / f"{i}.png")
    items = [{"caption": "x", "Item": name, "image_path": str(tmp_path / f"{i}.png")} for i, name in enumerate(["red", "blue"])]
    cfg = FluxLoraTrainConfig(caption_column="Item", resolution=16, max_train_steps=2, grad_accum=2, checkpoint_every=1,
                              max_sequence_length=8, out_dir=str(tmp_path / "lora"), lora=LoraSettings(rank=2, alpha=2),
                              optim=OptimConfig(name="adamw", lr=1e-3, max_grad_norm=1.0))
    pipe = _pipe(flux_dir)
    out = finetune_flux_lora(pipe, items, cfg)
    lines = [json.loads(s) for s in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in lines)
    trained = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    # lora_B starts at zero: after two AdamW steps (lr 1e-3) every B entry with a gradient has moved
    b = torch.cat([p.flatten() for n, p in trained.items() if "lora_B" in n])
    assert (b != 0).float().mean() > 0.9
    # the last checkpoint holds the final adapter weights, and the saved file loads back to the trained model
    ckpt = torch.load(tmp_path / "lora" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and set(ckpt["trainable"]) == set(trained)
    for n, p in trained.items():
        torch.testing.assert_close(ckpt["trainable"][n], p, rtol=0, atol=0)
    tg = _target(pipe)
    cond = tg.encode_condition(["red"])
    x = torch.randn(tg.latent_shape(1), generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.8])
    tuned = tg.velocity(x, s, cond).detach()
    fresh = _pipe(flux_dir)
    base = _target(fresh).velocity(x, s, cond).detach()
    fresh.load_lora_weights(str(out.parent))
    assert not torch.allclose(base, tuned, atol=1e-5)
    torch.testing.assert_close(_target(fresh).velocity(x, s, cond).detach(), tuned, rtol=1e-5, atol=1e-5)
    # a rerun into the same --out continues only with the same settings (another rank failed on the
    # adapters' shapes mid-load, another seed or lr spliced two runs); it may run longer
    from dataclasses import replace

    from miro.align.flux_lora_train import check_resume

    before = (tmp_path / "lora" / "checkpoints" / "last.pt").read_bytes()
    for other, why in ((replace(cfg, seed=7), "seed: 42 -> 7"), (replace(cfg, lora=LoraSettings(rank=4, alpha=2)),
                                                                   "lora.rank: 2 -> 4")):
        with pytest.raises(ValueError, match=f"last.pt was trained with other settings \\({why}\\): resume with them"):
            finetune_flux_lora(pipe, items, other)
    assert (tmp_path / "lora" / "checkpoints" / "last.pt").read_bytes() == before
    check_resume(replace(cfg, max_train_steps=5, checkpoint_every=3))  # how long it runs may change
    finetune_flux_lora(_pipe(flux_dir), items, replace(cfg, max_train_steps=3))  # resumes at 2, runs step 3
    assert [json.loads(x)["step"] for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert torch.load(tmp_path / "lora" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_flux_trains_float32_weights_by_the_adamw_step(flux_dir, tmp_path, lora):
    # An AdamW step moves a weight by about lr = 5e-6, far below bf16's spacing (2^-8 relative):
    # updated in bf16 most steps round away (1.7 % of the weights moved in 5 steps). The trained
    # weights must be float32 masters, the frozen ones stay bf16, the forward autocasts (facts §5).
    from diffusers import FluxPipeline

    from miro.align.lora import LoraSettings, add_flux_lora
    from miro.align.prompts import PromptConfig
    from miro.align.step import StepConfig
    from miro.align.trainer import OptimConfig, SRPOTrainer, TrainConfig

    pipe = FluxPipeline.from_pretrained(flux_dir, torch_dtype=torch.bfloat16)
    if lora:
        add_flux_lora(pipe.transformer, LoraSettings(rank=4))
    tg = _target(pipe)
    before = {n: p.detach().float().clone() for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    optim, steps = OptimConfig(), 3  # the published lr 5e-6
    step = StepConfig(rollout_steps=1, loss="maximize", prompts=PromptConfig(pos_prompt=POS, neg_prompt=NEG))
    SRPOTrainer(tg, SemanticRelativeReward(HashEmbeddingScorer()), [{"caption": "a red circle"}], step, optim,
                TrainConfig(max_steps=steps, out_dir=str(tmp_path / "run"), progress=False)).fit()
    params = dict(pipe.transformer.named_parameters())
    assert {params[n].dtype for n in before} == {torch.float32}
    frozen = {p.dtype for p in pipe.transformer.parameters() if not p.requires_grad} | {p.dtype for p in pipe.vae.parameters()}
    assert frozen == {torch.bfloat16}
    moved = torch.cat([(params[n].detach() - before[n]).abs().flatten() for n in before]) / optim.lr
    # AdamW's step is lr·m̂/(√v̂ + eps) ≈ lr per weight with a gradient (LoRA's A gets none while B = 0)
    assert (moved > 0).float().mean() > 0.9
    assert moved.max() <= steps * 1.05 and moved.mean() > 0.25


@pytest.mark.parametrize("argv, message", [
    (["flux-generate", "--items", '["a"]', "--out", "o", "--n", "0"], "--n must be >= 1; got 0"),
    (["flux-generate", "--items", '["a"]', "--out", "o", "--seed", "-1"], "--seed must be >= 0; got -1"),
    (["flux-generate", "--items", '["a"]', "--out", "o", "--lora-scale", "inf"], "--lora-scale must be a finite number >= 0; got inf"),
    (["flux-embed", "--prompts", "p.txt", "--out", "o", "--batch-size", "-2"], "--batch-size must be >= 1; got -2"),
    (["flux-lora", "--data", "d.jsonl", "--out", "o", "--lr", "nan"], "--lr must be a finite number > 0; got nan"),
    (["flux-lora", "--data", "d.jsonl", "--out", "o", "--alpha", "0"], "--alpha must be a finite number > 0; got 0.0"),
    (["flux-lora", "--data", "d.jsonl", "--out", "o", "--grad-accum", "0"], "--grad-accum must be >= 1; got 0"),
])
def test_flux_tools_refuse_bad_numbers_before_any_model_or_file(argv, message, capsys, monkeypatch, tmp_path):
    from miro.align import flux_cli

    monkeypatch.chdir(tmp_path)  # no prompt, item or data file exists: the numbers are checked first
    assert flux_cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"miro align {argv[0]}: {message}"


def test_flux_tools_help_shows_defaults(capsys):
    from miro.align import flux_cli

    with pytest.raises(SystemExit):
        flux_cli.main(["flux-lora", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "LoRA rank (default: 16)" in out and "optimiser steps (default: 1000)" in out
    assert "(default: None)" not in out  # required options and unset ones show none
