"""The reward API contract (docs/rewards.md): common factory arguments, optional prompts for the
image-only scorers, and numpy numbers as per-reward guidance scales."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from miro.models.sampler import reward_scale_groups
from miro.rewards import available, load_scorer
from miro.rewards.base import check_prompts
from miro.shapes.render import render
from miro.shapes.rewards import PROMPT_KEYS, REWARD_KEYS, ShapesScorer, score_all
from miro.shapes.scene import Scene, ShapeObject

SHAPES_KEYS = [k for k in available() if k.startswith("shapes_")]
COMMON_KWARGS = dict(device="cpu", dtype="float32", batch_size=2, local_files_only=True, revision="main")
IMAGE_ONLY = [k for k in REWARD_KEYS if k not in PROMPT_KEYS]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # two tiny renders as a (B, 3, H, W) tensor in [0, 1], as in tests/test_shapes_rewards.py
    a = render(Scene([ShapeObject("circle", "red", 0.1, 0.3, 0.35)]))
    b = render(Scene([ShapeObject("square", "blue", 0.6, 0.35, 0.3)]))
    return torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 255


def test_every_shapes_factory_accepts_the_common_arguments(images):
    assert set(SHAPES_KEYS) == set(REWARD_KEYS)
    for key in SHAPES_KEYS:
        for name, value in COMMON_KWARGS.items():
            assert isinstance(load_scorer(key, **{name: value}), ShapesScorer)
        s = load_scorer(key, **COMMON_KWARGS)
        assert s.batch_size == 2 and s.local_files_only and s.revision == "main"
    # the arguments do not change the (CPU, float32) scores
    plain = load_scorer("shapes_alignment")
    odd = load_scorer("shapes_alignment", device="cuda", dtype=torch.bfloat16, batch_size=1)
    out = odd.score(images, "a red circle")
    assert out.dtype == torch.float32 and out.device.type == "cpu" and odd.device.type == "cpu"
    assert torch.equal(out, plain.score(images, "a red circle"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), r"batch_size must be a positive integer; got 0"),
    (dict(batch_size=True), r"batch_size .* got True"),
    (dict(batch_size=2.5), r"batch_size .* got 2\.5"),
    (dict(dtype="int8"), r"dtype='int8' is not one of"),
    (dict(device="gpu"), r"device='gpu' is not a torch device"),
])
def test_shapes_factory_rejects_bad_common_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_scorer("shapes_sharpness", **kwargs)


@pytest.mark.parametrize("key", IMAGE_ONLY)
def test_image_only_scorers_need_no_prompts(images, key):
    s = load_scorer(key)
    with_prompts = s.score(images, ["a red circle", "a blue square"])
    for out in (s.score(images), s.score(images, None), s(images)):
        assert torch.equal(out, with_prompts)
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):  # given prompts are still checked
        s.score(images, ["a"] * 3)


@pytest.mark.parametrize("key", PROMPT_KEYS)
def test_prompt_dependent_scorers_name_themselves_without_prompts(images, key):
    s = load_scorer(key)
    for call in (lambda: s.score(images), lambda: s.score(images, None), lambda: s(images)):
        with pytest.raises(ValueError, match=rf"^{key} needs the prompts"):
            call()


def test_score_all_without_prompts(images):
    only_image = score_all(images, None, keys=tuple(IMAGE_ONLY))
    assert set(only_image) == set(IMAGE_ONLY)
    with pytest.raises(ValueError, match="each of shapes_alignment, shapes_counting needs the prompts"):
        score_all(images, None, keys=("shapes_alignment", "shapes_counting", "shapes_sharpness"))


def test_check_prompts_none_names_the_scorer():
    with pytest.raises(ValueError, match="clip_score needs the prompts"):
        check_prompts(None, 2, scorer="clip_score")
    with pytest.raises(ValueError, match="this scorer needs the prompts"):
        check_prompts(None, 2)


KEYS = ("shapes_alignment", "shapes_counting", "shapes_position")


@pytest.mark.parametrize("conv", [np.float32, np.float64, np.int64, float])
def test_numpy_scales_give_the_same_groups(conv):
    # exactly representable values, so float32 and float64 agree with the Python floats
    scales = {"shapes_alignment": 15.0, "shapes_position": 2.0 if conv is np.int64 else 2.5, "shapes_counting": 0.0}
    expected = reward_scale_groups(KEYS, scales, 7.0)
    got = reward_scale_groups(KEYS, {k: conv(v) for k, v in scales.items()}, 7.0)
    assert got == expected and all(type(w) is float for _, w in got)
    assert reward_scale_groups(KEYS, {"shapes_alignment": conv(7)}, 7.0) == [(KEYS, 7.0)]


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), math.nan, np.float32("nan"), math.inf,
                                 np.float64("-inf"), -1.0, np.float32(-0.5), "3", None])
def test_bad_scales_still_rejected(bad):
    with pytest.raises(ValueError, match=r"reward_guidance_scale\['shapes_alignment'\] = .*finite number >= 0"):
        reward_scale_groups(KEYS, {"shapes_alignment": bad}, 7.0)


class _TwoRewardField(torch.nn.Module):
    """MiroModel stand-in whose velocity depends on the text and (non-additively) on two rewards."""

    coherence_keys = ("a", "b")

    def forward(self, y, gamma, emb, mask, coherence=None, previous_latents=None):
        ra, rb, text = coherence["a"], coherence["b"], emb[..., 0].mean(1)
        v = ra + 2 * rb + ra * rb + text + ra * text
        return y * 0 + v.reshape(-1, 1, 1, 1), torch.zeros(y.shape[0], 2, 3)


def test_sampler_takes_numpy_scales():
    from miro.models import euler_sample

    emb, mask, unc = torch.full((2, 4, 5), 0.5), torch.ones(2, 4, dtype=torch.bool), torch.full((1, 5), -0.25)

    def run(w, scales):
        return euler_sample(_TwoRewardField(), torch.zeros(2, 1, 2, 2), emb, mask, unc, None, {"a": 0.8, "b": 0.9},
                            {"a": 0.2, "b": 0.1}, num_steps=2, guidance_scale=w, reward_guidance_scale=scales)

    ref = run(3.0, {"a": 7.0, "b": 2.0})
    assert torch.equal(run(np.float32(3), {"a": np.float32(7), "b": np.int64(2)}), ref)
    assert torch.equal(run(np.float64(3), np.float32(7)), run(3.0, 7.0))
    for bad in (dict(guidance_scale=True), dict(reward_guidance_scale=np.float32("nan"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            run(bad.get("guidance_scale", 3.0), bad.get("reward_guidance_scale", 7.0))


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_every_published_scorer_rejects_a_bad_batch_size_before_loading(bad):
    from miro import REWARD_KEYS

    for key in REWARD_KEYS:
        extra = {"trust_remote_code": True} if key == "clip_score" else {}  # jina-clip-v2's opt-in
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive integer; got {bad!r}$"):
            load_scorer(key, batch_size=bad, **extra)


@pytest.mark.parametrize("name", ["pick_a_score_score", "sciscore_score", "image_reward_score", "vqa_score"])
def test_a_misspelt_argument_of_a_forwarding_factory_is_named_before_loading(name):
    # these factories pass **kwargs on; their signature lists what the scorer takes
    with pytest.raises(ValueError, match=f"reward '{name}' takes no argument 'batchsize'; it takes: model, .*batch_size"):
        load_scorer(name, batchsize=4)


def test_every_scorer_has_load_and_empty_images_are_named():
    from PIL import Image

    s = load_scorer("shapes_alignment")
    assert s.load() is s  # nothing to load, as docs/rewards.md promises for every scorer
    with pytest.raises(ValueError, match=r"images\[1\] is empty \(0x0 pixels\)"):
        s.score([Image.new("RGB", (8, 8)), Image.new("RGB", (0, 0))], ["a red circle"] * 2)
