"""MiroPipeline's diffusers-style API: ``.images`` / ``return_dict``, ``latents=``,
``output_type="latent"``, progress bar settings, ``from_pretrained`` compatibility arguments,
``half()``/``float()``/``cuda()``, reward target forms, and the prompt truncation warning."""

from __future__ import annotations

import copy
import io
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from miro.encoders.tiny import tiny_pipeline
from miro.models.sampler import euler_sample
from miro.pipeline import MiroPipeline, MiroPipelineOutput, _stored_float_dtype
from miro.rewards.binning import RewardBins

PROMPTS = ["a red circle", "a green star"]  # short: below the tiny max_text_len of 8 tokens
KW = dict(num_inference_steps=2, output_type="np")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    bins = RewardBins(4, {"clip_score": [0.0, 0.1, 0.2, 0.3, 0.4]})
    return tiny_pipeline(tmp_path_factory.mktemp("pipe") / "enc", text="bert", reward_bins=bins)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "p")


def fresh(saved, **kw) -> MiroPipeline:
    p = MiroPipeline.from_pretrained(saved, **kw)
    p.set_progress_bar_config(disable=True)
    return p


def _spy(p, monkeypatch):
    calls = []
    forward = p.model.forward

    def record(y, gamma, emb, mask, coherence=None, previous_latents=None, **kw):
        calls.append({k: v.clone() for k, v in (coherence or {}).items()})
        return forward(y, gamma, emb, mask, coherence, previous_latents, **kw)

    monkeypatch.setattr(p.model, "forward", record)
    return calls


# ---------------------------------------------------------------------- 1. .images, return_dict
def test_pil_output_is_a_list_with_images(pipe):
    out = pipe(PROMPTS, generator=gen(0), num_inference_steps=2)
    assert isinstance(out, list) and isinstance(out, MiroPipelineOutput)
    assert out.images is out and len(out) == 2 and out[0].size == (8, 8)
    assert [im.mode for im in out] == ["RGB", "RGB"]
    (plain,) = pipe(PROMPTS, generator=gen(0), num_inference_steps=2, return_dict=False)
    assert type(plain) is list
    assert np.array_equal(np.stack([np.asarray(i) for i in plain]), np.stack([np.asarray(i) for i in out]))


def test_array_and_tensor_outputs_keep_their_type_and_gain_images(pipe, tmp_path):
    arr = pipe(PROMPTS, generator=gen(1), **KW)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (2, 8, 8, 3)
    assert type(arr.images) is np.ndarray and np.array_equal(arr.images, arr)
    assert type(pickle.loads(pickle.dumps(arr))) is np.ndarray  # pickles as a plain array
    res = pipe(PROMPTS, generator=gen(1), return_dict=False, **KW)
    assert isinstance(res, tuple) and len(res) == 1 and type(res[0]) is np.ndarray
    assert np.array_equal(res[0], arr)

    pt = pipe(PROMPTS, generator=gen(1), num_inference_steps=2, output_type="pt")
    assert isinstance(pt, torch.Tensor) and type(pt.images) is torch.Tensor and torch.equal(pt.images, pt)
    assert type(pt * 2) is torch.Tensor and type(pt[0]) is torch.Tensor  # the subclass does not spread
    dup = copy.deepcopy(pt)
    assert torch.equal(dup.images, pt) and dup.data_ptr() != pt.data_ptr()
    torch.save(pt, tmp_path / "pt.pt")
    back = torch.load(tmp_path / "pt.pt", weights_only=True)
    assert type(back) is torch.Tensor and torch.equal(back, pt)
    (plain,) = pipe(PROMPTS, generator=gen(1), num_inference_steps=2, output_type="pt", return_dict=False)
    assert type(plain) is torch.Tensor and torch.equal(plain, pt)
    # np is still the truncating uint8 cast of pt.
    assert np.array_equal((pt * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), arr)
    with pytest.raises(ValueError, match="return_dict must be True or False; got 'no'"):
        pipe(PROMPTS, return_dict="no", **KW)


