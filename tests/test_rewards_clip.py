"""CLIP-like scorers (clip_score, pick_a_score_score, sciscore_score) and the aesthetic predictor on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _rewards_support import save_tiny_clip

PROMPTS = ["a photo of a dog", "two red cats", "a blue image", "the green dog on the left", "three cats"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tinyclip"), seed=1)


@pytest.fixture(scope="module")
def images():
    g = np.random.default_rng(0)
    sizes = [(40, 40), (48, 40), (40, 56), (64, 64), (33, 47)]
    return [Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


def _reference_logits(clip_dir, scorer, images, prompts):
    """transformers' own CLIPModel.forward on the same inputs: diag(logits_per_image)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    enc = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    px = scorer.backbone.transform(images)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
    return out.logits_per_image.diag(), model.logit_scale.exp().item()


def test_clip_score_equals_diag_of_logits_per_image(clip_dir, images):
    from miro.rewards import load_scorer

    s = load_scorer("clip_score", model=str(clip_dir), device="cpu", batch_size=2)
    assert s.backbone.model is None and s.load() is s and s.backbone.model is not None  # lazy until load()
    raw = s.score(images, PROMPTS)
    ref, scale = _reference_logits(clip_dir, s, images, PROMPTS)
    torch.testing.assert_close(raw, ref, rtol=1e-4, atol=1e-4)
    # exp(logit_scale) · cos with the scale from the checkpoint, and MIRO's value is raw / 100
    cos = (s.embed_image(images) * s.embed_text(PROMPTS)).sum(-1)
    torch.testing.assert_close(raw, scale * cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.normalize(raw), raw / 100)
    assert raw.std() > 0  # different (image, prompt) pairs get different scores


def test_pickscore_is_exp_logit_scale_times_cosine(tmp_path, images):
    from miro.rewards import load_scorer

    d = save_tiny_clip(tmp_path / "pick", seed=2, logit_scale=2.0)
    s = load_scorer("pick_a_score_score", model=str(d), tokenizer=str(d), image_size=32, device="cpu")
    raw = s.score(images, PROMPTS)
    img, txt = s.embed_image(images), s.embed_text(PROMPTS)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(raw, math.exp(2.0) * (img * txt).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.similarity(img, txt), raw)
    torch.testing.assert_close(s.normalize(raw), raw / 100)
    assert raw.abs().max() <= math.exp(2.0) + 1e-4


def test_sciscore_loads_clip_and_scores_like_pickscore(clip_dir, images):
    from miro.rewards import load_scorer

    sci = load_scorer("sciscore_score", model=str(clip_dir), tokenizer=str(clip_dir), image_size=32, device="cpu")
    pick = load_scorer("pick_a_score_score", model=str(clip_dir), tokenizer=str(clip_dir), image_size=32, device="cpu")
    torch.testing.assert_close(sci.score(images, PROMPTS), pick.score(images, PROMPTS))
    assert sci.key == "sciscore_score" and pick.key == "pick_a_score_score"


