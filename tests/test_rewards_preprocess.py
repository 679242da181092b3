"""Reward-model image preprocessing: geometry, normalisation, PIL path vs differentiable tensor path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from miro.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    pil_resample_matrix,
)

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def _noise(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


def _unnorm(x):
    return x * STD + MEAN


def test_normalisation_is_openai_mean_std():
    x = torch.full((2, 3, 8, 8), 0.25)
    out = ImageTransform(size=8)(x)
    expected = (0.25 - MEAN) / STD
    torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rounding,offset", [("round", 4), ("floor", 3)])
def test_centre_crop_offsets_without_resize(rounding, offset):
    # 231 wide, 224 high: no resize (short side = 224), crop 7 columns; torchvision int(round(3.5)) = 4, HF 7 // 2 = 3
    im, x = _noise(224, 231)
    t = ImageTransform(size=224, crop_rounding=rounding)
    expected = x[..., :, offset : offset + 224]
    torch.testing.assert_close(_unnorm(t.from_pil([im])), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_unnorm(t.from_tensor(x)), expected, rtol=0, atol=1e-6)


def test_shortest_side_resize_geometry():
    t = ImageTransform(size=224)
    assert t.resized_hw(200, 300) == (224, 336)  # short side to 224, long side truncated
    assert t.resized_hw(301, 200) == (337, 224)  # int(224 * 301 / 200) = 337
    assert t.resized_hw(224, 500) == (224, 500)  # already the right short side: untouched
    p = ImageTransform(size=224, resize="longest_pad")
    assert p.resized_hw(100, 300) == (75, 224)  # ResizeMaxSize rounds: round(100 * 224/300) = 75


def test_pil_resample_matrix_rows_sum_to_one_and_identity():
    for n_in, n_out in [(97, 32), (13, 336), (50, 64)]:
        w = pil_resample_matrix(n_in, n_out)
        torch.testing.assert_close(w.sum(1), torch.ones(n_out), rtol=0, atol=1e-6)
    torch.testing.assert_close(pil_resample_matrix(17, 17), torch.eye(17), rtol=0, atol=1e-6)


@pytest.mark.parametrize("h,w,size,mode", [(97, 131, 32, "shortest"), (40, 50, 64, "shortest"),
                                           (131, 97, 32, "longest_pad"), (13, 20, 48, "shortest")])
def test_pil_and_tensor_paths_agree(h, w, size, mode):
    im, x = _noise(h, w, seed=h)
    t = ImageTransform(size=size, resize=mode)
    a, b = t.from_pil([im]), t.from_tensor(x)
    assert a.shape == b.shape == (1, 3, size, size)
    # PIL works in uint8 (rounded after each pass): agreement to about one grey level
    assert ((a - b) * STD).abs().max().item() <= 1.5 / 255
    assert ((a - b) * STD).abs().mean().item() <= 0.5 / 255


@pytest.mark.parametrize("h,w,size", [(40, 30, 16), (10, 12, 16)], ids=["down", "up"])
def test_tensor_path_keeps_gradients(h, w, size):
    # On [0.3, 0.7] no clamp is reached (bicubic overshoot stays within [0, 1]), so the transform is
    # affine there: <grad of <f(x), r>, x - y> = <f(x) - f(y), r> for any two such inputs.
    g = torch.Generator().manual_seed(0)
    x = (0.3 + 0.4 * torch.rand(2, 3, h, w, generator=g)).requires_grad_(True)
    y = 0.3 + 0.4 * torch.rand(2, 3, h, w, generator=g)
    t = ImageTransform(size=size, pad_to_square=OPENAI_CLIP_MEAN)
    r = torch.randn(2, 3, size, size, generator=g)
    fx = t(x)
    (fx * r).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    lhs = (x.grad * (x.detach() - y)).sum()
    rhs = ((fx.detach() - t(y)) * r).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)
    assert rhs.abs() > 1.0  # not a comparison of two near-zero numbers


def test_longest_pad_zero_pads_black_before_normalising():
    im, x = _noise(16, 32)  # landscape: long side 32 → 16, short 8 → padded 4 + 4 rows
    t = ImageTransform(size=16, resize="longest_pad")
    for out in (t.from_pil([im]), t.from_tensor(x)):
        raw = _unnorm(out)
        assert torch.allclose(raw[..., :4, :], torch.zeros(1), atol=1e-6)
        assert torch.allclose(raw[..., 12:, :], torch.zeros(1), atol=1e-6)
        assert raw[..., 4:12, :].abs().sum() > 0


def test_pad_to_square_uses_mean_colour():
    im = Image.new("RGB", (20, 10), (255, 255, 255))  # expand2square pastes at row (20 - 10) // 2 = 5
    t = ImageTransform(size=20, pad_to_square=OPENAI_CLIP_MEAN)
    fill = torch.tensor([int(c * 255) / 255 for c in OPENAI_CLIP_MEAN]).view(1, 3, 1, 1)  # (122, 116, 104)
    x = torch.ones(1, 3, 10, 20)
    for out in (t.from_pil([im]), t.from_tensor(x)):
        raw = _unnorm(out)
        torch.testing.assert_close(raw[..., :5, :], fill.expand(1, 3, 5, 20), rtol=0, atol=1e-6)
        torch.testing.assert_close(raw[..., 15:, :], fill.expand(1, 3, 5, 20), rtol=0, atol=1e-6)
        torch.testing.assert_close(raw[..., 5:15, :], torch.ones(1, 3, 10, 20), rtol=0, atol=1e-6)


def test_mixed_sizes_and_modes_in_a_pil_batch():
    ims = [_noise(30, 40)[0], _noise(50, 20)[0].convert("L"), _noise(16, 16)[0].convert("RGBA")]
    t = ImageTransform(size=16)
    out = t(ims)
    assert out.shape == (3, 3, 16, 16)
    # each row is that image alone, converted to RGB (RGBA drops alpha, L repeats its grey level)
    for i, im in enumerate(ims):
        torch.testing.assert_close(out[i : i + 1], t([im.convert("RGB")]), rtol=0, atol=0)
    grey = _unnorm(out[1:2])
    torch.testing.assert_close(grey[:, 0], grey[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grey[:, 0], grey[:, 2], rtol=0, atol=1e-6)
    assert len({tuple(out[i].flatten()[:8].tolist()) for i in range(3)}) == 3


def test_bad_inputs_raise_clear_errors():
    t = ImageTransform(size=8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        t(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="floating point"):
        t(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    for lo, hi in ((-1.0, 1.0), (0.0, 255.0)):  # [-1, 1] or 0-255 floats would be scored silently wrong
        x = torch.linspace(lo, hi, 3 * 64).view(1, 3, 8, 8)
        with pytest.raises(ValueError, match=rf"values must be in \[0, 1\]; got \[{lo:.4g}, {hi:.4g}\]"):
            t(x)
    t(torch.linspace(-0.005, 1.005, 3 * 64).view(1, 3, 8, 8))  # rounding slack is accepted
    with pytest.raises(ValueError, match="PIL image"):
        t(["not an image"])
    with pytest.raises(ValueError, match="resize="):
        ImageTransform(resize="stretch")
    with pytest.raises(ValueError, match="crop_rounding="):
        ImageTransform(crop_rounding="ceil")


def test_paired_batches_keep_each_prompt_with_its_image():
    from miro.rewards.preprocess import paired_batches

    prompts = [f"p{i}" for i in range(5)]
    imgs = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    got = [(c[:, 0, 0, 0].long().tolist(), ps) for c, ps in paired_batches(imgs, prompts, 2)]
    assert got == [([0, 1], ["p0", "p1"]), ([2, 3], ["p2", "p3"]), ([4], ["p4"])]
    pil_like = list(range(5))
    assert [(c, ps) for c, ps in paired_batches(pil_like, prompts, 3)] == [([0, 1, 2], prompts[:3]), ([3, 4], prompts[3:])]
    assert list(paired_batches([], [], 4)) == []