# ------------------------------------------------------------------------------- 2. latents=
def test_latents_are_the_noise_the_generator_would_draw(pipe):
    noise = torch.randn((4, 3, 8, 8), generator=gen(5))
    kept = noise.clone()
    ref = pipe(PROMPTS, num_images_per_prompt=2, generator=gen(5), **KW)
    g = gen(99)
    state = g.get_state()
    out = pipe(PROMPTS, num_images_per_prompt=2, latents=noise, generator=g, **KW)
    assert np.array_equal(out, ref)
    assert torch.equal(g.get_state(), state)  # the generator is not drawn from
    assert torch.equal(noise, kept)  # the caller's tensor is not changed
    assert np.array_equal(pipe(PROMPTS, num_images_per_prompt=2, latents=noise.double(), **KW), ref)


@pytest.mark.parametrize("latents,match", [
    (torch.zeros(1, 3, 8, 8), r"shape \(2, 3, 8, 8\).*got torch.float32 tensor of shape \(1, 3, 8, 8\)"),
    (torch.zeros(2, 4, 8, 8), r"\(2, 3, 8, 8\).*\(2, 4, 8, 8\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.long), "floating tensor.*torch.int64"),
    (np.zeros((2, 3, 8, 8), np.float32), "got ndarray"),
    (torch.full((2, 3, 8, 8), float("nan")), "NaN or infinite"),
])
def test_bad_latents_are_named(pipe, latents, match):
    with pytest.raises(ValueError, match=match):
        pipe(PROMPTS, latents=latents, **KW)


# ------------------------------------------------------------------------- 3. output_type="latent"
@pytest.mark.parametrize("codec", ["identity", "vae"])
def test_latent_output_decodes_to_the_pt_output(pipe, codec, tmp_path):
    p = pipe if codec == "identity" else tiny_pipeline(tmp_path, text="bert", codec="vae")
    channels = 3 if codec == "identity" else 4
    lat = p(PROMPTS, generator=gen(2), num_inference_steps=2, output_type="latent")
    assert lat.shape == (2, channels, 8, 8) and lat.dtype == torch.float32
    assert type(lat.images) is torch.Tensor
    # Closed form: the sampler's x0 from the same noise, before postprocessing and decoding.
    emb, mask = p.text_encoder.encode(PROMPTS)
    noise = torch.randn((2, channels, 8, 8), generator=gen(2))
    assert torch.equal(lat, euler_sample(p.model, noise, emb, mask, p.uncond_embedding, None, num_steps=2))
    pt = p(PROMPTS, generator=gen(2), num_inference_steps=2, output_type="pt")
    assert torch.equal(p.decode_latents(lat, "pt"), pt)
    assert np.array_equal(p.decode_latents(lat, "np"), p(PROMPTS, generator=gen(2), **KW))
    assert p.decode_latents(lat).images[1].size == pt.shape[-2:][::-1]
    (plain,) = p(PROMPTS, generator=gen(2), num_inference_steps=2, output_type="latent", return_dict=False)
    assert type(plain) is torch.Tensor and torch.equal(plain, lat)
    with pytest.raises(ValueError, match=r"latents must be a \(B, 3, 8, 8\) tensor; got \(2, 8, 8\)"):
        pipe.decode_latents(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"\['pil', 'np', 'numpy', 'pt'\]; got 'latent'"):
        pipe.decode_latents(torch.zeros(1, 3, 8, 8), "latent")


# ---------------------------------------------------------------------- 4. progress bar settings
def test_progress_bar_config_reaches_tqdm(saved):
    p = fresh(saved)
    p.set_progress_bar_config(disable=True, leave=False)  # the diffusers idiom
    buf = io.StringIO()
    p.set_progress_bar_config(file=buf, desc="denoising", leave=True, mininterval=0)
    steps = []
    p(PROMPTS, generator=gen(0), num_inference_steps=3, output_type="np",
      callback=lambda i, g, x: steps.append(i))
    text = buf.getvalue()
    assert "denoising" in text and "3/3" in text
    assert steps == [0, 1, 2]  # the user's callback still runs, once per step
    buf2 = io.StringIO()
    p.set_progress_bar_config(file=buf2, disable=True)
    p(PROMPTS, generator=gen(0), **KW)
    assert buf2.getvalue() == ""
    with pytest.raises(ValueError, match=r"\['colour_me'\], which tqdm does not take; allowed: .*'leave'"):
        p.set_progress_bar_config(colour_me=True)


# ---------------------------------------------------------------- 5. from_pretrained arguments
def test_from_pretrained_accepts_diffusers_arguments(pipe, saved, tmp_path):
    ref = pipe(PROMPTS, generator=gen(3), **KW)
    for kw in (dict(use_safetensors=True), dict(low_cpu_mem_usage=True), dict(low_cpu_mem_usage=False),
               dict(torch_dtype="auto"), dict(dtype="AUTO", device="cpu")):
        p = fresh(saved, **kw)
        assert p.dtype == torch.float32, kw
        assert np.array_equal(p(PROMPTS, generator=gen(3), **KW), ref), kw
    with pytest.raises(ValueError, match="use_safetensors=False.*only as model.safetensors"):
        MiroPipeline.from_pretrained(saved, use_safetensors=False)
    # "auto" on a half-precision folder: float16 is what is stored, but off CUDA it is float32.
    half = shutil.copytree(saved, tmp_path / "half")
    state = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              str(half / "model.safetensors"))
    assert _stored_float_dtype({"model.safetensors": half / "model.safetensors"}) == torch.float16
    assert _stored_float_dtype({"model.safetensors": saved / "model.safetensors"}) == torch.float32
    assert _stored_float_dtype({}) == torch.float32
    assert fresh(half, torch_dtype="auto").dtype == torch.float32
    assert fresh(half, torch_dtype="auto", dtype=torch.bfloat16).dtype == torch.bfloat16  # explicit wins


