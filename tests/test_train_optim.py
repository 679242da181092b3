import math

import pytest
import torch
from torch import nn

from miro.train.optim import Lamb, OptimizerConfig, WarmupCosineDecayLR, build_optimizer, param_groups


def _lamb_reference(p, g, lr, b1, b2, eps, wd, decouple, adapt, steps):
    """Closed-form LAMB in float64, written out step by step."""
    p = p.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for s in range(1, steps + 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**s)) / (torch.sqrt(v / (1 - b2**s)) + eps)
        if wd and not decouple:
            u = u + wd * p
        r = (p.norm() / u.norm()).item() if adapt and p.norm() > 0 and u.norm() > 0 else 1.0
        p = p - lr * r * u
        if wd and decouple:
            p = p * (1 - wd)
    return p


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("adapt", [False, True])
def test_lamb_matches_closed_form(decouple, adapt, foreach):
    torch.manual_seed(0)
    p0 = torch.randn(3, 4, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64)
    p = nn.Parameter(p0.clone())
    opt = Lamb([{"params": [p], "layer_adaptation": adapt}], lr=0.1, betas=(0.8, 0.9), eps=1e-6,
               weight_decay=0.05, decouple=decouple, foreach=foreach)
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
    ref = _lamb_reference(p0, g, 0.1, 0.8, 0.9, 1e-6, 0.05, decouple, adapt, 3)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decouple", [False, True])
def test_lamb_foreach_equals_the_loop_on_a_model(decouple):
    # Both published groups (decay + adaptation, and neither), tensors of many shapes, a tensor
    # with no gradient in some steps (its step count falls behind) and a zero tensor (ratio 1).
    def run(foreach):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3), nn.Embedding(4, 3))
        with torch.no_grad():
            m[2].bias.zero_()
        opt = build_optimizer(m, OptimizerConfig(name="lamb", lr=0.02, weight_decay=0.1, decouple=decouple))
        for group in opt.param_groups:
            group["foreach"] = foreach
        gen = torch.Generator().manual_seed(1)
        for i in range(6):
            opt.zero_grad(set_to_none=True)
            x = torch.randn(8, 5, generator=gen)
            loss = m[2](m[1](m[0](x))).square().mean() + (m[3].weight.sum() if i % 2 else 0.0)
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in m.parameters()], opt

    loop, _ = run(False)
    fused, opt = run(True)
    for a, b in zip(loop, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    steps = {tuple(p.shape): opt.state[p]["step"] for g in opt.param_groups for p in g["params"]}
    assert steps[(4, 3)] == 3 and steps[(7, 5)] == 6  # the embedding had gradients every other step


def test_lamb_first_step_by_hand():
    # One step, no decay, adaptation on: m̂ = g, v̂ = g², u = g/(|g|+eps) ≈ sign(g); r = ‖p‖/‖u‖.
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    Lamb([{"params": [p], "layer_adaptation": True}], lr=0.5, eps=0.0).step()
    u = torch.tensor([1.0, -1.0], dtype=torch.float64)
    r = 5.0 / math.sqrt(2.0)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64) - 0.5 * r * u)


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_group_without_adaptation_key_adapts_iff_it_decays(foreach):
    """A group with no ``layer_adaptation`` key uses the trust ratio exactly when its weight decay is
    > 0 (spec §8.2); ``adam=True`` turns the ratio off. First step, eps 0: u = sign(g)."""
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p0 = torch.tensor([3.0, 4.0], dtype=torch.float64)
    u = torch.tensor([1.0, -1.0], dtype=torch.float64)
    r = 5.0 / math.sqrt(2.0)
    for wd, adam, ratio in ((0.0, False, 1.0), (0.1, False, r), (0.1, True, 1.0)):
        p = nn.Parameter(p0.clone())
        p.grad = g.clone()
        Lamb([p], lr=0.5, eps=0.0, weight_decay=wd, decouple=True, adam=adam, foreach=foreach).step()
        torch.testing.assert_close(p.detach(), (p0 - 0.5 * ratio * u) * (1 - wd))


def test_lamb_zero_weight_falls_back_to_ratio_one():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.tensor([2.0, -1.0], dtype=torch.float64)
    Lamb([{"params": [p], "layer_adaptation": True}], lr=0.1, eps=0.0).step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64))


def test_warmup_cosine_values():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sch = WarmupCosineDecayLR(opt, warmup_steps=4, total_steps=14, rate=0.8)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    for s in (4, 9, 14, 15):
        expected = 0.5 * 2.0 * (1 + math.cos(0.8 * math.pi * (s - 4) / 10))
        assert lrs[s] == pytest.approx(expected)
    assert lrs[14] == pytest.approx(2.0 * 0.5 * (1 + math.cos(0.8 * math.pi)))  # ~9.5 % floor
    # state round trip
    sch2 = WarmupCosineDecayLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0), 4, 14, 0.8)
    sch2.load_state_dict(sch.state_dict())
    assert sch2.last_epoch == sch.last_epoch
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineDecayLR(opt, warmup_steps=10, total_steps=5)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.emb = nn.Embedding(4, 3)
        self.latents = nn.Parameter(torch.zeros(2, 3))
        self.preconditioning = nn.Linear(3, 1)


def test_param_groups_follow_published_split():
    m = _Tiny()
    groups = param_groups(m, 0.01)
    names = {id(p): n for n, p in m.named_parameters()}
    g1 = sorted(names[id(p)] for p in groups[0]["params"])
    g2 = sorted(names[id(p)] for p in groups[1]["params"])
    assert g1 == ["latents", "lin.weight", "preconditioning.bias", "preconditioning.weight"]
    assert g2 == ["emb.weight", "lin.bias", "norm.bias", "norm.weight"]
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["layer_adaptation"] and not groups[1]["layer_adaptation"]


def test_build_optimizer_names():
    m = _Tiny()
    assert isinstance(build_optimizer(m, OptimizerConfig(name="lamb")), Lamb)
    assert isinstance(build_optimizer(m, OptimizerConfig(name="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"one of \['lamb', 'adamw'\]"):
        build_optimizer(m, OptimizerConfig(name="sgd"))


def test_scheduler_resume_keeps_configured_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    old = WarmupCosineDecayLR(opt, warmup_steps=2, total_steps=10)
    for _ in range(5):
        opt.step()
        old.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    new = WarmupCosineDecayLR(opt2, warmup_steps=2, total_steps=100)  # the run was extended
    new.load_state_dict(old.state_dict())
    assert new.last_epoch == 5 and new.total_steps == 100
    opt2.step()
    new.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(new.factor(6))
