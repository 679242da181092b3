"""Exponential moving averages of model weights, kept inside the LightningModule.

Standard EMA, from step 0: after every optimizer step, for each decay d,
``ema ← d·ema + (1 − d)·param`` (CAD's callback used ``ema.lerp(param, d)``, which is
``ema + d·(param − ema)`` and nearly copies the weights; the fact sheet §4 says to use the
standard form). Buffers (Fourier frequencies, normalisation constants, masks) are copied.

The copies are sub-modules with ``requires_grad=False``, so they travel in ``state_dict`` and
therefore in ``last.ckpt`` (resume restores them), DDP ignores them, and they work under FSDP,
unlike ``lightning``'s ``WeightAveraging`` callback (ecosystem facts §3). The released
``network.`` weights are the EMA weights (decay 0.9999), so sampling and export use these copies.

Warm-up (opt-in, ``warmup=True``): at optimizer step ``n`` (0-based) the decay used is
``min(d, (1 + n) / (10 + n))``, the ``num_updates`` form of TensorFlow's
``ExponentialMovingAverage``. Without it a copy keeps a ``d^n`` share of the random
initialisation (0.999^2000 = 14%), which dominates short runs; the published recipe (500k steps
at 0.9999, where the share is 2e-22) has none, so it is off by default. The step comes from the
trainer, so resuming needs no extra state.
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

    def __init__(self, model: nn.Module, decays: Sequence[float] = (0.9999,), warmup: bool = False):
        super().__init__()
        self.warmup = bool(warmup)
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

    def effective_decay(self, decay: float, step: int | None) -> float:
        """The decay applied at optimizer step ``step`` (0-based), after the optional warm-up."""
        if not self.warmup or step is None:
            return decay
        if step < 0:
            raise ValueError(f"EMA step must be >= 0; got {step}")
        return min(decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """One EMA step towards ``model``'s current weights (``step``: the optimizer step, for
        the warm-up)."""
        params = [p for p in model.parameters()]
        bufs = [b for b in model.buffers()]
        for d, name in zip(self.decays, self.names):
            d = self.effective_decay(d, step)
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
