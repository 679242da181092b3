"""MiroPipeline: published layout round trips, order of operations, outputs, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from miro.encoders import to_uint8
from miro.encoders.tiny import tiny_pipeline
from miro.models.sampler import euler_sample
from miro.pipeline import MiroPipeline
from miro.rewards.binning import RewardBins

PROMPTS = ["two red circles above a blue square", "a green star"]
KW = dict(num_inference_steps=3, output_type="np")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    bins = RewardBins(4, {"clip_score": [0.0, 0.1, 0.2, 0.3, 0.4]})
    return tiny_pipeline(root / "enc", text="bert", reward_bins=bins)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "p")


def test_save_load_bit_identical(pipe, saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json", "model.safetensors", "reward_bins.json", "uncond_embedding.npy"]
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["text_encoder"] == pipe.text_encoder.spec and cfg["autoencoder"] == "identity"
    loaded = MiroPipeline.from_pretrained(str(saved))
    loaded.set_progress_bar_config(disable=True)
    # Exactly the published tensor prefixes, fp32 floats and bool masks.
    sd = load_file(str(saved / "model.safetensors"))
    assert {k.split(".")[0] for k in sd} == {"network", "preconditioning", "data_preprocessing", "postprocessing"}
    assert {v.dtype for v in sd.values()} == {torch.float32, torch.bool}
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert torch.equal(loaded.uncond_embedding, pipe.uncond_embedding)
    assert loaded.reward_bins.to_dict() == pipe.reward_bins.to_dict()
    a = pipe(PROMPTS, generator=gen(3), num_images_per_prompt=2, **KW)
    b = loaded(PROMPTS, generator=gen(3), num_images_per_prompt=2, **KW)
    assert a.shape == (4, 8, 8, 3) and np.array_equal(a, b)


def test_same_generator_same_images_other_seed_differs(pipe):
    a = pipe(PROMPTS, generator=gen(1), **KW)
    b = pipe(PROMPTS, generator=gen(1), **KW)
    c = pipe(PROMPTS, generator=gen(2), **KW)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_generator_list_seeds_each_image(pipe):
    # Image k of a batch with per-image generators equals a batch of one with that seed.
    batch = pipe(PROMPTS, num_images_per_prompt=2, generator=[gen(s) for s in (5, 6, 7, 8)], **KW)
    single = pipe(PROMPTS[1], generator=gen(7), **KW)
    assert np.array_equal(batch[2], single[0])
    with pytest.raises(ValueError, match="got 3 generators for 4 images"):
        pipe(PROMPTS, num_images_per_prompt=2, generator=[gen(0)] * 3, **KW)


def _spy(pipe, monkeypatch):
    calls = []
    forward = pipe.model.forward

    def record(y, gamma, emb, mask, coherence=None, previous_latents=None, **kw):
        calls.append(dict(y=y.clone(), gamma=gamma.clone(), emb=emb.clone(), mask=mask.clone(),
                          coherence={k: v.clone() for k, v in (coherence or {}).items()},
                          prev=previous_latents))
        return forward(y, gamma, emb, mask, coherence, previous_latents, **kw)

    monkeypatch.setattr(pipe.model, "forward", record)
    return calls


@pytest.mark.parametrize("text", ["t5", "bert"])
def test_published_order_of_operations(text, tmp_path, monkeypatch):
    p = tiny_pipeline(tmp_path, text=text)
    calls = _spy(p, monkeypatch)
    targets = {"clip_score": 0.25, "vqa_score": 0.5}
    out = p(PROMPTS, reward_targets=targets, negative_reward_targets={"aesthetic_score": 0.75},
            num_images_per_prompt=2, generator=gen(7), num_inference_steps=3, output_type="np")
    assert len(calls) == 3  # one 2B forward per step (batched CFG)
    first = calls[0]
    # One noise draw from the user's generator, shared by both halves.
    noise = torch.randn((4, 3, 8, 8), generator=gen(7))
    assert torch.equal(first["y"], torch.cat([noise, noise]))
    assert first["prev"] is None and calls[1]["prev"] is not None
    # Conditional half: prompt copies adjacent (A, A, B, B), exactly the encoder output.
    emb, mask = p.text_encoder.encode(PROMPTS)
    assert torch.equal(first["emb"][:4], emb.repeat_interleave(2, 0))
    assert torch.equal(first["mask"][:4], mask.repeat_interleave(2, 0))
    # Unconditional half: the stored tokens, then zeros with a False mask.
    u = p.uncond_embedding
    n_u = u.shape[0]
    assert n_u == (1 if text == "t5" else 2)
    assert torch.equal(first["emb"][4:, :n_u], u.expand(4, -1, -1))
    assert torch.equal(first["emb"][4:, n_u:], torch.zeros(4, 8 - n_u, u.shape[1]))
    assert first["mask"][4:].tolist() == [[True] * n_u + [False] * (8 - n_u)] * 4
    # Rewards: [positive (default 1.0) ; negative (default 0.0)].
    for key in p.coherence_keys:
        pos = targets.get(key, 1.0)
        neg = 0.75 if key == "aesthetic_score" else 0.0
        assert first["coherence"][key].tolist() == [pos] * 4 + [neg] * 4, key
    # The pipeline's image is exactly sampler -> postprocess -> truncating uint8.
    x0 = euler_sample(p.model, noise, emb.repeat_interleave(2, 0), mask.repeat_interleave(2, 0),
                      u, None, targets, {"aesthetic_score": 0.75}, num_steps=3, guidance_scale=7.0)
    assert np.array_equal(out, to_uint8(p.model.postprocess(x0)))


def test_no_guidance_runs_conditional_branch_only(pipe, monkeypatch):
    calls = _spy(pipe, monkeypatch)
    pipe(PROMPTS, guidance_scale=0.0, generator=gen(0), **KW)
    assert len(calls) == 3 and all(c["y"].shape[0] == 2 for c in calls)


def test_split_cfg_close_to_batched(pipe):
    a = pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt")
    b = pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt", batched_cfg=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_reward_guidance_scale_runs_three_branches(pipe, monkeypatch):
    """A separate reward scale adds a (prompt, negative targets) branch: 3B rows per step, and
    the image changes; w_r = w is the published two-branch call."""
    base = pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt")
    assert torch.equal(pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt",
                            reward_guidance_scale=7.0), base)
    calls = _spy(pipe, monkeypatch)
    out = pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt", reward_guidance_scale=20.0)
    assert len(calls) == 3 and all(c["y"].shape[0] == 6 for c in calls)
    assert (out - base).abs().max() > 1e-3


def test_per_reward_guidance_scales(pipe, monkeypatch):
    """A mapping gives each reward its own scale: a chain of branches, one per run of equal scales;
    every scale = w is the published call."""
    keys = pipe.coherence_keys
    calls = _spy(pipe, monkeypatch)
    out = pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt",
               reward_guidance_scale={keys[1]: 20.0, keys[0]: 0.0})
    # (prompt, r+), (prompt, r+ with k1 at r-), (.. and k0), (prompt, r-), (null, r-): five branches of two
    assert len(calls) == 3 and all(c["y"].shape[0] == 10 for c in calls)
    calls.clear()
    pipe(PROMPTS, generator=gen(0), num_inference_steps=1, output_type="pt", reward_guidance_scale={keys[0]: 2.0},
         reward_direction="null")
    assert [c["y"].shape[0] for c in calls] == [8]  # (prompt, r+), (null, r+), (null, r+ k0 at r-), (null, r-)
    base = pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt")
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(base, pipe(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="pt",
                                  reward_guidance_scale={k: 7.0 for k in keys}))
    with pytest.raises(ValueError, match=r"unknown reward keys \['nope'\]"):
        pipe(PROMPTS, generator=gen(0), **KW, reward_guidance_scale={"nope": 1.0})
    with pytest.raises(ValueError, match=rf"reward_guidance_scale\['{keys[1]}'\] = -1\.0; .*finite number >= 0"):
        pipe(PROMPTS, generator=gen(0), **KW, reward_guidance_scale={keys[1]: -1.0})


def test_reward_direction_reaches_the_sampler(pipe, monkeypatch):
    """``reward_direction="null"`` steps the rewards on the null text (only the first branch carries
    the prompt); ``"prompt"`` steps them on the prompt (only the last branch is the null text)."""
    keys = pipe.coherence_keys
    calls = _spy(pipe, monkeypatch)
    for direction, prompt_rows in (("null", [True, False, False, False]), ("prompt", [True, True, True, False])):
        calls.clear()
        pipe(PROMPTS, generator=gen(0), num_inference_steps=1, output_type="pt",
             reward_guidance_scale={keys[0]: 2.0}, reward_direction=direction)
        emb = calls[0]["emb"].chunk(4)
        assert [torch.equal(e, emb[0]) for e in emb] == prompt_rows, direction


def test_reward_targets_are_fp32_rounded_and_filled(pipe):
    """A target is read back as a Python float from fp32 (spec §5.1); keys not given get the
    default (1.0 for the positive targets, the given default otherwise)."""
    t = pipe.check_reward_targets({"clip_score": 0.3})
    assert t["clip_score"] == float(np.float32(0.3)) and t["clip_score"] != 0.3
    assert set(t) == set(pipe.coherence_keys)
    assert all(t[k] == 1.0 for k in pipe.coherence_keys if k != "clip_score")
    neg = pipe.check_reward_targets(None, default=0.0, name="negative_reward_targets")
    assert neg == {k: 0.0 for k in pipe.coherence_keys}


def test_output_types(pipe):
    arr = pipe(PROMPTS, generator=gen(4), **KW)
    assert arr.dtype == np.uint8 and arr.shape == (2, 8, 8, 3)
    assert np.array_equal(pipe(PROMPTS, generator=gen(4), num_inference_steps=3, output_type="numpy"), arr)
    pt = pipe(PROMPTS, generator=gen(4), num_inference_steps=3, output_type="pt")
    assert pt.dtype == torch.float32 and pt.shape == (2, 3, 8, 8)
    assert pt.min() >= 0 and pt.max() <= 1
    # np is the truncating uint8 cast of pt.
    assert np.array_equal((pt * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), arr)
    pil = pipe(PROMPTS, generator=gen(4), num_inference_steps=3)
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), arr)


def test_variant_subfolders(pipe, tmp_path):
    other = tiny_pipeline(tmp_path / "enc2", text="bert", seed=1)
    pipe.save_pretrained(tmp_path / "repo", variant="miro-a")
    other.save_pretrained(tmp_path / "repo", variant="miro-b")
    a = MiroPipeline.from_pretrained(tmp_path / "repo", variant="miro-a")
    b = MiroPipeline.from_pretrained(tmp_path / "repo", variant="miro-b")
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    assert np.array_equal(a(PROMPTS, generator=gen(0), **KW), pipe(PROMPTS, generator=gen(0), **KW))
    assert np.array_equal(b(PROMPTS, generator=gen(0), **KW), other(PROMPTS, generator=gen(0), **KW))
    with pytest.raises(ValueError, match=r"'miro-c' not found.*\['miro-a', 'miro-b'\]"):
        MiroPipeline.from_pretrained(tmp_path / "repo", variant="miro-c")
    with pytest.raises(ValueError, match=r"pass variant= one of \['miro-a', 'miro-b'\]"):
        MiroPipeline.from_pretrained(tmp_path / "repo")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=""), "non-empty string"),
        (dict(prompt=["ok", 3]), "got 3"),
        (dict(prompt=[]), "non-empty"),
        (dict(reward_targets={"nope": 1.0}), r"\['nope'\].*valid keys: \['clip_score'"),
        (dict(negative_reward_targets={"clip_scor": 0.0}), "clip_scor"),
        (dict(reward_targets={"clip_score": float("nan")}), r"clip_score.*nan.*finite numbers in \[0, 1\]"),
        (dict(reward_targets={"clip_score": 1.5}), r"1\.5.*\[0, 1\]"),
        (dict(negative_reward_targets={"vqa_score": -0.1}), r"-0\.1"),
        (dict(reward_targets={"clip_score": "high"}), "'high'"),
        (dict(num_inference_steps=0), "num_inference_steps.*>= 1; got 0"),
        (dict(num_inference_steps=2.5), "got 2.5"),
        (dict(guidance_scale=-1.0), r"guidance_scale.*>= 0; got -1\.0"),
        (dict(reward_guidance_scale=-2.0), r"reward_guidance_scale.*None or a finite number >= 0 .*; got -2\.0"),
        (dict(reward_guidance_scale="3"), r"reward_guidance_scale.*got '3'"),
        (dict(reward_guidance_scale=3.0, reward_direction="text"), r"'prompt' or 'null'; got 'text'"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt.*got 0"),
        (dict(output_type="jpeg"), r"\['pil', 'np', 'numpy', 'pt', 'latent'\]; got 'jpeg'"),
        (dict(generator=0), "torch.Generator"),
    ],
)
def test_bad_call_inputs(pipe, kwargs, match):
    args = dict(prompt="a red circle", num_inference_steps=1, output_type="np")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe(**args)


def test_missing_file_is_named(saved, tmp_path):
    import shutil

    broken = shutil.copytree(saved, tmp_path / "broken")
    (broken / "uncond_embedding.npy").unlink()
    with pytest.raises(ValueError, match="missing 'uncond_embedding.npy'") as e:
        MiroPipeline.from_pretrained(broken)
    assert isinstance(e.value, FileNotFoundError)


def test_a_save_killed_over_another_pipeline_does_not_load(tmp_path, monkeypatch):
    import miro.pipeline as P
    from miro.hub import MissingFileError

    a = tiny_pipeline(tmp_path / "enc", seed=0, reward_bins=RewardBins(4, {"clip_score": [0.0, 0.1, 0.2, 0.3, 0.4]}))
    b = tiny_pipeline(tmp_path / "enc", seed=1, reward_bins=RewardBins(4, {"clip_score": [0.0, 0.2, 0.4, 0.6, 0.8]}))
    folder = a.save_pretrained(tmp_path / "p")

    def killed(*args):  # the save dies once the new weights are in place
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "np_save", killed)
    with pytest.raises(KeyboardInterrupt):
        b.save_pretrained(folder)
    monkeypatch.undo()
    # new weights beside the old uncond embedding and bins: refused, not loaded as a mix
    with pytest.raises(MissingFileError, match="missing 'config.json'"):
        MiroPipeline.from_pretrained(folder)
    # a pipeline without bins saved over one with bins leaves none of the old ones behind
    b.reward_bins = None
    b.save_pretrained(folder)
    assert MiroPipeline.from_pretrained(folder).reward_bins is None


@pytest.mark.parametrize("edit,match", [
    ("drop", "'network.latents'"),
    ("shape", r"'network.text_registers' has shape \(3, 32\)"),
    ("float_mask", "'network.cond_mask' has dtype torch.float32"),
    ("int_weights", "'network.latents' has dtype torch.int32, expected torch.float32"),
    ("extra", "unexpected tensor 'network.extra'"),
])
def test_mismatched_safetensors_names_first_mismatch(saved, tmp_path, edit, match):
    import shutil

    broken = shutil.copytree(saved, tmp_path / "broken")
    sd = load_file(str(broken / "model.safetensors"))
    if edit == "drop":
        del sd["network.latents"]
    elif edit == "shape":
        sd["network.text_registers"] = sd["network.text_registers"][:3].contiguous()
    elif edit == "float_mask":
        sd["network.cond_mask"] = sd["network.cond_mask"].float()
    elif edit == "int_weights":  # a damaged file: a float tensor stored as integers
        sd["network.latents"] = sd["network.latents"].int()
    else:
        sd["network.extra"] = torch.zeros(1)
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        MiroPipeline.from_pretrained(broken)


def test_dtype_aliases(saved, tmp_path):
    for kw in (dict(dtype=torch.bfloat16), dict(torch_dtype=torch.bfloat16), dict(dtype="bf16"),
               dict(torch_dtype="bfloat16", dtype=torch.bfloat16)):
        p = MiroPipeline.from_pretrained(saved, **kw)
        assert p.dtype == torch.bfloat16
        dtypes = {v.dtype for v in p.model.state_dict().values()}
        assert dtypes == {torch.bfloat16, torch.bool}  # masks stay bool
    with pytest.raises(ValueError, match="disagree"):
        MiroPipeline.from_pretrained(saved, dtype="fp16", torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        MiroPipeline.from_pretrained(saved, dtype="int8")
    # Saving a bf16 pipeline writes float32 tensors, as published.
    out = p.save_pretrained(tmp_path / "bf16")
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.float32, torch.bool}
    with pytest.raises(ValueError, match="needs a CUDA device"):
        p("a red circle", num_inference_steps=1)


def test_score_to_target(pipe, tmp_path):
    # 4 bins with edges 0, .1, .2, .3, .4: bin index / (B - 1).
    assert pipe.score_to_target("clip_score", 0.05) == 0.0
    assert pipe.score_to_target("clip_score", 0.15) == pytest.approx(1 / 3)
    assert pipe.score_to_target("clip_score", 0.99) == 1.0
    np.testing.assert_allclose(pipe.score_to_target("clip_score", np.array([0.25, -1.0])), [2 / 3, 0.0])
    with pytest.raises(ValueError, match=r"'hpsv2_score'.*\['clip_score'\]"):
        pipe.score_to_target("hpsv2_score", 0.2)
    no_bins = tiny_pipeline(tmp_path, text="bert")
    with pytest.raises(ValueError, match="no reward_bins.json"):
        no_bins.score_to_target("clip_score", 0.2)


def test_latent_space_pipeline_with_autoencoder_kl(tmp_path):
    p = tiny_pipeline(tmp_path, text="bert", codec="vae")
    out = p(PROMPTS, generator=gen(0), **KW)
    assert out.shape == (2, 16, 16, 3)  # 8x8 latents, downsample 2
    emb, mask = p.text_encoder.encode(PROMPTS)
    noise = torch.randn((2, 4, 8, 8), generator=gen(0))
    x0 = euler_sample(p.model, noise, emb, mask, p.uncond_embedding, None, num_steps=3)
    assert np.array_equal(out, to_uint8(p.autoencoder.decode(p.model.postprocess(x0))))
    saved = p.save_pretrained(tmp_path / "saved")
    q = MiroPipeline.from_pretrained(saved)
    q.set_progress_bar_config(disable=True)
    assert np.array_equal(q(PROMPTS, generator=gen(0), **KW), out)


def test_overrides_and_coherence_keys(saved, pipe):
    from miro import REWARD_KEYS

    assert pipe.coherence_keys == REWARD_KEYS
    q = MiroPipeline.from_pretrained(saved, text_encoder=pipe.text_encoder, vae="identity")
    assert q.text_encoder is pipe.text_encoder
    with pytest.raises(ValueError, match="unknown autoencoder 'nope'"):
        MiroPipeline.from_pretrained(saved, vae="nope")
    # A text encoder of another width is refused with both widths named.
    wrong = MiroPipeline.from_pretrained(saved, text_encoder="minilm")
    with pytest.raises(ValueError, match="384-d embeddings.*24-d text"):
        wrong("a red circle", num_inference_steps=1)