# ------------------------------------------------------------- 6. half()/float()/cpu()/cuda()
def test_dtype_and_device_methods_go_through_to(saved, monkeypatch):
    p = fresh(saved)
    uncond = p.uncond_embedding.clone()
    assert p.half() is p and p.dtype == torch.float16
    assert {v.dtype for v in p.model.state_dict().values()} == {torch.float16, torch.bool}
    assert torch.equal(p.uncond_embedding, uncond)  # float32, not rounded through float16 and back
    with pytest.raises(ValueError, match="generation in torch.float16 needs a CUDA device"):
        p(PROMPTS, **KW)
    assert p.float().dtype == torch.float32 and p.cpu().device == torch.device("cpu")
    # Back in float32 the call runs; the weights keep their float16 rounding.
    ref = fresh(saved)
    ref.model.half().float()
    assert np.array_equal(p(PROMPTS, generator=gen(4), **KW), ref(PROMPTS, generator=gen(4), **KW))
    assert fresh(saved).bfloat16().dtype == torch.bfloat16
    # a named dtype, as torch_dtype takes it (miro generate --dtype passes one for a .ckpt)
    assert fresh(saved).to(dtype="bf16").dtype == torch.bfloat16
    named = fresh(saved).to("cpu", "float16")
    assert named.dtype == torch.float16 and named.device == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        fresh(saved).to(dtype="int8")
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        p.double()
    assert p.dtype == torch.float32 and p.model.network.latents.dtype == torch.float32
    seen = []
    monkeypatch.setattr(p, "to", lambda *a, **kw: seen.append((a, kw)) or p)
    p.cuda(), p.cuda(1), p.cuda("cuda:0")
    assert seen == [(("cuda",), {}), ((torch.device("cuda", 1),), {}), (("cuda:0",), {})]


