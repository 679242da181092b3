"""Exponential moving averages of model weights, kept inside the LightningModule.

Standard EMA, from step 0: after every optimizer step, for each decay d,
``ema ← d·ema + (1 − d)·param`` (CAD's callback used ``ema.lerp(param, d)``, which is
``ema + d·(param − ema)`` and nearly copies the weights; the fact sheet §4 says to use the
standard form). Buffers (Fourier frequencies, normalisation constants, masks) are copied.

The copies are sub-modules with ``requires_grad=False``, so they travel in ``state_dict`` and
therefore in ``last.ckpt`` (resume restores them), DDP ignores them, and they work under FSDP,
unlike ``lightning``'s ``WeightAveraging`` callback (ecosystem facts §3). The released
``network.`` weights are the EMA weights (decay 0.9999), so sampling and export use these copies.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn


def _suffix(decay: float) -> str:
    return format(decay, ".10g").replace(".", "_").replace("-", "m")


class EMA(nn.Module):
    """One EMA copy of ``model`` per decay, stored under ``ema_<decay>`` (e.g. ``ema_0_9999``)."""

    def __init__(self, model: nn.Module, decays: Sequence[float] = (0.9999,)):
        super().__init__()
        decays = [float(d) for d in (decays if isinstance(decays, (list, tuple)) else [decays])]
        if not decays:
            raise ValueError("EMA needs at least one decay")
        for d in decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"EMA decay must be in [0, 1); got {d}")
        if len(set(decays)) != len(decays):
            raise ValueError(f"EMA decays must be distinct; got {decays}")
        self.decays = decays
        self.names = [f"ema_{_suffix(d)}" for d in decays]
        for name in self.names:
            shadow = copy.deepcopy(model).requires_grad_(False).eval()
            self.add_module(name, shadow)

    def model(self, index: int = 0) -> nn.Module:
        """The EMA copy for ``decays[index]`` (index 0 = the default, exported one)."""
        return getattr(self, self.names[index])

    def train(self, mode: bool = True) -> "EMA":
        # The copies stay in eval mode: they are only ever used for sampling and export.
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        params = [p for p in model.parameters()]
        bufs = [b for b in model.buffers()]
        for d, name in zip(self.decays, self.names):
            shadow = getattr(self, name)
            s_params = list(shadow.parameters())
            if len(s_params) != len(params):
                raise RuntimeError("EMA copy and model have different parameter lists")
            floats = [(s, p.detach()) for s, p in zip(s_params, params) if s.dtype.is_floating_point]
            if floats:
                ss, pp = zip(*floats)
                pp = [p.to(s.dtype) for s, p in zip(ss, pp)]
                # ema = d*ema + (1-d)*p, fused over all tensors
                torch._foreach_lerp_(list(ss), pp, 1.0 - d)
            for s, b in zip(shadow.buffers(), bufs):
                s.copy_(b)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset every copy to ``model``'s weights (e.g. when fine-tuning from new weights)."""
        for name in self.names:
            getattr(self, name).load_state_dict(model.state_dict())