def test_batch_size_does_not_change_scores(clip_dir, images):
    from miro.rewards import load_scorer

    a = load_scorer("clip_score", model=str(clip_dir), device="cpu", batch_size=1).score(images, PROMPTS)
    b = load_scorer("clip_score", model=str(clip_dir), device="cpu", batch_size=4).score(images, PROMPTS)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tensor_path_matches_pil_and_keeps_gradients(clip_dir, images):
    from miro.rewards import load_scorer

    s = load_scorer("clip_score", model=str(clip_dir), device="cpu")
    assert s.differentiable
    x = torch.stack([torch.from_numpy(np.asarray(im.resize((48, 48)), dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
    pil = [im.resize((48, 48)) for im in images]
    x.requires_grad_(True)
    raw = s.score(x, PROMPTS)
    torch.testing.assert_close(raw, s.score(pil, PROMPTS), rtol=0, atol=2e-2)
    raw.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # a PIL batch builds no graph (frozen weights)
    assert not s.score(pil, PROMPTS).requires_grad


def test_bfloat16_returns_float32_close_to_float32(clip_dir, images):
    from miro.rewards import load_scorer

    f32 = load_scorer("clip_score", model=str(clip_dir), device="cpu").score(images, PROMPTS)
    bf16 = load_scorer("clip_score", model=str(clip_dir), device="cpu", dtype="bfloat16").score(images, PROMPTS)
    assert bf16.dtype == torch.float32
    assert (bf16 - f32).abs().max() < 0.1  # measured 0.053; the four close scores span 0.19
    assert torch.equal(bf16.argsort(), f32.argsort())


def test_the_logit_scale_stays_float32_in_bfloat16(tmp_path):
    # exp(ln 100) from a bf16-rounded parameter is 98.86: a 1 % bias on every PickScore.
    from miro.rewards import load_scorer

    d = save_tiny_clip(tmp_path / "pick", seed=2, logit_scale=math.log(100.0))
    s = load_scorer("pick_a_score_score", model=str(d), tokenizer=str(d), image_size=32, device="cpu",
                    dtype="bfloat16")
    assert s.backbone.logit_scale().dtype == torch.float32
    assert s.backbone.logit_scale().item() == pytest.approx(100.0, rel=1e-6)
    assert s.backbone.model.logit_scale.dtype == torch.bfloat16  # the model itself is cast


def test_jina_needs_explicit_remote_code_opt_in(tmp_path):
    from miro.rewards import load_scorer

    with pytest.raises(ValueError, match="trust_remote_code=True") as e:
        load_scorer("clip_score")  # default: jinaai/jina-clip-v2
    assert "openai/clip-vit-large-patch14" in str(e.value)
    # a local folder whose config points at remote code is recognised too
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jina_clip", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_scorer("clip_score", model=str(tmp_path))
    with pytest.raises(ValueError, match="backend="):
        load_scorer("clip_score", model=str(tmp_path), backend="onnx")


def test_remote_backend_uses_generic_dual_encoder_api(clip_dir, images):
    """The jina path (AutoModel + get_image/text_features + logit_scale) on a stand-in dual encoder."""
    from miro.rewards import load_scorer

    remote = load_scorer("clip_score", model=str(clip_dir), backend="remote", trust_remote_code=True, image_size=32,
                         device="cpu")
    assert remote.backbone.api == "generic" and remote.backbone.max_length == 1024
    local = load_scorer("clip_score", model=str(clip_dir), device="cpu")
    square = [im.resize((40, 40)) for im in images]  # square inputs: both crop conventions coincide
    torch.testing.assert_close(remote.score(square, PROMPTS), local.score(square, PROMPTS), rtol=1e-5, atol=1e-5)


def test_prompt_count_must_match(clip_dir, images):
    from miro.rewards import load_scorer

    s = load_scorer("clip_score", model=str(clip_dir), device="cpu")
    with pytest.raises(ValueError, match="5 images but 2 prompts"):
        s.score(images, PROMPTS[:2])
    one = s.score(images[:2], "a dog")  # one prompt broadcasts
    torch.testing.assert_close(one, s.score(images[:2], ["a dog", "a dog"]))


def test_all_published_keys_are_registered():
    import miro
    from miro.rewards import REGISTRY, available

    names = available()
    for key in miro.REWARD_KEYS:
        assert key in names and callable(REGISTRY[key])


# ----------------------------------------------------------------------------- aesthetic
def _save_mlp(path, seed=0):
    from miro.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    mlp = AestheticMLP(16)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sd = mlp.state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return mlp.eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_is_affine_in_the_normalised_embedding(clip_dir, images, tmp_path, fmt):
    from miro.rewards import load_scorer

    mlp = _save_mlp(tmp_path / f"sac+logos+ava1-l14-linearMSE.{fmt}")
    s = load_scorer("aesthetic_score", model=str(clip_dir), mlp_weights=str(tmp_path / f"sac+logos+ava1-l14-linearMSE.{fmt}"),
                    device="cpu")
    raw = s.score(images)
    emb = s.embed_image(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(images)))
    w, b = mlp.affine()
    torch.testing.assert_close(raw, (emb @ w + b).squeeze(-1), rtol=1e-5, atol=1e-5)
    # affine: the score of a convex combination of embeddings is the combination of scores
    mix = 0.3 * emb[0] + 0.7 * emb[1]
    torch.testing.assert_close(s.mlp(mix), 0.3 * s.mlp(emb[0]) + 0.7 * s.mlp(emb[1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.normalize(raw), raw / 10)
    torch.testing.assert_close(s.score(images, PROMPTS), raw)  # prompts are ignored
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    s.score(x).sum().backward()
    assert s.differentiable and x.grad.abs().sum() > 0


def test_aesthetic_rejects_a_wrong_head(clip_dir, tmp_path):
    from miro.rewards import load_scorer

    torch.save({"layers.0.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.pth"))
    s = load_scorer("aesthetic_score", model=str(clip_dir), mlp_weights=str(tmp_path / "bad.pth"), device="cpu")
    with pytest.raises(ValueError, match="missing"):
        s.score([Image.new("RGB", (32, 32))])
    s2 = load_scorer("aesthetic_score", model=str(clip_dir), mlp_weights="https://example.invalid/x.pth", device="cpu")
    with pytest.raises(ValueError, match="downloads are disabled"):
        s2.score([Image.new("RGB", (32, 32))])
    # default: the published .pth URL, then the hub mirror; offline and uncached, both are reported
    s3 = load_scorer("aesthetic_score", model=str(clip_dir), device="cpu")
    with pytest.raises(ValueError, match="linearMSE.pth.*ttj/sac-logos-ava1-l14-linearMSE"):
        s3.score([Image.new("RGB", (32, 32))])


def test_aesthetic_head_from_a_folder_with_one_weight_file(clip_dir, images, tmp_path):
    from miro.rewards import load_scorer

    mlp = _save_mlp(tmp_path / "model.safetensors", seed=5)
    s = load_scorer("aesthetic_score", model=str(clip_dir), mlp_weights=str(tmp_path), device="cpu")
    w, b = mlp.affine()
    torch.testing.assert_close(s.score(images), (s.embed_image(images) @ w + b).squeeze(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["remote", "clip"])
def test_a_pinned_revision_also_pins_the_models_own_tokenizer(monkeypatch, backend):
    import transformers

    from miro.rewards import load_scorer

    calls = []

    def record(kind):
        def from_pretrained(name, **kw):
            calls.append((kind, name, kw.get("revision"), kw.get("trust_remote_code", False)))
            return (object(), {"missing_keys": []}) if kw.get("output_loading_info") else object()
        return from_pretrained

    for cls in (transformers.AutoModel, transformers.CLIPModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", record(cls.__name__))
    s = load_scorer("clip_score", model="org/clip", backend=backend, trust_remote_code=backend == "remote",
                    revision="0123abc")
    s.backbone._loader()
    model_cls = "AutoModel" if backend == "remote" else "CLIPModel"
    remote = backend == "remote"
    assert calls == [(model_cls, "org/clip", "0123abc", remote), ("AutoTokenizer", "org/clip", "0123abc", remote)]
    calls.clear()  # a tokenizer of another repo is not held to the model's revision
    load_scorer("clip_score", model="org/clip", tokenizer="org/tok", backend=backend, trust_remote_code=remote,
                revision="0123abc").backbone._loader()
    assert calls[1] == ("AutoTokenizer", "org/tok", None, remote)


# ----------------------------------------------------------------------------- damaged or odd input
def test_a_clip_folder_missing_weights_is_refused_not_filled_at_random(clip_dir, tmp_path):
    # transformers fills missing tensors with random values and only prints a table
    import shutil

    from safetensors.torch import load_file, save_file

    from miro.rewards import load_scorer

    dst = tmp_path / "damaged"
    shutil.copytree(clip_dir, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("visual_projection")}, str(dst / "model.safetensors"))
    for name in ("clip_score", "aesthetic_score"):
        s = load_scorer(name, model=str(dst), device="cpu")
        with pytest.raises(ValueError, match=r"missing \(1\): visual_projection.weight"):
            s.load()


def test_aesthetic_head_file_with_other_tensors_is_not_taken(clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from miro.rewards import load_scorer

    _save_mlp(tmp_path / "ok.safetensors")
    sd = load_file(str(tmp_path / "ok.safetensors"))
    save_file({**{f"mlp.{k}": v for k, v in sd.items()}, "junk": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    save_file({**{f"mlp.{k}": v for k, v in sd.items()}, **{f"head.{k}": v.clone() for k, v in sd.items()}},
              str(tmp_path / "two.safetensors"))
    save_file({f"mlp.{k}": v for k, v in sd.items()}, str(tmp_path / "wrapped.safetensors"))
    for f, message in (("extra", r"other tensors \(junk\)"), ("two", r"the prefixes \['head.', 'mlp.'\]")):
        s = load_scorer("aesthetic_score", model=str(clip_dir), mlp_weights=str(tmp_path / f"{f}.safetensors"))
        with pytest.raises(ValueError, match=f"is not an aesthetic MLP: .*{message}"):
            s.load()
    # one wrapper prefix is still unwrapped
    ok = load_scorer("aesthetic_score", model=str(clip_dir), mlp_weights=str(tmp_path / "ok.safetensors"))
    wrapped = load_scorer("aesthetic_score", model=str(clip_dir), mlp_weights=str(tmp_path / "wrapped.safetensors"))
    im = [Image.new("RGB", (32, 32), (200, 30, 30))]
    torch.testing.assert_close(ok.score(im), wrapped.score(im))


@pytest.mark.parametrize("kwargs, message", [
    (dict(trust_remote_code="false"), "trust_remote_code must be True or False; got 'false'"),
    (dict(image_size=0), "image_size must be a positive integer or None"),
    (dict(max_length=0), "max_length must be a positive integer or None"),
    (dict(device="gpu"), "device='gpu' is not a torch device"),
    (dict(dtype=torch.int64), "dtype=torch.int64 is not a floating-point dtype"),
])
def test_clip_score_arguments_are_checked_when_built(clip_dir, kwargs, message):
    from miro.rewards import load_scorer

    with pytest.raises(ValueError, match=message):
        load_scorer("clip_score", model=str(clip_dir), backend="clip", **kwargs)


def test_16_bit_grayscale_is_rescaled_and_rangeless_modes_refused(clip_dir):
    from miro.rewards import load_scorer

    s = load_scorer("clip_score", model=str(clip_dir), device="cpu")
    g8 = (np.arange(48 * 40).reshape(40, 48) % 256).astype(np.uint8)
    g16 = Image.fromarray(g8.astype(np.uint16) * 257)  # the same picture at 16 bits
    assert g16.mode == "I;16"
    torch.testing.assert_close(s.score([g16], ["a cat"]), s.score([Image.fromarray(g8).convert("RGB")], ["a cat"]))
    for arr, mode in ((np.zeros((8, 8), np.float32), "F"), (np.zeros((8, 8), np.int32), "I")):
        with pytest.raises(ValueError, match=f"images\\[0\\] has mode '{mode}'.*no fixed range"):
            s.score([Image.fromarray(arr)], ["a cat"])


def test_a_pickle_with_code_is_refused_in_one_line(tmp_path):
    import os

    from miro.rewards.weights import load_state_dict

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": torch.zeros(1), "x": Payload()}, str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match=r"evil.pth is not a plain weights file and is not loaded.*GLOBAL") as e:
        load_state_dict(tmp_path / "evil.pth")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