# ----------------------------------------------------------------------------- 7. reward targets
def test_none_drops_a_reward_in_both_branches(pipe, monkeypatch):
    calls = _spy(pipe, monkeypatch)
    out = pipe(PROMPTS, reward_targets={"clip_score": None}, generator=gen(6), output_type="pt",
               num_inference_steps=2)
    assert "clip_score" not in calls[0] and set(calls[0]) == set(pipe.coherence_keys) - {"clip_score"}
    emb, mask = pipe.text_encoder.encode(PROMPTS)
    noise = torch.randn((2, 3, 8, 8), generator=gen(6))
    x0 = euler_sample(pipe.model, noise, emb, mask, pipe.uncond_embedding, None, {"clip_score": None},
                      {"clip_score": None}, num_steps=2)
    assert torch.equal(out, pipe.decode_latents(x0, "pt"))
    # Dropped in one branch only (either one): batched CFG gives what two forwards give
    for targets in (dict(negative_reward_targets={"clip_score": None}),
                    dict(reward_targets={"clip_score": None}, negative_reward_targets={"clip_score": 0.0})):
        batched = pipe(PROMPTS, generator=gen(6), output_type="latent", num_inference_steps=3, **targets)
        apart = pipe(PROMPTS, generator=gen(6), output_type="latent", num_inference_steps=3, batched_cfg=False,
                     **targets)
        torch.testing.assert_close(batched, apart, rtol=1e-4, atol=1e-5)
        both = pipe(PROMPTS, generator=gen(6), output_type="latent", num_inference_steps=3,
                    **{k: {"clip_score": 0.0} for k in targets})
        assert (batched - both).abs().max() > 1e-3  # the drop is not a no-op


def test_per_image_and_per_prompt_targets(pipe, monkeypatch):
    calls = _spy(pipe, monkeypatch)
    pipe(PROMPTS, reward_targets={"clip_score": [0.25, 0.75]}, generator=gen(0), **KW)
    assert calls[0]["clip_score"].tolist() == [0.25, 0.75, 0.0, 0.0]  # [positive ; negative]
    calls.clear()
    pipe(PROMPTS, num_images_per_prompt=2, reward_targets={"clip_score": np.array([0.25, 0.75])},
         negative_reward_targets={"vqa_score": torch.tensor([0.0, 0.5, 0.25, 1.0])}, generator=gen(0), **KW)
    assert calls[0]["clip_score"].tolist() == [0.25, 0.25, 0.75, 0.75] + [0.0] * 4  # one per prompt
    assert calls[0]["vqa_score"].tolist() == [1.0] * 4 + [0.0, 0.5, 0.25, 1.0]  # one per image
    monkeypatch.undo()
    # Equal per-image values are the scalar call, bit for bit.
    assert np.array_equal(pipe(PROMPTS, reward_targets={"clip_score": [0.5, 0.5]}, generator=gen(0), **KW),
                          pipe(PROMPTS, reward_targets={"clip_score": 0.5}, generator=gen(0), **KW))


@pytest.mark.parametrize("value,match", [
    ([0.1, 0.2, 0.3], r"has 3 values; give one per image \(2 = 2 prompts x 1\) or one per prompt \(2\)"),
    ([0.1, 1.5], r"\['clip_score'\]\[1\] = 1\.5; targets must be finite numbers in \[0, 1\]"),
    (torch.tensor([0.1, float("nan")]), r"\[1\] = nan"),
    ([0.1, None], "one per image"),
    ([[0.1, 0.2]], "1-D list/array/tensor"),
])
def test_bad_per_image_targets(pipe, value, match):
    with pytest.raises(ValueError, match=match):
        pipe(PROMPTS, reward_targets={"clip_score": value}, **KW)


