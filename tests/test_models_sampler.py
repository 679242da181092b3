"""Euler CFG sampler: closed forms, CFG batching, determinism, callbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miro.models import MiroModel, euler_sample, get_config, time_grid
from miro.models.sampler import build_cfg_text, reward_scale_groups


class FieldModel(nn.Module):
    """Stand-in with the MiroModel interface and an analytic velocity field."""

    coherence_keys = ("r",)

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.calls = []

    def forward(self, y, gamma, emb, mask, coherence=None, previous_latents=None):
        self.calls.append((y.shape[0], emb.shape[1], previous_latents is None, dict(coherence)))
        return self.fn(y, gamma.reshape(-1, 1, 1, 1), coherence), torch.zeros(y.shape[0], 2, 3)


def _text(b=2, length=4):
    return torch.randn(b, length, 5), torch.ones(b, length, dtype=torch.bool)


def test_euler_linear_field_closed_form():
    a = 0.7
    model = FieldModel(lambda y, g, c: a * y)  # dx/dgamma = -a x
    noise = torch.randn(2, 1, 2, 2)
    emb, mask = _text()
    n = 10
    out = euler_sample(model, noise, emb, mask, None, None, num_steps=n, guidance_scale=0.0)
    grid = time_grid(n)
    factor = torch.prod(1 - a * (grid[1:] - grid[:-1]))
    torch.testing.assert_close(out, noise * factor)
    # converges to the exact ODE solution exp(-a * (1 - gamma_0))
    fine = euler_sample(model, noise, emb, mask, None, None, num_steps=2000, guidance_scale=0.0)
    torch.testing.assert_close(fine, noise * torch.exp(torch.tensor(-a * (1 - 1e-9))), rtol=1e-3, atol=1e-4)


def test_euler_from_a_partly_noised_start():
    """``scheduler=Scheduler(end=g0)``: the grid runs from g0 to 1 (SDEdit), so on dx/dgamma = -a x
    the end point is x_g0 * (1 - a (1 - g0) / n)^n."""
    from miro.models.flow import Scheduler

    a, g0, n = 0.7, 0.4, 6
    model = FieldModel(lambda y, g, c: a * y)
    x = torch.randn(2, 1, 2, 2)
    emb, mask = _text()
    out = euler_sample(model, x, emb, mask, None, None, num_steps=n, guidance_scale=0.0, scheduler=Scheduler(end=g0))
    torch.testing.assert_close(out, x * (1 - a * (1 - g0) / n) ** n)


def test_euler_straight_path_is_exact():
    """For a single data point the flow is straight, so Euler recovers it for any N."""
    x_star = torch.randn(1, 1, 2, 2)
    model = FieldModel(lambda y, g, c: (y - x_star) / (1 - g))
    noise = torch.randn(1, 1, 2, 2)
    emb, mask = _text(1)
    for n in (1, 3, 17):
        out = euler_sample(model, noise, emb, mask, None, None, num_steps=n, guidance_scale=0.0)
        torch.testing.assert_close(out, x_star, rtol=1e-5, atol=1e-5)


def test_cfg_batching_and_reward_branches():
    # v depends on the reward value, so guidance = cond + w (cond - uncond) is checkable
    model = FieldModel(lambda y, g, c: y * 0 + c["r"].reshape(-1, 1, 1, 1))
    noise = torch.zeros(2, 1, 2, 2)
    emb, mask = _text(2, 4)
    out = euler_sample(model, noise, emb, mask, torch.randn(1, 5), None, {"r": 0.8}, {"r": 0.2},
                       num_steps=4, guidance_scale=3.0)
    v = 0.8 * 4 - 0.2 * 3  # (1 + w) cond - w uncond
    torch.testing.assert_close(out, torch.full_like(out, -v * (1 - 1e-9)))
    batch, length, first_none, coh = model.calls[0]
    assert batch == 4 and length == 4 and first_none
    assert coh["r"].tolist() == pytest.approx([0.8, 0.8, 0.2, 0.2])  # cond half first
    assert not model.calls[1][2]  # latents carried after step 0
    with pytest.raises(ValueError, match="unknown reward keys"):
        euler_sample(model, noise, emb, mask, torch.randn(1, 5), None, {"clip_score": 1.0})
    with pytest.raises(ValueError, match="uncond"):
        euler_sample(model, noise, emb, mask, None, None)


def _tiny():
    model = MiroModel.from_config(get_config("tiny"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # make every path (self-conditioning included) matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _inputs(b=2, length=6):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(b, 3, 8, 8, generator=g)
    emb = torch.randn(b, length, 384, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 3:] = False
    return noise, emb, mask, torch.randn(1, 384, generator=g)


def test_batched_cfg_equals_split_cfg_and_is_deterministic():
    model = _tiny()
    noise, emb, mask, unc = _inputs()
    targets = {"clip_score": 0.9, "vqa_score": 0.3}
    a = euler_sample(model, noise, emb, mask, unc, None, targets, num_steps=4, guidance_scale=5.0)
    b = euler_sample(model, noise, emb, mask, unc, None, targets, num_steps=4, guidance_scale=5.0, batched_cfg=False)
    c = euler_sample(model, noise, emb, mask, unc, None, targets, num_steps=4, guidance_scale=5.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a, c)
    d = euler_sample(model, noise, emb, mask, unc, None, {"clip_score": 0.1}, num_steps=4, guidance_scale=5.0)
    assert (a - d).abs().max() > 1e-4  # reward targets steer the result


def test_cfg_with_identical_branches_equals_conditional():
    model = _tiny()
    noise, emb, mask, _ = _inputs()
    same_r = {k: 0.7 for k in model.coherence_keys}
    # uncond branch identical to cond (same text, same rewards): (1 + w) c - w c = c
    emb_same = emb[:1].expand(2, -1, -1)
    mask_same = mask[:1].expand(2, -1)
    cfg = euler_sample(model, noise, emb_same, mask_same, emb[0], mask[0], same_r, same_r, num_steps=3,
                       guidance_scale=4.0)
    cond = euler_sample(model, noise, emb_same, mask_same, None, None, same_r, num_steps=3, guidance_scale=0.0)
    torch.testing.assert_close(cfg, cond, rtol=1e-4, atol=1e-4)
    # default negative targets (0.0) make the branches differ
    other = euler_sample(model, noise, emb_same, mask_same, emb[0], mask[0], same_r, num_steps=3, guidance_scale=4.0)
    assert (other - cond).abs().max() > 1e-4


def test_callback_progress_mode_and_shift():
    model = _tiny().train()
    noise, emb, mask, unc = _inputs()
    seen = []
    euler_sample(model, noise, emb, mask, unc, None, num_steps=3, callback=lambda i, g, x: seen.append((i, float(g))),
                 progress=True)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[-1][1] == 1.0
    assert model.training  # mode restored
    shifted = euler_sample(model, noise, emb, mask, unc, None, num_steps=3, shift=3.0)
    plain = euler_sample(model, noise, emb, mask, unc, None, num_steps=3)
    assert (shifted - plain).abs().max() > 1e-5


def test_dropped_reward_is_zero_embedding():
    model = _tiny()
    noise, emb, mask, unc = _inputs()
    a = euler_sample(model, noise, emb, mask, None, None, {"clip_score": None}, num_steps=2, guidance_scale=0)
    # direct check against the network with the key absent (the others at their default 1.0)
    model.eval()
    g, x, z = time_grid(2), noise.clone(), None
    rest = {k: torch.ones(noise.shape[0]) for k in model.coherence_keys if k != "clip_score"}
    with torch.no_grad():
        for i in range(2):
            v, z = model(x, g[i].expand(noise.shape[0]), emb, mask, rest, z)
            x = x - v.float() * (g[i + 1] - g[i])
    torch.testing.assert_close(a, x)
    b = euler_sample(model, noise, emb, mask, None, None, {"clip_score": 1.0}, num_steps=2, guidance_scale=0)
    assert (a - b).abs().max() > 1e-5  # and dropping is not the target 1.0


def test_w_zero_is_the_conditional_euler_loop():
    model = _tiny().eval()
    noise, emb, mask, unc = _inputs()
    r = {"clip_score": 0.7}
    out = euler_sample(model, noise, emb, mask, unc, None, r, num_steps=3, guidance_scale=0.0)
    x, z, grid = noise.clone(), None, time_grid(3)
    full = {k: torch.full((2,), 0.7 if k == "clip_score" else 1.0) for k in model.coherence_keys}
    with torch.no_grad():
        for i in range(3):
            v, z = model(x, grid[i].expand(2), emb, mask, full, z)
            x = x - v * (grid[i + 1] - grid[i])
    assert torch.equal(out, x)


class TextRewardField(nn.Module):
    """v = f(r, text) = r + text + r * text, text = mean of the valid text features: the reward and
    the text interact, so the two factorisations of two-scale guidance differ."""

    coherence_keys = ("r",)

    @staticmethod
    def f(r, text):
        return r + text + r * text

    def forward(self, y, gamma, emb, mask, coherence=None, previous_latents=None):
        m = mask.float()
        text = (emb[..., 0] * m).sum(1) / m.sum(1)
        return y * 0 + self.f(coherence["r"], text).reshape(-1, 1, 1, 1), torch.zeros(y.shape[0], 2, 3)


@pytest.mark.parametrize("batched", [True, False])
def test_two_scale_guidance_closed_form(batched):
    """prompt: v = v(t, r+) + w_r [v(t, r+) - v(t, r-)] + w [v(t, r-) - v(null, r-)] (InstructPix2Pix eq. 3);
    null: v = v(t, r+) + w [v(t, r+) - v(null, r+)] + w_r [v(null, r+) - v(null, r-)]."""
    a, u, rp, rn = 0.5, -0.25, 0.8, 0.2
    model = TextRewardField()
    f = model.f
    noise = torch.zeros(2, 1, 2, 2)
    emb, mask = torch.full((2, 4, 5), a), torch.ones(2, 4, dtype=torch.bool)
    unc = torch.full((1, 5), u)

    def run(w, wr, direction="prompt", uncond=unc):
        out = euler_sample(model, noise, emb, mask, uncond, None, {"r": rp}, {"r": rn}, num_steps=3, guidance_scale=w,
                           reward_guidance_scale=wr, reward_direction=direction, batched_cfg=batched)
        return out.flatten()[0].item() / -(1 - 1e-9)  # the constant velocity the three steps integrated

    for w, wr in ((3.0, 7.0), (3.0, 0.0)):
        assert run(w, wr) == pytest.approx(f(rp, a) + wr * (f(rp, a) - f(rn, a)) + w * (f(rn, a) - f(rn, u)))
    for w, wr in ((3.0, 7.0), (0.0, 7.0), (3.0, 0.0)):
        assert run(w, wr, "null") == pytest.approx(f(rp, a) + w * (f(rp, a) - f(rp, u)) + wr * (f(rp, u) - f(rn, u)))
    # text guidance off, reward guidance along the prompt: two branches, no uncond needed
    assert run(0.0, 7.0, uncond=None) == pytest.approx(f(rp, a) + 7.0 * (f(rp, a) - f(rn, a)))
    # w_r = w: both are the published (1 + w) v(t, r+) - w v(null, r-)
    for d in ("prompt", "null"):
        assert run(3.0, 3.0, d) == pytest.approx(4.0 * f(rp, a) - 3.0 * f(rn, u))
    assert run(3.0, 7.0, "null") != pytest.approx(run(3.0, 7.0, "prompt"))
    with pytest.raises(ValueError, match="reward_direction must be 'prompt' or 'null'; got 'text'"):
        run(3.0, 7.0, "text")
    with pytest.raises(ValueError, match="needs an unconditional text embedding"):
        run(0.0, 1.0, "null", uncond=None)


def test_two_scale_guidance_on_the_network():
    """Three branches, each with its own self-conditioning latents, batched == split == a hand loop;
    w_r = w gives the published two-branch result."""
    model = _tiny().eval()
    noise, emb, mask, unc = _inputs()
    pos = {k: 0.9 for k in model.coherence_keys}
    neg = {k: 0.1 for k in model.coherence_keys}
    kw = dict(num_steps=3, guidance_scale=4.0, reward_guidance_scale=9.0)
    a = euler_sample(model, noise, emb, mask, unc, None, pos, neg, **kw)
    b = euler_sample(model, noise, emb, mask, unc, None, pos, neg, batched_cfg=False, **kw)
    # float32 rounding of a 3B-row against a B-row forward (about 1e-6 a branch, depending on the
    # CPU's kernels) is multiplied by up to 1 + w + w_r = 14 in the combination
    torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)
    ce, cm, ue, um = build_cfg_text(emb, mask, unc, None)
    full = [{k: torch.full((2,), v[k]) for k in v} for v in (pos, neg, neg)]
    texts = [(ce, cm), (ce, cm), (ue, um)]
    x, zs, grid = noise.clone(), [None] * 3, time_grid(3)
    with torch.no_grad():
        for i in range(3):
            vs = []
            for j in range(3):
                v, zs[j] = model(x, grid[i].expand(2), *texts[j], full[j], zs[j])
                vs.append(v)
            v = vs[0] + 9.0 * (vs[0] - vs[1]) + 4.0 * (vs[1] - vs[2])
            x = x - v * (grid[i + 1] - grid[i])
    torch.testing.assert_close(b, x, rtol=1e-5, atol=1e-5)
    c = euler_sample(model, noise, emb, mask, unc, None, pos, neg, reward_direction="null", **kw)
    d = euler_sample(model, noise, emb, mask, unc, None, pos, neg, reward_direction="null", batched_cfg=False, **kw)
    torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-5)
    assert (c - a).abs().max() > 1e-4
    one = euler_sample(model, noise, emb, mask, unc, None, pos, neg, num_steps=3, guidance_scale=4.0)
    assert (a - one).abs().max() > 1e-4  # a larger reward scale changes the image
    same = euler_sample(model, noise, emb, mask, unc, None, pos, neg, num_steps=3, guidance_scale=4.0,
                        reward_guidance_scale=4.0)
    assert torch.equal(same, one)
    with pytest.raises(ValueError, match="reward_guidance_scale must be a finite number"):
        euler_sample(model, noise, emb, mask, unc, None, pos, neg, num_steps=2, reward_guidance_scale=float("nan"))


class TwoRewardField(nn.Module):
    """v = r1 + 2 r2 + r1 r2 + text + r1 text: the rewards interact with each other and with the text."""

    coherence_keys = ("a", "b")

    @staticmethod
    def f(ra, rb, text):
        return ra + 2 * rb + ra * rb + text + ra * text

    def forward(self, y, gamma, emb, mask, coherence=None, previous_latents=None):
        m = mask.float()
        text = (emb[..., 0] * m).sum(1) / m.sum(1)
        return y * 0 + self.f(coherence["a"], coherence["b"], text).reshape(-1, 1, 1, 1), torch.zeros(y.shape[0], 2, 3)


@pytest.mark.parametrize("batched", [True, False])
def test_per_reward_guidance_closed_form(batched):
    """{key: w_k}: a chain r+ = r_0 -> r_1 -> r_2 = r-, one reward turned to its negative target per
    step, in the mapping's order; prompt: v(t, r_0) + sum_j w_j [v(t, r_j-1) - v(t, r_j)] + w [v(t, r-)
    - v(null, r-)]; null: v(t, r+) + w [v(t, r+) - v(null, r+)] + sum_j w_j [v(null, r_j-1) - v(null, r_j)]."""
    t, u = 0.5, -0.25
    (pa, pb), (na, nb) = (0.8, 0.9), (0.2, 0.1)
    model = TwoRewardField()
    f = model.f
    noise = torch.zeros(2, 1, 2, 2)
    emb, mask, unc = torch.full((2, 4, 5), t), torch.ones(2, 4, dtype=torch.bool), torch.full((1, 5), u)

    def run(w, scales, direction):
        out = euler_sample(model, noise, emb, mask, unc, None, {"a": pa, "b": pb}, {"a": na, "b": nb}, num_steps=3,
                           guidance_scale=w, reward_guidance_scale=scales, reward_direction=direction,
                           batched_cfg=batched)
        return out.flatten()[0].item() / -(1 - 1e-9)

    for w, wa, wb in ((3.0, 7.0, 2.0), (0.0, 7.0, 2.0), (3.0, 0.0, 5.0)):
        prompt = (f(pa, pb, t) + wa * (f(pa, pb, t) - f(na, pb, t)) + wb * (f(na, pb, t) - f(na, nb, t))
                  + w * (f(na, nb, t) - f(na, nb, u)))
        assert run(w, {"a": wa, "b": wb}, "prompt") == pytest.approx(prompt)
        null = (f(pa, pb, t) + w * (f(pa, pb, t) - f(pa, pb, u)) + wa * (f(pa, pb, u) - f(na, pb, u))
                + wb * (f(na, pb, u) - f(na, nb, u)))
        assert run(w, {"a": wa, "b": wb}, "null") == pytest.approx(null)
    # the mapping's order is the chain's: b first
    assert run(3.0, {"b": 2.0, "a": 7.0}, "null") == pytest.approx(
        f(pa, pb, t) + 3.0 * (f(pa, pb, t) - f(pa, pb, u)) + 2.0 * (f(pa, pb, u) - f(pa, nb, u))
        + 7.0 * (f(pa, nb, u) - f(na, nb, u)))
    assert run(3.0, {"b": 2.0, "a": 7.0}, "null") != pytest.approx(run(3.0, {"a": 7.0, "b": 2.0}, "null"))
    # a reward not named gets w; equal scales telescope: one scale for all is the scalar form,
    # and every scale = w the published combination
    for d in ("prompt", "null"):
        assert run(3.0, {"a": 7.0}, d) == run(3.0, {"a": 7.0, "b": 3.0}, d)
        assert run(3.0, {"a": 7.0, "b": 7.0}, d) == run(3.0, 7.0, d)
        assert run(3.0, {"b": 3.0}, d) == run(3.0, None, d) == pytest.approx(4.0 * f(pa, pb, t) - 3.0 * f(na, nb, u))
    with pytest.raises(ValueError, match=r"unknown reward keys \['c'\]; this model uses \['a', 'b'\]"):
        run(3.0, {"c": 1.0}, "null")
    for bad in (-1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match=r"reward_guidance_scale\['b'\] = .*finite number >= 0"):
            run(3.0, {"b": bad}, "prompt")


def test_reward_scale_groups():
    keys = ("a", "b", "c", "d")
    assert reward_scale_groups(keys, 2.0, 5.0) == [(keys, 2.0)]
    assert reward_scale_groups(keys, {"c": 9, "a": 9}, 5.0) == [(("c", "a"), 9.0), (("b", "d"), 5.0)]
    assert reward_scale_groups(keys, {"b": 5.0, "d": 0}, 5.0) == [(("b",), 5.0), (("d",), 0.0), (("a", "c"), 5.0)]


def test_per_reward_guidance_on_the_network():
    """Batched == split == a hand loop over the chain's branches, each with its own
    self-conditioning latents; equal scales share a step."""
    model = _tiny().eval()
    noise, emb, mask, unc = _inputs()
    keys = model.coherence_keys
    assert len(keys) >= 3
    pos, neg = {k: 0.9 for k in keys}, {k: 0.1 for k in keys}
    k0 = keys[0]
    kw = dict(num_steps=3, guidance_scale=4.0, reward_guidance_scale={k0: 6.0}, reward_direction="null")
    a = euler_sample(model, noise, emb, mask, unc, None, pos, neg, **kw)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    b = euler_sample(model, noise, emb, mask, unc, None, pos, neg, batched_cfg=False, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == [2] * 12  # (text, r+), (null, r+), (null, r+ with k0 at r-), (null, r-): the rest share a step
    ce, cm, ue, um = build_cfg_text(emb, mask, unc, None)
    full = [{k: torch.full((2,), v) for k, v in r.items()} for r in (pos, pos, {**pos, k0: neg[k0]}, neg)]
    texts = [(ce, cm), (ue, um), (ue, um), (ue, um)]
    x, zs, grid = noise.clone(), [None] * 4, time_grid(3)
    with torch.no_grad():
        for i in range(3):
            vs = []
            for j in range(4):
                v, zs[j] = model(x, grid[i].expand(2), *texts[j], full[j], zs[j])
                vs.append(v)
            v = vs[0] + 4.0 * (vs[0] - vs[1]) + 6.0 * (vs[1] - vs[2]) + 4.0 * (vs[2] - vs[3])
            x = x - v * (grid[i + 1] - grid[i])
    torch.testing.assert_close(b, x, rtol=1e-5, atol=1e-5)
    calls.clear()
    one = euler_sample(model, noise, emb, mask, unc, None, pos, neg, num_steps=3, guidance_scale=4.0)
    same = euler_sample(model, noise, emb, mask, unc, None, pos, neg, num_steps=3, guidance_scale=4.0,
                        reward_guidance_scale={k: 4.0 for k in reversed(keys)}, reward_direction="null")
    assert torch.equal(one, same) and calls == [4] * 6  # every scale = w: the published 2B path
