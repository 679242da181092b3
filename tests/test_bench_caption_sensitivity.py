"""benchmarks/caption_sensitivity.py: swapped scenes and the paired gap against closed forms."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from caption_sensitivity import scenes, sensitivity  # noqa: E402

from miro.shapes import world as W  # noqa: E402
from miro.shapes.detector import detect  # noqa: E402


def test_swapped_scenes_change_only_the_swapped_word():
    imgs, caps = scenes(10, seed=3)
    for i in range(10):
        true = caps["true"][i].split()
        assert true[-1] == W.CLASSES[i % len(W.CLASSES)]
        shape, colour = caps["shape"][i].split(), caps["colour"][i].split()
        assert shape[-1] != true[-1] and shape[:-1] == true[:-1]
        assert colour[-2] != true[-2] and colour[-1] == true[-1] and colour[:-2] == true[:-2]
        for word, cap in (("true", true), ("shape", shape), ("colour", colour)):
            (obj,) = detect(imgs[word][i])
            assert (obj.cls, obj.color) == (cap[-1], cap[-2])
        # same place: the pixels outside the swapped object's box are the background in all three
        changed = np.any(imgs["shape"][i] != imgs["true"][i], axis=-1) | np.any(imgs["colour"][i] != imgs["true"][i], axis=-1)
        assert changed.any() and changed.mean() < 0.25


class _Model(torch.nn.Module):
    """v̂ = y, plus ``text_weight`` times the mean text embedding (broadcast): text-blind at 0."""

    coherence_keys = ("r",)

    def __init__(self, text_weight):
        super().__init__()
        self.w = text_weight

    def preprocess(self, x):
        return x

    def postprocess(self, x):
        return x

    def forward(self, y, gamma, emb, mask, coherence):
        return y + self.w * emb.mean(dim=(1, 2))[:, None, None, None], None


def _pipe(text_weight):
    def encode(prompts):
        emb = torch.tensor([[[float(sum(map(ord, p)) % 7)]] for p in prompts])
        return emb, torch.ones(len(prompts), 1, dtype=torch.bool)

    return SimpleNamespace(model=_Model(text_weight), encode_prompt=encode)


def test_a_text_blind_model_has_zero_gap_and_the_mse_is_the_closed_form():
    imgs, caps = scenes(6, seed=0)
    x0 = torch.from_numpy(imgs["true"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = sensitivity(_pipe(0.0), x0, caps, eps, [0.25], batch_size=4)
    # v̂ = x: x̂0 = x - (1 - g) x = g x, so the error is g·x - x0
    x = 0.25 * x0 + 0.75 * eps
    assert rows[0]["mse"] == pytest.approx((0.25 * x - x0).pow(2).mean().item(), rel=1e-5)
    assert rows[0]["shape"] == (0.0, 0.0) and rows[0]["colour"] == (0.0, 0.0)
    reading = sensitivity(_pipe(1.0), x0, caps, eps, [0.25], batch_size=4)
    assert reading[0]["shape"][0] != 0.0 and reading[0]["colour"][0] != 0.0
