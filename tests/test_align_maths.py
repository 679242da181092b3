"""Direct-Align maths, schedules, relative reward and the branch logic of one SRPO step."""

from __future__ import annotations

import pytest
import torch

from miro.align.direct_align import (
    DirectAlignSchedule,
    add_noise,
    direct_align_branch,
    discount_schedule,
    recover_x0,
    rollout_sigmas,
    shift_sigma,
)
from miro.align.relative_reward import RelativeRewardConfig, SemanticRelativeReward, cosine_similarity, relative_reward, srpo_loss
from miro.rewards.base import Scorer


def _pair(seed=0, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_renoise_recover_is_identity():
    x0, eps = _pair()
    for s in (0.0, 0.3, 0.75, 0.9643):
        torch.testing.assert_close(recover_x0(add_noise(x0, eps, s), eps, s), x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigmas", [(0.9, 0.8), (0.8, 0.9), (0.96, 0.75)])
def test_branch_with_true_velocity_recovers_x0(sigmas):
    # With the true velocity v = eps - x0 one Euler step stays on the straight path, so x0_hat = x0.
    x0, eps = _pair(1)
    calls = []

    def true_v(x, s):
        calls.append(s)
        return eps - x0

    out = direct_align_branch(true_v, x0, eps, *sigmas)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    assert float(calls[0][0]) == pytest.approx(sigmas[0])


def test_branch_with_wrong_velocity_does_not_recover():
    x0, eps = _pair(2)
    out = direct_align_branch(lambda x, s: torch.zeros_like(x), x0, eps, 0.9, 0.8)
    assert not torch.allclose(out, x0)


def test_gradients_reach_only_the_velocity_parameters():
    x0, eps = _pair(3, (2, 8))
    x0, eps = x0.float().requires_grad_(True), eps.float()
    lin = torch.nn.Linear(8, 8)
    out = direct_align_branch(lambda x, s: lin(x), x0, eps, 0.9, 0.8)
    out.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert x0.grad is None  # the re-noised input is built without gradient


def test_shift_matches_flow_convention():
    from miro.models.flow import flux_shift_to_gamma_shift, shift_gamma

    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    ours = shift_sigma(s, 3.0)
    via_gamma = 1 - shift_gamma(1 - s, flux_shift_to_gamma_shift(3.0))
    torch.testing.assert_close(ours, via_gamma, rtol=0, atol=1e-12)
    assert float(rollout_sigmas(25, 3.0)[0]) == 1.0 and float(rollout_sigmas(25, 3.0)[-1]) == 0.0


def test_schedule_window_and_gap_match_the_published_numbers():
    hps = DirectAlignSchedule()
    sig = hps.sigmas()
    assert len(sig) == 1000
    assert float(sig[0]) == pytest.approx(0.964285714, abs=1e-8)  # shift_3(1 - 5/50)
    assert float(sig[-1]) == pytest.approx(0.75, abs=1e-12)  # shift_3(1 - 25/50)
    assert float(DirectAlignSchedule(train_timestep=(5, 30)).sigmas()[-1]) == pytest.approx(2 / 3, abs=1e-12)
    assert hps.gap == 100
    custom = DirectAlignSchedule(sigma_range=(0.95, 0.4)).sigmas()
    assert float(custom[0]) == pytest.approx(0.95) and float(custom[-1]) == pytest.approx(0.4)


def test_both_branches_recover_at_the_same_sigma_for_every_index():
    sched = DirectAlignSchedule(timestep_length=200)
    for sel in range(sched.sel_margin, 200 - sched.sel_margin + 1):
        s_hi, s_m = sched.denoise_sigmas(sel)
        s_lo, s_m2, j = sched.inversion_sigmas(sel)
        assert s_m == s_m2
        assert s_hi > s_m > s_lo
        assert 1 <= j < sel


@pytest.mark.parametrize("window", [{"sigma_range": (1.0, 0.7)}, {"train_timestep": (0, 25)}], ids=["sigma_range", "train_timestep"])
def test_a_window_reaching_sigma_one_works_for_every_index(window):
    # σ_from = 1 is x_1 = ε, where every rollout starts; only the recovery divides, by 1 − σ_to,
    # and σ_to < 1 for every index. The noisiest indices (sel >= 900 here) give σ_hi = 1.
    sched = DirectAlignSchedule(**window)
    x0, eps = _pair(3)

    def true_v(x, s):
        return eps - x0

    his = set()
    for sel in range(sched.sel_margin, sched.timestep_length - sched.sel_margin + 1):
        s_hi, s_m = sched.denoise_sigmas(sel)
        s_lo, _, _ = sched.inversion_sigmas(sel)
        his.add(s_hi)
        for a, b in ((s_hi, s_m), (s_lo, s_m)):
            torch.testing.assert_close(direct_align_branch(true_v, x0, eps, a, b), x0, rtol=0, atol=1e-9)
    assert 1.0 in his
    with pytest.raises(ValueError, match="sigma_to < 1"):
        direct_align_branch(true_v, x0, eps, 0.9, 1.0)


def test_sample_index_range_and_reproducibility():
    sched = DirectAlignSchedule()
    draws = [sched.sample_index(torch.Generator().manual_seed(i)) for i in range(200)]
    assert min(draws) >= 5 and max(draws) <= 995
    assert draws == [sched.sample_index(torch.Generator().manual_seed(i)) for i in range(200)]


def test_discount_schedules_index_ends():
    inv, den = discount_schedule((0.3, 0.01)), discount_schedule((0.1, 0.25))
    assert float(inv[0]) == pytest.approx(0.3) and float(inv[-1]) == pytest.approx(0.01)
    assert float(den[0]) == pytest.approx(0.1) and float(den[-1]) == pytest.approx(0.25)
    assert float(den[500]) == pytest.approx(0.1 + 0.15 * 500 / 999)
    with pytest.raises(ValueError, match="two ends"):
        discount_schedule((0.1, 0.2, 0.3))


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="train_timestep"):
        DirectAlignSchedule(train_timestep=(30, 5))
    with pytest.raises(ValueError, match="sigma_range"):
        DirectAlignSchedule(sigma_range=(0.4, 0.9))
    with pytest.raises(ValueError, match="groundtruth_ratio"):
        DirectAlignSchedule(groundtruth_ratio=1.5)


class _FixedScorer(Scorer):
    differentiable = True

    def __init__(self, img, texts, logit_scale=None):
        self.img, self.texts, self.logit_scale = img, texts, logit_scale

    def embed_image(self, images):
        return self.img[: images.shape[0]] * images.mean()  # scale-free under cosine, keeps the graph

    def embed_text(self, prompts):
        return torch.stack([self.texts[p] for p in prompts])


def test_relative_reward_on_hand_made_embeddings():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    texts = {"pos": torch.tensor([2.0, 0.0]), "neg": torch.tensor([0.0, 3.0])}
    rr = SemanticRelativeReward(_FixedScorer(img, texts))
    images = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)
    out = rr(images, ["pos", "pos"], ["neg", "neg"], 0.25)
    # cos(img, pos) = [1, 0.6], cos(img, neg) = [0, 0.8]; r = 1.25 * cos_pos - cos_neg
    torch.testing.assert_close(out["reward"], torch.tensor([1.25, 0.75 - 0.8]))
    out["reward"].sum().backward()
    assert images.grad is not None
    # logit variant: exp(logit_scale) * cos / 20
    rl = SemanticRelativeReward(_FixedScorer(img, texts, logit_scale=torch.tensor(100.0).log()), RelativeRewardConfig(similarity="logit"))
    torch.testing.assert_close(rl(images.detach(), ["pos"] * 2, ["neg"] * 2, 0.0)["reward"], 5.0 * torch.tensor([1.0, 0.6 - 0.8]))


