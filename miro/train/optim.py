"""Optimisers and learning-rate schedule of the MIRO/CAD recipe.

* :class:`Lamb` — LAMB (You et al. 2020) with the published semantics of MIRO's
  ``utils/optimizers.py`` (numerics spec §8.2): bias-corrected Adam direction ``u = m̂/(√v̂+ε)``,
  per-tensor trust ratio ``‖p‖/‖u‖`` (1 when either norm is 0, unclipped), weight decay either
  coupled (``u += wd·p`` before the trust ratio, CAD's recipe) or decoupled
  (``p ← p·(1 − wd)`` after the step, *not* scaled by lr — MIRO's default).
* :class:`WarmupCosineDecayLR` — linear warmup then ``½·base·(1 + cos(ρπ(s − W)/(T − W)))``
  (spec §8.3; CAD ``utils/lr_scheduler.py`` uses ρ = 0.8), stepped with the optimizer step index.
* :func:`param_groups` — the published two groups (spec §8.1): weights with decay and layer
  adaptation; norms, embeddings and biases without.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


class Lamb(torch.optim.Optimizer):
    """LAMB with per-group ``layer_adaptation`` and coupled or decoupled weight decay.

    A group without a ``layer_adaptation`` key adapts iff its weight decay is > 0 (as published).
    ``adam=True`` turns the trust ratio off everywhere (plain Adam with the same decay rule).
    ``foreach``: each group's update as a handful of multi-tensor ops instead of a dozen ops per
    tensor, with the same arithmetic. ``None`` (default) chooses as ``torch.optim`` does: foreach
    for CUDA tensors, where the per-tensor loop is launch-bound (×1.28–1.30 on the release step,
    H200), the loop on the CPU, where the group-wide temporaries of the release model make foreach
    slower (×0.77–0.81; ``benchmarks/bench_optim.py``, docs/benchmarks.md "One GPU").
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decouple: bool = True, adam: bool = False, foreach: bool | None = None):
        if lr < 0:
            raise ValueError(f"Lamb lr must be >= 0; got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb betas must be in [0, 1); got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"Lamb eps and weight_decay must be >= 0; got eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decouple=decouple, adam=adam,
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            if not params:
                continue
            foreach = group.get("foreach")
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            (_foreach_update if foreach else _loop_update)(params, [self.state[p] for p in params], group)
        return loss


def _group_hyper(group: dict):
    b1, b2 = group["betas"]
    adapt = group.get("layer_adaptation", group["weight_decay"] > 0) and not group["adam"]
    return b1, b2, group["weight_decay"], group["eps"], group["lr"], group["decouple"], adapt


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    """‖p‖/‖u‖, or 1 where either norm is 0 (unclipped, as published)."""
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


def _loop_update(params: list, states: list, group: dict) -> None:
    """One tensor at a time (the reference form of the update)."""
    b1, b2, wd, eps, lr, decouple, adapt = _group_hyper(group)
    for p, state in zip(params, states):
        g, m, v, s = p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = (m / (1 - b1**s)) / ((v / (1 - b2**s)).sqrt().add_(eps))
        if wd != 0 and not decouple:
            u.add_(p, alpha=wd)
        if adapt:
            u.mul_(_trust_ratio(p.norm(2), u.norm(2)))
        p.add_(u, alpha=-lr)
        if wd != 0 and decouple:
            p.mul_(1 - wd)


def _foreach_update(params: list, states: list, group: dict) -> None:
    """The same update over the whole group with multi-tensor (``torch._foreach_*``) ops."""
    b1, b2, wd, eps, lr, decouple, adapt = _group_hyper(group)
    grads = [p.grad for p in params]
    ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, grads, alpha=1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
    den = torch._foreach_div(vs, [1 - b2 ** st["step"] for st in states])
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, eps)
    u = torch._foreach_div(ms, [1 - b1 ** st["step"] for st in states])
    torch._foreach_div_(u, den)
    del den
    if wd != 0 and not decouple:
        torch._foreach_add_(u, params, alpha=wd)
    if adapt:  # per-tensor trust ratios, computed together: no host sync
        ratio = _trust_ratio(torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(u)))
        torch._foreach_mul_(u, list(ratio.unbind(0)))
    torch._foreach_add_(params, u, alpha=-lr)
    if wd != 0 and decouple:
        torch._foreach_mul_(params, 1 - wd)


class WarmupCosineDecayLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup over ``warmup_steps`` then cosine decay towards step ``total_steps``.

    ``lr(s) = base·min(s/max(W,1), 1)`` for ``s < W``, else ``½·base·(1 + cos(ρπ(s−W)/(T−W)))``;
    no clamp past T (ρ < 1 keeps a floor: ρ = 0.8 ends at ≈ 9.5 % of base).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, rate: float = 1.0,
                 last_epoch: int = -1):
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps; got warmup_steps={warmup_steps}, "
                             f"total_steps={total_steps}")
        self.warmup_steps, self.total_steps, self.rate = int(warmup_steps), int(total_steps), float(rate)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        w, t = self.warmup_steps, self.total_steps
        if step < w:
            return min(step / max(w, 1), 1.0)
        return 0.5 * (1.0 + math.cos(self.rate * math.pi * (step - w) / (t - w)))

    def load_state_dict(self, state_dict: dict) -> None:
        # The configured schedule wins over the checkpoint's (raising max_steps to extend a run
        # re-targets the cosine); only the position and base lrs are restored.
        keep = {k: getattr(self, k) for k in ("warmup_steps", "total_steps", "rate")}
        super().load_state_dict(state_dict)
        self.__dict__.update(keep)
        # The groups' lr was stored under the old schedule: the next step would run at it.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


# Module types whose parameters never get weight decay (spec §8.1; RMSNorm by class name so that
# our own and torch's both match).
_NO_DECAY_TYPES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm)


def _no_decay_module(m: nn.Module) -> bool:
    return isinstance(m, _NO_DECAY_TYPES) or "RMSNorm" in type(m).__name__


def param_groups(model: nn.Module, weight_decay: float, always_decay_prefixes: Iterable[str] = ("preconditioning.",)
                 ) -> list[dict]:
    """Two groups: (weights, wd, adaptation) and (norms/embeddings/biases, no wd, no adaptation).

    Parameters under ``always_decay_prefixes`` (the learned log-variance head of the
    preconditioning, as published) all join the first group, biases included.
    """
    no_decay: set[str] = set()
    for mname, module in model.named_modules():
        if _no_decay_module(module):
            for pname, _ in module.named_parameters(recurse=False):
                no_decay.add(f"{mname}.{pname}" if mname else pname)
    decay_params, other_params = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        forced = any(name.startswith(pre) for pre in always_decay_prefixes)
        if forced or (name not in no_decay and "bias" not in name.rsplit(".", 1)[-1]):
            decay_params.append(p)
        else:
            other_params.append(p)
    return [
        {"params": decay_params, "weight_decay": weight_decay, "layer_adaptation": True},
        {"params": other_params, "weight_decay": 0.0, "layer_adaptation": False},
    ]


@dataclass
class OptimizerConfig:
    name: str = "lamb"  # "lamb" (published) or "adamw"
    lr: float = 1e-3  # base learning rate (CAD cad_256: 1e-3 with LAMB)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moments (CAD lamb.yaml)
    eps: float = 1e-8  # added outside the square root
    weight_decay: float = 0.01  # CAD lamb.yaml; coupled (L2 in the update) unless decouple
    decouple: bool = False  # lamb only; MIRO's LAMB default is True (p·(1−wd) per step, lr-free): only for tiny wd
    exclude_norms_and_biases: bool = True  # two groups as published; False puts everything in one


@dataclass
class SchedulerConfig:
    warmup_steps: int = 50_000  # CAD cad_256 (MIRO's value unpublished)
    total_steps: int = 500_000  # MIRO release: 500k steps
    rate: float = 0.8  # CAD WarmupCosineDecayLR rate


OPTIMIZERS = ("lamb", "adamw")  # the names ``OptimizerConfig.name`` takes (case-insensitive)


def check_optimizer_name(name) -> str:
    """``name`` lower-cased if it is one of :data:`OPTIMIZERS`; a ValueError naming it otherwise."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {list(OPTIMIZERS)}; got {name!r}")
    return name.lower()


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Optimizer over ``model``'s trainable parameters per ``cfg``."""
    name = check_optimizer_name(cfg.name)
    if cfg.exclude_norms_and_biases:
        groups = param_groups(model, cfg.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay,
                   "layer_adaptation": True}]
    groups = [g for g in groups if g["params"]]
    if name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                    decouple=cfg.decouple)
    for g in groups:  # adamw: no layer adaptation
        g.pop("layer_adaptation", None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
