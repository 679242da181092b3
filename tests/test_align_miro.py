"""SRPO on our own flow models (tiny MiroPipeline): convention, training, offline noise, resume, LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from miro.align.miro_target import MiroTarget, MiroTargetConfig
from miro.align.prompts import PromptConfig
from miro.align.relative_reward import SemanticRelativeReward
from miro.align.step import StepConfig, clean_latents
from miro.align.testing import HashEmbeddingScorer
from miro.align.trainer import OptimConfig, SRPOTrainer, TrainConfig

POS, NEG = "Real. a red circle", "Painting. a red circle"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from miro.encoders.tiny import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("bert"), hidden=24)


def make_pipe(bert_dir, seed=0):
    from miro.encoders.autoencoder import load_autoencoder
    from miro.encoders.text import load_text_encoder
    from miro.models.configs import get_config
    from miro.models.model import MiroModel
    from miro.pipeline import MiroPipeline

    cfg = get_config("tiny")
    cfg["network"]["label_dim"] = 24
    cfg["text_encoder"] = str(bert_dir)
    model = MiroModel.from_config(cfg, generator=torch.Generator().manual_seed(seed))
    te = load_text_encoder(str(bert_dir), max_length=cfg["max_text_len"])
    pipe = MiroPipeline(model, te, load_autoencoder("identity"), cfg, te.uncond_embedding().numpy())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_velocity_and_rollout_follow_the_model_convention(bert_dir):
    pipe = make_pipe(bert_dir)
    tg = MiroTarget(pipe, MiroTargetConfig(guidance_scale=3.0))
    cond = tg.encode_condition(["a red circle"])
    x = torch.randn(tg.latent_shape(1), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3])
    v, _ = pipe.model(x, 1 - sigma, cond["emb"], cond["mask"], {k: torch.ones(1) for k in tg.keys}, None)
    torch.testing.assert_close(tg.velocity(x, sigma, cond, guidance=0.0), v)
    # rollout + decode equals the pipeline's own generation from the same noise
    img = tg.decode(tg.rollout(x, cond, num_steps=3, shift=None))
    ref = pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(img, ref, rtol=1e-5, atol=1e-5)


def _eval_reward(tg, rw):
    cond = tg.encode_condition(["a red circle"] * 2)
    noise = torch.randn(tg.latent_shape(2), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return rw(tg.decode(tg.rollout(noise, cond, num_steps=3)), [POS] * 2, [NEG] * 2, 0.0)["reward"].mean().item()


def _trainer(tg, out, steps, rollout_steps=3, run_settings=None, **kw):
    step = StepConfig(rollout_steps=rollout_steps, rollout_shift=None, loss="maximize", prompts=PromptConfig(pos_prompt=POS, neg_prompt=NEG))
    return SRPOTrainer(tg, SemanticRelativeReward(HashEmbeddingScorer()), [{"caption": "a red circle"}, {"caption": "a blue square"}],
                       step, OptimConfig(lr=2e-3, max_grad_norm=1.0), TrainConfig(max_steps=steps, out_dir=str(out), progress=False, **kw),
                       run_settings=run_settings)


def test_srpo_steps_increase_the_reward(bert_dir, tmp_path):
    tg = MiroTarget(make_pipe(bert_dir), MiroTargetConfig(guidance_scale=2.0))
    rw = SemanticRelativeReward(HashEmbeddingScorer())
    before = _eval_reward(tg, rw)
    hist = _trainer(tg, tmp_path, 4).fit()
    after = _eval_reward(tg, rw)
    assert after > before + 0.02, (before, after)
    assert {"denoise/reward", "inversion/reward", "grad_norm"} <= set(hist[-1])


def test_offline_noise_is_independent_of_the_image(bert_dir):
    tg = MiroTarget(make_pipe(bert_dir))
    cfg = StepConfig(mode="offline")
    a = torch.rand(2, 3, 8, 8) * 2 - 1
    b = -a
    x0a, na = clean_latents(tg, cfg, None, {"items": [{}, {}], "images": a}, torch.Generator().manual_seed(5))
    x0b, nb = clean_latents(tg, cfg, None, {"items": [{}, {}], "images": b}, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x0a, a)  # identity codec, unit normalisation
    torch.testing.assert_close(x0b, b)
    torch.testing.assert_close(na, nb, rtol=0, atol=0)  # same draw whatever the image
    assert not torch.allclose(na, x0a, atol=0.5)
    _, nc = clean_latents(tg, cfg, None, {"items": [{}, {}], "images": a}, torch.Generator().manual_seed(6))
    assert not torch.allclose(na, nc)  # fresh noise per draw
    with pytest.raises(ValueError, match="offline mode needs real images"):
        clean_latents(tg, cfg, None, {"items": [{}]}, torch.Generator())


def test_resume_after_a_kill_equals_an_uninterrupted_run(bert_dir, tmp_path):
    full = MiroTarget(make_pipe(bert_dir))
    _trainer(full, tmp_path / "full", 3, rollout_steps=2, checkpoint_every=2).fit()

    class Killed(RuntimeError):
        pass

    def kill_at_3(step, metrics):
        if step == 3:
            raise Killed

    first = MiroTarget(make_pipe(bert_dir))
    tr = _trainer(first, tmp_path / "resumed", 3, rollout_steps=2, checkpoint_every=2)
    tr.callback = kill_at_3
    with pytest.raises(Killed):
        tr.fit()
    second = MiroTarget(make_pipe(bert_dir))  # a fresh process would rebuild the base model
    _trainer(second, tmp_path / "resumed", 3, rollout_steps=2, checkpoint_every=2).fit()
    for (n, p), (_, q) in zip(full.pipe.model.named_parameters(), second.pipe.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    steps = [json.loads(s)["step"] for s in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # train.log_every: a line every N steps and at the last (it was accepted and ignored)
    hist = _trainer(MiroTarget(make_pipe(bert_dir)), tmp_path / "sparse", 3, rollout_steps=2, log_every=2).fit()
    logged = [json.loads(s)["step"] for s in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 3] and [h["step"] for h in hist] == [1, 2, 3]


def test_resume_refuses_other_settings_but_may_run_longer(bert_dir, tmp_path):
    """A rerun into a run's out_dir continues it only with the settings it was trained with: another
    lr or seed would splice two runs under one name. How long it runs may change."""
    from miro.align.trainer import settings_changes

    _trainer(MiroTarget(make_pipe(bert_dir)), tmp_path, 2, rollout_steps=2).fit()
    other = _trainer(MiroTarget(make_pipe(bert_dir)), tmp_path, 3, rollout_steps=2, seed=7)
    other.optim_cfg = OptimConfig(lr=1e-3, max_grad_norm=1.0)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"last.pt was trained with other settings \(optim.lr: 0.002 -> 0.001; "
                                         r"train.seed: 42 -> 7\): resume with them"):
        other.fit()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    longer = _trainer(MiroTarget(make_pipe(bert_dir)), tmp_path, 3, rollout_steps=2, checkpoint_every=5)
    assert len(longer.fit()) == 1  # steps 3 only: resumed at 2
    # the CLI's target, reward, data and LoRA sections are settings too (another reward model or
    # prompt file continued silently before); the device may change
    run = {"reward": {"name": "hpsv2_score"}, "data": {"prompts": "a.txt"}, "target": {"device": "cpu"}}
    out2 = tmp_path / "run2"
    _trainer(MiroTarget(make_pipe(bert_dir)), out2, 1, rollout_steps=2, run_settings=run).fit()
    other = _trainer(MiroTarget(make_pipe(bert_dir)), out2, 2, rollout_steps=2,
                     run_settings={**run, "data": {"prompts": "b.txt"}})
    with pytest.raises(ValueError, match=r"other settings \(run.data.prompts: 'a.txt' -> 'b.txt'\)"):
        other.fit()
    moved = _trainer(MiroTarget(make_pipe(bert_dir)), out2, 2, rollout_steps=2,
                     run_settings={**run, "target": {"device": "cuda"}})
    assert len(moved.fit()) == 1
    saved = {"step": {"schedule": {"a": 1}, "discount_inv": (0.3, 0.01)}, "train": {"max_steps": 2}}
    assert settings_changes(saved, {"step": {"schedule": {"a": 2}, "discount_inv": [0.3, 0.01]},
                                    "train": {"max_steps": 9}}) == ["step.schedule.a: 1 -> 2"]
    assert settings_changes(None, saved) == []


def test_resume_past_max_steps_is_refused(bert_dir, tmp_path):
    # A checkpoint at step 2 resumed with train.max_steps=1 ran no step and exported the step-2
    # weights as the run's result.
    _trainer(MiroTarget(make_pipe(bert_dir)), tmp_path, 2, rollout_steps=2).fit()
    with pytest.raises(ValueError, match=r"last.pt is at step 2, past train.max_steps=1: resume with train.max_steps >= 2"):
        _trainer(MiroTarget(make_pipe(bert_dir)), tmp_path, 1, rollout_steps=2).fit()
    assert _trainer(MiroTarget(make_pipe(bert_dir)), tmp_path, 2, rollout_steps=2).fit() == []  # a finished run reruns


def test_miro_lora_roundtrip_and_merge(bert_dir, tmp_path):
    from miro.align.lora import LoraSettings, add_miro_lora, load_miro_lora, merge_lora_state_dict, save_miro_lora

    pipe = make_pipe(bert_dir)
    settings = LoraSettings(rank=2, alpha=4)
    add_miro_lora(pipe.model, settings)
    assert all("lora_" in n for n, p in pipe.model.named_parameters() if p.requires_grad)
    tg = MiroTarget(pipe)
    hist = _trainer(tg, tmp_path / "run", 2).fit()  # LoRA-only SRPO
    assert len(hist) == 2
    cond = tg.encode_condition(["a red circle"])
    x = torch.randn(tg.latent_shape(1), generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.6])
    tuned = tg.velocity(x, s, cond).detach()
    base = MiroTarget(make_pipe(bert_dir)).velocity(x, s, cond).detach()
    assert not torch.allclose(tuned, base, atol=1e-6)
    save_miro_lora(pipe.model, tmp_path / "lora", settings)
    loaded = make_pipe(bert_dir)
    load_miro_lora(loaded.model, tmp_path / "lora")
    torch.testing.assert_close(MiroTarget(loaded).velocity(x, s, cond), tuned, rtol=1e-5, atol=1e-6)
    merged = make_pipe(bert_dir)
    merged.model.load_state_dict_checked(merge_lora_state_dict(pipe.model))  # published tensor names only
    torch.testing.assert_close(MiroTarget(merged).velocity(x, s, cond), tuned, rtol=1e-4, atol=1e-5)


def test_bfloat16_weights_train_float32_masters(bert_dir, tmp_path):
    # target.dtype=bfloat16: the rollout (euler_sample) and the training forward autocast to bf16,
    # so float32 latents meet bf16 weights ("mat1 and mat2 must have the same dtype" before), and
    # the trained weights are float32 masters (miro.align.precision).
    pipe = make_pipe(bert_dir).to(dtype=torch.bfloat16)
    tg = MiroTarget(pipe, MiroTargetConfig(guidance_scale=2.0))
    assert tg.compute_dtype == torch.bfloat16
    before = {n: p.detach().float().clone() for n, p in pipe.model.named_parameters() if p.requires_grad}
    hist = _trainer(tg, tmp_path, 1, rollout_steps=2).fit()
    assert all(v == v for v in hist[0].values()) and hist[0]["grad_norm"] > 0
    params = dict(pipe.model.named_parameters())
    assert {params[n].dtype for n in before} == {torch.float32}
    assert any(not torch.equal(params[n].detach(), before[n]) for n in before)