def test_relative_reward_formula_and_losses():
    s_pos, s_neg = torch.tensor([0.3, 0.2]), torch.tensor([0.25, 0.3])
    torch.testing.assert_close(relative_reward(s_pos, s_neg, 0.1), torch.tensor([1.1 * 0.3 - 0.25, 1.1 * 0.2 - 0.3]))
    r = torch.tensor([0.1, 0.9])
    torch.testing.assert_close(srpo_loss(r, "hinge", 0.7), torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(srpo_loss(r, "maximize"), -r)
    with pytest.raises(ValueError, match="unknown loss"):
        srpo_loss(r, "mse")
    torch.testing.assert_close(cosine_similarity(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])), torch.tensor([0.96]))


def test_relative_reward_rejects_non_differentiable_scorer():
    class _Plain(Scorer):
        differentiable = False

    with pytest.raises(ValueError, match="not differentiable"):
        SemanticRelativeReward(_Plain())


class _Target:
    device = torch.device("cpu")

    def __init__(self):
        self.lin = torch.nn.Linear(4, 4)

    def latent_shape(self, b):
        return (b, 4)

    def encode_condition(self, captions):
        return None

    def velocity(self, x, s, cond):
        return self.lin(x)

    def rollout(self, noise, cond, num_steps, shift):
        return noise * 0.5

    def decode(self, x0):
        return x0.sigmoid()[:, None, :, None].expand(-1, 3, 4, 4)


