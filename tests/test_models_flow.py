"""Flow convention, scheduler, preconditioning and loss: closed forms and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from miro.models import LossConfig, MiroModel, flow_loss, get_config
from miro.models.flow import (
    FlowPrecond,
    Scheduler,
    cfg_combine,
    drop_text,
    euler_step,
    flux_shift_to_gamma_shift,
    gamma_to_sigma,
    interpolate,
    noise_from_velocity,
    sample_time_logit_normal,
    shift_gamma,
    sigma_to_gamma,
    time_grid,
    unshift_gamma,
    velocity_target,
    x0_from_velocity,
)


def test_interpolation_endpoints_and_velocity_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    assert torch.equal(interpolate(x0, eps, 1.0), x0)
    assert torch.equal(interpolate(x0, eps, 0.0), eps)
    gamma = torch.tensor([0.25, 0.8])
    x = interpolate(x0, eps, gamma)
    torch.testing.assert_close(x[0], 0.25 * x0[0] + 0.75 * eps[0])
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x, v, gamma), x0)
    torch.testing.assert_close(noise_from_velocity(x, v, gamma), eps)
    # v is -dx/dgamma along the straight path
    h = 1e-3
    dx = (interpolate(x0, eps, gamma + h) - interpolate(x0, eps, gamma - h)) / (2 * h)
    torch.testing.assert_close(-dx, v, rtol=1e-3, atol=1e-3)


def test_euler_step_is_exact_on_the_straight_path():
    """x <- x - v (gamma' - gamma) moves x_gamma to x_gamma' exactly when v = eps - x0; a full step
    from pure noise (gamma = 0) to gamma = 1 lands on x0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(euler_step(interpolate(x0, eps, 0.2), v, 0.2, 0.7), interpolate(x0, eps, 0.7))
    torch.testing.assert_close(euler_step(eps, v, torch.tensor(0.0), torch.tensor(1.0)), x0)


def test_cfg_combine():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(cfg_combine(c, u, 0.0), c)
    torch.testing.assert_close(cfg_combine(c, u, 7.0), u + 8.0 * (c - u))


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0])
def test_shift_inverse_monotone_endpoints(s):
    g = torch.linspace(0, 1, 101, dtype=torch.float64)
    sg = shift_gamma(g, s)
    torch.testing.assert_close(unshift_gamma(sg, s), g)
    assert torch.all(sg[1:] >= sg[:-1])
    assert sg[0] == 0 and sg[-1] == 1
    if s > 1:
        assert torch.all(sg[1:-1] > g[1:-1])  # more time near the data end


def test_flux_sigma_conversion():
    sigma = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_gamma(gamma_to_sigma(sigma)), sigma)
    assert gamma_to_sigma(torch.tensor(0.25)).item() == 0.75
    m = 3.0  # FLUX shift on sigma
    flux = m * sigma / (1 + (m - 1) * sigma)
    ours = gamma_to_sigma(shift_gamma(sigma_to_gamma(sigma), flux_shift_to_gamma_shift(m)))
    torch.testing.assert_close(ours, flux)


def test_time_grid_exactly_as_published():
    for n in (1, 7, 50):
        grid = time_grid(n)
        s = 1 - torch.arange(n + 1, dtype=torch.float32) / n
        assert grid.dtype == torch.float32
        assert torch.equal(grid, torch.clamp(1 - s, min=1e-9))
        assert grid[0].item() == pytest.approx(1e-9) and grid[-1].item() == 1.0
    # the published expression is not bitwise i/N
    assert not torch.equal(time_grid(50), torch.clamp(torch.arange(51, dtype=torch.float32) / 50, min=1e-9))


