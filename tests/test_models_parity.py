"""Float32 parity with the published implementation (fixtures from benchmarks/make_parity_fixture.py).

Contract: torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max()).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miro.models import LossConfig, MiroModel, euler_sample, flow_loss


FIX = Path(__file__).parent / "fixtures" / "parity"
NAMES = ["parity_main", "parity_concat"]


def close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def load(name):
    config = json.loads((FIX / f"{name}.json").read_text())
    model = MiroModel.from_config(config)
    model.load_state_dict_checked(load_file(str(FIX / f"{name}.safetensors")))
    cases = load_file(str(FIX / f"{name}_cases.safetensors"))
    coh = {k[4:]: v for k, v in cases.items() if k.startswith("coh.")}
    return model.eval(), cases, coh


@pytest.mark.parametrize("name", NAMES)
def test_network_forward_eval_and_train(name):
    model, c, coh = load(name)
    net = model.network
    coh_eval = {k: v for k, v in coh.items() if k != "hpsv2_score"}
    with torch.no_grad():
        f, z = net(c["y"], c["gamma"], c["emb"], c["mask"], coh_eval, c["prev"])
        close(f, c["eval_F"])
        close(z, c["eval_z"])
        net.train()
        f, z = net(c["y"], c["gamma"], c["emb"], c["mask"], coh, c["prev"])
        net.eval()
    close(f, c["train_F"])
    close(z, c["train_z"])


@pytest.mark.parametrize("name", NAMES)
def test_network_forward_with_batch_wide_text_padding(name):
    """Our trimming of text columns padded in every sample keeps parity with the full computation."""
    model, c, coh = load(name)
    coh_eval = {k: v for k, v in coh.items() if k != "hpsv2_score"}
    with torch.no_grad():
        f, z = model.network(c["y"], c["gamma"], c["emb"], c["trim_mask"], coh_eval, c["prev"])
    close(f, c["trim_F"])
    close(z, c["trim_z"])


@pytest.mark.parametrize("name", NAMES)
def test_preconditioned_forward_with_logvar(name):
    model, c, coh = load(name)
    coh_eval = {k: v for k, v in coh.items() if k != "hpsv2_score"}
    with torch.no_grad():
        d, z, logvar = model(c["y"], c["gamma"], c["emb"], c["mask"], coh_eval, None, return_logvar=True)
    close(d, c["precond_D"])
    close(z, c["precond_z"])
    close(logvar, c["precond_logvar"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tag", ["cfg_long", "cfg_short"])
def test_cfg_euler_sampler(name, tag):
    model, c, _ = load(name)
    keys = model.coherence_keys
    steps, w = c[f"{tag}_meta"].tolist()
    pos = dict(zip(keys, c[f"{tag}_pos"].tolist()))
    neg = dict(zip(keys, c[f"{tag}_neg"].tolist()))
    out = euler_sample(model, c[f"{tag}_noise"], c[f"{tag}_emb"], c[f"{tag}_mask"], c[f"{tag}_uncond"], None,
                       pos, neg, num_steps=int(steps), guidance_scale=w)
    close(out, c[f"{tag}_out"])


@pytest.mark.parametrize("name", NAMES)
def test_training_loss_and_gradients(name):
    model, c, coh = load(name)
    model.train()
    cfg = LossConfig(self_cond_rate=0.9, cond_drop_rate=0.5, do_gradnorm_reweighting=True)
    loss, logs = flow_loss(model, c["loss_x0"], c["emb"], c["mask"], coh, c["loss_uncond"][0:1], cfg,
                           torch.Generator().manual_seed(7))
    loss.backward()
    close(loss.detach(), c["loss_value"])
    for k in ("raw_loss", "logvar", "loss_gradnorm_reweighted"):
        close(logs[k], c[f"loss_log.{k}"])
    params = dict(model.network.named_parameters())
    params.update({"pre." + k: v for k, v in model.preconditioning.named_parameters()})
    grads = {k[5:]: v for k, v in c.items() if k.startswith("grad.")}
    assert len(grads) >= 5
    for k, ref in grads.items():
        close(params[k].grad, ref)
