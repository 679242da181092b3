"""Basic shape/contract tests of the model core (tiny configs, CPU)."""

from __future__ import annotations

import pytest
import torch

from miro.models import LossConfig, MiroModel, euler_sample, flow_loss, get_config


def _inputs(model, b=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s, _ = model.latent_shape
    x = torch.randn(b, c, s, s, generator=g)
    emb = torch.randn(b, length, model.network.label_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return x, emb, mask


def test_forward_shapes_and_loss_backward():
    model = MiroModel.from_config(get_config("tiny"), generator=torch.Generator().manual_seed(0))
    x, emb, mask = _inputs(model)
    v, z = model(x, torch.rand(3), emb, mask, {"clip_score": torch.rand(3)})
    assert v.shape == x.shape
    assert z.shape == (3, model.network.num_latents, model.network.latents_dim)
    model.train()
    coh = {k: torch.rand(3) for k in model.coherence_keys}
    loss, logs = flow_loss(
        model, x, emb, mask, coh, torch.randn(1, 384),
        LossConfig(cond_drop_rate=0.5, do_gradnorm_reweighting=True), torch.Generator().manual_seed(1),
    )
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.network.patch_extractor.weight.grad is not None
    assert model.preconditioning.logvar_proj[1].weight.grad is not None
    assert set(logs) >= {"raw_loss", "logvar", "loss_gradnorm_reweighted", "self_cond_frac", "text_drop_frac"}


def test_sampler_shape_and_finite():
    model = MiroModel.from_config(get_config("tiny"), generator=torch.Generator().manual_seed(0))
    x, emb, mask = _inputs(model)
    out = euler_sample(model, x, emb, mask, torch.randn(1, 384), None, num_steps=3)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_release_param_count_meta():
    with torch.device("meta"):
        model = MiroModel.from_config(get_config("release"))
    assert sum(p.numel() for p in model.network.parameters()) == 360_413_712


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown config"):
        get_config("nope")