def test_scheduler_from_a_pipeline_config_reads_every_key_as_published():
    # spec §4.2: g = (end - start) t + start; shifted only when shift > 1; clamped below at clip_min
    t = 1 - torch.arange(5, dtype=torch.float32) / 4
    with pytest.warns(UserWarning, match=r"scheduler.shift=0.5 is read as 1 \(no shift\), as the published loader"):
        s = Scheduler.from_config({"start": 0.9, "end": 0.1, "clip_min": 0.3, "shift": 0.5})
    assert (s.start, s.end, s.shift, s.clip_min) == (0.9, 0.1, 1.0, 0.3)  # a shift <= 1 is ignored (with a warning)
    torch.testing.assert_close(s(t), torch.clamp(0.1 + 0.8 * (1 - t), min=0.3))
    g = 0.1 + 0.8 * (1 - t)
    torch.testing.assert_close(Scheduler.from_config({"start": 0.9, "end": 0.1, "shift": 3})(t), 3 * g / (1 + 2 * g))
    with pytest.warns(UserWarning, match="shift=-2 is read as 1"):
        assert Scheduler.from_config(None) == Scheduler() == Scheduler.from_config({"shift": -2})
    with pytest.raises(ValueError, match=r"unknown keys \['shfit'\]"):
        Scheduler.from_config({"shfit": 3})
    with pytest.raises(ValueError, match="scheduler.start must be a finite number; got 'a'"):
        Scheduler.from_config({"start": "a"})


def test_bad_values_raise():
    with pytest.raises(ValueError, match="shift"):
        Scheduler(shift=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="time_sampling"):
        LossConfig(time_sampling="beta")
    with pytest.raises(ValueError, match="self_cond_rate"):
        LossConfig(self_cond_rate=1.5)
    with pytest.raises(ValueError, match="do_normalization"):
        FlowPrecond(do_normalization="edm")


