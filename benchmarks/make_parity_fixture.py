"""Generate the float32 parity fixture of the published implementation (``miro-t2i`` 0.1.4).

Run from the repository root (not part of the package; the published package is never imported
by ``miro``)::

    python benchmarks/make_parity_fixture.py --peer /tmp/peer/unpacked/miro \
        --scratch /tmp/miro_scratch --out tests/fixtures/parity

It copies the published package into ``<scratch>/miro_peer`` with its imports renamed (its top
level is also called ``miro``), puts ``einops`` from ``<scratch>/deps`` on the path
(``pip install einops --target <scratch>/deps``), builds small but complete networks (all seven
reward keys, self-conditioning, cond RIN blocks; and a variant with concatenated cond tokens),
perturbs every weight so that each path matters, and stores under ``--out``:

- ``<name>.safetensors``: the state dict in the published ``model.safetensors`` layout;
- ``<name>.json``: the pipeline config;
- ``<name>_cases.safetensors``: inputs and the published fp32 outputs (network forward in eval
  and train mode, eval with text padding shared by the whole batch, preconditioned forward with logvar, a CFG Euler run in both padding branches,
  one loss evaluation with its gradients).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from _args import ArgumentParser, run_main  # beside this script

from miro import REWARD_KEYS

# The published coherence_keys order (the fixture covers every reward path).
KEYS = list(REWARD_KEYS)

NETWORKS = {
    "parity_main": dict(
        data_size=8, data_dim=16, num_input_channels=4, num_latents=8, latents_dim=32, label_dim=24,
        num_processing_layers=1, num_blocks=2, patch_size=2, num_cond_tokens=0, read_write_heads=2,
        compute_heads=4, latent_mlp_multiplier=4, data_mlp_multiplier=4, use_cond_rin_block=True,
        concat_cond_token_to_latents=False, use_self_conditioning=True, num_text_registers=4,
        coherence_keys=KEYS, coherence_dropout=0.0, dropout_strategy="none",
    ),
    # Published flag defaults: cond tokens concatenated to the latents, plain RIN blocks, no
    # self-conditioning. num_cond_tokens = K + R + L so the zero previous latents fit.
    "parity_concat": dict(
        data_size=8, data_dim=16, num_input_channels=4, num_latents=4 + 7 + 2 + 5 + 1, latents_dim=16,
        label_dim=24, num_processing_layers=1, num_blocks=1, patch_size=4, num_cond_tokens=7 + 2 + 5,
        read_write_heads=2, compute_heads=2, latent_mlp_multiplier=1, data_mlp_multiplier=1,
        use_cond_rin_block=False, concat_cond_token_to_latents=True, use_self_conditioning=False,
        num_text_registers=2, coherence_keys=KEYS, coherence_dropout=0.0, dropout_strategy="none",
    ),
}


class PeerNotFoundError(FileNotFoundError):
    """The unpacked published package is not where ``--peer`` points."""


def check_peer(peer: Path) -> Path:
    """``peer`` if it holds the unpacked published package (its ``models`` package), else PeerNotFoundError."""
    peer = Path(peer)
    if not (peer / "models").is_dir():
        raise PeerNotFoundError(f"published package not found at {peer}; pass --peer DIR (see make_parity_fixture.py)")
    return peer


def load_peer(peer: Path, scratch: Path):
    peer = check_peer(peer)
    dst = scratch / "miro_peer"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(peer, dst, ignore=shutil.ignore_patterns("__pycache__", "assets", "app.py"))
    (dst / "__init__.py").write_text("")
    for f in dst.rglob("*.py"):
        s = f.read_text()
        s2 = re.sub(r"\b(from|import) miro\.", r"\1 miro_peer.", s)
        if s2 != s:
            f.write_text(s2)
    sys.path[:0] = [str(scratch), str(scratch / "deps")]
    from miro_peer.models.loss import FlowMatchingLoss
    from miro_peer.models.networks.rin import CADRINTextCond
    from miro_peer.models.preconditioning import FlowPrecond
    from miro_peer.models.sampler import flow_euler_sampler
    from miro_peer.models.scheduler import LinearScheduler

    return CADRINTextCond, FlowPrecond, FlowMatchingLoss, flow_euler_sampler, LinearScheduler


@torch.no_grad()
def perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    for p in module.parameters():
        if p.dtype.is_floating_point:
            p.add_(0.3 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 0.05))


def batch_dict(y, gamma, emb, mask, coh, prev):
    b = {"y": y.clone(), "gamma": gamma.clone(), "text_tokens_embeddings": emb.clone(),
         "text_tokens_mask": mask.clone(), "previous_latents": None if prev is None else prev.clone()}
    b.update({f"{k}_coherence": v.clone() for k, v in coh.items()})
    return b


def make(name: str, net_kwargs: dict, peer_classes, out: Path) -> None:
    CADRINTextCond, FlowPrecond, FlowMatchingLoss, flow_euler_sampler, LinearScheduler = peer_classes
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    net = CADRINTextCond(**net_kwargs)
    pre_kwargs = dict(num_latents=net_kwargs["num_latents"], latents_dim=net_kwargs["latents_dim"],
                      do_normalization="noise_driven", sigma_data=0.5, do_gradnorm_reweighting=True,
                      logvar_channels=16, logvar_mlp_layers=1)
    precond = FlowPrecond(**pre_kwargs)
    perturb(net, gen)
    perturb(precond, gen)
    net.eval()
    c, s = net_kwargs["num_input_channels"], net_kwargs["data_size"]
    n_l, d_l, e = net_kwargs["num_latents"], net_kwargs["latents_dim"], net_kwargs["label_dim"]
    b, length = 3, 5
    cases: dict[str, torch.Tensor] = {}

    y = torch.randn(b, c, s, s, generator=gen)
    gamma = torch.tensor([1e-9, 0.37, 0.93])
    emb = torch.randn(b, length, e, generator=gen)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 2:] = False
    mask[2, 4:] = False
    prev = torch.randn(b, n_l, d_l, generator=gen)
    coh = {k: torch.rand(b, generator=gen) for k in KEYS}
    coh["vqa_score"][1] = float("nan")  # NaN at eval -> zero embedding; in training -> value 0
    coh_eval = {k: v for k, v in coh.items() if k != "hpsv2_score"}  # a missing key at eval
    cases.update(y=y, gamma=gamma, emb=emb, mask=mask, prev=prev)
    cases.update({f"coh.{k}": v for k, v in coh.items()})

    f, z = net(batch_dict(y, gamma, emb, mask, coh_eval, prev))
    cases.update(eval_F=f, eval_z=z)
    trim_mask = mask.clone()
    trim_mask[:, 3:] = False  # trailing text columns padded in every sample
    f, z = net(batch_dict(y, gamma, emb, trim_mask, coh_eval, prev))
    cases.update(trim_mask=trim_mask, trim_F=f, trim_z=z)
    net.train()
    f, z = net(batch_dict(y, gamma, emb, mask, coh, prev))
    cases.update(train_F=f, train_z=z)
    net.eval()
    d, z, logvar = precond(net, batch_dict(y, gamma, emb, mask, coh_eval, None), return_logvar=True)
    cases.update(precond_D=d, precond_z=z, precond_logvar=logvar)

    # CFG Euler runs as the published pipeline drives them (fp32: sampling_dtype=float32).
    def run_sampler(tag, lc, lu, steps, w, pos, neg):
        noise = torch.randn(2, c, s, s, generator=gen)
        temb = torch.randn(2, lc, e, generator=gen)
        tmask = torch.ones(2, lc, dtype=torch.bool)
        tmask[1, lc - 1:] = False
        uemb = torch.randn(lu, e, generator=gen)
        batch = {"y": noise.clone(), "previous_latents": None, "text_tokens_embeddings": temb.clone(),
                 "text_tokens_mask": tmask.clone()}
        batch.update({f"{k}_coherence": torch.full((2,), pos[k]) for k in KEYS})
        uncond = {"text_tokens_embeddings": uemb[None].expand(2, -1, -1).contiguous(),
                  "text_tokens_mask": torch.ones(2, lu, dtype=torch.bool)}
        x = flow_euler_sampler(
            lambda bb: precond(net, bb), batch, num_steps=steps, scheduler=LinearScheduler(),
            conditioning_keys=["text_tokens"], uncond_tokens=uncond, cfg_rate=w,
            coherence_keys=[f"{k}_coherence" for k in KEYS],
            coherence_values={f"{k}_coherence": pos[k] for k in KEYS},
            uncoherence_values={f"{k}_coherence": neg[k] for k in KEYS},
            sampling_dtype=torch.float32,
        )
        cases.update({f"{tag}_noise": noise, f"{tag}_emb": temb, f"{tag}_mask": tmask,
                      f"{tag}_uncond": uemb, f"{tag}_out": x})
        cases[f"{tag}_meta"] = torch.tensor([steps, w])
        cases[f"{tag}_pos"] = torch.tensor([pos[k] for k in KEYS])
        cases[f"{tag}_neg"] = torch.tensor([neg[k] for k in KEYS])

    with torch.no_grad():
        pos = {k: float(torch.rand(1, generator=gen)) for k in KEYS}
        neg = {k: float(torch.rand(1, generator=gen)) * 0.5 for k in KEYS}
        run_sampler("cfg_long", length, 1, 4, 3.0, pos, neg)  # one-token uncond padded to L
        run_sampler("cfg_short", 2, 4, 3, 5.0, pos, {k: 0.0 for k in KEYS})  # cond padded to L_u

    # One training-loss evaluation with gradients.
    net.train()
    x0 = torch.randn(b, c, s, s, generator=gen)
    uncond = torch.randn(1, e, generator=gen)
    cases.update(loss_x0=x0, loss_uncond=uncond)
    loss_fn = FlowMatchingLoss(LinearScheduler(), uncond, self_cond_rate=0.9, cond_drop_rate=0.5,
                               do_gradnorm_reweighting=True)
    lgen = torch.Generator().manual_seed(7)
    batch = {"x_0": x0.clone(), "text_tokens_embeddings": emb.clone(), "text_tokens_mask": mask.clone()}
    batch.update({f"{k}_coherence": v.clone() for k, v in coh.items()})
    net.zero_grad()
    precond.zero_grad()
    loss, logs = loss_fn(precond, net, None, batch, 0, generator=lgen)
    loss.mean().backward()
    cases["loss_value"] = loss.mean().detach()
    for k, v in logs.items():
        cases[f"loss_log.{k}"] = v
    for pname, p in list(net.named_parameters()) + [("pre." + n, p) for n, p in precond.named_parameters()]:
        if p.grad is not None and any(t in pname for t in ("patch_extractor.weight", "latents", "map_text_tokens.weight",
                                                             "coherence_embedder.clip_score_coherence.map_time_input.weight",
                                                             "ln_previous_2.weight", "pre.logvar_proj.3.weight",
                                                             "text_registers", "layer_scale_1")):
            cases[f"grad.{pname}"] = p.grad.detach().clone()
    net.zero_grad()
    net.eval()

    from safetensors.torch import save_file

    state = {f"network.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    state.update({f"preconditioning.{k}": v.detach().contiguous() for k, v in precond.state_dict().items()})
    scale = torch.tensor([0.9, 1.1, 0.7, 1.3]).reshape(1, 4, 1, 1)
    bias = torch.tensor([0.1, -0.2, 0.0, 0.05]).reshape(1, 4, 1, 1)
    for prefix in ("data_preprocessing", "postprocessing"):
        state[f"{prefix}.scale"] = scale.clone()
        state[f"{prefix}.bias"] = bias.clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"{name}.safetensors"))
    save_file({k: v.contiguous() for k, v in cases.items()}, str(out / f"{name}_cases.safetensors"))
    config = {
        "network": net_kwargs,
        "preconditioning": pre_kwargs,
        "data_preprocessing": {"model_type": "identity", "scale": scale.flatten().tolist(), "bias": bias.flatten().tolist()},
        "postprocessing": {"model_type": "identity", "scale": scale.flatten().tolist(), "bias": bias.flatten().tolist()},
        "scheduler": {"start": 1, "end": 0, "shift": 1.0, "clip_min": 1e-9},
        "data_resolution": s,
        "max_text_len": length,
        "coherence_keys": KEYS,
    }
    (out / f"{name}.json").write_text(json.dumps(config, indent=1))
    size = sum((out / f).stat().st_size for f in (f"{name}.safetensors", f"{name}_cases.safetensors", f"{name}.json"))
    print(f"{name}: {len(state)} tensors, {size / 1e6:.2f} MB")


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", type=Path, default=Path("/tmp/peer/unpacked/miro"), help="unpacked published package")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/miro_scratch"), help="scratch dir (peer copy, deps)")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/parity"), help="fixture output folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    classes = load_peer(args.peer, args.scratch)
    for name, kw in NETWORKS.items():
        make(name, kw, classes, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