def test_check_reward_targets_takes_numbers_only(pipe):
    assert pipe.check_reward_targets({"clip_score": np.array([0.5])})["clip_score"] == 0.5
    assert pipe.check_reward_targets({"clip_score": torch.tensor(1)})["clip_score"] == 1.0
    with pytest.raises(ValueError, match="None and per-image values are taken by the pipeline call only"):
        pipe.check_reward_targets({"clip_score": None})


def test_score_to_target_keeps_the_type_and_feeds_back(pipe):
    assert pipe.score_to_target("clip_score", 0.15) == pytest.approx(1 / 3)
    assert isinstance(pipe.score_to_target("clip_score", 0.15), float)
    t = pipe.score_to_target("clip_score", torch.tensor([0.7]))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.tolist() == [1.0]
    t0 = pipe.score_to_target("clip_score", torch.tensor(0.25, dtype=torch.float64))
    assert t0.shape == () and t0.item() == pytest.approx(2 / 3)
    arr = pipe.score_to_target("clip_score", np.array([0.05, 0.25]))
    assert isinstance(arr, np.ndarray)
    np.testing.assert_allclose(arr, [0.0, 2 / 3])
    # Fed back as targets: a 1-element tensor or array is one number; (B,) is per image.
    ref = pipe(PROMPTS, reward_targets={"clip_score": 1.0}, generator=gen(0), **KW)
    assert np.array_equal(pipe(PROMPTS, reward_targets={"clip_score": t}, generator=gen(0), **KW), ref)
    assert np.array_equal(
        pipe(PROMPTS, reward_targets={"clip_score": pipe.score_to_target("clip_score", np.array([0.7]))},
             generator=gen(0), **KW), ref)
    pipe(PROMPTS, reward_targets={"clip_score": arr}, generator=gen(0), **KW)
    with pytest.raises(ValueError, match=r"'clip_score'.*the score is NaN"):
        pipe.score_to_target("clip_score", float("nan"))
    with pytest.raises(ValueError, match=r"NaN at index \[1\]"):
        pipe.score_to_target("clip_score", torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="must be a number or an array/tensor of numbers"):
        pipe.score_to_target("clip_score", "high")


# ---------------------------------------------------------------------- 8. truncation warning
def test_truncated_prompts_warn_once_per_call(pipe):
    long = "one two three four five six seven eight nine"  # 9 words + [CLS] [SEP] = 11 > 8 tokens
    with pytest.warns(UserWarning, match=r"2 of 3 prompts are longer than the text encoder's 8 tokens.*"
                                         r"prompt 0 .*3 tokens dropped; prompt 2 .*1 token dropped") as rec:
        pipe([long, "a red circle", "one two three four five six seven"], num_images_per_prompt=2, **KW)
    assert len(rec) == 1 and rec[0].filename == __file__  # attributed to the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(PROMPTS, **KW)  # short prompts: no warning


# ------------------------------------------------------------- 9. damaged files and bad arguments
@pytest.mark.parametrize("name, damage, message", [
    ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:1000]), "is not a readable safetensors file"),
    ("config.json", lambda f: f.write_text("{not json"), "is not a readable JSON file"),
    ("reward_bins.json", lambda f: f.write_text("{not json"), "is not a readable reward bins file"),
    ("uncond_embedding.npy", lambda f: f.write_text("hello"), r"is not a readable .npy array \(not a .npy file\)"),
])
def test_a_damaged_pipeline_file_is_named(saved, tmp_path, name, damage, message):
    copy_ = tmp_path / "p"
    shutil.copytree(saved, copy_)
    damage(copy_ / name)
    with pytest.raises(ValueError, match=f"{name} {message}") as e:
        MiroPipeline.from_pretrained(copy_)
    assert "\n" not in str(e.value)