def test_logit_normal_matches_torch_normal_draw():
    t = sample_time_logit_normal(1000, 0.5, 2.0, torch.Generator().manual_seed(3))
    ref = torch.sigmoid(torch.normal(0.5, 2.0, (1000,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(t, ref)
    assert 0 < t.min() and t.max() < 1


def test_flow_precond_formulas():
    pre = FlowPrecond(num_latents=3, latents_dim=4, sigma_data=0.5, logvar_channels=8)
    gamma = torch.tensor([0.0, 1.0, 0.3])
    c_in, c_out, c_skip = pre.scalings(gamma)
    torch.testing.assert_close(c_in.flatten(), torch.tensor([1.0, 2.0, 1 / math.sqrt(0.15**2 + 0.7**2)]))
    torch.testing.assert_close(c_out.flatten(), torch.full((3,), math.sqrt(1.25)))
    assert torch.equal(c_skip, torch.zeros(3, 1, 1, 1))  # published: no skip
    assert c_in.shape == (3, 1, 1, 1)
    seen = {}

    def net(y, g, emb, mask, coh, prev, generator=None, latents_only=False):
        seen["y"], seen["prev"] = y, prev
        return y * 2.0, prev + 1

    y = torch.randn(3, 2, 4, 4)
    out, z, logvar = pre(net, y, gamma, torch.zeros(3, 1, 5), torch.ones(3, 1, dtype=torch.bool), return_logvar=True)
    torch.testing.assert_close(seen["y"], y * c_in)
    assert torch.equal(seen["prev"], torch.zeros(3, 3, 4))  # missing previous latents -> fp32 zeros
    torch.testing.assert_close(out, 2.0 * y * c_in * c_out)
    assert logvar.shape == (3, 1, 1, 1)
    torch.testing.assert_close(logvar.flatten(), pre.logvar_proj(gamma).flatten())
    off = FlowPrecond(num_latents=3, latents_dim=4, do_normalization=False, do_gradnorm_reweighting=False)
    assert not hasattr(off, "logvar_proj")
    assert torch.equal(off.scalings(gamma)[0], torch.ones(3, 1, 1, 1))


def test_flow_precond_skip_closed_form():
    """``skip``: F's target (v - c_skip x) / c_out has unit variance and is uncorrelated with x at
    every gamma when x0 has std sigma_d (Monte Carlo), and a zero network predicts the data mean."""
    sd = 0.5
    pre = FlowPrecond(num_latents=3, latents_dim=4, do_normalization="skip", sigma_data=sd, logvar_channels=8)
    gamma = torch.tensor([0.05, 0.3, 0.7, 0.95])
    c_in, c_out, c_skip = pre.scalings(gamma)
    torch.testing.assert_close(c_in, FlowPrecond(3, 4, sigma_data=sd).scalings(gamma)[0])  # same c_in
    torch.testing.assert_close(c_out, sd * c_in)
    g = torch.Generator().manual_seed(0)
    x0 = sd * torch.randn(4, 200_000, generator=g)
    eps = torch.randn(4, 200_000, generator=g)
    x = interpolate(x0, eps, gamma[:, None])
    r = (velocity_target(x0, eps) - c_skip.reshape(4, 1) * x) / c_out.reshape(4, 1)
    torch.testing.assert_close(r.var(dim=1), torch.ones(4), atol=0.02, rtol=0)
    for i in range(4):
        assert abs(torch.corrcoef(torch.stack([r[i], x[i]]))[0, 1]) < 0.01

    def net(y, g, emb, mask, coh, prev, generator=None, latents_only=False):
        return y * 2.0, prev

    y = torch.randn(4, 2, 4, 4)
    out, _ = pre(net, y, gamma, torch.zeros(4, 1, 5), torch.ones(4, 1, dtype=torch.bool))
    torch.testing.assert_close(out, 2.0 * y * c_in * c_out + c_skip * y)
    zero = lambda y, *a, **k: (torch.zeros_like(y), a[3])  # noqa: E731
    noise = torch.randn(2, 2, 4, 4, generator=g)
    v, _ = pre(zero, noise, torch.zeros(2), torch.zeros(2, 1, 5), torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(x0_from_velocity(noise, v, 0.0), torch.zeros_like(noise))
    with pytest.raises(ValueError, match="do_normalization='edm'.*'skip'"):
        FlowPrecond(do_normalization="edm")


def test_drop_text_semantics():
    emb = torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool)
    coh = {"a": torch.tensor([0.1, 0.2, 0.3])}
    u = torch.randn(1, 5)
    e2, m2, c2 = drop_text(emb, mask, coh, torch.tensor([True, False, True]), u)
    assert torch.equal(e2[1], emb[1]) and torch.equal(m2[1], mask[1])
    assert torch.equal(e2[0], u.expand(4, 5)) and m2[0].tolist() == [True, False, False, False]
    assert torch.isnan(c2["a"][0]) and torch.isnan(c2["a"][2]) and c2["a"][1] == 0.2
    assert not torch.isnan(coh["a"]).any()  # not in place
    e3, m3, _ = drop_text(emb, mask, coh, torch.tensor([True, False, False]), torch.randn(2, 5))
    assert m3[0].tolist() == [True, True, False, False] and torch.equal(e3[0, 2:], torch.zeros(2, 5))


def _tiny(seed=0):
    return MiroModel.from_config(get_config("tiny"), generator=torch.Generator().manual_seed(seed))


def _batch(model, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *model.latent_shape, generator=g)
    emb = torch.randn(b, 5, 384, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    coh = {k: torch.rand(b, generator=g) for k in model.coherence_keys}
    return x0, emb, mask, coh


def test_flow_loss_same_generator_same_output():
    model = _tiny().train()
    x0, emb, mask, coh = _batch(model)
    cfg = LossConfig(cond_drop_rate=0.5, do_gradnorm_reweighting=True)
    u = torch.randn(1, 384)
    l1, _ = flow_loss(model, x0, emb, mask, coh, u, cfg, torch.Generator().manual_seed(5))
    l2, _ = flow_loss(model, x0, emb, mask, coh, u, cfg, torch.Generator().manual_seed(5))
    l3, _ = flow_loss(model, x0, emb, mask, coh, u, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)


def _graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


def test_self_conditioning_graph_is_static():
    model = _tiny().train()
    with torch.no_grad():  # make self-conditioning matter
        model.network.ln_previous_2.weight.fill_(0.5)
    x0, emb, mask, coh = _batch(model)
    sizes, fracs = set(), set()
    for seed in range(8):
        loss, logs = flow_loss(model, x0, emb, mask, coh, None, LossConfig(self_cond_rate=0.5), torch.Generator().manual_seed(seed))
        sizes.add(_graph_size(loss))
        fracs.add(float(logs["self_cond_frac"]))
    assert len(fracs) > 1  # the keep masks differed ...
    assert len(sizes) == 1  # ... but the autograd graph did not
    # rate 0 skips the first pass; rate 1 keeps every sample
    _, logs = flow_loss(model, x0, emb, mask, coh, None, LossConfig(self_cond_rate=1.0), torch.Generator().manual_seed(0))
    assert float(logs["self_cond_frac"]) == 1.0
    _, logs = flow_loss(model, x0, emb, mask, coh, None, LossConfig(self_cond_rate=0.0), torch.Generator().manual_seed(0))
    assert "self_cond_frac" not in logs


def test_flow_loss_closed_form_with_oracle_model():
    """A model that predicts the true velocity exactly has zero loss."""

    class Oracle(torch.nn.Module):
        def __init__(self, x0, noise_gen_seed):
            super().__init__()
            self.x0 = x0

        def forward(self, y, gamma, emb, mask, coh, prev, return_logvar=False, generator=None, latents_only=False):
            g = gamma.reshape(-1, 1, 1, 1)
            eps = (y - g * self.x0) / (1 - g)
            v = eps - self.x0
            z = torch.zeros(y.shape[0], 2, 2)
            return (v, z, torch.zeros(y.shape[0], 1, 1, 1)) if return_logvar else (v, z)

    x0 = torch.randn(3, 2, 4, 4)
    m = Oracle(x0, 0)
    loss, logs = flow_loss(m, x0, torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool), None, None,
                           LossConfig(time_sampling="uniform"), torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_flow_loss_time_draw_shift_and_interpolation(sampling):
    """The loss draws t first (sigmoid(N(mu_t, std_t)) or U[0, 1)), then the noise; the model sees
    gamma = shift(1 - t) and y = gamma x0 + (1 - gamma) noise, and a zero prediction costs the mean
    of (noise - x0)^2."""
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, y, gamma, emb, mask, coh, prev, return_logvar=False, generator=None, latents_only=False):
            seen["y"], seen["gamma"] = y, gamma
            return torch.zeros_like(y), torch.zeros(y.shape[0], 2, 2)

    b, mu, std, s = 64, 1.5, 0.5, 3.0
    x0 = torch.randn(b, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    cfg = LossConfig(self_cond_rate=0.0, time_sampling=sampling, mu_t=mu, std_t=std, shift=s)
    loss, _ = flow_loss(Spy(), x0, torch.zeros(b, 1, 4), torch.ones(b, 1, dtype=torch.bool), None, None, cfg,
                        torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    if sampling == "logit_normal":
        t = torch.sigmoid(torch.normal(mu, std, (b,), generator=g))
    else:
        t = torch.rand(b, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    gamma = s * (1 - t) / (1 + (s - 1) * (1 - t))
    torch.testing.assert_close(seen["gamma"], gamma)
    gb = gamma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["y"], gb * x0 + (1 - gb) * noise)
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())


def test_flow_loss_gradnorm_reweighting_closed_form():
    """With log-variance reweighting the loss is mean(l / exp(u) + u) over all elements."""
    u = torch.tensor([0.5, -1.0, 2.0]).reshape(3, 1, 1, 1)

    class Const(torch.nn.Module):
        def forward(self, y, gamma, emb, mask, coh, prev, return_logvar=False, generator=None, latents_only=False):
            v, z = torch.zeros_like(y), torch.zeros(y.shape[0], 2, 2)
            return (v, z, u) if return_logvar else (v, z)

    x0 = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    cfg = LossConfig(self_cond_rate=0.0, time_sampling="uniform", do_gradnorm_reweighting=True)
    loss, logs = flow_loss(Const(), x0, torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool), None, None, cfg,
                           torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    torch.rand(3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    elem = (noise - x0) ** 2
    torch.testing.assert_close(logs["raw_loss"], elem.mean())
    torch.testing.assert_close(loss, (elem / u.exp() + u).mean())


def test_tiny_model_fits_a_fixed_batch():
    """End-to-end learning signal: the loss on a fixed batch drops when training on it."""
    model = _tiny().train()
    x0, emb, mask, coh = _batch(model, b=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = LossConfig(time_sampling="uniform")

    def eval_loss():
        with torch.no_grad():
            return sum(float(flow_loss(model, x0, emb, mask, coh, None, cfg, torch.Generator().manual_seed(100 + s))[0])
                       for s in range(4)) / 4

    before = eval_loss()
    for step in range(40):
        loss, _ = flow_loss(model, x0, emb, mask, coh, None, cfg, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before