def test_step_swaps_prompts_and_discounts_in_the_inversion_branch():
    from miro.align.prompts import PromptConfig
    from miro.align.step import StepConfig, srpo_step

    calls = []

    class _Reward:
        def __call__(self, images, pos, neg, k):
            calls.append((list(pos), list(neg), float(k)))
            r = images.mean((1, 2, 3))
            return {"reward": r, "s_pos": r, "s_neg": r}

    cfg = StepConfig(prompts=PromptConfig(pos_prompt="P", neg_prompt="N"), rollout_steps=2)
    g = torch.Generator().manual_seed(0)
    m = srpo_step(_Target(), _Reward(), cfg, {"items": [{"caption": "c"}]}, g, step=0)
    sel = int(m["sel"])
    j = cfg.schedule.inversion_sigmas(sel)[2]
    assert calls[0][:2] == (["P"], ["N"]) and calls[1][:2] == (["N"], ["P"])
    assert calls[0][2] == pytest.approx(float(discount_schedule(cfg.discount_denoise)[sel]))
    assert calls[1][2] == pytest.approx(float(discount_schedule(cfg.discount_inv)[j]))
    assert m["denoise/sigma_to"] == m["inversion/sigma_to"]
    calls.clear()
    srpo_step(_Target(), _Reward(), StepConfig(inversion=False, rollout_steps=2), {"items": [{"caption": "c"}]}, g, 0)
    assert len(calls) == 1


def test_metrics_s_pos_is_the_positive_prompt_in_both_branches():
    # The inversion branch scores with p+ and p− swapped; its logged s_pos must still be the
    # similarity to the item's p+ (docs/alignment.md), not to whichever prompt came first.
    from miro.align.prompts import PromptConfig
    from miro.align.step import StepConfig, srpo_step

    sim = {"P": 0.25, "N": -0.5}

    def reward(images, pos, neg, k):
        s_pos, s_neg = torch.full((1,), sim[pos[0]]), torch.full((1,), sim[neg[0]])
        return {"reward": images.mean((1, 2, 3)) + (1 + k) * s_pos - s_neg, "s_pos": s_pos, "s_neg": s_neg}

    cfg = StepConfig(prompts=PromptConfig(pos_prompt="P", neg_prompt="N"), rollout_steps=2)
    m = srpo_step(_Target(), reward, cfg, {"items": [{"caption": "c"}]}, torch.Generator().manual_seed(0), step=0)
    assert m["denoise/s_pos"] == m["inversion/s_pos"] == 0.25
    assert m["denoise/s_neg"] == m["inversion/s_neg"] == -0.5
