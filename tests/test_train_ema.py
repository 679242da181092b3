import pytest
import torch
from torch import nn

from miro.train.ema import EMA


def test_ema_closed_form_multiple_decays():
    model = nn.Linear(2, 2)
    model.register_buffer("const", torch.zeros(1))
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decays=[0.9, 0.5])
    assert ema.names == ["ema_0_9", "ema_0_5"]
    # the model's weights jump to the constant c after every step: ema_n = c + d^n (w0 - c)
    c, n = 3.0, 5
    for _ in range(n):
        with torch.no_grad():
            model.weight.fill_(c)
            model.const.fill_(7.0)
        ema.update(model)
    for i, d in enumerate([0.9, 0.5]):
        expected = c + d**n * (1.0 - c)
        torch.testing.assert_close(ema.model(i).weight, torch.full((2, 2), expected))
        assert ema.model(i).const.item() == 7.0  # buffers are copied
        assert not any(p.requires_grad for p in ema.model(i).parameters())


def test_ema_in_state_dict_and_eval_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    ema = EMA(model, decays=0.9999)
    ema.train()
    assert not ema.model().training
    assert any(k.startswith("ema_0_9999.") for k in ema.state_dict())


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA(nn.Linear(1, 1), decays=[1.0])
    with pytest.raises(ValueError, match="distinct"):
        EMA(nn.Linear(1, 1), decays=[0.9, 0.9])


def test_ema_warmup_closed_form():
    # constant target c: ema_n = c + prod_k d_k (w0 - c), with d_k = min(d, (1+k)/(10+k))
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decays=[0.999, 0.5], warmup=True)
    assert ema.effective_decay(0.999, 0) == pytest.approx(0.1)
    assert ema.effective_decay(0.5, 0) == pytest.approx(0.1) and ema.effective_decay(0.5, 100) == 0.5
    assert ema.effective_decay(0.999, 10**6) == 0.999
    c, n = 3.0, 12
    with torch.no_grad():
        model.weight.fill_(c)
    for k in range(n):
        ema.update(model, step=k)
    for i, d in enumerate([0.999, 0.5]):
        share = 1.0
        for k in range(n):
            share *= min(d, (1 + k) / (10 + k))
        torch.testing.assert_close(ema.model(i).weight, torch.full((1, 1), c + share * (1.0 - c)))
    # without warm-up (or without a step) the plain decay applies
    assert EMA(model, 0.999).effective_decay(0.999, 0) == 0.999
    assert ema.effective_decay(0.999, None) == 0.999
    with pytest.raises(ValueError, match="step"):
        ema.effective_decay(0.999, -1)


def test_default_decay_is_the_release_value():
    """Without decays the one copy is the release's 0.9999 EMA (spec §7): a step moves it 1e-4 of
    the way to the weights."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model)
    assert ema.decays == [0.9999] and ema.names == ["ema_0_9999"]
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.model().weight.item() == pytest.approx(1e-4, rel=1e-4)