def test_public_helpers_refuse_what_they_would_get_wrong(pipe, tmp_path):
    with pytest.raises(ValueError, match="variant must be a plain subfolder name; got '../escape'"):
        pipe.save_pretrained(tmp_path / "sv", variant="../escape")
    assert not (tmp_path / "escape").exists()
    emb, mask = pipe.encode_prompt("a red circle")  # one prompt, not 12 one-letter prompts
    torch.testing.assert_close(emb, pipe.encode_prompt(["a red circle"])[0])
    assert emb.shape[0] == 1
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer; got 0"):
        pipe.encode_prompt(["a red circle"], 0)
    with pytest.raises(ValueError, match="got 1 generators for a batch of 3"):
        pipe.prepare_noise(3, [gen(0)])
    with pytest.raises(ValueError, match="generator must be a torch.Generator, a list of them or None; got 'x'"):
        pipe.prepare_noise(2, "x")
    x0 = pipe("a red circle", generator=gen(0), num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="latents contain NaN or infinite values"):
        pipe.decode_latents(torch.full_like(x0, float("nan")))


def test_a_bad_device_is_refused_before_loading(saved, monkeypatch):
    import miro.pipeline as P

    monkeypatch.setattr(P, "resolve_pipeline_dir", lambda *a, **k: pytest.fail("loaded before the device check"))
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        MiroPipeline.from_pretrained(saved, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available here"):
            MiroPipeline.from_pretrained(saved, device="cuda")
    monkeypatch.undo()
    p = fresh(saved)
    with pytest.raises(ValueError, match="MiroPipeline.to: .*expected a device"):
        p.to("gpu")


def test_diverged_sampling_is_an_error_not_black_images(pipe):
    with pytest.raises(ValueError, match=r"sampling diverged to NaN or infinite values \(guidance_scale=1e\+38"):
        pipe(PROMPTS, guidance_scale=1e38, generator=gen(0), **KW)


def test_non_finite_decoded_pixels_are_an_error_not_black_images(pipe, monkeypatch):
    monkeypatch.setattr(pipe.autoencoder, "decode", lambda z: torch.full((z.shape[0], 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"the autoencoder decoded NaN or infinite pixels \(pipeline dtype torch.float32\)"):
        pipe(PROMPTS, generator=gen(0), **KW)


def test_negative_prompt_replaces_the_null_text(pipe):
    from miro.models.sampler import euler_sample

    out = pipe(PROMPTS, negative_prompt="a blue square", generator=gen(3), num_inference_steps=2, output_type="latent")
    emb, mask = pipe.encode_prompt(PROMPTS)
    nemb, nmask = pipe.encode_prompt(["a blue square"] * 2)
    x0 = euler_sample(pipe.model, torch.randn((2, 3, 8, 8), generator=gen(3)), emb, mask, nemb, nmask, None, None,
                      num_steps=2, guidance_scale=7.0)
    torch.testing.assert_close(out, x0)
    default = pipe(PROMPTS, generator=gen(3), num_inference_steps=2, output_type="latent")
    assert (out - default).abs().max() > 1e-3
    per_prompt = pipe(PROMPTS, negative_prompt=["a blue square", "a blue square"], generator=gen(3),
                      num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(per_prompt, out)
    with pytest.raises(ValueError, match="got 1 negative prompts for 2 prompts"):
        pipe(PROMPTS, negative_prompt=["x"], **KW)
    with pytest.raises(ValueError, match="negative_prompt must be None, a string or a list of strings; got 3"):
        pipe(PROMPTS, negative_prompt=3, **KW)


def test_save_refuses_a_file_or_a_folder_of_other_files(pipe, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file; the pipeline goes into a folder"):
        pipe.save_pretrained(tmp_path / "afile")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json.bak").write_text("keep")
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds files but no pipeline \\(config.json.bak, notes.txt\\)"):
        pipe.save_pretrained(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json.bak", "notes.txt"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DModel"}')  # not a pipeline's
    with pytest.raises(ValueError, match="holds files but no pipeline \\(config.json\\)"):
        pipe.save_pretrained(tmp_path / "other")
    out = pipe.save_pretrained(tmp_path / "p")
    assert pipe.save_pretrained(out) == out  # over an earlier pipeline: replaced
