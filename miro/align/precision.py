"""Mixed precision for SRPO: float32 trained weights, frozen weights in their stored dtype, and
forwards under autocast so the two meet.

Upstream trains the FLUX transformer with float32 parameters and a bf16-autocast forward (FSDP
MixedPrecision with fp32 params; facts §5). Updating bf16 weights in place loses most steps: an
AdamW step moves a weight by about ``lr`` = 5e-6, far below bf16's relative spacing of 2^-8, so it
rounds away (20 steps moved 7.8 % of bf16 weights, by 1/11 of the intended step on
average; docs/benchmarks.md, "Why trained weights stay float32").
diffusers' ``cast_training_params`` keeps LoRA adapters in float32 for the same reason.
"""

from __future__ import annotations

import contextlib

import torch


def cast_trainable_params(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Store every parameter with ``requires_grad`` in ``dtype`` (the optimiser's master weights);
    frozen ones keep theirs. Returns how many tensors were cast."""
    n = 0
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


# Fabric precisions that keep parameters as they are (float32 masters stay float32). The "-true"
# half precisions, and transformer-engine, cast the whole module in ``fabric.setup``, after
# :func:`cast_trainable_params` ran: every optimiser step would then land on bf16 weights.
TRAINING_PRECISIONS = ("auto", "32-true", "32", "64-true", "64", "bf16-mixed", "bf16", "16-mixed", "16")


def check_training_precision(key: str, precision: str) -> None:
    """Refuse a Fabric precision that would store the trained weights below float32."""
    if precision not in TRAINING_PRECISIONS:
        half = "true" in str(precision) or "transformer" in str(precision)
        hint = (" (it would cast the float32 trained weights to half precision, where small optimiser"
                " steps round away; frozen weights keep the dtype they were loaded in, so bf16-mixed"
                " saves the same memory)" if half else "")
        raise ValueError(f"{key} must be one of {', '.join(TRAINING_PRECISIONS)}; got {precision!r}{hint}")


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The narrowest floating dtype among the module's parameters: the compute dtype of a model
    loaded in bf16, whether or not its trained weights were since cast to float32."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` to ``dtype`` on ``device`` for weights stored below float32 (on CPU too,
    where Fabric's ``32-true`` sets none); for float32 a no-op that leaves an outer autocast
    (Fabric's ``bf16-mixed``) in force."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
